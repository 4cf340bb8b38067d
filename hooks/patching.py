"""Activation patching at discourse positions ("wait"), within a model or across two models.

For each trajectory and each "wait" (an *anchor*), the residual stream entering block l
(`blocks.{l}.hook_resid_pre`, TransformerLens's convention) of the target model at the
position `wait + rel_pos` is replaced by the source model's state at the same content
position, and the target's forward continues. One source forward captures every needed
state; one clean target forward gives the baseline and its KV cache; each patched position
then re-runs only the tail after it (the forward before it is unchanged), all layers at once
as one batch (row j patches layer j). A metric that reads a *branch* (a prefix of the
trajectory followed by other tokens, e.g. the forced answer) gets one more such tail per
patched position, over the branch.

What a patch is measured by is a function passed in (`metrics`, as TransformerLens's
`patching_metric`): a name of a built-in (`hooks.patch_metrics`: ``forced_answer``,
``next_token_kl``, ``recheck``, and ``kl``/``gold_prob``), a `PatchMetric`, or a
``{"name": fn}`` mapping. All are read from the target, teacher-forced on the trajectory
rendered with the gold answer. Effects are patched minus clean (for a KL the KL itself: its
clean value is 0). A ``random`` control anchor per wait — a uniformly drawn non-discourse
reasoning token of the same trajectory *before* the wait, so its window, like the wait's,
precedes what the metrics read — is patched the same way and read where its wait is read.

`attribute` is attribution patching (the estimate lives in `hooks.attribution`): the
first-order estimate ``(a_source - a_target) · ∂metric/∂a_target`` at every (layer, position)
from one target forward + one backward per distinct scalar metric. Only differentiable
metrics that read the trajectory itself are attributed (a KL has zero gradient at the clean
point, its minimum).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import astuple

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from waitlens.hooks.attribution import attribution_estimates
from waitlens.hooks.models import LoadedModel
from waitlens.hooks.patch_cases import (
    DEFAULT_WINDOW,
    ROW_COLUMNS,
    PatchCase,
    PatchResult,
    PatchRow,
    Reads,
    parse_window,
    prepare_cases,
)
from waitlens.hooks.patch_metrics import (
    DEFAULT_METRICS,
    MetricError,
    MetricInput,
    PatchMetric,
    Read,
    resolve_metrics,
)
from waitlens.hooks.points import (
    StopForward,
    decoder_of,
    hook_name,
    lm_head_of,
    residual_hooks,
    resolve_layers,
)
from waitlens.traces.positions import Positions
from waitlens.traces.trajectory import Trajectory


# ---------------------------------------------------------------------------------------------
# forward passes
@torch.inference_mode()
def capture_resid_pre(model: LoadedModel, ids: Sequence[int], positions: Sequence[int],
                      layers: Sequence[int]) -> Float[Tensor, "layer pos d_model"]:
    """Residual states entering each of `layers` at `positions` (one forward, stopped early)."""
    layers = list(layers)
    out: dict[int, Tensor] = {}
    idx = torch.tensor(list(positions), dtype=torch.long)
    last = max(layers)

    def grab(layer):
        def fn(x):
            out[layer] = x[0, idx.to(x.device)].detach().clone()
            if layer == last:
                raise StopForward
        return fn

    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with residual_hooks(model, {hook_name(layer, "resid_pre"): grab(layer) for layer in layers}):
        try:
            decoder_of(model)(input_ids=x, use_cache=False)
        except StopForward:
            pass
    return torch.stack([out[layer] for layer in layers])


def run_patched(model: LoadedModel, ids: Sequence[int], patches: dict[tuple[int, int], Tensor], *,
                capture: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
    """One full forward with `patches` {(layer, position): state} applied at resid_pre.

    Returns the logits [pos, vocab] and the resid_pre states [pos, d_model] of the layers in
    `capture` (after patching). The reference implementation the fast grid is tested against.
    """
    by_layer: dict[int, list[tuple[int, Tensor]]] = {}
    for (layer, pos), v in patches.items():
        by_layer.setdefault(layer, []).append((pos, v))
    seen: dict[int, Tensor] = {}
    fns = {}
    for layer in sorted(set(by_layer) | set(capture)):
        def fn(x, layer=layer):
            if layer in by_layer:
                x = x.clone()
                for pos, v in by_layer[layer]:
                    x[0, pos] = v.to(x.dtype)
            if layer in capture:
                seen[layer] = x[0].detach().clone()
            return x if layer in by_layer else None
        fns[hook_name(layer, "resid_pre")] = fn
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.inference_mode(), residual_hooks(model, fns):
        logits = model.hf(input_ids=x, use_cache=False).logits[0]
    return logits, seen


MIN_CUT = 32  # a tail stops at its last read only when that saves at least this many tokens


def _cells(case: PatchCase, window: tuple[int, int]) -> dict[int, list[tuple[int, int]]]:
    """target position -> [(anchor index, rel_pos)] for every in-reasoning window cell."""
    cells: dict[int, list[tuple[int, int]]] = {}
    for ai, a in enumerate(case.anchors):
        for rel in range(window[0], window[1] + 1):
            off = a.offset + rel
            if 0 <= off < case.align.n_reasoning:
                cells.setdefault(case.align.target_start + off, []).append((ai, rel))
    return cells


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_reads(target: LoadedModel, case: PatchCase, cells, metrics: Sequence[PatchMetric]):
    """{(position, local cell index): [reads or None per metric]} and each branch's fork.

    A branch read before the branch leaves the trajectory is the trajectory's own read (with
    the branch's next token), so it is computed once.
    """
    forks: dict[tuple, int] = {}

    def norm(r: Read) -> Read:
        if r.branch is None:
            return r
        f = forks.get(r.branch)
        if f is None:
            f = forks[r.branch] = _common_prefix(r.branch, case.target_ids)
        if r.position < f:
            return Read(r.position, None, r.token if r.token is not None else int(r.branch[r.position + 1]))
        return r

    plan = {}
    for p, cell in cells.items():
        for local, (ai, _rel) in enumerate(cell):
            a = case.anchors[ai]
            row = []
            for m in metrics:
                rs = m.reads(target, case, a, p)
                row.append(None if rs is None else [norm(r) for r in rs])
            plan[(p, local)] = row
    return plan, forks


@torch.inference_mode()
def _clean_target(target, case: PatchCase, layers, positions, reads: Reads):
    x = torch.tensor([case.target_ids], dtype=torch.long, device=target.device)
    states: dict[int, Tensor] = {}
    idx = torch.tensor(positions, dtype=torch.long)

    def grab(layer):
        def fn(h):
            states[layer] = h[0, idx.to(h.device)].detach().clone()
        return fn

    with residual_hooks(target, {hook_name(layer, "resid_pre"): grab(layer) for layer in layers}):
        out = decoder_of(target)(input_ids=x, use_cache=True)
    h = out.last_hidden_state[0, reads.positions]
    lp = torch.log_softmax(lm_head_of(target)(h).float(), -1)
    return lp, out.cache, torch.stack([states[layer] for layer in layers])


def _cropped_cache(cache, p: int, batch: int, config):
    from transformers import DynamicCache

    kv = [(layer.keys[:, :, :p].expand(batch, -1, -1, -1), layer.values[:, :, :p].expand(batch, -1, -1, -1))
          for layer in cache.layers]
    return DynamicCache(kv, config=config)


@torch.inference_mode()
def _tail_rows(target, seq: Sequence[int], p: int, rows: list[tuple[int, Tensor] | None], sel: Sequence[int],
               cache, use_cache: bool) -> Tensor:
    """Log-probs [row, len(sel), vocab] at positions `sel` (all >= p) of `seq`, row j patched at
    position p with rows[j] = (layer, state) (None: unpatched); the first p tokens come from the
    clean cache (its first p entries are `seq[:p]`'s) or, without `use_cache`, are re-run. The
    forward stops at the last position read when that saves `MIN_CUT` tokens or more (a shorter
    forward is equal to a full one up to float error, ~1e-8, not bit for bit; an identical state is
    never re-run by default, so the null patch stays exactly zero)."""
    B = len(rows)
    start = p if use_cache and p > 0 else 0
    end = max(sel) + 1  # causal: nothing after the last read changes what is read
    if len(seq) - end < MIN_CUT:  # too little to gain: run to the end (the same floats as a full tail)
        end = len(seq)
    ids = torch.tensor(list(seq[start:end]), dtype=torch.long, device=target.device)
    x = ids.unsqueeze(0).expand(B, -1)
    fns = {}
    for j, row in enumerate(rows):
        if row is None:
            continue
        layer, v = row

        def fn(h, j=j, v=v):
            h = h.clone()
            h[j, p - start] = v.to(h.dtype)
            return h
        fns[hook_name(layer, "resid_pre")] = fn
    if start:
        kwargs = dict(cache=_cropped_cache(cache, p, B, target.hf.config), use_cache=True)
    else:
        kwargs = dict(use_cache=False)
    with residual_hooks(target, fns):
        hid = decoder_of(target)(input_ids=x, **kwargs).last_hidden_state
    return torch.log_softmax(lm_head_of(target)(hid[:, [i - start for i in sel]]).float(), -1)


def _value(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _patch_case(source, target, case: PatchCase, layers, window, metrics: list[PatchMetric], use_cache,
                batch_size, skip_identical, cost):
    cells = _cells(case, window)
    patched = sorted(cells)
    plan, forks = plan_reads(target, case, cells, metrics)
    traj_pos: set[int] = set()
    branch_pos: dict[tuple, set[int]] = {}
    for row in plan.values():
        for rs in row:
            for r in rs or ():
                if r.branch is None:
                    traj_pos.add(r.position)
                else:
                    branch_pos.setdefault(r.branch, set()).add(r.position)
    reads = Reads.build(traj_pos)
    branch_reads = {b: Reads.build(ps) for b, ps in branch_pos.items()}
    t = time.perf_counter()
    src = capture_resid_pre(source, case.source_ids, [case.align.to_source(p) for p in patched], layers)
    cost["source_s"] += time.perf_counter() - t
    t = time.perf_counter()
    clean_lp, cache, tgt = _clean_target(target, case, layers, patched, reads)
    clean_branch = {b: _tail_rows(target, b, forks[b], [None], br.positions, cache, use_cache)[0]
                    for b, br in branch_reads.items()}
    cost["clean_s"] += time.perf_counter() - t
    cost["clean_forwards"] += 1
    cost["branch_forwards"] += len(branch_reads)
    T = len(case.target_ids)

    def clean_lookup(r: Read) -> Tensor:
        if r.branch is None:
            return clean_lp[reads.index[r.position]]
        return clean_branch[r.branch][branch_reads[r.branch].index[r.position]]

    out: list[PatchRow] = []
    t = time.perf_counter()
    for k, p in enumerate(patched):
        todo = [(li, layer) for li, layer in enumerate(layers)
                if not (skip_identical and torch.equal(src[li, k], tgt[li, k]))]
        lookups: dict[int, object] = {}
        # only what this position's cells read: the trajectory after p, and the branches that
        # leave the trajectory after p (one that leaves before p is not patched)
        need = [r for local in range(len(cells[p])) for rs in plan[(p, local)] for r in (rs or ())]
        sel = sorted({r.position for r in need if r.branch is None and r.position >= p})
        at = {q: i for i, q in enumerate(sel)}
        live: dict[tuple, list[int]] = {}
        for r in need:
            if r.branch is not None and forks[r.branch] > p:
                live.setdefault(r.branch, set()).add(r.position)
        live = {b: sorted(ps) for b, ps in live.items()}
        end = T if not sel or T - max(sel) - 1 < MIN_CUT else max(sel) + 1
        for b0 in range(0, len(todo), batch_size):
            chunk = todo[b0:b0 + batch_size]
            rows = [(layer, src[li, k]) for li, layer in chunk]
            lp_rows = _tail_rows(target, case.target_ids, p, rows, sel, cache, use_cache) if sel else None
            cost["tail_rows"] += len(chunk)
            cost["tail_token_fraction"] += len(chunk) * (end - (p if use_cache else 0)) / T
            br_rows = {}
            for b, ps in live.items():
                br_rows[b] = (_tail_rows(target, b, p, rows, ps, cache, use_cache), {q: i for i, q in enumerate(ps)})
                cost["branch_rows"] += len(chunk)
            for j, (_li, layer) in enumerate(chunk):
                def lookup(r: Read, j=j, lp_rows=lp_rows, br_rows=br_rows, p=p, at=at) -> Tensor:
                    if r.branch is None:
                        if r.position < p:
                            return clean_lp[reads.index[r.position]]
                        return lp_rows[j, at[r.position]]
                    if r.branch not in br_rows:
                        return clean_lookup(r)
                    lp_b, at_b = br_rows[r.branch]
                    return lp_b[j, at_b[r.position]]
                lookups[layer] = lookup
        for layer in layers:
            lookups.setdefault(layer, clean_lookup)  # identical states: the clean run
        for local, (ai, rel) in enumerate(cells[p]):
            a = case.anchors[ai]
            clean = {mi: _value(m(MetricInput(target, case, a, p, plan[(p, local)][mi], clean_lookup, clean_lookup)))
                     for mi, m in enumerate(metrics) if plan[(p, local)][mi] is not None}
            for layer in layers:
                for mi, m in enumerate(metrics):
                    rs = plan[(p, local)][mi]
                    if rs is None:
                        continue
                    c = clean[mi]
                    v = _value(m(MetricInput(target, case, a, p, rs, lookups[layer], clean_lookup)))
                    out.append(PatchRow("", "", "", case.trajectory.id, case.trajectory.problem_id, a.group,
                                        a.control, layer, rel, p, m.name, c, v, v - c))
    cost["tail_s"] += time.perf_counter() - t
    return out, (src, tgt, patched, plan, cells)


def patch(
    source: LoadedModel,
    target: LoadedModel,
    trajectories: Sequence[Trajectory],
    positions: Positions | None = None,
    layers=None,
    *,
    window=DEFAULT_WINDOW,
    metrics: Sequence[str | PatchMetric] | Mapping[str, object] = DEFAULT_METRICS,
    word: str = "wait",
    control: bool = True,
    kl_positions: int = 8,
    use_cache: bool = True,
    batch_size: int = 64,
    skip_identical: bool = True,
    attribution: bool = False,
    seed: int = 0,
    direction: str | None = None,
    progress: bool = False,
) -> PatchResult:
    """Patch `source`'s resid_pre states into `target` at every (layer, wait + rel_pos) cell.

    positions: a Positions table in the target's tokenization (default: every `word`
    occurrence); layers: None/"all", ints or "0,2"; window: inclusive (lo, hi) or "-2:4";
    metrics: built-in names, PatchMetrics, or {"name": fn} (`hooks.patch_metrics`); default
    ``forced_answer``, ``next_token_kl``, ``recheck``. kl_positions: the KL built-ins' window.
    use_cache: re-run only the tail after each patched position from the clean KV cache
    (equal to a full re-run up to float error; False = full re-runs). skip_identical: a cell
    whose source state equals the target's own is not re-run (its effect is exactly zero).
    attribution: also fill the `attribution` column (first-order estimate, see `attribute`).
    Returns a PatchResult with one row (`PatchRow`) per (trajectory, anchor, layer, rel_pos, metric).
    """
    from tqdm.auto import tqdm

    metric_fns = resolve_metrics(metrics, kl_positions=kl_positions)
    window = parse_window(window)
    layers = resolve_layers(layers, target.n_layers)
    cases, info = prepare_cases(source, target, trajectories, positions, word=word, control=control, seed=seed)
    direction = direction or f"{target.spec}<-{source.spec}"
    cost = dict(source_s=0.0, clean_s=0.0, tail_s=0.0, attribution_s=0.0, clean_forwards=0, branch_forwards=0,
                tail_rows=0, branch_rows=0, tail_token_fraction=0.0, backward_passes=0)
    diff = [m for m in metric_fns if m.differentiable]
    rows: list[PatchRow] = []
    for case in tqdm(cases, desc=f"patching {direction}", disable=not progress):
        out, ctx = _patch_case(source, target, case, layers, window, metric_fns, use_cache, batch_size,
                               skip_identical, cost)
        if attribution:
            att = attribution_estimates(target, case, layers, diff, metric_fns, ctx, cost)
            for r in out:
                r.attribution = att.get((r.position, r.anchor, r.control, r.rel_pos, r.layer, r.metric), float("nan"))
        rows.extend(out)
    for r in rows:
        r.direction, r.source, r.target = direction, source.spec, target.spec
    table = pd.DataFrame([astuple(r) for r in rows], columns=ROW_COLUMNS)
    info.update(direction=direction, directions=[direction], layers=layers, window=list(window),
                metrics=[m.name for m in metric_fns], kl_positions=kl_positions, use_cache=use_cache, cost=cost)
    return PatchResult(table, info)


def attribute(source: LoadedModel, target: LoadedModel, trajectories: Sequence[Trajectory], positions=None, layers=None, *, window=DEFAULT_WINDOW,
              metrics=("gold_prob", "recheck"), **kwargs) -> PatchResult:
    """Exact patching and attribution patching on the same grid (the `attribution` column).

    A KL cannot be attributed: it is minimised (gradient zero) at the clean run.
    """
    fns = resolve_metrics(metrics, kl_positions=kwargs.get("kl_positions", 8))
    bad = [m.name for m in fns if m.name in ("kl", "next_token_kl")]
    if bad:
        raise MetricError(f"attribution patching cannot estimate {bad[0]!r}: KL(clean‖patched) has zero gradient "
                          "at the clean run; use a differentiable metric such as 'gold_prob' or 'recheck'")
    return patch(source, target, trajectories, positions, layers, window=window, metrics=metrics,
                 attribution=True, **kwargs)


__all__ = ["DEFAULT_WINDOW", "PatchResult", "PatchRow", "attribute", "capture_resid_pre", "patch", "prepare_cases",
           "run_patched"]
