"""Discourse-token positions: where each lexicon word sits in a model's own tokenization.

`find_positions` renders each trajectory exactly as the model will see it (chat template
included), finds lexicon words in the reasoning text, and maps each word's character span to
the tokens that cover it. A word split over several tokens keeps its whole span
(`span_start`, `span_end`); `token_index` is its first or last token (`anchor`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from waitlens.traces.formats import PromptFormat, Rendered, get_format, render
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.trajectory import Trajectory

COLUMNS = [
    "trajectory_id", "problem_id", "word", "surface", "anchor", "token_index",
    "span_start", "span_end", "rel_index", "frac", "n_reasoning_tokens", "correct",
    "char_start", "char_end",
]
ANCHORS = ("first", "last", "both")


@dataclass
class Positions:
    """A table of token positions (one row per position) for one tokenizer.

    `table` has the columns in `COLUMNS`; `word == "<control>"` marks control positions.
    """

    table: pd.DataFrame
    lexicon: tuple[str, ...] = ()
    format: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.table.columns]
        if missing:
            raise ValueError(f"positions table lacks column(s) {missing}")
        self.table = self.table.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    def select(self, words: Sequence[str] | None = None, trajectory_ids: Sequence[str] | None = None) -> Positions:
        t = self.table
        if words is not None:
            t = t[t["word"].isin([w.lower() for w in words])]
        if trajectory_ids is not None:
            t = t[t["trajectory_id"].isin(list(trajectory_ids))]
        return Positions(t.copy(), self.lexicon, self.format, dict(self.info))

    def by_trajectory(self) -> dict[str, pd.DataFrame]:
        return {tid: g for tid, g in self.table.groupby("trajectory_id", sort=False)}

    def concat(self, other: Positions) -> Positions:
        return Positions(pd.concat([self.table, other.table], ignore_index=True), self.lexicon, self.format, self.info)


def _resolve(tokenizer_or_model, fmt):
    """Accept a tokenizer (+ format) or a loaded model object carrying both."""
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if fmt is None:
        fmt = getattr(tokenizer_or_model, "format", None)
    return tok, get_format(fmt, tok)


def find_positions(
    tokenizer,
    trajectories: Sequence[Trajectory],
    lexicon: Lexicon | Sequence[str] | str | None = None,
    *,
    fmt: PromptFormat | str | None = None,
    anchor: str = "first",
) -> Positions:
    """Every lexicon-word occurrence in the reasoning of each trajectory, as token positions.

    `tokenizer` is a fast HF tokenizer or a model from `hooks.load_model` (its tokenizer and
    prompt format are used). `anchor`: "first" or "last" token of a multi-token word, or
    "both" (two rows when they differ). No match at all gives a warning and an empty table.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    lex = Lexicon.parse(lexicon)
    tok, fmt = _resolve(tokenizer, fmt)
    rows = []
    for traj in trajectories:
        rendered = render(tok, traj, fmt)
        rows.extend(_rows_for(traj, rendered, lex, anchor))
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        warnings.warn(
            f"no lexicon word {list(lex.words)} occurs in the reasoning of any of the "
            f"{len(trajectories)} trajectories; the positions table is empty",
            stacklevel=2,
        )
    return Positions(_typed(table), lex.words, fmt.name)


def _rows_for(traj: Trajectory, rd: Rendered, lex: Lexicon, anchor: str) -> list[dict]:
    r0, _ = rd.reasoning_chars
    t0, t1 = rd.reasoning_tokens
    n_reason = max(t1 - t0, 1)
    rows = []
    for m in lex.finditer(traj.reasoning):
        cs, ce = r0 + m.start, r0 + m.end
        toks = [i for i in range(t0, t1) if rd.offsets[i][1] > cs and rd.offsets[i][0] < ce]
        if not toks:  # cannot happen with a consistent fast tokenizer; guard anyway
            continue
        idx = {"first": [toks[0]], "last": [toks[-1]], "both": sorted({toks[0], toks[-1]})}[anchor]
        for k, ti in enumerate(idx):
            rows.append({
                "trajectory_id": traj.id, "problem_id": traj.problem_id, "word": m.word,
                "surface": m.surface,
                "anchor": anchor if anchor != "both" else ("first" if k == 0 else "last"),
                "token_index": ti, "span_start": toks[0], "span_end": toks[-1] + 1,
                "rel_index": ti - t0, "frac": (ti - t0) / n_reason, "n_reasoning_tokens": t1 - t0,
                "correct": traj.correct, "char_start": cs, "char_end": ce,
            })
    return rows


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    ints = ["token_index", "span_start", "span_end", "rel_index", "n_reasoning_tokens", "char_start", "char_end"]
    for c in ints:
        table[c] = table[c].astype("int64")
    table["frac"] = table["frac"].astype("float64")
    for c in ("trajectory_id", "problem_id", "word", "surface", "anchor"):
        table[c] = table[c].astype(object)
    return table


def control_positions(
    tokenizer,
    trajectories: Sequence[Trajectory],
    positions: Positions,
    *,
    fmt: PromptFormat | str | None = None,
    seed: int = 0,
    n_bins: int = 10,
) -> Positions:
    """Random non-discourse reasoning positions, one per discourse position, matched on `frac`.

    For each discourse position, a token of the same trajectory is drawn from the same
    relative-position bin (1/`n_bins` of the reasoning), avoiding every discourse-word span;
    if that bin has no free token, from the nearest bin that has one. Rows have
    `word == "<control>"`.
    """
    tok, fmt = _resolve(tokenizer, fmt)
    rng = np.random.default_rng(seed)
    by_id = {t.id: t for t in trajectories}
    rows = []
    for tid, group in positions.table.groupby("trajectory_id", sort=False):
        traj = by_id[tid]
        rd = render(tok, traj, fmt)
        t0, t1 = rd.reasoning_tokens
        taken = set()
        for s, e in zip(group["span_start"], group["span_end"], strict=True):
            taken.update(range(s, e))
        free = np.array([i for i in range(t0, t1) if i not in taken])
        if free.size == 0:
            continue
        n_reason = max(t1 - t0, 1)
        free_bins = np.minimum(((free - t0) / n_reason * n_bins).astype(int), n_bins - 1)
        for frac in group["frac"]:
            b = min(int(frac * n_bins), n_bins - 1)
            dist = np.abs(free_bins - b)
            pool = free[dist == dist.min()]
            ti = int(rng.choice(pool))
            rows.append({
                "trajectory_id": tid, "problem_id": traj.problem_id, "word": "<control>",
                "surface": "", "anchor": "first", "token_index": ti, "span_start": ti,
                "span_end": ti + 1, "rel_index": ti - t0, "frac": (ti - t0) / n_reason,
                "n_reasoning_tokens": t1 - t0, "correct": traj.correct,
                "char_start": rd.offsets[ti][0], "char_end": rd.offsets[ti][1],
            })
    return Positions(_typed(pd.DataFrame(rows, columns=COLUMNS)), positions.lexicon, fmt.name, {"control_seed": seed})
