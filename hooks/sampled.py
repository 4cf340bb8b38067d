"""Sampled (greedy) check of cross-model patching: what does the target actually write after a
patched "wait"?

`sampled_continuations` complements the teacher-forced metrics of `hooks.patching`. For every
wait that `select` picks, the prefix is the target's own rendering of the trajectory up to and
including the wait token. For each layer and each ``rel_pos <= 0`` the source's
``blocks.{l}.hook_resid_pre`` state at ``wait + rel_pos`` (one source forward over the same
prefix, `capture_resid_pre`) replaces the target's there, in the prefill only; the target then
decodes `max_new_tokens` tokens greedily with its KV cache (new tokens are never patched). Rows:

- ``control="clean"``: the same greedy continuation without any patch (layer/rel_pos NA);
- ``control="none"``: patched at the wait's window;
- ``control="random"``: patched the same way around a non-discourse reasoning token drawn
  before the wait (the random anchor `hooks.patch_cases.prepare_cases` draws, same `seed`).

Window cells outside the reasoning (before its first token) are skipped, as in
`hooks.patching`. Each anchor's clean and patched continuations run as one batch (row 0
clean, one row per (layer, rel_pos) cell), all rows the same length, so no padding.

Which waits, and what counts as a success, are the caller's (a task's ground truth):
``select(trajectory) -> {word index: wait}`` (the wait's whitespace-word index in the
reasoning) and ``judge(continuation, wait) -> (success, value)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from waitlens.hooks.patch_cases import prepare_cases, word_index
from waitlens.hooks.patching import capture_resid_pre
from waitlens.hooks.points import hook_name, residual_hooks, resolve_layers
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

SAMPLED_COLUMNS = ["trajectory_id", "problem_id", "direction", "control", "layer", "rel_pos", "wait_word",
                   "corrected", "value", "continuation"]


# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def _greedy_batch(model, prefix: Sequence[int], patches: list[list[tuple[int, int, torch.Tensor]]],
                  max_new_tokens: int, *, share_prefix: bool = True) -> list[list[int]]:
    """Greedy continuation of `prefix` once per row; row r gets `patches[r]` [(layer, pos, state)] in the prefill.

    share_prefix: the tokens before the first patched position are the same in every row, so
    they run once (one row) and their KV cache is repeated for the rows; only the rest of the
    prefill runs per row (tested to give the same tokens as the full per-row prefill)."""
    n, L = len(patches), len(prefix)
    by_layer: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for r, cells in enumerate(patches):
        for layer, pos, v in cells:
            by_layer.setdefault(layer, []).append((r, pos, v))
    first = min((pos for cells in by_layer.values() for _, pos, _ in cells), default=L - 1)
    start = min(first, L - 1) if share_prefix else 0  # the per-row forward covers prefix[start:]

    def make(layer):
        def fn(x):  # hooked in the prefill only: new tokens are never patched
            x = x.clone()
            for r, pos, v in by_layer[layer]:
                x[r, pos - start] = v.to(device=x.device, dtype=x.dtype)
            return x
        return fn

    past = None
    if start > 0:
        head = torch.tensor([list(prefix[:start])], dtype=torch.long, device=model.device)
        past = model.hf(input_ids=head, use_cache=True).cache
        past.batch_repeat_interleave(n)
    x = torch.tensor([list(prefix[start:])] * n, dtype=torch.long, device=model.device)
    with residual_hooks(model, {hook_name(layer, "resid_pre"): make(layer) for layer in by_layer}):
        out = model.hf(input_ids=x, use_cache=True, **({} if past is None else {"cache": past}))
    past, nxt = out.cache, out.logits[:, -1].argmax(-1)
    toks = [nxt]
    for _ in range(max_new_tokens - 1):
        out = model.hf(input_ids=nxt[:, None], cache=past, use_cache=True)
        past, nxt = out.cache, out.logits[:, -1].argmax(-1)
        toks.append(nxt)
    return torch.stack(toks, 1).tolist()


def _decode(model, ids: list[int]) -> str:
    eos = model.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sampled_continuations(source: LoadedModel, target: LoadedModel, trajectories: Sequence[Trajectory], *,
                          select: Callable[[Trajectory], dict[int, Any]],
                          judge: Callable[[str, Any], tuple[bool, int | None]], layers=None,
                          rel_positions: Sequence[int] = (-2, -1, 0), max_new_tokens: int = 8, seed: int = 0,
                          progress: bool = False) -> pd.DataFrame:
    """Greedy continuations of the target after each selected wait, clean and patched (module doc).

    Trajectories where `select` picks no wait are left out; none left raises ValueError.
    Positive `rel_positions` (inside the continuation) are dropped with a warning.
    """
    from tqdm.auto import tqdm

    layers = resolve_layers(layers, target.n_layers)
    rels = sorted({int(r) for r in rel_positions})
    if any(r > 0 for r in rels):
        warnings.warn(f"rel_positions > 0 are after the prefix and cannot be patched; dropped "
                      f"{[r for r in rels if r > 0]}", stacklevel=2)
        rels = [r for r in rels if r <= 0]
    if not rels:
        raise ValueError("no rel_position <= 0 to patch")
    direction = f"{target.spec}<-{source.spec}"
    picked = {t.id: select(t) for t in trajectories}
    chosen = [t for t in trajectories if picked[t.id]]
    if not chosen:
        raise ValueError(f"none of the {len(trajectories)} trajectories has a wait to continue after")
    cases, _ = prepare_cases(source, target, chosen, seed=seed)

    rows = []
    for case in tqdm(cases, desc=f"sampled {direction}", disable=not progress):
        traj, al = case.trajectory, case.align
        trd = target.render(dataclasses.replace(traj, answer=traj.gold))
        by_word = picked[traj.id]
        groups: dict[int, dict[str, int]] = {}
        for a in case.anchors:
            groups.setdefault(a.group, {})[a.control] = a.offset
        for g in groups.values():
            off = g["none"]
            char = trd.offsets[al.target_start + off][0] - trd.reasoning_chars[0]
            word = word_index(traj.reasoning, char)
            wait = by_word.get(word)
            if wait is None:  # a wait not selected
                continue
            t_end = al.target_start + off + 1
            cells = []  # (control, layer, rel, reasoning offset)
            for control in ("none", "random"):
                if control not in g:
                    continue
                for layer in layers:
                    for rel in rels:
                        o = g[control] + rel
                        if 0 <= o <= off:
                            cells.append((control, layer, rel, o))
            offs = sorted({c[3] for c in cells})
            src_prefix = case.source_ids[: al.source_start + off + 1]
            states = capture_resid_pre(source, src_prefix, [al.source_start + o for o in offs], layers)
            li, oi = {lay: i for i, lay in enumerate(layers)}, {o: i for i, o in enumerate(offs)}
            patches = [[]] + [[(layer, al.target_start + o, states[li[layer], oi[o]])]
                              for _, layer, _, o in cells]
            outs = _greedy_batch(target, case.target_ids[:t_end], patches, max_new_tokens)
            for (control, layer, rel, _), ids in zip([("clean", pd.NA, pd.NA, None)] + cells, outs, strict=True):
                text = _decode(target, ids)
                ok, value = judge(text, wait)
                rows.append((traj.id, traj.problem_id, direction, control, layer, rel, word, int(ok),
                             value, text))
    df = pd.DataFrame(rows, columns=SAMPLED_COLUMNS)
    for c in ("layer", "rel_pos", "value"):
        df[c] = df[c].astype("Int64")
    return df


__all__ = ["SAMPLED_COLUMNS", "sampled_continuations"]
