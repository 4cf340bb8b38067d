"""Per-token log-probabilities of a trajectory under a model: one forward pass each.

`token_logprobs` gives, for every reasoning token, the log-probability the model assigned to
that very token given everything before it (teacher forcing over the rendered trajectory).
`token_occurrences` turns those into the rows `probes.tokens` counts: a lexicon word is one
occurrence however many tokens it spans (its log-prob is the sum over its tokens) and all its
surface variants ("Wait", " wait", "WAIT") merge into the lower-case lexicon entry; any other
token is keyed by its decoded text with surrounding whitespace stripped, case kept
(" the" and "the" merge, "The" stays apart); a whitespace-only token is keyed by its escaped
text (``"\\n"``, ``"␣"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from waitlens.traces.lexicon import Lexicon
from waitlens.traces.positions import find_positions
from waitlens.traces.trajectory import Trajectory

OCCURRENCE_COLUMNS = ["trajectory_id", "problem_id", "correct", "key", "kind", "token_index",
                      "n_tokens", "logprob", "rel_pos"]


@torch.no_grad()
def token_logprobs(model, trajectory: Trajectory) -> pd.DataFrame:
    """One row per reasoning token: token_index (absolute), token_id, token (decoded), logprob.

    An empty reasoning gives an empty table (no forward pass).
    """
    rd = model.render(trajectory)
    t0, t1 = rd.reasoning_tokens
    cols = ["token_index", "token_id", "token", "logprob"]
    if t1 <= t0:
        return pd.DataFrame(columns=cols)
    model.check_length(t1, trajectory.id)
    ids = rd.input_ids
    # logits at positions t0-1 .. t1-2 predict tokens t0 .. t1-1: the last (t1-t0) rows of ids[:t1-1]
    x = torch.tensor([ids[: t1 - 1]], device=model.device)
    logits = model.hf(input_ids=x, logits_to_keep=t1 - t0).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ids[t0:t1], device=lp.device)
    vals = lp.gather(1, target[:, None])[:, 0].cpu().tolist()
    toks = [model.tokenizer.decode([t]) for t in ids[t0:t1]]
    return pd.DataFrame({"token_index": range(t0, t1), "token_id": ids[t0:t1], "token": toks, "logprob": vals})


def token_key(text: str) -> str:
    """How a non-lexicon token is keyed: stripped text, or an escaped form if only whitespace."""
    s = text.strip()
    if s:
        return s
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "<empty>"


def token_occurrences(
    model,
    trajectories: Sequence[Trajectory],
    lexicon: Lexicon | Iterable[str] | str | None = None,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Every token occurrence of every trajectory's reasoning, with the model's log-prob.

    Columns: trajectory_id, problem_id, correct, key, kind ("word" for lexicon words, "token"
    otherwise), token_index (first token), n_tokens, logprob (summed over the word's tokens),
    rel_pos (token_index relative to the reasoning start, as a fraction).
    """
    lex = Lexicon.parse(lexicon)
    rows = []
    it: Iterable = trajectories
    if progress:
        from tqdm import tqdm

        it = tqdm(trajectories, desc=f"logprobs {getattr(model, 'spec', '')}")
    for traj in it:
        tl = token_logprobs(model, traj)
        if tl.empty:
            continue
        t0 = int(tl["token_index"].iloc[0])
        n = len(tl)
        lp = dict(zip(tl["token_index"], tl["logprob"], strict=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pos = find_positions(model, [traj], lex, anchor="first").table
        in_word: set[int] = set()
        for w, s, e in zip(pos["word"], pos["span_start"], pos["span_end"], strict=True):
            span = [i for i in range(s, e) if i in lp]
            if not span:
                continue
            in_word.update(span)
            rows.append((traj.id, traj.problem_id, traj.correct, w, "word", span[0], len(span),
                         float(sum(lp[i] for i in span)), (span[0] - t0) / n))
        for i, tok, v in zip(tl["token_index"], tl["token"], tl["logprob"], strict=True):
            if i in in_word:
                continue
            rows.append((traj.id, traj.problem_id, traj.correct, token_key(tok), "token", int(i), 1,
                         float(v), (i - t0) / n))
    return pd.DataFrame(rows, columns=OCCURRENCE_COLUMNS)
