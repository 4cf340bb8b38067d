"""Discourse-token positions: where each lexicon word sits in a model's own tokenization.

`find_positions` renders each trajectory exactly as the model will see it (chat template
included), finds lexicon words in the reasoning text, and maps each word's character span to
the tokens that cover it. A word split over several tokens keeps its whole span
(`span_start`, `span_end`); `token_index` is its first or last token (`anchor`).
"""

from __future__ import annotations

import bisect
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from waitlens.traces.formats import PromptFormat, Rendered, get_format, render, render_text
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COLUMNS = [
    "trajectory_id", "problem_id", "word", "surface", "anchor", "token_index",
    "span_start", "span_end", "rel_index", "frac", "n_reasoning_tokens", "correct",
    "char_start", "char_end",
]
ANCHORS = ("first", "last", "both")
CONTROL_WORD = "<control>"  # the `word` of control positions (random non-discourse tokens)


class TokenizedModel(Protocol):
    """What positions need of a model: its tokenizer and prompt format (a `LoadedModel` from
    `hooks.load_model`, or a weightless `traces.tokenizers.TokenizerModel`)."""

    tokenizer: Any
    format: PromptFormat


@dataclass
class Positions:
    """A table of token positions (one row per position) for one tokenizer.

    `table` has the columns in `COLUMNS`; `word == CONTROL_WORD` ("<control>") marks control positions.
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


def _resolve(model: TokenizedModel | PreTrainedTokenizerBase, fmt: PromptFormat | str | None):
    """Accept a model object carrying a tokenizer and a format (a `hooks.load_model` result or
    a weightless `traces.tokenizers.TokenizerModel`) or a bare tokenizer (+ format)."""
    tok = getattr(model, "tokenizer", model)
    if fmt is None:
        fmt = getattr(model, "format", None)
    return tok, get_format(fmt, tok)


def find_positions(
    model: TokenizedModel | PreTrainedTokenizerBase,
    trajectories: Sequence[Trajectory],
    lexicon: Lexicon | Sequence[str] | str | None = None,
    *,
    format: PromptFormat | str | None = None,
    anchor: str = "first",
) -> Positions:
    """Every lexicon-word occurrence in the reasoning of each trajectory, as token positions.

    `model`: a model from `hooks.load_model` or `traces.tokenizers.tokenizer_model` (its
    tokenizer and prompt format are used, and a trajectory longer than its context is an error
    raised before any search), or a bare fast HF tokenizer with `format`. `anchor`:
    "first" or "last" token of a multi-token word, or "both" (two rows when they differ). No
    match at all gives a warning and an empty table. Linear in the text length: each word's
    tokens are found by binary search over the token offsets.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    lex = Lexicon.parse(lexicon)
    tok, fmt = _resolve(model, format)
    check_length = getattr(model, "check_length", None)
    n_ctx = getattr(model, "n_ctx", None) if check_length is not None else None
    rows, frames = [], []
    unk_id, skipped = getattr(tok, "unk_token_id", None), {}
    for traj in trajectories:
        text, reasoning_chars, _ = render_text(tok, traj, fmt)
        if len(text) > LONG_TEXT and chunk_safe(tok):
            located = _Chunked(tok, text, n_ctx=n_ctx)
            if check_length is not None:
                check_length(located.n_tokens, traj.id)
            if rows:
                frames.append(pd.DataFrame(rows, columns=COLUMNS))
                rows = []
            frames.append(_rows_chunked(traj, located, reasoning_chars, lex, anchor))
            continue
        rendered = render(tok, traj, fmt)
        if check_length is not None:
            check_length(rendered.n_tokens, traj.id)
        rows.extend(_rows_for(traj, rendered, lex, anchor, unk_id, skipped))
    if skipped:
        warnings.warn(
            f"left out {skipped.get('unk', 0)} lexicon match(es) that tokenize to the unknown token "
            f"{getattr(tok, 'unk_token', None)!r} and {skipped.get('shared', 0)} whose token already holds "
            "another word's row", stacklevel=2)
    frames.append(pd.DataFrame(rows, columns=COLUMNS))
    frames = [f for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        warnings.warn(
            f"no lexicon word {list(lex.words)} occurs in the reasoning of any of the "
            f"{len(trajectories)} trajectories; the positions table is empty",
            stacklevel=2,
        )
    return Positions(_typed(table), lex.words, fmt.name)


def positions_in(trajectory: Trajectory, rendered: Rendered, lexicon: Lexicon | Sequence[str] | str | None = None,
                 *, anchor: str = "first") -> Positions:
    """`find_positions` for one trajectory already rendered (no second tokenization)."""
    lex = Lexicon.parse(lexicon)
    return Positions(positions_table(position_rows(trajectory, rendered, lex, anchor=anchor)), lex.words)


def position_rows(trajectory: Trajectory, rendered: Rendered, lexicon: Lexicon | Sequence[str] | str | None = None,
                  *, anchor: str = "first") -> list[dict]:
    """`positions_in`'s rows (dicts keyed by `COLUMNS`), untyped: a caller that walks many
    rendered trajectories collects them and builds one table with `positions_table`."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    return _rows_for(trajectory, rendered, Lexicon.parse(lexicon), anchor)


def positions_table(rows: Sequence[dict]) -> pd.DataFrame:
    """A positions table (`COLUMNS`, typed as `find_positions` types it) from `position_rows`' rows."""
    return _typed(pd.DataFrame(list(rows), columns=COLUMNS))


def _rows_for(traj: Trajectory, rd: Rendered, lex: Lexicon, anchor: str, unk_id: int | None = None,
              skipped: dict[str, int] | None = None) -> list[dict]:
    """The rows of one rendered trajectory. A match whose tokens include the unknown token
    (`unk_id`: the word is not in the vocabulary as written, e.g. "Wait" for a lower-case
    word-level vocabulary) or whose anchor token already holds a row (two words in one token)
    is left out and counted in `skipped` ("unk", "shared")."""
    skipped = {} if skipped is None else skipped
    taken: set[int] = set()
    r0, _ = rd.reasoning_chars
    t0, t1 = rd.reasoning_tokens
    n_reason = max(t1 - t0, 1)
    if t1 <= t0:
        return []
    offs = np.asarray(rd.offsets[t0:t1], dtype=np.int64).reshape(-1, 2)
    starts = offs[:, 0]
    # running maximum of the token ends: non-decreasing, so the first token that can overlap
    # a span is a binary search away (a fast tokenizer's ends are already non-decreasing)
    ends = np.maximum.accumulate(offs[:, 1])
    rows = []
    for m in lex.finditer(traj.reasoning):
        cs, ce = r0 + m.start, r0 + m.end
        k = int(np.searchsorted(ends, cs, side="right"))  # first token with end > cs
        toks = []
        while k < len(starts) and starts[k] < ce:
            if offs[k, 1] > cs:
                toks.append(t0 + k)
            k += 1
        if not toks:  # cannot happen with a consistent fast tokenizer; guard anyway
            continue
        if unk_id is not None and any(rd.input_ids[ti] == unk_id for ti in toks):
            skipped["unk"] = skipped.get("unk", 0) + 1
            continue
        idx = {"first": [toks[0]], "last": [toks[-1]], "both": sorted({toks[0], toks[-1]})}[anchor]
        if taken.intersection(idx):
            skipped["shared"] = skipped.get("shared", 0) + 1
            continue
        taken.update(idx)
        for j, ti in enumerate(idx):
            rows.append({
                "trajectory_id": traj.id, "problem_id": traj.problem_id, "word": m.word,
                "surface": m.surface,
                "anchor": anchor if anchor != "both" else ("first" if j == 0 else "last"),
                "token_index": ti, "span_start": toks[0], "span_end": toks[-1] + 1,
                "rel_index": ti - t0, "frac": (ti - t0) / n_reason, "n_reasoning_tokens": t1 - t0,
                "correct": traj.correct, "char_start": cs, "char_end": ce,
            })
    return rows


# -- long texts: tokenized in chunks, words located by the tokenizer's own char_to_token ------
LONG_TEXT = 200_000  # characters; longer rendered texts are tokenized in chunks
CHUNK = 50_000  # characters per chunk (cut at a pre-token boundary, see `_cuts`)
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Sequence"}
_SAFE_PRE_TOKENIZERS = {"Sequence", "Split", "ByteLevel", "WhitespaceSplit", "Whitespace", "Digits",
                        "Punctuation"}
# a single space between two non-space characters, or the start of a line after a newline:
# every pre-tokenizer accepted by `chunk_safe` splits there, so the chunks' tokens are the
# whole text's tokens (tests compare them on real traces)
_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=\n)(?=\S)")


def _types(state: bytes | str | None) -> list[dict]:
    """Every component (nested Sequences included) of a normalizer/pre-tokenizer state."""
    if not state:
        return []
    obj = json.loads(state)
    out, todo = [], [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, dict):
            out.append(o)
            todo.extend(o.get("pretokenizers") or o.get("normalizers") or [])
    return out


def chunk_safe(tokenizer) -> bool:
    """Can `tokenizer` encode a text in chunks cut at `_CUT` and give the whole text's tokens?
    Yes for byte-level BPE (GPT-2, Qwen, Llama-3), whitespace/word-level tokenizers; no for
    SentencePiece-style ones (a prefix space per chunk) or added tokens containing spaces."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    if bk is None:
        return False
    cached = getattr(tokenizer, "_waitlens_chunk_safe", None)
    if cached is not None:
        return cached
    try:
        norm = _types(bk.normalizer.__getstate__() if bk.normalizer is not None else None)
        pre = _types(bk.pre_tokenizer.__getstate__() if bk.pre_tokenizer is not None else None)
    except (AttributeError, TypeError, ValueError):
        return False
    ok = bool(pre) and all(c.get("type") in _SAFE_NORMALIZERS for c in norm) and all(
        c.get("type") in _SAFE_PRE_TOKENIZERS and not c.get("add_prefix_space", False) for c in pre)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ok = ok and not any(re.search(r"\s", str(t)) for t in added.values())
    try:
        tokenizer._waitlens_chunk_safe = ok
    except AttributeError:
        pass
    return ok


def _cuts(text: str, size: int) -> list[int]:
    """Chunk starts: 0, then the first `_CUT` at or after every `size` characters."""
    starts, pos = [0], size
    while pos < len(text):
        m = _CUT.search(text, pos)
        if m is None:
            break
        starts.append(m.start())
        pos = m.start() + size
    return starts


class _Chunked:
    """A long text tokenized chunk by chunk (in Rust, no per-token Python objects); stops as
    soon as it is longer than `n_ctx` tokens, so an over-long trajectory is reported at once."""

    def __init__(self, tokenizer, text: str, *, n_ctx: int | None = None, size: int = CHUNK):
        bk = tokenizer.backend_tokenizer
        starts = _cuts(text, size)
        bounds = [*starts, len(text)]
        self.bases: list[int] = []
        self.encs: list = []
        self.first_token: list[int] = []  # global index of each chunk's first token
        n = 0
        group = 16
        for g in range(0, len(starts), group):
            pieces = [text[bounds[i]: bounds[i + 1]] for i in range(g, min(g + group, len(starts)))]
            for k, enc in enumerate(bk.encode_batch(pieces, add_special_tokens=False)):
                self.bases.append(bounds[g + k])
                self.encs.append(enc)
                self.first_token.append(n)
                n += len(enc.ids)
            if n_ctx is not None and n > n_ctx:
                break  # already too long: the caller's length check reports it
        self.n_tokens = n
        self._offsets: dict[int, list[tuple[int, int]]] = {}

    def _chunk(self, char: int) -> int:
        return max(bisect.bisect_right(self.bases, char) - 1, 0)

    def offsets(self, k: int) -> list[tuple[int, int]]:
        if k not in self._offsets:
            b = self.bases[k]
            self._offsets[k] = [(s + b, e + b) for s, e in self.encs[k].offsets]
        return self._offsets[k]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """As `formats._token_span`: [first, last+1) of the non-empty tokens overlapping
        [start, end), reading only the chunks at its two ends."""
        first = last = None
        for k in range(self._chunk(start), len(self.encs)):
            hit = [i for i, (s, e) in enumerate(self.offsets(k)) if e > start and s < end and e > s]
            if hit:
                first = self.first_token[k] + hit[0]
                break
            if k + 1 < len(self.encs) and self.bases[k + 1] >= end:
                break
        if first is None:
            nxt = next((self.first_token[k] + i for k in range(self._chunk(start), len(self.encs))
                        for i, (s, _) in enumerate(self.offsets(k)) if s >= start), self.n_tokens)
            return (nxt, nxt)
        for k in range(self._chunk(max(end - 1, start)), -1, -1):
            hit = [i for i, (s, e) in enumerate(self.offsets(k)) if e > start and s < end and e > s]
            if hit:
                last = self.first_token[k] + hit[-1]
                break
        return (first, last + 1)


def _rows_chunked(traj: Trajectory, loc: _Chunked, reasoning_chars: tuple[int, int], lex: Lexicon,
                  anchor: str) -> list[dict] | pd.DataFrame:
    """The rows of `_rows_for` for a chunk-tokenized text, vectorized per chunk: each word's
    first token is the first whose end passes its start, its last the last starting before its
    end (binary searches over the chunk's offsets)."""
    r0, r1 = reasoning_chars
    t0, t1 = loc.span(r0, r1)
    n_reason = max(t1 - t0, 1)
    found = [(r0 + m.start, r0 + m.end, m.word, m.surface) for m in lex.finditer(traj.reasoning)]
    if not found:
        return []
    cs = np.fromiter((f[0] for f in found), dtype=np.int64, count=len(found))
    ce = np.fromiter((f[1] for f in found), dtype=np.int64, count=len(found))
    chunk = np.searchsorted(np.asarray(loc.bases, dtype=np.int64), cs, side="right") - 1
    first = np.full(len(found), -1, dtype=np.int64)
    last = np.full(len(found), -1, dtype=np.int64)
    for k in np.unique(chunk):
        sel = np.flatnonzero(chunk == k)
        offs = np.asarray(loc.encs[k].offsets, dtype=np.int64).reshape(-1, 2) + loc.bases[k]
        if len(offs) == 0:
            continue
        ends = np.maximum.accumulate(offs[:, 1])
        starts = np.maximum.accumulate(offs[:, 0])
        a = np.searchsorted(ends, cs[sel], side="right")
        b = np.searchsorted(starts, ce[sel], side="left") - 1
        ok = (a < len(offs)) & (b >= a)
        # a word running past its chunk's last token (cannot happen: chunks cut between words)
        first[sel[ok]] = loc.first_token[k] + a[ok]
        last[sel[ok]] = loc.first_token[k] + b[ok]
    keep = first >= 0
    if anchor == "both":
        two = keep & (first != last)
        order = np.concatenate([np.flatnonzero(keep), np.flatnonzero(two)])
        which = np.concatenate([np.zeros(keep.sum(), dtype=int), np.ones(two.sum(), dtype=int)])
        srt = np.lexsort((which, order))
        order, which = order[srt], which[srt]
        tok = np.where(which == 0, first[order], last[order])
        anchors = np.where(which == 0, "first", "last")
    else:
        order = np.flatnonzero(keep)
        tok = (first if anchor == "first" else last)[order]
        anchors = np.full(len(order), anchor, dtype=object)
    return pd.DataFrame({
        "trajectory_id": traj.id, "problem_id": traj.problem_id,
        "word": [found[i][2] for i in order], "surface": [found[i][3] for i in order],
        "anchor": anchors.astype(object), "token_index": tok, "span_start": first[order],
        "span_end": last[order] + 1, "rel_index": tok - t0, "frac": (tok - t0) / n_reason,
        "n_reasoning_tokens": t1 - t0, "correct": traj.correct, "char_start": cs[order],
        "char_end": ce[order],
    }, columns=COLUMNS)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    ints = ["token_index", "span_start", "span_end", "rel_index", "n_reasoning_tokens", "char_start", "char_end"]
    for c in ints:
        table[c] = table[c].astype("int64")
    table["frac"] = table["frac"].astype("float64")
    for c in ("trajectory_id", "problem_id", "word", "surface", "anchor"):
        table[c] = table[c].astype(object)
    return table


def control_positions(
    model: TokenizedModel | PreTrainedTokenizerBase,
    trajectories: Sequence[Trajectory],
    positions: Positions,
    *,
    format: PromptFormat | str | None = None,
    seed: int = 0,
    n_bins: int = 10,
) -> Positions:
    """Random non-discourse reasoning positions, one per discourse position, matched on `frac`.

    For each discourse position, a token of the same trajectory is drawn from the same
    relative-position bin (1/`n_bins` of the reasoning), avoiding every discourse-word span;
    if that bin has no free token, from the nearest bin that has one. Rows have
    `word == CONTROL_WORD`. `model`: as in `find_positions`.
    """
    tok, fmt = _resolve(model, format)
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
                "trajectory_id": tid, "problem_id": traj.problem_id, "word": CONTROL_WORD,
                "surface": "", "anchor": "first", "token_index": ti, "span_start": ti,
                "span_end": ti + 1, "rel_index": ti - t0, "frac": (ti - t0) / n_reason,
                "n_reasoning_tokens": t1 - t0, "correct": traj.correct,
                "char_start": rd.offsets[ti][0], "char_end": rd.offsets[ti][1],
            })
    return Positions(_typed(pd.DataFrame(rows, columns=COLUMNS)), positions.lexicon, fmt.name, {"control_seed": seed})
