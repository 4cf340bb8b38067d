"""Forced-wait interventions: re-run a trajectory from its own prefix with a word the model is
made to say ("Wait"), continue with the same engine and sampling settings, and grade again.

`--at end` is s1's setting (the word where the model closed its reasoning); `--at steps` cuts
the reasoning at one step boundary (chosen per trajectory, seeded) and forces the word there.
With `n > 1` the model's next closes of its reasoning are replaced by the word too (budget
forcing's `extend_thinking`), so every re-run carries `n` forced words unless it stops early.
The re-run is a `Trajectory` like any other, with ``extra["forced_waits"]`` (offsets of the
forced words in its reasoning) and ``extra["intervention"]`` (what was done to which trajectory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from waitlens.hooks.generate import (
    Budget,
    HFEngine,
    Sampling,
    as_engine,
    forced_completions,
    join_word,
    reasoning_offsets,
    split_completion,
)
from waitlens.traces.formats import render_head
from waitlens.traces.grading import grade
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel
    from waitlens.hooks.vllm_engine import VLLMEngine

AT = ("end", "steps")
CHANGES = ("fix", "break", "kept-right", "kept-wrong")


class InterventionError(ValueError):
    """An intervention that cannot run; the message names the setting and its value."""


_STEP_END = re.compile(r"\n\s*\n|(?<=[.!?])\s+(?=\S)|\n")


def step_boundaries(reasoning: str) -> list[int]:
    """Character offsets where a reasoning step ends: paragraph breaks, line breaks and sentence
    ends (the offset is where the step's text stops; the last step's end is not included)."""
    ends = sorted({m.start() for m in _STEP_END.finditer(reasoning)})
    return [e for e in ends if 0 < e < len(reasoning.rstrip())]


def default_word(tokenizer, word: str = "Wait") -> str:
    """`word` if the tokenizer knows it, else its lower case (a small word-level vocabulary may
    have only "wait")."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return word.lower() if unk is not None and unk in ids else word


@dataclass
class Intervention:
    """One trajectory before and after a forced word."""

    trajectory_id: str
    problem_id: str
    model: str | None
    at: str
    word: str
    cut: int  # character offset in the original reasoning where the word was forced
    before_correct: bool
    after_correct: bool
    before_answer: str
    after_answer: str
    rerun: Trajectory

    @property
    def change(self) -> str:
        if self.before_correct != self.after_correct:
            return "fix" if self.after_correct else "break"
        return "kept-right" if self.after_correct else "kept-wrong"

    def row(self) -> dict:
        return {"trajectory_id": self.trajectory_id, "problem_id": self.problem_id, "model": self.model,
                "at": self.at, "word": self.word, "cut": self.cut, "before_correct": self.before_correct,
                "after_correct": self.after_correct, "before_answer": self.before_answer,
                "after_answer": self.after_answer, "change": self.change,
                "n_forced": len(self.rerun.extra.get("forced_waits", []))}


def force_wait(
    model: LoadedModel | HFEngine | VLLMEngine,
    trajectories: Sequence[Trajectory],
    *,
    at: str = "end",
    word: str | None = None,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    answer_tokens: int = 32,
    boundaries: Callable[[str], list[int]] | None = None,
    progress: bool = False,
) -> list[Intervention]:
    """Re-run every trajectory with `word` forced at the end of its reasoning (`at="end"`) or
    after one of its step boundaries (`at="steps"`; `boundaries(reasoning)` gives the offsets,
    default `step_boundaries`; a trajectory without one is left out), `n` forced words in all.

    model: a loaded model (HF `generate`) or an engine (`hooks.vllm_engine.VLLMEngine`).
    word: default "Wait" (or "wait" where the tokenizer does not know "Wait").
    """
    if at not in AT:
        raise InterventionError(f"--at must be one of {', '.join(AT)}, got {at!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InterventionError(f"--n (forced words per trajectory) must be a whole number >= 1, got {n!r}")
    engine = as_engine(model)
    word = (word or default_word(engine.tokenizer)).strip()
    if not word:
        raise InterventionError("--word must be a non-empty word")
    boundaries = boundaries or step_boundaries
    rng = np.random.default_rng([int(seed), 17])
    todo: list[tuple[Trajectory, int]] = []
    for t in trajectories:
        if at == "end":
            todo.append((t, len(t.reasoning.rstrip())))
            continue
        cuts = boundaries(t.reasoning)
        if cuts:
            todo.append((t, int(cuts[int(rng.integers(len(cuts)))])))
    if not todo:
        return []
    heads = [render_head(engine.tokenizer, t.prompt, engine.format) for t, _ in todo]
    prefixes, waits = [], []
    for t, cut in todo:
        text, off = join_word(t.reasoning[:cut].rstrip(), word)
        prefixes.append(text)
        waits.append([off])
    budget = Budget(None, n - 1, word, answer_tokens)
    pairs = forced_completions(engine, heads, budget=budget, max_new_tokens=max_new_tokens,
                               sampling=Sampling(temperature, top_p, seed, batch_size), prefixes=prefixes,
                               prefix_waits=waits, progress=progress)
    out = []
    for (t, cut), (completion, thought) in zip(todo, pairs, strict=True):
        reasoning, answer = split_completion(completion, engine.format)
        extra = {"completion": completion, "temperature": temperature, "seed": seed,
                 "forced_waits": reasoning_offsets(thought.text, reasoning, thought.waits, word),
                 "intervention": {"of": t.id, "at": at, "cut": cut, "word": word, "n": n}}
        if answer is None:
            extra["malformed"] = True
        rerun = Trajectory(id=f"{t.id}+{word}@{at}", problem_id=t.problem_id, prompt=t.prompt, reasoning=reasoning,
                           answer=answer or "", gold=t.gold, correct=answer is not None and grade(answer, t.gold),
                           model=t.model, extra=extra)
        before = bool(t.correct) if t.correct is not None else grade(t.answer, t.gold)
        out.append(Intervention(t.id, t.problem_id, t.model, at, word, cut, before, bool(rerun.correct),
                                t.answer, rerun.answer, rerun))
    return out
