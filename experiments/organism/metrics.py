"""The organism's own patching and ablation metrics: what its ground truth lets us measure.

The organism's traces are ``a op b = v`` steps separated by ``;``/``so``/``therefore``, with a
``wait`` that re-checks the step before it; each sampled trajectory carries the truth of what
was planted (``extra["truth"]``: its steps, its slips, what each wait did). On that grammar:

- ``correction`` (a `PatchMetric` for `hooks.patch`, and a read-out for `hooks.ablations`):
  for a wait that follows a slip, the probability the target gives the *correct* value of the
  re-checked step at the position that writes it (the ``=`` token five words after the wait
  predicts it: "wait a op b = c"). Waits that do not follow a slip get no correction value.
  Without ground truth: the mean probability of the trajectory's own next 4 tokens after the
  wait (the discourse behaviour that followed).
- `sampled_corrections`: greedy continuations after each patched wait that follows a slip
  (`hooks.sampled.sampled_continuations`), judged by `organism_recheck_correct`: the first
  five words parse as the re-checked step ``a op b = v`` with the operands of the slipped step
  (`a` the running value written before it, ``op b`` the problem's operation) and ``v`` equal
  to the step's ``expected`` value in the truth — the same target `correction_reads` uses.
- ablations: steps split at `ORGANISM_SEPARATORS`, and the edited wait is the first one that
  follows a slip (`first_wait_after_slip`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from waitlens.hooks.ablations import continuation_reads
from waitlens.hooks.patch_cases import word_index
from waitlens.hooks.patch_metrics import MetricInput, PatchMetric, Read
from waitlens.traces.formats import Rendered
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

ORGANISM_SEPARATORS = (";", "so", "therefore")
FORMAT_NAME = "organism"


def is_organism(model: LoadedModel) -> bool:
    """A model speaking the organism's prompt format."""
    return getattr(getattr(model, "format", None), "name", None) == FORMAT_NAME


def organism_truth(traj: Trajectory) -> dict | None:
    """The organism's ground truth of a trajectory (``extra["truth"]`` with steps and waits), or None."""
    truth = traj.extra.get("truth") if isinstance(traj.extra, dict) else None
    if isinstance(truth, dict) and "steps" in truth and "waits" in truth:
        return truth
    return None


def _char_span_of_word(text: str, k: int) -> tuple[int, int] | None:
    for i, m in enumerate(re.finditer(r"\S+", text)):
        if i == k:
            return m.start(), m.end()
    return None


def correction_reads(model: LoadedModel, traj: Trajectory, rd: Rendered, wait_char: int, wait_token: int,
                     continuation_tokens: int = 4) -> list[tuple[int, int]] | None:
    """What `correction` reads for the wait at reasoning character `wait_char` (module doc):
    [(target position read, token it should predict)], or None."""
    truth = traj.extra.get("truth") if isinstance(traj.extra, dict) else None
    r0 = rd.reasoning_chars[0]
    if isinstance(truth, dict) and "steps" in truth:
        w = word_index(traj.reasoning, wait_char)
        wait = next((x for x in truth.get("waits", []) if x.get("word") == w), None)
        step = next((s for s in truth.get("steps", []) if s.get("kind") == "wait" and s.get("word") == w), None)
        if wait is None or step is None or not wait.get("after_slip"):
            return None
        span = _char_span_of_word(traj.reasoning, w + 5)  # "wait a op b = c": c is 5 words on
        if span is None:
            return None
        ti = next((i for i, (s, e) in enumerate(rd.offsets) if e > r0 + span[0] and s < r0 + span[1]), None)
        ids = model.tokenizer(str(step["expected"]), add_special_tokens=False)["input_ids"]
        if ti is None or ti == 0 or not ids:
            return None
        return [(ti - 1, int(ids[0]))]
    return continuation_reads(model, traj, rd, wait_char, wait_token, continuation_tokens)


def _correction_fn(x: MetricInput):
    return torch.stack([x.logprobs(r)[r.token] for r in x.reads]).exp().mean()


def correction(*, continuation_tokens: int = 4, name: str = "correction") -> PatchMetric:
    """The organism's correction read-out as a `PatchMetric` (module doc)."""

    def reads(model, case, anchor, p):
        key = ("correction", anchor.wait_token)
        if key not in case.cache:
            rs = correction_reads(model, case.trajectory, case.target_rendered, anchor.wait_char, anchor.wait_token,
                                  continuation_tokens)
            case.cache[key] = None if not rs else [Read(pos, None, tok) for pos, tok in rs]
        return case.cache[key]

    return PatchMetric(name, _correction_fn, reads)


ORGANISM_METRICS = {"correction": correction()}
ORGANISM_READOUTS = {"correction": correction_reads}


def first_wait_after_slip(traj: Trajectory, matches: list):
    """The first wait match that follows a slip (ground truth), else the first match."""
    truth = traj.extra.get("truth") if isinstance(traj.extra, dict) else None
    if isinstance(truth, dict):
        after = {w["word"] for w in truth.get("waits", []) if w.get("after_slip")}
        for m in matches:
            if len(traj.reasoning[:m.start].split()) in after:
                return m
    return matches[0]


# ---------------------------------------------------------------------------------------------
# sampled corrections
def organism_slip_waits(traj: Trajectory) -> list[dict]:
    """The waits after a slip, each with the slipped step's ``before``, ``op``, ``b`` and ``expected``.

    The operation is read from the slipped step as written (``a op b = v``, from its ``word``
    index in the reasoning).
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
    """(corrected, value written) for a continuation right after the wait (module doc)."""
    words = continuation.split()[:5]
    if len(words) < 5 or words[3] != "=" or not words[4].isdigit():
        return False, None
    a, op, b, _, v = words
    value = int(v)
    ok = (a == str(wait["before"]) and op == wait["op"] and b == str(wait["b"]) and value == wait["expected"])
    return ok, value


def sampled_corrections(source: LoadedModel, target: LoadedModel, trajectories: Sequence[Trajectory], *, layers=None,
                        rel_positions: Sequence[int] = (-2, -1, 0), max_new_tokens: int = 8, seed: int = 0,
                        progress: bool = False) -> pd.DataFrame:
    """Greedy continuations of the target after each after-slip wait, clean and patched; the
    ``corrected`` column says whether the continuation re-checks the step and writes its
    correct value. Trajectories without organism truth are skipped with a warning that counts
    them; a set with no wait after a slip raises ValueError."""
    from waitlens.hooks.sampled import sampled_continuations

    no_truth = [t.id for t in trajectories if organism_truth(t) is None]
    if no_truth:
        warnings.warn(f"skipped {len(no_truth)} of {len(trajectories)} trajectories without organism truth "
                      f"(extra['truth']) (e.g. {no_truth[:3]})", stacklevel=2)
    slip_waits = {t.id: organism_slip_waits(t) for t in trajectories if organism_truth(t) is not None}
    chosen = [t for t in trajectories if slip_waits.get(t.id)]
    if not chosen:
        raise ValueError(f"none of the {len(trajectories)} trajectories has a wait after a slip "
                         "(extra['truth']['waits'] with after_slip true); nothing to check")
    by_word = {tid: {w["word"]: w for w in ws} for tid, ws in slip_waits.items()}
    return sampled_continuations(source, target, chosen, select=lambda t: by_word.get(t.id, {}),
                                 judge=organism_recheck_correct, layers=layers, rel_positions=rel_positions,
                                 max_new_tokens=max_new_tokens, seed=seed, progress=progress)


__all__ = ["ORGANISM_METRICS", "ORGANISM_READOUTS", "ORGANISM_SEPARATORS", "correction", "correction_reads",
           "first_wait_after_slip", "is_organism", "organism_recheck_correct", "organism_slip_waits",
           "organism_truth", "sampled_corrections"]
