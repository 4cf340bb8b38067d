"""Per-token log-probabilities of trajectories under a model, in padded batched forwards.

`token_logprobs` gives, for every reasoning token, the log-probability the model assigned to
that very token given everything before it (teacher forcing over the rendered trajectory).
`token_logprobs_batch` does the same for many trajectories in padded batches (grouped by
length, capped in padded tokens as capture is; right or left padding), reading the LM head
only at the rows that predict reasoning tokens; it equals the one-at-a-time numbers within
float tolerance (tests: 1e-5).
`token_occurrences` turns those into the rows `probes.tokens` counts: a lexicon word is one
occurrence however many tokens it spans (its log-prob is the sum over its tokens) and all its
surface variants ("Wait", " wait", "WAIT") merge into the lower-case lexicon entry; any other
token is keyed by its decoded text with surrounding whitespace stripped, case kept
(" the" and "the" merge, "The" stays apart); a whitespace-only token is keyed by its escaped
text (``"\\n"``, ``"␣"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from waitlens.hooks.batching import MAX_BATCH_TOKENS, check_padding, length_batches, pad_batch
from waitlens.hooks.models import LoadedModel
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.positions import find_positions
from waitlens.traces.trajectory import Trajectory

OCCURRENCE_COLUMNS = ["trajectory_id", "problem_id", "correct", "key", "kind", "token_index",
                      "n_tokens", "logprob", "rel_pos"]
LOGPROB_COLUMNS = ["token_index", "token_id", "token", "logprob"]


def token_logprobs(model: LoadedModel, trajectory: Trajectory) -> pd.DataFrame:
    """One row per reasoning token: token_index (absolute), token_id, token (decoded), logprob.

    An empty reasoning gives an empty table (no forward pass).
    """
    return token_logprobs_batch(model, [trajectory], batch_size=1)[0]


def token_logprobs_batch(
    model: LoadedModel,
    trajectories: Sequence[Trajectory],
    *,
    batch_size: int = 64,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    padding: str = "right",
) -> list[pd.DataFrame]:
    """`token_logprobs` of each trajectory (same order), in padded batches of at most
    `batch_size` trajectories and `max_batch_tokens` padded tokens."""
    check_padding(padding)
    spans, arrays = _reasoning_logprobs(model, trajectories, batch_size, max_batch_tokens, padding)
    decode = _Decoder(model.tokenizer)
    out = []
    for (ids, t0, t1), vals in zip(spans, arrays, strict=True):
        if vals is None:
            out.append(pd.DataFrame(columns=LOGPROB_COLUMNS))
            continue
        toks = ids[t0:t1]
        out.append(pd.DataFrame({"token_index": range(t0, t1), "token_id": toks,
                                 "token": [decode(t) for t in toks], "logprob": vals.tolist()}))
    return out


def _reasoning_logprobs(model, trajectories, batch_size, max_batch_tokens, padding):
    """[(ids, t0, t1)] and, per trajectory, the float64 log-probs of ids[t0:t1] (None if empty)."""
    spans = []
    for traj in trajectories:
        rd = model.render(traj)
        t0, t1 = rd.reasoning_tokens
        if t1 > t0:
            model.check_length(t1, traj.id)
        spans.append((rd.input_ids, t0, t1))
    arrays: list[np.ndarray | None] = [None] * len(spans)
    todo = [i for i, (_, t0, t1) in enumerate(spans) if t1 > t0]
    # logits at positions t0-1 .. t1-2 predict tokens t0 .. t1-1: the input is ids[:t1-1]
    lengths = [spans[i][2] - 1 for i in todo]
    for group in length_batches(lengths, batch_size, max_batch_tokens):
        members = [todo[g] for g in group]
        inputs = [spans[i][0][: spans[i][2] - 1] for i in members]
        rows = [range(spans[i][1] - 1, spans[i][2] - 1) for i in members]
        targets = [spans[i][0][spans[i][1]: spans[i][2]] for i in members]
        for i, v in zip(members, _score(model, inputs, rows, targets, padding), strict=True):
            arrays[i] = v
    return spans, arrays


@torch.inference_mode()
def _score(model, inputs: list[list[int]], rows: list[range], targets: list[list[int]],
           padding: str) -> list[np.ndarray]:
    """One padded forward: for each sequence, log p(targets[j] | inputs[:rows[j]+1])."""
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    batch = pad_batch(inputs, padding, pad_id, model.device)
    flat = torch.cat([batch.flat_index(b, r) for b, r in enumerate(rows)]).to(model.device)
    hidden = model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False).last_hidden_state
    sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    tgt = torch.tensor([t for ts in targets for t in ts], device=sel.device)
    vals = target_logprobs(model, sel, tgt).double().cpu().numpy()
    return np.split(vals, np.cumsum([len(r) for r in rows])[:-1])


HEAD_CHUNK = 1 << 23  # logits per LM-head chunk in `target_logprobs` (32 MB of float32)


def target_logprobs(model: LoadedModel, hidden: Float[Tensor, "n d_model"],
                    targets: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """`row_logprobs(model, hidden)[i, targets[i]]` for every row i, a few rows at a time, so the
    [n, vocab] matrix is never built (8192 rows of a 151k vocabulary: 5 GB, twice)."""
    return head_logprobs(model, hidden, targets)[0]


def head_logprobs(model: LoadedModel, hidden: Float[Tensor, "n d_model"], targets: Int[Tensor, " n"] | None = None,
                  *, top: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Rows of `row_logprobs(model, hidden)` read `HEAD_CHUNK` logits at a time, never the whole
    [n, vocab] matrix: (log-prob of `targets[i]` in row i, or None without targets; with `top`,
    each row's argmax (the first, as `argmax`) and its log-prob, else None, None). A float32
    nn.Linear head without logit softcapping writes each chunk into two buffers reused across
    chunks (no fresh pages per chunk); any other head goes through `row_logprobs` chunk by chunk."""
    head = model.hf.get_output_embeddings()
    n = hidden.shape[0]
    tgt = torch.empty(n, dtype=torch.float32, device=hidden.device) if targets is not None else None
    top_id = torch.empty(n, dtype=torch.long, device=hidden.device) if top else None
    top_lp = torch.empty(n, dtype=torch.float32, device=hidden.device) if top else None
    if n == 0:
        return tgt, top_id, top_lp
    plain = (type(head) is torch.nn.Linear and head.weight.dtype == hidden.dtype == torch.float32
             and not getattr(model.config, "final_logit_softcapping", None))
    vocab = head.weight.shape[0] if plain else int(getattr(model.config, "vocab_size", 0) or 1)
    step = max(1, min(n, HEAD_CHUNK // vocab))
    if plain:
        logits = hidden.new_empty((step, vocab))
        buf = hidden.new_empty((step, vocab))
    for s in range(0, n, step):
        h = hidden[s:s + step]
        m = len(h)
        if plain:
            if head.bias is None:
                torch.mm(h, head.weight.t(), out=logits[:m])
            else:
                torch.addmm(head.bias, h, head.weight.t(), out=logits[:m])
            lp = torch.log_softmax(logits[:m], -1, out=buf[:m])
        else:
            lp = row_logprobs(model, h)
        if tgt is not None:
            tgt[s:s + m] = lp.gather(1, targets[s:s + m, None])[:, 0]
        if top:
            v, i = lp.max(-1)
            top_lp[s:s + m], top_id[s:s + m] = v, i
    return tgt, top_id, top_lp


def row_logprobs(model: LoadedModel, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """Log-softmax of the LM head over final hidden states (after the final norm), in float32."""
    logits = model.hf.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


class _Decoder:
    """tokenizer.decode of single ids, memoised (the same few thousand ids recur)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        s = self.memo.get(t)
        if s is None:
            s = self.memo[t] = self.tok.decode([t])
        return s


class TokenKeys:
    """`token_key` of a token id's decoded text, memoised per id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        k = self.memo.get(t)
        if k is None:
            k = self.memo[t] = token_key(self.tok.decode([t]))
        return k


def token_key(text: str) -> str:
    """How a non-lexicon token is keyed: stripped text, or an escaped form if only whitespace."""
    s = text.strip()
    if s:
        return s
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "<empty>"


def token_occurrences(
    model: LoadedModel,
    trajectories: Sequence[Trajectory],
    lexicon: Lexicon | Iterable[str] | str | None = None,
    *,
    progress: bool = False,
    batch_size: int = 64,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    padding: str = "right",
) -> pd.DataFrame:
    """Every token occurrence of every trajectory's reasoning, with the model's log-prob.

    Columns: trajectory_id, problem_id, correct, key, kind ("word" for lexicon words, "token"
    otherwise), token_index (first token), n_tokens, logprob (summed over the word's tokens),
    rel_pos (token_index relative to the reasoning start, as a fraction).
    Log-probs come from `token_logprobs_batch` (batch_size, max_batch_tokens, padding).
    """
    lex = Lexicon.parse(lexicon)
    check_padding(padding)
    trajectories = list(trajectories)
    spans, arrays = [], []
    chunk = max(batch_size * 8, 1)  # progress by chunks of trajectories
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trajectories), desc=f"logprobs {getattr(model, 'spec', '')}", unit="traj")
    for k in range(0, len(trajectories), chunk):
        s, a = _reasoning_logprobs(model, trajectories[k:k + chunk], batch_size, max_batch_tokens, padding)
        spans += s
        arrays += a
        if bar is not None:
            bar.update(len(s))
    if bar is not None:
        bar.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pos = find_positions(model, trajectories, lex, anchor="first").table
    words_by: dict[str, list[tuple[str, int, int]]] = {}
    for tid, w, s, e in zip(pos["trajectory_id"], pos["word"], pos["span_start"], pos["span_end"], strict=True):
        words_by.setdefault(tid, []).append((w, int(s), int(e)))
    key = TokenKeys(model.tokenizer)
    return occurrence_table([
        occurrence_block(traj, ids, t0, t1, words_by.get(traj.id, ()), key, vals)
        for traj, (ids, t0, t1), vals in zip(trajectories, spans, arrays, strict=True) if vals is not None
    ])


class OccurrenceBlock(NamedTuple):
    """One trajectory's rows of an occurrence table: `n_words` lexicon-word rows, then one row
    per other reasoning token, in token order."""

    trajectory: Trajectory
    t0: int  # the reasoning's tokens are [t0, t1)
    t1: int
    keys: list[str]
    token_index: np.ndarray  # first token of each row
    n_tokens: np.ndarray
    logprob: np.ndarray
    n_words: int


def occurrence_block(trajectory: Trajectory, ids: Sequence[int], t0: int, t1: int,
                     words: Iterable[tuple[str, int, int]], key: Callable[[int], str],
                     logprobs: np.ndarray | None = None) -> OccurrenceBlock:
    """The occurrences in one trajectory's reasoning tokens ``ids[t0:t1]``: each lexicon word
    (``(word, span_start, span_end)``, clipped to the reasoning) is one row; every token outside
    the words is a row keyed by ``key(token_id)``. `logprobs`: the reasoning tokens' log-probs
    (a word's is the sum over its tokens); None leaves the column NaN."""
    in_word = np.zeros(t1 - t0, dtype=bool)
    words_, first, length, word_lp = [], [], [], []
    for w, s, e in words:
        lo, hi = max(s, t0), min(e, t1)
        if hi <= lo:
            continue
        in_word[lo - t0: hi - t0] = True
        words_.append(w)
        first.append(lo)
        length.append(hi - lo)
        if logprobs is not None:
            word_lp.append(float(logprobs[lo - t0: hi - t0].sum()))
    others = np.flatnonzero(~in_word)
    other_ids = np.asarray(ids[t0:t1], dtype=np.int64)[others].tolist()
    if logprobs is None:
        lp = np.full(len(words_) + len(others), np.nan)
    else:
        lp = np.concatenate([np.asarray(word_lp, dtype=np.float64), np.asarray(logprobs, dtype=np.float64)[others]])
    return OccurrenceBlock(trajectory, t0, t1, words_ + [key(t) for t in other_ids],
                           np.concatenate([np.asarray(first, dtype=np.int64), others + t0]),
                           np.concatenate([np.asarray(length, dtype=np.int64), np.ones(len(others), np.int64)]),
                           lp, len(words_))


def occurrence_table(blocks: Sequence[OccurrenceBlock]) -> pd.DataFrame:
    """The occurrence table (`OCCURRENCE_COLUMNS`), the blocks' rows in order, built column by
    column (a long study has tens of millions of rows)."""
    if not blocks:
        return pd.DataFrame(columns=OCCURRENCE_COLUMNS)
    sizes = np.array([len(b.keys) for b in blocks])
    per_row = lambda values, dtype=object: np.repeat(np.array(values, dtype=dtype), sizes)  # noqa: E731
    index = np.concatenate([b.token_index for b in blocks])
    kind = np.full(len(index), "token", dtype=object)
    for start, b in zip(np.cumsum(sizes) - sizes, blocks, strict=True):
        kind[start: start + b.n_words] = "word"
    t0 = per_row([b.t0 for b in blocks], np.int64)
    return pd.DataFrame({
        "trajectory_id": per_row([b.trajectory.id for b in blocks]),
        "problem_id": per_row([b.trajectory.problem_id for b in blocks]),
        "correct": per_row([b.trajectory.correct for b in blocks]),
        "key": np.array([k for b in blocks for k in b.keys], dtype=object),
        "kind": kind,
        "token_index": index,
        "n_tokens": np.concatenate([b.n_tokens for b in blocks]),
        "logprob": np.concatenate([b.logprob for b in blocks]),
        "rel_pos": (index - t0) / (per_row([b.t1 for b in blocks], np.int64) - t0),
    }).infer_objects()
