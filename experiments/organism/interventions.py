"""The organism's side of forced-wait interventions: where its steps end, and what its ground
truth says a forced "wait" did.

A forced "wait" in an organism trace re-checks the step just written (`task.analyze` reads it as
a ``wait`` recheck). The ground truth of the re-run says whether that step was a slip
(`after_slip`), whether the recheck wrote the right value (`recheck_correct`) and whether it
changed the running value (`changed_answer`). `truth_change` derives the change from the ground
truth alone (the true final value against gold, before and after), so it can be checked against
the graded change, and `mechanism` says which planted behaviour each change came from: a fix
is a slip re-checked correctly, a break a correct step "re-checked" to a wrong value, or the
word taken as a hesitation: the model goes on and applies the last operation again (what the
models learn from the hesitations in their corpora).
"""

from __future__ import annotations

from typing import Any

from waitlens.experiments.organism.sample import add_truth
from waitlens.experiments.organism.task import SEPARATORS, Problem, analyze, apply
from waitlens.traces.trajectory import Trajectory

CONNECTIVES = (*SEPARATORS, "wait", "alternatively")


def step_boundaries(reasoning: str) -> list[int]:
    """Character offsets where an organism step ends (right after its value, before the
    connective that follows; the last step's end is not included)."""
    out, pos = [], 0
    spans = []
    for w in reasoning.split():
        i = reasoning.index(w, pos)
        spans.append((i, i + len(w), w))
        pos = i + len(w)
    for (_, end, _), (_, _, nxt) in zip(spans, spans[1:], strict=False):
        if nxt in CONNECTIVES:
            out.append(end)
    return out


def is_organism(trajectories: list[Trajectory]) -> bool:
    """Every trajectory is an organism prompt (so its ground truth can be read)."""
    try:
        for t in trajectories:
            Problem.parse_prompt(t.prompt)
    except ValueError:
        return False
    return bool(trajectories)


def _right(truth: dict, gold: str) -> bool:
    return (not truth.get("malformed")) and str(truth.get("final_value")) == str(gold).strip()


def truth_check(original: Trajectory, rerun: Trajectory) -> dict[str, Any]:
    """What the ground truth says about one intervention (adds ``extra["truth"]`` to `rerun`)."""
    problem = Problem.parse_prompt(original.prompt)
    before = original.extra.get("truth") or analyze(problem, original.reasoning).to_dict()
    if "truth" not in rerun.extra:
        add_truth(rerun, problem)
    after = rerun.extra["truth"]
    offsets = rerun.extra.get("forced_waits", [])
    word_idx = {len(rerun.reasoning[:o].split()) for o in offsets}
    forced = [w for w in after.get("waits", []) if w.get("word") in word_idx]
    w = forced[0] if forced else {}
    steps = after.get("steps", [])
    k = next((i for i, st in enumerate(steps) if st.get("kind") == "wait" and st.get("word") == w.get("word")), None)
    after_recheck = bool(k) and steps[k - 1].get("kind") in ("wait", "alternatively")
    # the step after the word applies the operation to the running value again (a "next step"
    # past the end, as after a hesitation), instead of re-checking the step before it
    applied_again = False
    if k is not None:
        st = steps[k]
        op, b = problem.ops[st["step"]]
        applied_again = bool(st.get("wrong_operands")) and st["value"] == apply(st["before"], op, b)
    tb, ta = _right(before, original.gold), _right(after, rerun.gold)
    gb, ga = bool(original.correct), bool(rerun.correct)

    def change(b, a):
        return ("fix" if a else "break") if a != b else ("kept-right" if a else "kept-wrong")

    return {
        "truth_change": change(tb, ta), "graded_change": change(gb, ga),
        "agree": change(tb, ta) == change(gb, ga),
        "malformed_after": bool(after.get("malformed")),
        "forced_found": bool(forced), "forced_rechecked": bool(w.get("rechecked", False)),
        "forced_after_slip": w.get("after_slip"), "forced_recheck_correct": w.get("recheck_correct"),
        "forced_changed_answer": w.get("changed_answer"),
        # the word follows a recheck (never in the training traces): the step it re-checks is the recheck
        "forced_after_recheck": after_recheck,
        "forced_applied_again": applied_again,
    }


def mechanism(check: dict[str, Any]) -> str:
    """Which planted behaviour a change came from (for fixes and breaks; else "-")."""
    c = check["graded_change"]
    if check["malformed_after"] and c == "break":
        return "re-run malformed"
    if c in ("fix", "break") and check.get("forced_applied_again"):
        return "went on: the last operation applied again to the running value"
    if c == "fix":
        if check["forced_after_slip"] and check["forced_recheck_correct"]:
            return "slip re-checked to the right value"
        return "other"
    if c == "break":
        if check["forced_after_slip"] is False and check["forced_recheck_correct"] is False:
            return "correct step re-checked to a wrong value"
        return "other"
    return "-"
