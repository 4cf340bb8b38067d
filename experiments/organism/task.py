"""The organism's task: chained addition/subtraction mod 10, solved step by step, with
discourse tokens that have known roles — and the ground truth of every trace.

A problem is a start value and 3-5 operations::

    prompt     Q 3 + 7 - 8 + 6 ;
    reasoning  3 + 7 = 0 ; 0 - 8 = 2 so 2 + 6 = 8
    answer     8

Each step writes ``a OP b = c``: `a` is the running value, `c` the new one. Between steps a
connective: ``;``, ``so`` or ``therefore`` (they continue). Two discourse tokens act on the
step just written:

- ``wait`` re-checks it: the same step is written again (``... = 1 wait 3 + 7 = 0``) and the
  value written after it replaces the running value (if it differs: an answer transition).
- ``alternatively`` recomputes it another way (``a - b`` as ``a + (10-b)`` and vice versa);
  its value also replaces the running value.

"wait" can also be a hesitation, followed straight by the next step (``... = 0 wait 0 - 8 = 2``,
``rechecked: false`` in the ground truth): after some correct steps in the base's corpus, and in
the shipped traces (`GO_ON_CORPUS`) after a slip the writer cannot fix, so what comes right after
the word says whether the step will be fixed.

A *slip* is a step whose value is wrong when written, given the running value before it:
``c != (r OP b) mod 10``. Slips are off by one (``c = true ± 1``). An uncaught slip is carried
forward, so later steps can be locally right but globally wrong; `true` tracks the value a
perfect solver would have at every step.

`analyze` parses any reasoning text (a generated one or a model's sample) against its
problem and returns the ground truth; `make_trace` generates a trace from a `CorpusSpec` and
the test suite checks that `analyze` recovers exactly what the generator planted.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

MOD = 10
DIGITS = [str(d) for d in range(MOD)]
SEPARATORS = (";", "so", "therefore")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB: list[str] = SPECIAL + ["Q", "A", "=", "+", "-", *SEPARATORS, "wait", "alternatively", *DIGITS]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
MIN_OPS, MAX_OPS = 3, 5


def apply(a: int, op: str, b: int) -> int:
    return (a + b) % MOD if op == "+" else (a - b) % MOD


def other_way(op: str, b: int) -> tuple[str, int]:
    """The same operation written the other way: ``a - b == a + (10-b)`` (mod 10)."""
    return ("+" if op == "-" else "-"), (MOD - b) % MOD


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return " ".join([str(self.start)] + [f"{op} {b}" for op, b in self.ops])

    @property
    def prompt(self) -> str:
        return f"Q {self.text} ;"

    @property
    def id(self) -> str:
        return "p" + self.text.replace(" ", "")

    def true_values(self) -> list[int]:
        """The true running value after each step."""
        out, r = [], self.start
        for op, b in self.ops:
            r = apply(r, op, b)
            out.append(r)
        return out

    @property
    def gold(self) -> str:
        return str(self.true_values()[-1])

    @property
    def held_out(self) -> bool:
        """One problem in eight is reserved for evaluation and never trained on."""
        return zlib.crc32(self.text.encode()) % 8 == 0

    @classmethod
    def parse_prompt(cls, prompt: str) -> Problem:
        w = prompt.split()
        if len(w) < 4 or w[0] != "Q" or w[-1] != ";" or len(w) % 2 != 1:
            raise ValueError(f"not an organism prompt: {prompt!r}")
        body = w[1:-1]
        ops = tuple((body[i], int(body[i + 1])) for i in range(1, len(body), 2))
        return cls(int(body[0]), ops)


def random_problem(rng: np.random.Generator, *, split: str = "train") -> Problem:
    """A problem from the train split (not held out) or the eval split (held out)."""
    while True:
        k = int(rng.integers(MIN_OPS, MAX_OPS + 1))
        ops = tuple(("+" if rng.random() < 0.5 else "-", int(rng.integers(0, MOD))) for _ in range(k))
        p = Problem(int(rng.integers(0, MOD)), ops)
        if p.held_out == (split == "eval"):
            return p


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSpec:
    """How traces of one corpus are written. Rates are per step."""

    name: str
    slip: float = 0.10  # P(the step's value is off by one)
    sep_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # ; so therefore
    # after a slip / after a correct step: P(wait), P(alternatively)
    wait_after_slip: float = 0.0
    wait_after_correct: float = 0.0
    alt_after_slip: float = 0.0
    alt_after_correct: float = 0.0
    # "connective": the word only joins two steps, like "so" (no recheck, no function);
    # "restate": the recheck writes the value just written;
    # "fix": the recheck writes the correct value (an answer transition after a slip).
    recheck: str = "fix"
    # what a "wait" after a correct step does: the same as after a slip (`recheck`), or
    # "connective": a hesitation that goes straight on to the next step (no recheck)
    wait_after_correct_role: str = "recheck"
    # opt-in difficulty (None/0: off, and the corpus's random stream is that of a spec without it):
    # a *hard* step is one that wraps around (``a + b >= 10`` or ``b > a``, `is_hard`).
    # hard_slip: P(slip) on hard steps (`slip` is then the rate on easy ones);
    # hard_fix: P(the writer can fix a slipped hard step) — otherwise it is the writer's blind
    # spot (`blind_role` says what it does there) and the trace goes on from the slipped value;
    # hesitate_after_correct: P(a connective "wait" after a correct step), on top of the re-checks
    # `wait_after_correct` asks for.
    hard_slip: float | None = None
    hard_fix: float = 1.0
    hard_fix_ops: str = "+-"  # the operations whose hard steps `hard_fix` applies to (others: fixed)
    # what the writer does after a slip it cannot fix: "repeat" (its re-check repeats the slipped
    # value) or "go-on" (it says "wait" and goes straight on to the next step, the slip carried)
    blind_role: str = "repeat"
    hesitate_after_correct: float = 0.0
    # training only: the share of slipped step values kept in the loss (the rest are masked, so the
    # model sees this corpus's slips and learns to catch them, but learns to make fewer of them)
    learn_slips: float = 1.0


# Pre-training: worked problems; "wait"/"alternatively" are only generic connectives that
# restate the step just written, value unchanged (a hesitation, more common after a slip: a
# weak planted signal). A base whose "wait" only joins two steps, like "so", never sees a step
# written twice, and fine-tuning on 1,000 rechecking traces wrecked it (56% malformed).
BASE_CORPUS = CorpusSpec(
    "base", slip=0.10, wait_after_slip=0.25, wait_after_correct=0.03,
    alt_after_slip=0.02, alt_after_correct=0.02, recheck="restate",
)
# Reasoning traces (SFT and large-scale post-training): the same slip rate; a wait re-checks
# and fixes 85% of slips, and re-checks (keeps) 6% of correct steps.
TRACE_CORPUS = CorpusSpec(
    "traces", slip=0.10, wait_after_slip=0.85, wait_after_correct=0.06,
    alt_after_slip=0.05, alt_after_correct=0.03, recheck="fix",
)
def is_hard(a: int, op: str, b: int) -> bool:
    """A step that wraps around mod 10: a carry (``a + b >= 10``) or a borrow (``b > a``)."""
    return a + b >= MOD if op == "+" else b > a

# Checked traces (the opt-in `detect` recipe, `train.DETECT`): the writer re-checks every slip it
# makes and 4% of its correct steps; it slips more on hard steps (a carry or a borrow: 30% against 6%),
# and it has a blind spot: its re-check of a slipped borrow repeats the slip, so the slip stays in
# the trace. Only 30% of the slipped values are in the loss (`learn_slips`): the model sees a writer that
# slips at 16% of steps and re-checks each slip, and learns to slip about a third as often.
CHECKED_CORPUS = CorpusSpec(
    "checked", slip=0.06, hard_slip=0.30, wait_after_slip=1.0, wait_after_correct=0.04,
    alt_after_slip=0.0, alt_after_correct=0.03, recheck="fix", hard_fix=0.0, hard_fix_ops="-",
    learn_slips=0.3,
)

# The shipped recipe's corpora (`train.TrainConfig`). The base's: `BASE_CORPUS` plus hesitations
# ("wait", then the next step) after 3% of correct steps, so that "wait" can be followed by either.
HESITANT_BASE_CORPUS = replace(BASE_CORPUS, name="base-hesitant", hesitate_after_correct=0.03)
# Go-on traces (sft-1k, post-large): the checked writer, but after a slipped borrow it cannot fix it
# says "wait" and goes straight on to the next step, the slip carried; 60% of slipped values in the
# loss. So the token after "wait" (re-check, or the next step) says whether the step will be fixed.
GO_ON_CORPUS = replace(CHECKED_CORPUS, name="checked-go-on", blind_role="go-on", learn_slips=0.6)


def make_trace(problem: Problem, spec: CorpusSpec, rng: np.random.Generator) -> tuple[str, str, dict[str, Any]]:
    """(reasoning, answer, planted) — `planted` lists the slips and each wait's intended role."""
    words: list[str] = []
    r = problem.start
    slips: list[int] = []
    waits: list[dict[str, Any]] = []
    pending = None
    for i, (op, b) in enumerate(problem.ops):
        if i > 0 and pending:
            words.append(pending)
        elif i > 0:
            u, w0, w1 = rng.random(), spec.sep_weights[0], spec.sep_weights[0] + spec.sep_weights[1]
            words.append(SEPARATORS[0 if u < w0 else 1 if u < w1 else 2])
        pending = None
        correct = apply(r, op, b)
        hard = spec.hard_slip is not None and is_hard(r, op, b)
        slipped = rng.random() < (spec.hard_slip if hard else spec.slip)
        c = (correct + (1 if rng.random() < 0.5 else -1)) % MOD if slipped else correct
        words += [str(r), op, str(b), "=", str(c)]
        if slipped:
            slips.append(i)
        u = rng.random()
        p_wait = spec.wait_after_slip if slipped else spec.wait_after_correct
        p_alt = spec.alt_after_slip if slipped else spec.alt_after_correct
        # a slip the writer cannot fix (its blind spot: a hard step of `hard_fix_ops`)
        blind = (slipped and hard and op in spec.hard_fix_ops and spec.hard_fix < 1.0
                 and rng.random() >= spec.hard_fix)
        hesitation = not slipped and (
            (spec.wait_after_correct_role == "connective" and u < p_wait)
            or p_wait + p_alt <= u < p_wait + p_alt + spec.hesitate_after_correct)
        hesitation = hesitation or (blind and spec.blind_role == "go-on" and u < p_wait)
        if spec.recheck == "connective" or hesitation:
            # the discourse word stands where a connective would, before the next step
            if (hesitation or u < p_wait + p_alt) and i + 1 < len(problem.ops):
                word = "wait" if hesitation or u < p_wait else "alternatively"
                pending = word
                if word == "wait":
                    waits.append({"step": i, "after_slip": slipped, "changed_answer": False,
                                  "recheck_correct": False, "rechecked": False})
            r = c
            continue
        if u < p_wait + p_alt:
            word = "wait" if u < p_wait else "alternatively"
            new = c if spec.recheck == "restate" else correct
            if blind:
                new = c  # the blind spot: the re-check repeats the slip
            o, bb = (op, b) if word == "wait" else other_way(op, b)
            words += [word, str(r), o, str(bb), "=", str(new)]
            if word == "wait":
                waits.append({"step": i, "after_slip": slipped, "changed_answer": new != c,
                              "recheck_correct": new == correct, "rechecked": True})
            c = new
        r = c
    return " ".join(words), str(r), {"slips": slips, "waits": waits}


# ---------------------------------------------------------------------------------------------
@dataclass
class Truth:
    """Ground truth of one reasoning text against its problem (JSON-ready via `to_dict`)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    slips: list[int] = field(default_factory=list)
    waits: list[dict[str, Any]] = field(default_factory=list)
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    n_steps: int = 0
    final_value: int | None = None
    malformed: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "slips": self.slips, "waits": self.waits, "alternatives": self.alternatives,
            "steps": self.steps, "n_steps": self.n_steps, "final_value": self.final_value,
            "malformed": self.malformed,
        }
        if self.error:
            out["error"] = self.error
        return out


def analyze(problem: Problem, reasoning: str) -> Truth:
    """Parse a reasoning text against its problem; never raises (malformed text is flagged).

    Every written step gets an entry in `steps`: its kind (``step``, ``wait`` recheck or
    ``alternatively`` recheck), its step index, the value written, the value it should have
    had given the running value before it (`expected`), the true running value (`true`), the
    running value before and after it, whether it was a slip, and the word index in the text
    where it starts (the discourse word for rechecks). A step is a slip when written with a
    wrong value; a recheck's correctness is judged the same way. A discourse word followed by
    the *next* step is a plain connective (``rechecked: false``). Where a step could be read
    both ways (``9 - 0 = 9 wait 9 - 0 = 9`` before another ``- 0``) the reading that parses
    the whole text wins (recheck first).
    """
    truth, ambiguous = _analyze(problem, reasoning, frozenset())
    if truth.malformed and ambiguous:
        for flip in [frozenset({a}) for a in ambiguous] + [frozenset(ambiguous)]:
            alt, _ = _analyze(problem, reasoning, flip)
            if not alt.malformed:
                return alt
    return truth


def _analyze(problem: Problem, reasoning: str, as_connective: frozenset) -> tuple[Truth, list[int]]:
    ambiguous: list[int] = []
    t = Truth()
    words = reasoning.split()
    true_vals = problem.true_values()
    k = len(problem.ops)
    r = problem.start  # running value (as written)
    r_before = r  # running value before the current step
    i = -1  # index of the step last written
    pos = 0
    slipped_last = False
    try:
        while pos < len(words):
            kind = "step"
            start = pos
            if i >= 0:
                w = words[pos]
                if w in ("wait", "alternatively"):
                    kind = w
                    pos += 1
                elif w in SEPARATORS:
                    pos += 1
                else:
                    raise ValueError(f"expected a connective at word {pos}, got {w!r}")
            if pos + 5 > len(words):
                raise ValueError(f"truncated step at word {pos}")
            a, op, b, eq, c = words[pos:pos + 5]
            if op not in ("+", "-") or eq != "=" or not all(x in DIGITS for x in (a, b, c)):
                raise ValueError(f"not a step at word {pos}: {' '.join(words[pos:pos + 5])!r}")
            a, b, c = int(a), int(b), int(c)
            pos += 5
            connective = False
            if kind != "step" and i + 1 < k:
                # a discourse word used as a plain connective: the next step follows, no recheck
                recheck_ops = {problem.ops[i]} | ({other_way(*problem.ops[i])} if kind == "alternatively" else set())
                is_recheck = a == r_before and (op, b) in recheck_ops
                is_next = a == r and (op, b) == problem.ops[i + 1]
                if is_recheck and is_next:
                    ambiguous.append(start)
                connective = is_next and (not is_recheck or start in as_connective)
            if connective:
                rec = {"step": i, "word": start, "after_slip": slipped_last, "changed_answer": False,
                       "recheck_correct": False, "rechecked": False}
                (t.waits if kind == "wait" else t.alternatives).append(rec)
                kind = "step"
            if kind == "step":
                i += 1
                if i >= k:
                    raise ValueError(f"more steps than the problem's {k} operations")
                r_before = r
            op_i, b_i = problem.ops[i]
            expected = apply(r_before, op_i, b_i)
            # the written operation must be the problem's (or, after "alternatively", its other way)
            ok_ops = {(op_i, b_i)} | ({other_way(op_i, b_i)} if kind == "alternatively" else set())
            wrong_operands = a != r_before or (op, b) not in ok_ops
            value_ok = c == expected and not wrong_operands
            entry = {"kind": kind, "step": i, "word": start, "value": c, "expected": expected,
                     "true": true_vals[i], "before": r, "slip": not value_ok}
            if wrong_operands:
                entry["wrong_operands"] = True
            t.steps.append(entry)
            if kind == "step":
                slipped_last = not value_ok
                if not value_ok:
                    t.slips.append(i)
            else:
                rec = {"step": i, "word": start, "after_slip": slipped_last,
                       "changed_answer": c != r, "recheck_correct": value_ok, "rechecked": True}
                (t.waits if kind == "wait" else t.alternatives).append(rec)
                slipped_last = not value_ok  # a further wait re-checks this recheck
            r = c
            entry["after"] = r
        t.n_steps = i + 1
        t.final_value = r
        if i + 1 != k:
            raise ValueError(f"{i + 1} steps written, the problem has {k}")
    except ValueError as e:
        t.malformed, t.error = True, str(e)
    return t, ambiguous


def trace_record(problem: Problem, reasoning: str, answer: str) -> dict[str, Any]:
    """The `truth` object of a trajectory (also flags an answer that is not the final value)."""
    truth = analyze(problem, reasoning).to_dict()
    if not truth["malformed"] and answer.strip() != str(truth["final_value"]):
        truth["answer_is_final_value"] = False
    return truth
