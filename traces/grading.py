"""Grading a final answer against the gold answer.

Exact match after light normalisation first (the organism's answers are plain integers);
otherwise math-verify checks mathematical equivalence. The gold is normalised where datasets
write it differently from predictions: GSM8K's worked solution ending ``#### 18`` grades as
``18``, a ``\\boxed{}`` gold as its content, and AIME's zero-padded ``025`` as ``25``.
"""

from __future__ import annotations

import functools
import re

_WS = re.compile(r"\s+")
_GSM8K_GOLD = re.compile(r"####\s*([^\n]+?)\s*$")
_PADDED_INT = re.compile(r"^0+(\d+)$")
_INT = re.compile(r"^-?[0-9]+$")


def normalize_answer(text: str) -> str:
    """Strip whitespace, a trailing period and surrounding ``$``; collapse inner spaces."""
    text = _WS.sub(" ", text.strip())
    text = text.strip("$ ").rstrip(".").strip()
    return text


def normalize_gold(gold: str) -> str:
    """The gold answer as predictions write it: GSM8K ``#### N`` -> ``N`` (thousands commas
    dropped), a ``\\boxed{x}`` gold -> ``x``, a zero-padded integer (AIME ``025``) -> ``25``."""
    from waitlens.traces.formats import last_boxed

    text = str(gold).strip()
    m = _GSM8K_GOLD.search(text)
    if m:
        text = m.group(1).replace(",", "").strip()
    elif "\\boxed" in text:
        text = last_boxed(text) or text
    m = _PADDED_INT.match(text)
    if m:
        text = m.group(1)
    return text


def grade(answer: str | None, gold: str, *, mode: str = "auto") -> bool:
    """Is `answer` equivalent to `gold`? No answer (None) is never correct.

    mode: ``"exact"`` (normalised string equality), ``"math"`` (math-verify only) or
    ``"auto"`` (exact, then math-verify).
    """
    if mode not in ("auto", "exact", "math"):
        raise ValueError(f"unknown grading mode {mode!r}; use 'auto', 'exact' or 'math'")
    if answer is None:
        return False
    gold = normalize_gold(gold)
    a, g = normalize_answer(answer), normalize_answer(gold)
    if mode in ("auto", "exact") and a == g:
        return True
    if mode == "exact":
        return False
    if _INT.match(a) and _INT.match(g):  # math-verify's verdict on two integers, without its parser
        return int(a) == int(g)
    return _math_verify(answer, gold)


def _math_verify(answer: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return False
        return any(verify(gold_parsed, a) for a in _answer_readings(answer, parse) if a)
    except Exception:  # math-verify raises on unparsable input; that is simply "not equal"
        return False


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """math-verify's reading of a gold answer, parsed once per gold (models graded on the same
    problems share it; verify only reads it)."""
    from math_verify import parse

    return parse(gold if "\\boxed" in gold or "$" in gold else f"$\\boxed{{{gold}}}$") or parse(gold)


def _answer_readings(answer: str, parse):
    """An extracted answer (``\\dfrac{3}{4}``, ``(3, \\frac{\\pi}{2})``, ``\\$460``) is read as
    the content of a box, then as written (``The answer is 20``); a text with its own
    ``\\boxed`` only as written."""
    if "\\boxed" not in answer:
        yield parse(f"\\boxed{{{answer}}}")
    yield parse(answer)
