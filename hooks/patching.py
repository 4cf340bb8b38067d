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

Batched (the default, `max_batch_tokens`): cases are grouped by length as every other stage
groups its sequences (`hooks.batching`); a group's source states and clean runs come from one
padded forward each (right or left padding), and the patched tails of all its cases - every
position, layer and branch - run as rows of a few forwards: rows sorted by patched position start
together at the group's first one, each on its own case's clean KV cache, right-padded after their
last read; a row patched at layer l on the trajectory starts at block l from the clean states
(`skip_lower_layers`, where `can_start_mid_stack`). ``max_batch_tokens=None`` is the reference
path, one case at a time; the two agree within float error (tests: 1e-5). Under torchrun, each
rank takes every N-th group and the rows are gathered in the single process's order.

`attribute` is attribution patching (the estimate lives in `hooks.attribution`): the
first-order estimate ``(a_source - a_target) · ∂metric/∂a_target`` at every (layer, position)
from one target forward + one backward per distinct scalar metric. Only differentiable
metrics that read the trajectory itself are attributed (a KL has zero gradient at the clean
point, its minimum).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import no_type_check

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from waitlens.hooks.attribution import attribution_estimates
from waitlens.hooks.batching import MAX_BATCH_TOKENS, check_padding, length_batches, pad_batch
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

    @no_type_check
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
        @no_type_check
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

    @no_type_check
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

    @no_type_check
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

        @no_type_check
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


class _Plan:
    """What one case patches and reads: its cells, the metrics' reads, and the branches."""

    def __init__(self, target, case: PatchCase, window, metrics: list[PatchMetric]):
        self.cells = _cells(case, window)
        self.patched = sorted(self.cells)
        self.plan, self.forks = plan_reads(target, case, self.cells, metrics)
        traj_pos: set[int] = set()
        branch_pos: dict[tuple, set[int]] = {}
        for row in self.plan.values():
            for rs in row:
                for r in rs or ():
                    if r.branch is None:
                        traj_pos.add(r.position)
                    else:
                        branch_pos.setdefault(r.branch, set()).add(r.position)
        self.reads = Reads.build(traj_pos)
        self.branch_reads = {b: Reads.build(ps) for b, ps in branch_pos.items()}

    def needs(self, p: int) -> tuple[list[int], dict[tuple, list[int]]]:
        """Only what position p's cells read: the trajectory at and after p, and the branches that
        leave the trajectory after p (one that leaves before p is not patched)."""
        need = [r for local in range(len(self.cells[p])) for rs in self.plan[(p, local)] for r in (rs or ())]
        sel = sorted({r.position for r in need if r.branch is None and r.position >= p})
        live: dict[tuple, set[int]] = {}
        for r in need:
            if r.branch is not None and self.forks[r.branch] > p:
                live.setdefault(r.branch, set()).add(r.position)
        return sel, {b: sorted(ps) for b, ps in live.items()}

    def todo(self, src, tgt, k: int, layers, skip_identical: bool) -> list[tuple[int, int]]:
        """(layer index, layer) of the layers patched at position index k (identical states are skipped)."""
        return [(li, layer) for li, layer in enumerate(layers)
                if not (skip_identical and torch.equal(src[li, k], tgt[li, k]))]


def _emit_rows(target, case: PatchCase, pl: _Plan, layers, metrics: list[PatchMetric], clean_lp, clean_branch,
               patched_lp) -> list[PatchRow]:
    """Rows of one case from the clean log-probs and `patched_lp[(p, layer)] = (lp [sel, vocab] or
    None, sel, {branch: (lp, positions)})` (a missing key: the layer was not re-run at p)."""
    reads, branch_reads = pl.reads, pl.branch_reads

    @no_type_check
    def clean_lookup(r: Read) -> Tensor:
        if r.branch is None:
            return clean_lp[reads.index[r.position]]
        return clean_branch[r.branch][branch_reads[r.branch].index[r.position]]

    @no_type_check
    def make_lookup(p, lp_rows, sel, br):
        at = {q: i for i, q in enumerate(sel)}
        br_at = {b: (lp, {q: i for i, q in enumerate(ps)}) for b, (lp, ps) in br.items()}

        def lookup(r: Read) -> Tensor:
            if r.branch is None:
                if r.position < p:
                    return clean_lp[reads.index[r.position]]
                return lp_rows[at[r.position]]
            if r.branch not in br_at:
                return clean_lookup(r)
            lp_b, at_b = br_at[r.branch]
            return lp_b[at_b[r.position]]
        return lookup

    out: list[PatchRow] = []
    for p in pl.patched:
        lookups = {layer: make_lookup(p, *patched_lp[(p, layer)]) if (p, layer) in patched_lp else clean_lookup
                   for layer in layers}  # identical states: the clean run
        for local, (ai, rel) in enumerate(pl.cells[p]):
            a = case.anchors[ai]
            row = pl.plan[(p, local)]
            clean = {mi: _value(m(MetricInput(target, case, a, p, row[mi], clean_lookup, clean_lookup)))
                     for mi, m in enumerate(metrics) if row[mi] is not None}
            for layer in layers:
                for mi, m in enumerate(metrics):
                    rs = row[mi]
                    if rs is None:
                        continue
                    c = clean[mi]
                    v = _value(m(MetricInput(target, case, a, p, rs, lookups[layer], clean_lookup)))
                    out.append(PatchRow("", "", "", case.trajectory.id, case.trajectory.problem_id, a.group,
                                        a.control, layer, rel, p, m.name, c, v, v - c))
    return out


def _patch_case(source, target, case: PatchCase, layers, window, metrics: list[PatchMetric], use_cache,
                batch_size, skip_identical, cost):
    """The one-case-at-a-time reference path (`patch(max_batch_tokens=None)`): one source and one
    clean forward per case, one tail forward per patched position (its layers as the batch rows)."""
    pl = _Plan(target, case, window, metrics)
    patched, reads, forks = pl.patched, pl.reads, pl.forks
    t = time.perf_counter()
    src = capture_resid_pre(source, case.source_ids, [case.align.to_source(p) for p in patched], layers)
    cost["source_s"] += time.perf_counter() - t
    t = time.perf_counter()
    clean_lp, cache, tgt = _clean_target(target, case, layers, patched, reads)
    clean_branch = {b: _tail_rows(target, b, forks[b], [None], br.positions, cache, use_cache)[0]
                    for b, br in pl.branch_reads.items()}
    cost["clean_s"] += time.perf_counter() - t
    cost["clean_forwards"] += 1
    cost["branch_forwards"] += len(pl.branch_reads)
    cost["forward_calls"] += 2 + len(pl.branch_reads)
    T = len(case.target_ids)
    patched_lp: dict[tuple[int, int], tuple] = {}
    t = time.perf_counter()
    for k, p in enumerate(patched):
        todo = pl.todo(src, tgt, k, layers, skip_identical)
        sel, live = pl.needs(p)
        end = T if not sel or T - max(sel) - 1 < MIN_CUT else max(sel) + 1
        for b0 in range(0, len(todo), batch_size):
            chunk = todo[b0:b0 + batch_size]
            rows = [(layer, src[li, k]) for li, layer in chunk]
            lp_rows = _tail_rows(target, case.target_ids, p, rows, sel, cache, use_cache) if sel else None
            cost["tail_rows"] += len(chunk)
            cost["tail_token_fraction"] += len(chunk) * (end - (p if use_cache else 0)) / T
            br_rows = {}
            for b, ps in live.items():
                br_rows[b] = (_tail_rows(target, b, p, rows, ps, cache, use_cache), ps)
                cost["branch_rows"] += len(chunk)
            cost["forward_calls"] += (1 if sel else 0) + len(live)
            for j, (_li, layer) in enumerate(chunk):
                patched_lp[(p, layer)] = (None if lp_rows is None else lp_rows[j], sel,
                                          {b: (lp[j], ps) for b, (lp, ps) in br_rows.items()})
    out = _emit_rows(target, case, pl, layers, metrics, clean_lp, clean_branch, patched_lp)
    cost["tail_s"] += time.perf_counter() - t
    return out, (src, tgt, patched, pl.plan, pl.cells)


# ---------------------------------------------------------------------------------------------
# the batched path: many cases per forward
def _pad_id(model) -> int:
    return int(getattr(model.tokenizer, "pad_token_id", None) or 0)


@torch.inference_mode()
def _capture_batch(model: LoadedModel, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], layers,
                   padding: str) -> list[Tensor]:
    """`capture_resid_pre` of every sequence from one padded forward: [layer, pos, d_model] each."""
    batch = pad_batch(seqs, padding, _pad_id(model), model.device)
    flat = torch.cat([batch.flat_index(b, ps) for b, ps in enumerate(positions)])
    out: dict[int, Tensor] = {}
    last = max(layers)

    @no_type_check
    def grab(layer):
        def fn(x):
            out[layer] = x.reshape(-1, x.shape[-1]).index_select(0, flat.to(x.device)).detach().clone()
            if layer == last:
                raise StopForward
        return fn

    with residual_hooks(model, {hook_name(layer, "resid_pre"): grab(layer) for layer in layers}):
        try:
            decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False)
        except StopForward:
            pass
    states = torch.stack([out[layer] for layer in layers])  # [layer, all positions, d]
    return list(torch.split(states, [len(ps) for ps in positions], dim=1))


@torch.inference_mode()
def _clean_batch(target: LoadedModel, cases: Sequence[PatchCase], plans: Sequence[_Plan], layers, padding: str,
                 full: dict | None = None):
    """`_clean_target` of every case from one padded forward: the clean log-probs at each case's
    reads, its resid_pre states at its patched positions, the KV cache and each case's offset.
    `full` (a dict) also receives each layer's whole resid_pre [batch, pos, d_model]."""
    batch = pad_batch([c.target_ids for c in cases], padding, _pad_id(target), target.device)
    flat = torch.cat([batch.flat_index(b, pl.patched) for b, pl in enumerate(plans)])
    states: dict[int, Tensor] = {}

    @no_type_check
    def grab(layer):
        def fn(h):
            states[layer] = h.reshape(-1, h.shape[-1]).index_select(0, flat.to(h.device)).detach().clone()
            if full is not None:
                full[layer] = h.detach()  # a block's input is never changed in place
        return fn

    with residual_hooks(target, {hook_name(layer, "resid_pre"): grab(layer) for layer in layers}):
        out = decoder_of(target)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=True)
    hid = out.last_hidden_state
    rows = torch.cat([batch.flat_index(b, pl.reads.positions) for b, pl in enumerate(plans)]).to(hid.device)
    lp = torch.log_softmax(lm_head_of(target)(hid.reshape(-1, hid.shape[-1]).index_select(0, rows)).float(), -1)
    lps = torch.split(lp, [len(pl.reads.positions) for pl in plans])
    tgt = torch.split(torch.stack([states[layer] for layer in layers]), [len(pl.patched) for pl in plans], dim=1)
    return list(lps), list(tgt), out.cache, batch.offsets


class _Tail:
    """One row of a batched tail forward: `seq` (the case's trajectory or a branch of it) from
    position `p` on, patched at p with `patch` = (layer, state) (None: unpatched), read at `sel`."""

    __slots__ = ("case", "seq", "p", "patch", "sel", "key", "start")

    def __init__(self, case: int, seq, p: int, patch, sel, key, start: int = 0):
        self.case, self.seq, self.p, self.patch, self.sel, self.key = case, seq, p, patch, list(sel), key
        self.start = start  # the first block run: the patched layer when the clean states below are reused

    @property
    def end(self) -> int:
        """Causal: nothing after the last read changes what is read; as in `_tail_rows`, the row
        runs to the end when stopping early saves fewer than `MIN_CUT` tokens."""
        end = max(self.sel) + 1
        return len(self.seq) if len(self.seq) - end < MIN_CUT else end


def _tail_groups(tails: list[_Tail], batch_size: int, max_tokens: int):
    """Tails sorted by first block and patched position, in groups of one first block, at most
    `batch_size` rows and `max_tokens` tokens (rows × longest sequence, the cached prefix included)."""
    group: list[_Tail] = []
    longest = 0
    for t in sorted(tails, key=lambda t: (t.start, t.p, t.end)):
        if group and (len(group) >= batch_size or (len(group) + 1) * max(longest, t.end) > max_tokens
                      or t.start != group[0].start):
            yield group
            group, longest = [], 0
        group.append(t)
        longest = max(longest, t.end)
    if group:
        yield group


@torch.inference_mode()
def _run_tails(target: LoadedModel, group: list[_Tail], cache, offsets: list[int], use_cache: bool,
               full: dict | None = None) -> list[Tensor]:
    """Log-probs [len(sel), vocab] of every tail from one forward. The rows start together at
    s = the group's first patched position: tokens before s come from each row's own case's clean
    cache (or, without `use_cache`, every row runs from 0), tokens from s on are re-run (a row patched
    later than s re-runs a few clean tokens: equal to the cache up to float error). Rows are right-
    padded after their last read; causal attention keeps the pads out of every real token's view."""
    s = min(t.p for t in group) if use_cache else 0
    L = max(t.end for t in group) - s
    B = len(group)
    if group[0].start:
        return _run_tails_from(target, group, cache, offsets, s, L, full)
    pad = _pad_id(target)
    ids = torch.full((B, L), pad, dtype=torch.long)
    for j, t in enumerate(group):
        ids[j, :t.end - s] = torch.as_tensor(list(t.seq[s:t.end]), dtype=torch.long)
    ids = ids.to(target.device)
    pos = torch.arange(s, s + L, device=target.device).expand(B, -1)
    by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
    for j, t in enumerate(group):
        if t.patch is not None:
            layer, v = t.patch
            by_layer.setdefault(layer, []).append((j, t.p - s, v))
    fns = {}
    for layer, items in by_layer.items():
        rows = torch.tensor([j for j, _, _ in items], dtype=torch.long)
        cols = torch.tensor([c for _, c, _ in items], dtype=torch.long)
        vals = torch.stack([v for _, _, v in items])

        @no_type_check
        def fn(h, rows=rows, cols=cols, vals=vals):
            h = h.clone()
            h[rows.to(h.device), cols.to(h.device)] = vals.to(h.device, h.dtype)
            return h
        fns[hook_name(layer, "resid_pre")] = fn
    kwargs: dict = dict(use_cache=False)
    if s:
        kwargs = dict(cache=_row_cache(target, group, cache, offsets, s), use_cache=True)
    with residual_hooks(target, fns):
        hid = decoder_of(target)(input_ids=ids, position_ids=pos, **kwargs).last_hidden_state
    return _read_rows(target, group, hid, s, L)


def _row_cache(target, group: list[_Tail], cache, offsets: list[int], s: int):
    """A DynamicCache whose row j holds the first s entries of row j's own case's clean cache."""
    from transformers import DynamicCache

    kv = []
    for layer in cache.layers:
        ks = [layer.keys[t.case, :, offsets[t.case]:offsets[t.case] + s] for t in group]
        vs = [layer.values[t.case, :, offsets[t.case]:offsets[t.case] + s] for t in group]
        kv.append((torch.stack(ks), torch.stack(vs)))
    return DynamicCache(kv, config=target.hf.config)


def _read_rows(target, group: list[_Tail], hid: Tensor, s: int, L: int) -> list[Tensor]:
    flat = torch.cat([j * L + torch.as_tensor(t.sel, dtype=torch.long) - s for j, t in enumerate(group)])
    lp = torch.log_softmax(lm_head_of(target)(hid.reshape(-1, hid.shape[-1]).index_select(0, flat.to(hid.device)))
                           .float(), -1)
    return list(torch.split(lp, [len(t.sel) for t in group]))


SKIP_TYPES = ("qwen2", "qwen3", "llama", "mistral")  # decoders whose blocks `_run_tails_from` can call one by one
MAX_FULL_STATES = 1 << 29  # bytes of clean resid_pre kept per case group for starting tails mid-stack


def can_start_mid_stack(model: LoadedModel) -> bool:
    """Whether a patched tail can start at the patched block from the clean states below it: a
    decoder of a known family (`SKIP_TYPES`: rotary positions, full attention in every block) on
    one device."""
    cfg, dec = model.hf.config, decoder_of(model)
    if getattr(cfg, "model_type", None) not in SKIP_TYPES or getattr(model.hf, "hf_device_map", None):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return False
    return all(hasattr(dec, a) for a in ("layers", "rotary_emb", "norm"))


def _run_tails_from(target, group: list[_Tail], cache, offsets: list[int], s: int, L: int, full: dict) -> list[Tensor]:
    """`_run_tails` for trajectory rows patched at block l = group[0].start: blocks below l see
    only clean tokens, so each row enters block l with its case's clean resid_pre at positions
    s.., its patch written in, and runs blocks l.. only (on the clean cache before s)."""
    from transformers.masking_utils import create_causal_mask

    l0 = group[0].start
    dec = decoder_of(target)
    src = full[l0]
    hidden = src.new_zeros((len(group), L, src.shape[-1]))
    for j, t in enumerate(group):
        o = offsets[t.case]
        hidden[j, :t.end - s] = src[t.case, o + s:o + t.end]
        layer, v = t.patch
        hidden[j, t.p - s] = v.to(hidden.device, hidden.dtype)
    pos = torch.arange(s, s + L, device=hidden.device).expand(len(group), -1)
    kv = _row_cache(target, group, cache, offsets, s) if s else None
    mask = create_causal_mask(config=dec.config, inputs_embeds=hidden, attention_mask=None, cache=kv, position_ids=pos)
    pe = dec.rotary_emb(hidden, pos)
    for block in dec.layers[l0:target.n_layers]:
        hidden = block(hidden, attention_mask=mask, position_ids=pos, cache=kv, use_cache=kv is not None,
                       position_embeddings=pe)
    return _read_rows(target, group, dec.norm(hidden), s, L)


def _patch_cases_batched(source, target, cases: Sequence[PatchCase], groups: Sequence[list[int]], layers, window,
                         metrics: list[PatchMetric], use_cache, batch_size, skip_identical, cost, max_batch_tokens: int,
                         padding: str, skip_lower: bool = False):
    """Each group of cases (`hooks.batching.length_batches` of their lengths: at most `batch_size`
    cases and `max_batch_tokens` padded tokens) in one source forward and one clean target
    forward, then every patched tail of the group's cases (all positions, layers and branches) in
    as few forwards as `_tail_groups` allows. Yields (case index, rows, ctx)."""
    for members in groups:
        group = [cases[i] for i in members]
        plans = [_Plan(target, c, window, metrics) for c in group]
        t = time.perf_counter()
        srcs = _capture_batch(source, [c.source_ids for c in group],
                              [[c.align.to_source(p) for p in pl.patched] for c, pl in zip(group, plans, strict=True)],
                              layers, padding)
        cost["source_s"] += time.perf_counter() - t
        t = time.perf_counter()
        d = target.hf.config.hidden_size
        full = {} if skip_lower and len(group) * max(len(c.target_ids) for c in group) * len(layers) * d * 4 \
            <= MAX_FULL_STATES else None
        clean_lps, tgts, cache, offsets = _clean_batch(target, group, plans, layers, padding, full)
        cost["clean_forwards"] += len(group)
        cost["forward_calls"] += 2
        tails: list[_Tail] = []
        for ci, pl in enumerate(plans):
            for b, br in pl.branch_reads.items():
                tails.append(_Tail(ci, b, pl.forks[b], None, br.positions, ("clean", b)))
            cost["branch_forwards"] += len(pl.branch_reads)
        t_clean = time.perf_counter() - t
        t = time.perf_counter()
        for ci, (c, pl) in enumerate(zip(group, plans, strict=True)):
            T = len(c.target_ids)
            for k, p in enumerate(pl.patched):
                sel, live = pl.needs(p)
                for li, layer in pl.todo(srcs[ci], tgts[ci], k, layers, skip_identical):
                    row = (layer, srcs[ci][li, k])
                    if sel:
                        tails.append(_Tail(ci, c.target_ids, p, row, sel, ("traj", p, layer),
                                           start=layer if full is not None else 0))
                        cost["tail_token_fraction"] += (max(sel) + 1 - (p if use_cache else 0)) / T
                    for b, ps in live.items():
                        tails.append(_Tail(ci, b, p, row, ps, ("branch", p, layer, b)))
                        cost["branch_rows"] += 1
                    cost["tail_rows"] += 1
        results: list[dict] = [{} for _ in group]
        for tg in _tail_groups(tails, batch_size, max_batch_tokens):
            for tl, lp in zip(tg, _run_tails(target, tg, cache, offsets, use_cache, full), strict=True):
                results[tl.case][tl.key] = lp
            cost["forward_calls"] += 1
        del cache, full
        cost["tail_s"] += time.perf_counter() - t
        for ci, (c, pl) in enumerate(zip(group, plans, strict=True)):
            t = time.perf_counter()
            res = results[ci]
            clean_branch = {b: res[("clean", b)] for b in pl.branch_reads}
            dt = time.perf_counter() - t
            cost["clean_s"] += t_clean / len(group) + dt
            t = time.perf_counter()
            patched_lp = {}
            for k, p in enumerate(pl.patched):
                sel, live = pl.needs(p)
                for _li, layer in pl.todo(srcs[ci], tgts[ci], k, layers, skip_identical):
                    patched_lp[(p, layer)] = (res.get(("traj", p, layer)), sel,
                                              {b: (res[("branch", p, layer, b)], ps) for b, ps in live.items()})
            out = _emit_rows(target, c, pl, layers, metrics, clean_lps[ci], clean_branch, patched_lp)
            cost["tail_s"] += time.perf_counter() - t
            yield members[ci], out, (srcs[ci], tgts[ci], pl.patched, pl.plan, pl.cells)


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
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
    padding: str = "right",
    skip_identical: bool = True,
    skip_lower_layers: bool = True,
    attribution: bool = False,
    seed: int = 0,
    direction: str | None = None,
    progress: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
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
    max_batch_tokens: cases run in padded batches (at most `batch_size` cases, and tail forwards
    of at most `batch_size` rows, each within this many padded tokens; `padding` "right" or
    "left" for the source and clean forwards); None runs one case at a time (the reference path,
    equal within float error). skip_lower_layers: a batched tail patched at layer l on the
    trajectory starts at block l from the clean states (the blocks below it see only clean tokens),
    where `can_start_mid_stack`; False runs every block. rank/world_size: data-parallel (default: torchrun's RANK and
    WORLD_SIZE): rank r patches cases r, r + N, ...; every rank returns the gathered result, rows
    in the single-process order.
    Returns a PatchResult with one row (`PatchRow`) per (trajectory, anchor, layer, rel_pos, metric).
    """
    from tqdm.auto import tqdm

    from waitlens.hooks.capture import _world

    metric_fns = resolve_metrics(metrics, kl_positions=kl_positions)
    window = parse_window(window)
    layers = resolve_layers(layers, target.n_layers)
    check_padding(padding)
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive or None (one case at a time), got {max_batch_tokens}")
    rank, world = _world(rank, world_size)
    cases, info = prepare_cases(source, target, trajectories, positions, word=word, control=control, seed=seed)
    direction = direction or f"{target.spec}<-{source.spec}"
    cost = dict(source_s=0.0, clean_s=0.0, tail_s=0.0, attribution_s=0.0, clean_forwards=0, branch_forwards=0,
                tail_rows=0, branch_rows=0, tail_token_fraction=0.0, backward_passes=0, forward_calls=0)
    diff = [m for m in metric_fns if m.differentiable]
    args = (layers, window, metric_fns, use_cache, batch_size, skip_identical, cost)
    if max_batch_tokens is None:
        mine = list(range(rank, len(cases), world))
        results = ((i, *_patch_case(source, target, cases[i], *args)) for i in mine)
    else:  # a rank takes whole groups, so its forwards are the single process's, float for float
        groups = list(length_batches([len(c.target_ids) for c in cases], batch_size, max_batch_tokens))[rank::world]
        mine = [i for g in groups for i in g]
        results = _patch_cases_batched(source, target, cases, groups, *args, max_batch_tokens, padding,
                                       skip_lower_layers and can_start_mid_stack(target))
    by_case: dict[int, list[PatchRow]] = {}
    for i, out, ctx in tqdm(results, total=len(mine), desc=f"patching {direction}", disable=not progress):
        if attribution:
            att = attribution_estimates(target, cases[i], layers, diff, metric_fns, ctx, cost)
            for r in out:
                r.attribution = att.get((r.position, r.anchor, r.control, r.rel_pos, r.layer, r.metric), float("nan"))
        by_case[i] = out
    if world > 1:
        by_case, cost = _gather(by_case, cost, world)
    rows = [r for i in range(len(cases)) for r in by_case[i]]
    for r in rows:
        r.direction, r.source, r.target = direction, source.spec, target.spec
    table = pd.DataFrame([tuple(getattr(r, c) for c in ROW_COLUMNS) for r in rows], columns=ROW_COLUMNS)
    info.update(direction=direction, directions=[direction], layers=layers, window=list(window),
                metrics=[m.name for m in metric_fns], kl_positions=kl_positions, use_cache=use_cache,
                max_batch_tokens=max_batch_tokens, padding=padding, rank=rank, world_size=world, cost=cost,
                skip_lower_layers=bool(skip_lower_layers and max_batch_tokens is not None and can_start_mid_stack(target)))
    return PatchResult(table, info)


def _gather(by_case: dict[int, list[PatchRow]], cost: dict, world: int) -> tuple[dict[int, list[PatchRow]], dict]:
    """Every rank's rows (by case index) and summed costs, on every rank (gloo all_gather_object)."""
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, (by_case, cost))
    merged: dict[int, list[PatchRow]] = {}
    total = {k: 0 for k in cost}
    for part, c in parts:
        merged.update(part)
        for k, v in c.items():
            total[k] += v
    return merged, total


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
