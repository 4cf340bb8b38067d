"""Activation patching at discourse positions ("wait"), within a model or across two models.

For each trajectory and each "wait" (an *anchor*), the residual stream entering block l
(`blocks.{l}.hook_resid_pre`, TransformerLens's convention) of the target model at the
position `wait + rel_pos` is replaced by the source model's state at the same content
position, and the target's forward continues. One source forward captures every needed
state; one clean target forward gives the baseline and its KV cache; each patched position
then re-runs only the tail after it (the forward before it is unchanged), all layers at once
as one batch (row j patches layer j).

Metrics, all read from the target, teacher-forced on the trajectory's own tokens (answer =
the gold answer, so the answer tokens give the forced gold probability):

- ``kl``: KL(clean ‖ patched) of the next-token distribution, averaged over the patched
  position and the `kl_positions - 1` positions after it (clipped at the sequence end).
- ``correction``: with ground truth (the organism's ``extra["truth"]``): for a wait that
  follows a slip, the probability the target gives the *correct* value of the re-checked step
  at the position that writes it (the ``=`` token five after the wait predicts it). Waits
  that do not follow a slip get no correction value. Without ground truth: the mean
  probability of the trajectory's own next `continuation_tokens` tokens after the wait (the
  discourse behaviour that followed).
- ``gold_prob``: the probability of the gold answer when forced at the end of the reasoning
  (the format's forcing suffix, then the gold answer's tokens).

Effects are patched minus clean (for ``kl`` the KL itself). A ``random`` control anchor per
wait — a uniformly drawn non-discourse reasoning token of the same trajectory *before* the
wait, so its window, like the wait's, precedes what the metrics read — is patched the same
way with the same metric read-outs.

`attribute` is attribution patching (the estimate lives in `hooks.attribution`): the
first-order estimate ``(a_source - a_target) · ∂metric/∂a_target`` at every (layer, position)
from one target forward + one backward per scalar metric. ``kl`` has zero gradient at the clean point (its
minimum), so only ``correction`` and ``gold_prob`` are attributed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from waitlens.hooks.attribution import attribution_estimates
from waitlens.hooks.patch_cases import (
    DEFAULT_WINDOW,
    DIFFERENTIABLE,
    METRICS,
    ROW_COLUMNS,
    Anchor,
    PatchCase,
    PatchResult,
    Reads,
    parse_window,
    prepare_cases,
    read_positions,
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
def capture_resid_pre(model, ids: Sequence[int], positions: Sequence[int],
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


def run_patched(model, ids: Sequence[int], patches: dict[tuple[int, int], Tensor], *,
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


def _metric_values(lp: Tensor, clean_lp: Tensor, reads: Reads, case: PatchCase, p: int, anchors: list[Anchor],
                   kl_positions: int, metrics) -> dict[tuple[int, str], float]:
    """Metric values per (anchor index, metric) from log-probs at `reads` (rows before p = clean)."""
    T = len(case.target_ids)
    out = {}
    if "kl" in metrics:
        ks = [reads.index[i] for i in range(p, min(p + kl_positions, T))]
        c = clean_lp[ks]
        kl = (c.exp() * (c - lp[ks])).sum(-1).clamp_min(0).mean().item()
    if "gold_prob" in metrics:
        a0, a1 = case.answer_tokens
        g = sum(lp[reads.index[i - 1], case.target_ids[i]] for i in range(a0, a1))
        gold = float(torch.as_tensor(g).exp())
    for ai, a in enumerate(anchors):
        if "kl" in metrics:
            out[(ai, "kl")] = kl
        if "gold_prob" in metrics:
            out[(ai, "gold_prob")] = gold
        if "correction" in metrics and a.reads:
            src = [(lp if r >= p else clean_lp)[reads.index[r], tok] for r, tok in a.reads]
            out[(ai, "correction")] = float(torch.stack(src).exp().mean())
    return out


def _cells(case: PatchCase, window: tuple[int, int]) -> dict[int, list[tuple[int, int]]]:
    """target position -> [(anchor index, rel_pos)] for every in-reasoning window cell."""
    cells: dict[int, list[tuple[int, int]]] = {}
    for ai, a in enumerate(case.anchors):
        for rel in range(window[0], window[1] + 1):
            off = a.offset + rel
            if 0 <= off < case.align.n_reasoning:
                cells.setdefault(case.align.target_start + off, []).append((ai, rel))
    return cells


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
    return lp, out.past_key_values, torch.stack([states[layer] for layer in layers])


def _cropped_cache(cache, p: int, batch: int, config):
    from transformers import DynamicCache

    kv = [(layer.keys[:, :, :p].expand(batch, -1, -1, -1), layer.values[:, :, :p].expand(batch, -1, -1, -1))
          for layer in cache.layers]
    return DynamicCache(kv, config=config)


@torch.inference_mode()
def _patched_rows(target, case: PatchCase, p: int, rows: list[tuple[int, Tensor]], reads: Reads,
                  cache, use_cache: bool) -> Tensor:
    """Log-probs at `reads` (positions >= p) for each row (layer, state) patched at position p."""
    B = len(rows)
    start = p if use_cache and p > 0 else 0
    ids = torch.tensor(case.target_ids[start:], dtype=torch.long, device=target.device)
    x = ids.unsqueeze(0).expand(B, -1)
    fns = {}
    for j, (layer, v) in enumerate(rows):
        def fn(h, j=j, v=v):
            h = h.clone()
            h[j, p - start] = v.to(h.dtype)
            return h
        fns[hook_name(layer, "resid_pre")] = fn
    if start:
        kwargs = dict(past_key_values=_cropped_cache(cache, p, B, target.hf.config), use_cache=True)
    else:
        kwargs = dict(use_cache=False)
    with residual_hooks(target, fns):
        hid = decoder_of(target)(input_ids=x, **kwargs).last_hidden_state
    sel = [i - start for i in reads.positions if i >= p]
    return torch.log_softmax(lm_head_of(target)(hid[:, sel]).float(), -1)


def _patch_case(source, target, case: PatchCase, layers, window, metrics, kl_positions, use_cache,
                batch_size, skip_identical, cost):
    cells = _cells(case, window)
    patched = sorted(cells)
    reads = read_positions(case, patched, kl_positions)
    t = time.perf_counter()
    src = capture_resid_pre(source, case.source_ids, [case.align.to_source(p) for p in patched], layers)
    cost["source_s"] += time.perf_counter() - t
    t = time.perf_counter()
    clean_lp, cache, tgt = _clean_target(target, case, layers, patched, reads)
    cost["clean_s"] += time.perf_counter() - t
    cost["clean_forwards"] += 1
    T = len(case.target_ids)
    clean_vals = _metric_values(clean_lp, clean_lp, reads, case, T, case.anchors, kl_positions,
                                [m for m in metrics if m != "kl"])
    out = []
    t = time.perf_counter()
    for k, p in enumerate(patched):
        anchors = [case.anchors[ai] for ai, _ in cells[p]]
        todo = [(li, layer) for li, layer in enumerate(layers)
                if not (skip_identical and torch.equal(src[li, k], tgt[li, k]))]
        vals: dict[int, dict] = {}
        for li, layer in enumerate(layers):
            if (li, layer) not in todo:
                vals[layer] = _metric_values(clean_lp, clean_lp, reads, case, p, anchors, kl_positions, metrics)
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            lp_rows = _patched_rows(target, case, p, [(layer, src[li, k]) for li, layer in chunk], reads, cache,
                                    use_cache)
            cost["tail_rows"] += len(chunk)
            cost["tail_token_fraction"] += len(chunk) * (T - p if use_cache else T) / T
            n_before = sum(1 for q in reads.positions if q < p)
            for j, (_li, layer) in enumerate(chunk):
                lp = torch.cat([clean_lp[:n_before], lp_rows[j]])
                vals[layer] = _metric_values(lp, clean_lp, reads, case, p, anchors, kl_positions, metrics)
        for local, ((ai, rel), a) in enumerate(zip(cells[p], anchors, strict=True)):
            for layer in layers:
                for metric in metrics:
                    key = (local, metric)
                    if key not in vals[layer]:
                        continue
                    v = vals[layer][key]
                    c = 0.0 if metric == "kl" else clean_vals[(ai, metric)]
                    out.append((case.trajectory.id, case.trajectory.problem_id, a.group, a.control, layer, rel, p,
                                metric, c, v, v - c))
    cost["tail_s"] += time.perf_counter() - t
    return out, (src, tgt, patched)


def patch(
    source,
    target,
    trajectories: Sequence[Trajectory],
    positions: Positions | None = None,
    layers=None,
    *,
    window=DEFAULT_WINDOW,
    metrics: Sequence[str] = METRICS,
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
    occurrence); layers: None/"all", ints or "0,2"; window: inclusive (lo, hi) or "-2:4".
    use_cache: re-run only the tail after each patched position from the clean KV cache
    (equal to a full re-run up to float error; False = full re-runs). skip_identical: a cell
    whose source state equals the target's own is not re-run (its effect is exactly zero).
    attribution: also fill the `attribution` column (first-order estimate, see `attribute`).
    Returns a PatchResult with one row per (trajectory, anchor, layer, rel_pos, metric).
    """
    from tqdm.auto import tqdm

    metrics = list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; use {METRICS}")
    window = parse_window(window)
    layers = resolve_layers(layers, target.n_layers)
    cases, info = prepare_cases(source, target, trajectories, positions, word=word, control=control, seed=seed)
    direction = direction or f"{target.spec}<-{source.spec}"
    cost = dict(source_s=0.0, clean_s=0.0, tail_s=0.0, attribution_s=0.0, clean_forwards=0, tail_rows=0,
                tail_token_fraction=0.0, backward_passes=0)
    rows = []
    for case in tqdm(cases, desc=f"patching {direction}", disable=not progress):
        out, ctx = _patch_case(source, target, case, layers, window, metrics, kl_positions, use_cache, batch_size,
                               skip_identical, cost)
        if attribution:
            att = attribution_estimates(target, case, layers, window, [m for m in metrics if m in DIFFERENTIABLE], ctx,
                                  cost)
            out = [r + (att.get((r[2], r[3], r[4], r[5], r[7]), float("nan")),) for r in out]
        else:
            out = [r + (float("nan"),) for r in out]
        rows.extend(out)
    table = pd.DataFrame([(direction, source.spec, target.spec, *r) for r in rows], columns=ROW_COLUMNS)
    info.update(direction=direction, directions=[direction], layers=layers, window=list(window), metrics=metrics,
                kl_positions=kl_positions, use_cache=use_cache, cost=cost)
    return PatchResult(table, info)


def attribute(source, target, trajectories, positions=None, layers=None, *, window=DEFAULT_WINDOW,
              metrics: Sequence[str] = DIFFERENTIABLE, **kwargs) -> PatchResult:
    """Exact patching and attribution patching on the same grid (the `attribution` column).

    ``kl`` cannot be attributed: it is minimised (gradient zero) at the clean run.
    """
    if "kl" in metrics:
        raise ValueError("attribution patching cannot estimate 'kl': KL(clean‖patched) has zero gradient at the "
                         "clean run; use 'correction' or 'gold_prob'")
    return patch(source, target, trajectories, positions, layers, window=window, metrics=metrics,
                 attribution=True, **kwargs)


__all__ = ["DEFAULT_WINDOW", "DIFFERENTIABLE", "METRICS", "PatchResult", "attribute", "capture_resid_pre", "patch",
           "prepare_cases", "run_patched"]
