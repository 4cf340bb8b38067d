"""Within-model ablations: does the discourse word matter (content), or the steps around it
(structure)?

Each ablation edits the trajectory's reasoning *text*, then the model reads the edited and
the original trajectory (answer = the gold answer), and we compare:

- ``replace-wait``: one "wait" replaced by a neutral word (default: the first of "then",
  "and", ";" that the tokenizer knows).
- ``remove-wait``: that "wait" deleted.
- ``shuffle-steps``: the reasoning steps put in a random order (separators stay in place).
- ``delete-steps``: one random step (not the last) deleted with the separator after it.

The edited wait is the one `pick_wait` chooses among the word's matches (default: the first;
a task with ground truth may prefer, say, the first wait after a slip). A *step* is the text
between `separators` (words, e.g. ``;``), or by default sentences and lines (split after
``.``/``!``/``?`` + space, or at newlines).

Metrics: ``gold_prob`` (forced gold answer after the reasoning); ``kl``: mean next-token
KL(original ‖ ablated) over the first `kl_positions` tokens of the common suffix the two token
sequences share after the edit (aligned by offset from the end); and one metric per
*read-out* in `readouts` (``{name: fn(model, trajectory, rendered, wait_char, wait_token) ->
[(position, token)] | None}``, default ``continuation``: the mean probability of the wait's
own next 4 tokens): the read-out of the edited wait, when the tokens it predicts lie in that
common suffix (NaN otherwise, e.g. after a shuffle) — after removing the wait, the token
before it is read; after replacing it, the neutral word.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from waitlens.hooks.batching import MAX_BATCH_TOKENS, check_padding
from waitlens.hooks.patch_cases import gold_version
from waitlens.traces.formats import Rendered
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

KINDS = ("replace-wait", "remove-wait", "shuffle-steps", "delete-steps")
COLUMNS = ["trajectory_id", "problem_id", "kind", "metric", "clean", "ablated", "effect"]


def neutral_word(tokenizer, candidates: Sequence[str] = ("then", "and", ";")) -> str:
    """The first candidate the tokenizer encodes without an unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for w in candidates:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if ids and (unk is None or unk not in ids):
            return w
    raise ValueError(f"none of {list(candidates)} is in the tokenizer's vocabulary; pass neutral=")


def continuation_reads(model: LoadedModel, traj: Trajectory, rd: Rendered, wait_char: int, wait_token: int,
                       continuation_tokens: int = 4) -> list[tuple[int, int]] | None:
    """The wait's own next `continuation_tokens` tokens: [(position read, token it predicts)]."""
    t1 = rd.reasoning_tokens[1]
    reads = [(i, rd.input_ids[i + 1]) for i in range(wait_token, min(wait_token + continuation_tokens, t1))]
    return reads or None


PickWait = Callable[[Trajectory, list], object]


def _target_wait(traj: Trajectory, word: str, pick_wait: PickWait | None = None):
    matches = list(Lexicon([word]).finditer(traj.reasoning))
    if not matches:
        return None
    return pick_wait(traj, matches) if pick_wait is not None else matches[0]


def split_steps(reasoning: str, separators: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(steps, separators between them); `separators` None = sentences/lines."""
    if separators:
        alt = "|".join(re.escape(s) for s in separators)
        parts = re.split(rf"(?:^|\s)({alt})(?=\s|$)", reasoning)
        steps, seps = [p.strip() for p in parts[0::2]], parts[1::2]
    else:
        parts = re.split(r"((?<=[.!?])[ \t]+|\n+)", reasoning)
        steps, seps = parts[0::2], parts[1::2]
    return steps, seps


def join_steps(steps: list[str], seps: list[str], separators) -> str:
    out = steps[0]
    for s, st in zip(seps, steps[1:], strict=False):
        out += (f" {s} " if separators else s) + st
    return out


def ablate_text(traj: Trajectory, kind: str, *, word: str = "wait", neutral: str = ";",
                separators: Sequence[str] | None = None, seed: int = 0,
                pick_wait: PickWait | None = None) -> tuple[str, int | None] | None:
    """(edited reasoning, char index of the edited wait in the original or None), or None
    when the ablation does not apply (no wait; fewer than two steps)."""
    r = traj.reasoning
    if kind in ("replace-wait", "remove-wait"):
        m = _target_wait(traj, word, pick_wait)
        if m is None:
            return None
        if kind == "replace-wait":
            return r[:m.start] + neutral + r[m.end:], m.start
        end = m.end + (1 if r[m.end:m.end + 1] == " " else 0)
        return r[:m.start] + r[end:], m.start
    if kind not in ("shuffle-steps", "delete-steps"):
        raise ValueError(f"unknown ablation {kind!r}; use one of {KINDS}")
    steps, seps = split_steps(r, separators)
    if len(steps) < 2:
        return None
    rng = np.random.default_rng([seed, len(r), sum(map(ord, traj.id))])
    if kind == "shuffle-steps":
        order = rng.permutation(len(steps))
        if (order == np.arange(len(steps))).all():
            order = np.roll(order, 1)
        new = [steps[i] for i in order]
        return join_steps(new, seps, separators), None
    k = int(rng.integers(0, len(steps) - 1))
    steps2 = steps[:k] + steps[k + 1:]
    seps2 = seps[:k] + seps[k + 1:]
    return join_steps(steps2, seps2, separators), None


FULL_LOGPROBS_MAX = 1 << 22  # positions x vocabulary up to which every position's log-probs are computed


class _RowLogprobs:
    """Next-token log-probs of one forward, computed only at the rows read (``lp[i, tok]``,
    ``lp[[i, j]]``): with a 150k vocabulary, all rows of a long trajectory are gigabytes."""

    def __init__(self, model, hidden: torch.Tensor):
        from waitlens.hooks.points import lm_head_of

        self.head, self.hidden, self.rows = lm_head_of(model), hidden, {}

    def _row(self, i: int) -> torch.Tensor:
        if i not in self.rows:
            with torch.inference_mode():
                self.rows[i] = torch.log_softmax(self.head(self.hidden[i]).float(), -1)
        return self.rows[i]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, t = key
            return self._row(int(i))[t]
        return torch.stack([self._row(int(i)) for i in key])


@torch.inference_mode()
def _logprobs(model, ids: list[int]):
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    if len(ids) * int(model.config.vocab_size) <= FULL_LOGPROBS_MAX:
        return torch.log_softmax(model.hf(input_ids=x, use_cache=False).logits[0].float(), -1)
    from waitlens.hooks.points import decoder_of

    return _RowLogprobs(model, decoder_of(model)(input_ids=x, use_cache=False).last_hidden_state[0])


@torch.inference_mode()
def _logprobs_batch(model, seqs: list[list[int]], batch_size: int, max_batch_tokens: int, padding: str) -> list:
    """`_logprobs` of every sequence from padded forwards (`hooks.batching`): sequences grouped by
    length, at most `batch_size` and `max_batch_tokens` padded tokens per forward; identical
    sequences run once."""
    from waitlens.hooks.batching import length_batches, pad_batch
    from waitlens.hooks.points import decoder_of, lm_head_of

    uniq: dict[tuple[int, ...], int] = {}
    for ids in seqs:
        uniq.setdefault(tuple(ids), len(uniq))
    keys = list(uniq)
    out: list = [None] * len(keys)
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    V = int(model.config.vocab_size)
    for group in length_batches([len(k) for k in keys], batch_size, max_batch_tokens):
        batch = pad_batch([keys[i] for i in group], padding, pad_id, model.device)
        hid = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False).last_hidden_state
        for b, i in enumerate(group):
            o, n = batch.offsets[b], batch.lengths[b]
            h = hid[b, o:o + n]
            if n * V <= FULL_LOGPROBS_MAX:
                out[i] = torch.log_softmax(lm_head_of(model)(h).float(), -1)
            else:
                out[i] = _RowLogprobs(model, h)
    return [out[uniq[tuple(ids)]] for ids in seqs]


def _gold(lp, ids, span) -> float:
    return float(sum(lp[i - 1, ids[i]] for i in range(*span)).exp()) if span[1] > span[0] else float("nan")


def ablate(model: LoadedModel, trajectories: Sequence[Trajectory], kind: str, *, word: str = "wait", neutral: str | None = None,
           separators: Sequence[str] | None = None, kl_positions: int = 8, seed: int = 0,
           pick_wait: PickWait | None = None, readouts: Mapping[str, Callable] | None = None,
           progress: bool = False, batch_size: int = 64, max_batch_tokens: int | None = MAX_BATCH_TOKENS,
           padding: str = "right") -> tuple[pd.DataFrame, dict]:
    """Run one ablation over trajectories: rows `COLUMNS` (one per trajectory and metric).

    separators: step separators (None: sentences/lines); pick_wait(trajectory, matches) -> the
    match to edit (default: the first); readouts: {metric name: read-out fn} (module doc).
    max_batch_tokens: the original and edited sequences run in padded batches (at most
    `batch_size` sequences and this many padded tokens each, `padding` "right" or "left"); None
    runs them one at a time (the reference path, equal within float error).
    """
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise ValueError(f"unknown ablation {kind!r}; use one of {KINDS}")
    if isinstance(separators, str):
        raise ValueError(f"separators must be a list of words or None (sentences), got {separators!r}")
    readouts = dict(readouts) if readouts is not None else {"continuation": continuation_reads}
    if neutral is None and kind == "replace-wait":
        neutral = neutral_word(model.tokenizer)
    check_padding(padding)
    rows, skipped, todo = [], [], []
    for traj in trajectories:
        gt = gold_version(traj)
        edit = ablate_text(gt, kind, word=word, neutral=neutral or ";", separators=separators, seed=seed,
                           pick_wait=pick_wait)
        if edit is None:
            skipped.append(traj.id)
            continue
        text, wait_char = edit
        todo.append((traj, gt, wait_char, model.render(gt), model.render(dataclasses.replace(gt, reasoning=text))))
    if max_batch_tokens is None:
        lps = None
    else:
        seqs = [ids for *_, rd0, rd1 in todo for ids in (rd0.input_ids, rd1.input_ids)]
        lps = _logprobs_batch(model, seqs, batch_size, max_batch_tokens, padding)
    for k, (traj, gt, wait_char, rd0, rd1) in enumerate(tqdm(todo, desc=kind, disable=not progress)):
        ids0, ids1 = rd0.input_ids, rd1.input_ids
        if lps is None:
            lp0, lp1 = _logprobs(model, ids0), _logprobs(model, ids1)
        else:
            lp0, lp1 = lps[2 * k], lps[2 * k + 1]
        g0, g1 = _gold(lp0, ids0, rd0.answer_tokens), _gold(lp1, ids1, rd1.answer_tokens)
        # the common suffix of the two sequences, aligned from the end
        L = 0
        while L < min(len(ids0), len(ids1)) and ids0[-1 - L] == ids1[-1 - L]:
            L += 1
        shift = len(ids0) - len(ids1)
        e1 = len(ids1) - L  # first ablated position in the common suffix
        ks = [i for i in range(e1, min(e1 + kl_positions, len(ids1))) if i >= rd1.reasoning_tokens[0]]
        kl = float("nan")
        if ks and e1 < rd1.reasoning_tokens[1]:
            a, b = lp0[[i + shift for i in ks]], lp1[ks]
            kl = float((a.exp() * (a - b)).sum(-1).clamp_min(0).mean())
        values = [("gold_prob", g0, g1), ("kl", 0.0, kl)]
        wt = None
        if wait_char is not None:
            wt = next(i for i, (s, e) in enumerate(rd0.offsets) if e > rd0.reasoning_chars[0] + wait_char)
        for name, fn in readouts.items():
            c0 = c1 = float("nan")
            reads = fn(model, gt, rd0, wait_char, wt) if wt is not None else None
            if reads and all(r + 1 - shift >= e1 for r, _ in reads):  # predicted token in the common suffix
                c0 = float(torch.stack([lp0[r, t] for r, t in reads]).exp().mean())
                c1 = float(torch.stack([lp1[r - shift, t] for r, t in reads]).exp().mean())
            values.append((name, c0, c1))
        for metric, c, v in values:
            eff = v - c if np.isfinite(v) and np.isfinite(c) else float("nan")
            rows.append((traj.id, traj.problem_id, kind, metric, c, v, eff))
    if skipped:
        warnings.warn(f"{kind}: skipped {len(skipped)} of {len(trajectories)} trajectories it does not apply to "
                      f"(no {word!r}, or fewer than two steps)", stacklevel=2)
    if not rows:
        raise ValueError(f"{kind}: applies to none of the {len(trajectories)} trajectories")
    info = {"kind": kind, "neutral": neutral, "separators": list(separators) if separators else "sentences",
            "n_trajectories": len(trajectories), "n_skipped": len(skipped), "kl_positions": kl_positions,
            "max_batch_tokens": max_batch_tokens, "padding": padding}
    return pd.DataFrame(rows, columns=COLUMNS), info


__all__ = ["KINDS", "ablate", "ablate_text", "continuation_reads", "neutral_word", "split_steps"]
