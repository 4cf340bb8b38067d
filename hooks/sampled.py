"""Sampled (greedy) check of cross-model patching: does the target's continuation after a
"wait" that follows a slip actually re-check the step and write the correct value?

`sampled_corrections` complements the teacher-forced metrics of `hooks.patching`. For every
wait that follows a slip (organism ground truth, ``extra["truth"]``), the prefix is the
target's own rendering of the trajectory up to and including the wait token. For each layer
and each ``rel_pos <= 0`` the source's ``blocks.{l}.hook_resid_pre`` state at
``wait + rel_pos`` (one source forward over the same prefix, `capture_resid_pre`) replaces the
target's there, in the prefill only; the target then decodes `max_new_tokens` tokens greedily
with its KV cache (new tokens are never patched). Rows:

- ``control="clean"``: the same greedy continuation without any patch (layer/rel_pos NA);
- ``control="none"``: patched at the wait's window;
- ``control="random"``: patched the same way around a non-discourse reasoning token drawn
  before the wait (the random anchor `hooks.patch_cases.prepare_cases` draws, same `seed`).

Window cells outside the reasoning (before its first token) are skipped, as in
`hooks.patching`. Each anchor's clean and patched continuations run as one batch (row 0
clean, one row per (layer, rel_pos) cell), all rows the same length, so no padding.

``corrected`` (organism-specific, `organism_recheck_correct`): the continuation's first five
words parse as the re-checked step ``a op b = v`` with the operands of the slipped step (`a` the
running value written before it, ``op b`` the problem's operation) and ``v`` equal to the step's
``expected`` value in the truth, i.e. the value the step should have had given the running value
before it — the same target that `correction_reads` uses (it equals the true value unless an
earlier slip went uncaught). Anything else (the next step, a wrong value, malformed text) is 0.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import pandas as pd
import torch

from waitlens.hooks.patch_cases import prepare_cases, word_index
from waitlens.hooks.patching import capture_resid_pre
from waitlens.hooks.points import hook_name, residual_hooks, resolve_layers
from waitlens.traces.trajectory import Trajectory

SAMPLED_COLUMNS = ["trajectory_id", "problem_id", "direction", "control", "layer", "rel_pos", "wait_word",
                   "corrected", "value", "continuation"]


# ---------------------------------------------------------------------------------------------
# organism-specific: ground truth and parsing
def organism_truth(traj: Trajectory) -> dict | None:
    """The organism's ground truth of a trajectory (``extra["truth"]`` with steps and waits), or None."""
    truth = traj.extra.get("truth") if isinstance(traj.extra, dict) else None
    if isinstance(truth, dict) and "steps" in truth and "waits" in truth:
        return truth
    return None


def organism_slip_waits(traj: Trajectory) -> list[dict]:
    """The waits after a slip, each with the slipped step's ``before``, ``op``, ``b`` and ``expected``.

    The operation is read from the slipped step as written (``a op b = v``, from its ``word``
    index in the reasoning), so this layer needs nothing from the organism's code.
    """
    truth = organism_truth(traj)
    if truth is None:
        return []
    words = traj.reasoning.split()
    out = []
    for w in truth["waits"]:
        if not w.get("after_slip") or "word" not in w:
            continue
        step = next((s for s in truth["steps"] if s["kind"] == "step" and s["step"] == w["step"]), None)
        if step is None:
            continue
        eq = next((i for i in range(int(step["word"]), len(words)) if words[i] == "="), None)
        if eq is None or eq < 2:  # the step's "a op b =" (its word index may be the separator before it)
            continue
        op, b = words[eq - 2], words[eq - 1]
        out.append({"word": int(w["word"]), "step": int(w["step"]), "before": int(step["before"]), "op": op,
                    "b": int(b), "expected": int(step["expected"])})
    return out


def organism_recheck_correct(continuation: str, wait: dict) -> tuple[bool, int | None]:
    """(corrected, value written) for a continuation right after the wait (see module doc)."""
    words = continuation.split()[:5]
    if len(words) < 5 or words[3] != "=" or not words[4].isdigit():
        return False, None
    a, op, b, _, v = words
    value = int(v)
    ok = (a == str(wait["before"]) and op == wait["op"] and b == str(wait["b"]) and value == wait["expected"])
    return ok, value


# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def _greedy_batch(model, prefix: Sequence[int], patches: list[list[tuple[int, int, torch.Tensor]]],
                  max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of `prefix` once per row; row r gets `patches[r]` [(layer, pos, state)] in the prefill."""
    n, L = len(patches), len(prefix)
    by_layer: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for r, cells in enumerate(patches):
        for layer, pos, v in cells:
            by_layer.setdefault(layer, []).append((r, pos, v))

    def make(layer):
        def fn(x):
            if x.shape[1] != L:  # decode step: new tokens are never patched
                return None
            x = x.clone()
            for r, pos, v in by_layer[layer]:
                x[r, pos] = v.to(device=x.device, dtype=x.dtype)
            return x
        return fn

    x = torch.tensor([list(prefix)] * n, dtype=torch.long, device=model.device)
    with residual_hooks(model, {hook_name(layer, "resid_pre"): make(layer) for layer in by_layer}):
        out = model.hf(input_ids=x, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    toks = [nxt]
    for _ in range(max_new_tokens - 1):
        out = model.hf(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
        toks.append(nxt)
    return torch.stack(toks, 1).tolist()


def _decode(model, ids: list[int]) -> str:
    eos = model.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sampled_corrections(source, target, trajectories: Sequence[Trajectory], *, layers=None,
                        rel_positions: Sequence[int] = (-2, -1, 0), max_new_tokens: int = 8, seed: int = 0,
                        progress: bool = False) -> pd.DataFrame:
    """Greedy continuations of the target after each after-slip wait, clean and patched (module doc).

    Trajectories without organism truth are skipped with a warning that counts them; a set with
    no wait after a slip raises ValueError. Positive `rel_positions` (inside the continuation)
    are dropped with a warning.
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

    no_truth = [t.id for t in trajectories if organism_truth(t) is None]
    if no_truth:
        warnings.warn(f"skipped {len(no_truth)} of {len(trajectories)} trajectories without organism truth "
                      f"(extra['truth']) (e.g. {no_truth[:3]})", stacklevel=2)
    slip_waits = {t.id: organism_slip_waits(t) for t in trajectories if organism_truth(t) is not None}
    chosen = [t for t in trajectories if slip_waits.get(t.id)]
    if not chosen:
        raise ValueError(f"none of the {len(trajectories)} trajectories has a wait after a slip "
                         "(extra['truth']['waits'] with after_slip true); nothing to check")
    cases, _ = prepare_cases(source, target, chosen, seed=seed)

    rows = []
    for case in tqdm(cases, desc=f"sampled {direction}", disable=not progress):
        traj, al = case.trajectory, case.align
        trd = target.render(dataclasses.replace(traj, answer=traj.gold))
        by_word = {w["word"]: w for w in slip_waits[traj.id]}
        groups: dict[int, dict[str, int]] = {}
        for a in case.anchors:
            groups.setdefault(a.group, {})[a.control] = a.offset
        for g in groups.values():
            off = g["none"]
            char = trd.offsets[al.target_start + off][0] - trd.reasoning_chars[0]
            wait = by_word.get(word_index(traj.reasoning, char))
            if wait is None:  # a wait not after a slip
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
                ok, value = organism_recheck_correct(text, wait)
                rows.append((traj.id, traj.problem_id, direction, control, layer, rel, wait["word"], int(ok),
                             value, text))
    df = pd.DataFrame(rows, columns=SAMPLED_COLUMNS)
    for c in ("layer", "rel_pos", "value"):
        df[c] = df[c].astype("Int64")
    return df


__all__ = ["SAMPLED_COLUMNS", "organism_recheck_correct", "organism_slip_waits", "organism_truth",
           "sampled_corrections"]
