"""Grading a final answer against the gold answer.

Exact match after light normalisation first (the organism's answers are plain integers);
otherwise math-verify extracts the answer (``\\boxed{...}``, "final answer", LaTeX or plain
expressions) and checks mathematical equivalence.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Strip whitespace, a trailing period and surrounding ``$``; collapse inner spaces."""
    text = _WS.sub(" ", text.strip())
    text = text.strip("$ ").rstrip(".").strip()
    return text


def grade(answer: str, gold: str, *, mode: str = "auto") -> bool:
    """Is `answer` equivalent to `gold`?

    mode: ``"exact"`` (normalised string equality), ``"math"`` (math-verify only) or
    ``"auto"`` (exact, then math-verify).
    """
    if mode not in ("auto", "exact", "math"):
        raise ValueError(f"unknown grading mode {mode!r}; use 'auto', 'exact' or 'math'")
    if mode in ("auto", "exact") and normalize_answer(answer) == normalize_answer(gold):
        return True
    if mode == "exact":
        return False
    return _math_verify(answer, gold)


def _math_verify(answer: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$")
        answer_parsed = parse(answer)
        if not gold_parsed or not answer_parsed:
            return False
        return bool(verify(gold_parsed, answer_parsed))
    except Exception:  # math-verify raises on unparsable input; that is simply "not equal"
        return False
