"""The discourse lexicon: which words count as discourse tokens, and how they are matched.

Matching is on the reasoning *text*, case-insensitive, on whole words (so "awaits" is no
"wait", "also" no "so", and "so-called" no "so"), with punctuation allowed around them ("Wait," "so."). A lexicon
entry may be a phrase ("let me check"); its words may be separated by any whitespace.
Every surface variant of a word ("Wait", " wait", "WAIT,") counts under the lower-case entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

DEFAULT_WORDS: tuple[str, ...] = (
    "wait", "so", "alternatively", "therefore", "hmm", "but", "however", "check", "verify",
)


@dataclass(frozen=True)
class Match:
    word: str  # the lexicon entry (lower case)
    surface: str  # the text as written, e.g. "Wait"
    start: int  # character span in the searched text
    end: int


class Lexicon:
    """An editable, ordered set of discourse words or phrases."""

    def __init__(self, words: Iterable[str] = DEFAULT_WORDS):
        cleaned = []
        for w in words:
            w = " ".join(str(w).split()).lower()
            if not w:
                raise ValueError("empty word in lexicon")
            if w not in cleaned:
                cleaned.append(w)
        if not cleaned:
            raise ValueError("the lexicon is empty; give at least one word")
        self.words: tuple[str, ...] = tuple(cleaned)
        # Longest entries first, so "let me check" wins over "check" at the same place.
        alts = sorted(self.words, key=len, reverse=True)
        body = "|".join(r"\s+".join(re.escape(p) for p in w.split()) for w in alts)
        # A hyphen binds like a letter: "so-called" and "so-so" are not the discourse "so".
        self._regex = re.compile(rf"(?<![\w-])({body})(?![\w-])", re.IGNORECASE)

    @classmethod
    def parse(cls, spec: str | Iterable[str] | Lexicon | None) -> Lexicon:
        """A Lexicon from a comma-separated string, a list of words, or None (the default)."""
        if spec is None:
            return cls()
        if isinstance(spec, Lexicon):
            return spec
        if isinstance(spec, str):
            spec = [w for w in spec.split(",") if w.strip()]
        return cls(spec)

    def finditer(self, text: str) -> Iterator[Match]:
        for m in self._regex.finditer(text):
            surface = m.group(1)
            yield Match(" ".join(surface.lower().split()), surface, m.start(1), m.end(1))

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.words

    def __iter__(self) -> Iterator[str]:
        return iter(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"Lexicon({list(self.words)!r})"
