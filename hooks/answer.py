"""Forced-answer probabilities: at chosen prefixes of a trajectory, append the model's
answer-forcing suffix and read the probability of the gold answer and of the answer the
model would give now.

**One pass plus one short branch per prefix.** The trajectory is run once with a KV cache
(no LM head). Every prefix p then becomes a *branch* ``forcing suffix + gold answer[:-1]``
(teacher forced) placed at rope positions ``p, p+1, ...``; all branches run together in a
single forward over the shared cache, with a custom 4-D attention mask in which each branch
sees the cache columns ``[0, p)`` and its own earlier tokens only. (When the forcing suffix
has no token of its own — it merges into the answer's first token — the prefix's last token
is re-fed as the branch's first token, seeing ``[0, p-1)``, so that its logits come out of
the branch pass.) Greedy decoding of the model's
own answer adds one such batched step per extra answer token. `method="naive"` re-runs
every prefix from scratch instead; tests check both agree within 1e-4.

**Tokenization.** A prefix is the trajectory's own tokens ``ids[:p]`` (as rendered, see
`traces.render`); the suffix and the answer are tokenized *together and separately from the
prefix*: ``tokenize(forcing_suffix + answer)``. For the full trajectory this equals the
rendered tokens whenever no BPE merge crosses the reasoning/suffix boundary (a merge such as
``".\\n"`` in SmolLM2's vocabulary would; we keep the prefix's own tokens then, since
re-tokenizing the prefix would break KV reuse). The answer tokens are those overlapping the
answer's characters: a token straddling the boundary (``" 5"`` after ``"answer:"``) counts
as an answer token, and the forcing tokens are the ones before it.

**What is measured.** ``gold_logprob`` = sum of teacher-forced log-probs of the answer
tokens (the closing ``answer_suffix`` such as ``"}"`` is *not* included unless
``include_close=True``, which then also scores it). ``top_answer`` = greedy decode after the
forcing tokens, at most ``max_answer_tokens`` tokens (default: as many as the gold answer
has), stopping at eos or at the first token of ``answer_suffix``; ``top_logprob`` its
log-probability. For a one-token answer this is the argmax of the next token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from waitlens.hooks.batching import MAX_BATCH_TOKENS, check_padding, length_batches, pad_batch
from waitlens.hooks.logprobs import head_logprobs
from waitlens.hooks.models import LoadedModel
from waitlens.traces.formats import Rendered, tokenize_with_offsets
from waitlens.traces.grading import normalize_answer
from waitlens.traces.trajectory import Trajectory

CURVE_COLUMNS = [
    "prefix", "rel_prefix", "frac", "gold_logprob", "gold_prob", "top_answer", "top_logprob",
    "top_prob", "top_is_gold",
]


class NoForcingSuffixError(ValueError):
    """The model's prompt format has no answer-forcing suffix."""


@dataclass
class SuffixTokens:
    """The forcing suffix and the answer, tokenized together (see module docstring)."""

    forcing: list[int]  # tokens before the answer
    answer: list[int]  # tokens overlapping the answer characters
    close: list[int]  # tokens of answer_suffix (scored only with include_close)
    stop: set[int]  # greedy decoding stops at these


def forcing_suffix(model: LoadedModel, suffix: str | None = None) -> str:
    """The suffix to append after a prefix: `suffix` if given, else the model format's."""
    text = suffix if suffix is not None else model.format.forcing_suffix
    if not text:
        raise NoForcingSuffixError(
            f"model {getattr(model, 'spec', '?')!r} (prompt format {model.format.name!r}) has no "
            "answer-forcing suffix: its format's think_close + answer_prefix is empty. Give one with "
            "suffix='...' (CLI: --suffix), or load the model with a format that has one, e.g. "
            "load_model(spec, format='r1') or a waitlens_format.json with think_close/answer_prefix"
        )
    return text


def suffix_tokens(model: LoadedModel, answer: str, suffix: str | None = None) -> SuffixTokens:
    tok = model.tokenizer
    text = forcing_suffix(model, suffix)
    close_text = model.format.answer_suffix
    full = text + answer + close_text
    ids, offs = tokenize_with_offsets(tok, full)
    a0, a1 = len(text), len(text) + len(answer)
    first = next((i for i, (s, e) in enumerate(offs) if e > a0 and e > s), len(ids))
    last = next((i for i, (s, e) in enumerate(offs) if s >= a1 and e > s), len(ids))
    if not answer.strip() or first >= last:
        raise ValueError(f"empty answer {answer!r}: nothing to score after the forcing suffix")
    stop = {int(t) for t in _as_list(getattr(tok, "eos_token_id", None))}
    close = ids[last:]
    if close:
        stop.add(int(close[0]))
    return SuffixTokens(ids[:first], ids[first:last], close, stop)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def choose_prefixes(
    rendered: Rendered, token_indices: Iterable[int] = (), *, k: int = 0, every: int | None = None
) -> list[int]:
    """Prefix ends (absolute token counts: a prefix is ``ids[:p]``) for a rendered trajectory.

    For each token index i in `token_indices` (e.g. discourse positions from
    `traces.find_positions`), the prefixes ending just before and after it, ±`k` tokens:
    ``p in i+1-k ... i+1+k`` (``p = i`` excludes the token, ``p = i+1`` includes it); plus
    every `every` reasoning tokens from the start. Clipped to the reasoning ``[t0, t1]``,
    sorted, unique. Empty reasoning gives ``[t0]``.
    """
    t0, t1 = rendered.reasoning_tokens
    out: set[int] = set()
    for i in token_indices:
        out.update(range(int(i) + 1 - k, int(i) + 2 + k))
    if every:
        out.update(range(t0, t1 + 1, int(every)))
        out.add(t1)
    return sorted(p for p in out if t0 <= p <= t1) or [t0]


# ---------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One trajectory's forced-answer job: its rendered ids, sorted prefix ends, suffix tokens."""

    ids: list[int]
    prefixes: list[int]
    st: SuffixTokens
    cap: int  # greedy answer length cap

    @property
    def r(self) -> int:
        # Rows that predict the scored tokens come from the forcing tokens; only when there are
        # none is the prefix's last token re-fed (r = 1) so that its logits come out of the branch.
        return 0 if self.st.forcing else 1

    @property
    def base_len(self) -> int:  # cached context: every branch sees a prefix of it (at least 1 column)
        return max(max(self.prefixes) - self.r, 1)

    def scored(self, include_close: bool) -> list[int]:
        return self.st.answer + (self.st.close if include_close else [])

    def cost(self, include_close: bool) -> int:  # padded tokens this item adds to a batch
        width = self.r + len(self.st.forcing) + len(self.scored(include_close)) - 1
        return self.base_len + width * len(self.prefixes)


def _neg(dtype) -> float:
    return torch.finfo(dtype).min


def _mask(visible: list[list[np.ndarray]], q: int, width: int, dtype) -> Float[Tensor, "batch 1 q width"]:
    """[batch, 1, q, width] additive mask: 0 where query i of batch row b may attend, else -inf.
    A query with nothing listed (padding) attends to nothing it could be hurt by: the caller
    lists its own column, so no row is fully masked (no NaN in the cache)."""
    allow = torch.zeros(len(visible), q, width, dtype=torch.bool)
    for b, rows in enumerate(visible):
        for i, cols in enumerate(rows):
            allow[b, i, torch.as_tensor(cols, dtype=torch.long)] = True
    mask = torch.full((len(visible), q, width), _neg(dtype), dtype=dtype)
    mask.masked_fill_(allow, 0.0)
    return mask[:, None]


@torch.no_grad()
def _step(model, cache, n_cached: int, queries: list[list[tuple[int, int, np.ndarray]]],
          pad_id: int) -> tuple[Float[Tensor, "rows d_model"], list[list[int]]]:
    """Run each batch row's queries (token, rope position, visible columns over cache + this
    step) as new cache columns n_cached..n_cached+q-1, padded to the longest row.

    Returns the final hidden states [batch * q, d_model] and, per row, the flat row number of
    each of its queries."""
    dev, dtype = model.device, model.dtype
    q = max(max(len(r) for r in queries), 1)
    toks = torch.full((len(queries), q), pad_id, dtype=torch.long)
    pos = torch.zeros((len(queries), q), dtype=torch.long)
    vis: list[list[np.ndarray]] = []
    flat = []
    for b, rows in enumerate(queries):
        vis.append([])
        flat.append([])
        for i in range(q):
            if i < len(rows):
                t, p, cols = rows[i]
                toks[b, i], pos[b, i] = t, p
                vis[b].append(cols)
                flat[b].append(b * q + i)
            else:  # padding: sees only itself
                vis[b].append(np.array([n_cached + i]))
    mask = _mask(vis, q, n_cached + q, dtype)
    hidden = model.hf.base_model(input_ids=toks.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev),
                                 cache=cache, use_cache=True).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]), flat


@torch.no_grad()
def _branching_batch(model, items: Sequence[_Item], include_close: bool, padding: str = "right"):
    """Forced-answer scores of several trajectories in one batch: one padded cached pass over
    their contexts, then every branch of every trajectory in one step (and one per greedy step).

    Returns, per item, (gold log-probs per prefix, greedy [(token, logprob), ...] per prefix)."""
    from transformers import DynamicCache

    check_padding(padding)
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0
    dtype = model.dtype
    base = pad_batch([it.ids[: it.base_len] for it in items], padding, pad_id, "cpu")
    T = base.input_ids.shape[1]
    # the cached pass, with its own 4-D mask: causal over each row's real tokens; a pad sees itself
    real = (base.attention_mask if base.attention_mask is not None else torch.ones_like(base.input_ids)).bool()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allow = causal[None] & real[:, None, :]
    allow |= torch.eye(T, dtype=torch.bool)[None]
    mask = torch.full(allow.shape, _neg(dtype), dtype=dtype).masked_fill_(allow, 0.0)[:, None]
    cache = DynamicCache(config=model.hf.config)
    model.hf.base_model(input_ids=base.input_ids.to(model.device), position_ids=base.position_ids.to(model.device),
                        attention_mask=mask.to(model.device), cache=cache, use_cache=True)
    n = T
    queries, starts = [], []
    for b, it in enumerate(items):
        o, r = base.offsets[b], it.r
        scored = it.scored(include_close)
        rows, st_b = [], []
        for p in it.prefixes:
            branch = it.ids[p - r:p] + it.st.forcing + scored[:-1]
            start = n + len(rows)
            st_b.append(start)
            for i, t in enumerate(branch):
                rows.append((t, p - r + i, np.concatenate([o + np.arange(p - r), np.arange(start, start + i + 1)])))
        queries.append(rows)
        starts.append(st_b)
    hidden, flat = _step(model, cache, n, queries, pad_id)
    n += max(max(len(r) for r in queries), 1)
    # log-probs only at the rows that predict scored tokens (the LM head read a few rows at a time)
    need, targets, where = [], [], []
    for b, it in enumerate(items):
        scored = it.scored(include_close)
        f, r = len(it.st.forcing), it.r
        width = r + f + len(scored) - 1
        first = r + f - 1  # the row predicting the first answer token
        for j in range(len(it.prefixes)):
            where.append((b, j, len(need)))
            need += [flat[b][j * width + first + i] for i in range(len(scored))]
            targets += scored
    lp, top_id, top_lp = head_logprobs(model, hidden.index_select(0, torch.tensor(need, device=hidden.device)),
                                       torch.tensor(targets, dtype=torch.long, device=hidden.device), top=True)
    gold = [np.zeros(len(it.prefixes)) for it in items]
    greedy: list[list[list[tuple[int, float]]]] = [[[] for _ in it.prefixes] for it in items]
    for b, j, k in where:
        scored = items[b].scored(include_close)
        gold[b][j] = float(sum(lp[k + i] for i in range(len(scored))))
        greedy[b][j].append((int(top_id[k]), float(top_lp[k])))
    # further greedy steps: each active branch feeds its last greedy token
    own = [[np.concatenate([base.offsets[b] + np.arange(p - it.r), np.arange(s, s + it.r + len(it.st.forcing))])
            for p, s in zip(it.prefixes, starts[b], strict=True)] for b, it in enumerate(items)]
    fed: list[list[list[int]]] = [[[] for _ in it.prefixes] for it in items]
    for step in range(1, max(it.cap for it in items)):
        active = [[j for j in range(len(it.prefixes)) if step < it.cap and len(greedy[b][j]) == step
                   and greedy[b][j][-1][0] not in it.st.stop] for b, it in enumerate(items)]
        if not any(active):
            break
        queries = []
        for b, it in enumerate(items):
            rows = []
            for qi, j in enumerate(active[b]):
                col = n + qi
                rows.append((greedy[b][j][-1][0], it.prefixes[j] + len(it.st.forcing) + step - 1,
                             np.concatenate([own[b][j], np.asarray(fed[b][j], dtype=int), [col]])))
                fed[b][j].append(col)
            queries.append(rows)
        hidden, flat = _step(model, cache, n, queries, pad_id)
        n += max(max(len(r) for r in queries), 1)
        idx = [flat[b][qi] for b in range(len(items)) for qi in range(len(active[b]))]
        _, top_id, top_lp = head_logprobs(model, hidden.index_select(0, torch.tensor(idx, device=hidden.device)),
                                          top=True)
        k = 0
        for b in range(len(items)):
            for j in active[b]:
                greedy[b][j].append((int(top_id[k]), float(top_lp[k])))
                k += 1
    return list(zip(gold, greedy, strict=True))


@torch.no_grad()
def _naive(model, ids: list[int], prefixes: Sequence[int], st: SuffixTokens,
           include_close: bool, max_answer_tokens: int):
    hf = model.hf
    dev = model.device
    scored = st.answer + (st.close if include_close else [])
    f = len(st.forcing)
    gold = np.zeros(len(prefixes))
    greedy: list[list[tuple[int, float]]] = []
    for j, p in enumerate(prefixes):
        seq = ids[:p] + st.forcing + scored
        lp = torch.log_softmax(hf(input_ids=torch.tensor([seq], device=dev)).logits[0].float(), -1)
        gold[j] = float(sum(lp[p - 1 + f + i, t] for i, t in enumerate(scored)))
        out = []
        ctx = ids[:p] + st.forcing
        for step in range(max_answer_tokens):
            if step == 0:  # the teacher-forced pass already holds the first answer distribution
                row = lp[p - 1 + f]
            else:
                row = torch.log_softmax(hf(input_ids=torch.tensor([ctx], device=dev)).logits[0, -1].float(), -1)
            g = int(row.argmax())
            out.append((g, float(row[g])))
            if g in st.stop:
                break
            ctx = ctx + [g]
        greedy.append(out)
    return gold, greedy


def _prepare(model, trajectory: Trajectory, prefixes, suffix, answer, include_close, max_answer_tokens):
    """Validated inputs of one trajectory: (_Item, rendered, gold text)."""
    rd = model.render(trajectory, include_answer=False)
    ids = rd.input_ids
    t0, t1 = rd.reasoning_tokens
    if prefixes is None:
        prefixes = list(range(t0, t1 + 1))
    prefixes = sorted({int(p) for p in prefixes})
    if not prefixes:
        raise ValueError(f"trajectory {trajectory.id!r}: no prefixes given")
    bad = [p for p in prefixes if not (max(t0, 1) <= p <= t1)]
    if bad:
        raise ValueError(
            f"trajectory {trajectory.id!r}: prefix end(s) {bad[:5]} outside its reasoning tokens "
            f"[{t0}, {t1}] (prefixes are absolute token counts)"
        )
    gold_text = trajectory.gold if answer is None else answer
    st = suffix_tokens(model, gold_text, suffix)
    cap = max_answer_tokens or len(st.answer)
    model.check_length(max(prefixes) + len(st.forcing) + max(len(st.answer) + len(st.close), cap), trajectory.id)
    return _Item(ids, prefixes, st, cap), rd, gold_text


def _rows(model, item: _Item, rd: Rendered, gold_text: str, gold, greedy, decoded: dict | None = None) -> list[dict]:
    """One row (CURVE_COLUMNS) per prefix; `decoded` memoises greedy-answer decoding."""
    st = item.st
    t0, t1 = rd.reasoning_tokens
    decoded = {} if decoded is None else decoded
    rows = []
    n_reason = max(t1 - t0, 1)
    gold_norm = normalize_answer(gold_text)
    for p, glp, gr in zip(item.prefixes, gold, greedy, strict=True):
        toks = tuple(t for t, _ in gr if t not in st.stop)
        top_lp = float(sum(lp for t, lp in gr if t not in st.stop)) if toks else float(gr[0][1])
        if toks not in decoded:
            text = model.tokenizer.decode(list(toks)).strip() if toks else ""
            decoded[toks] = (text, normalize_answer(text) if text else "")
        text, norm = decoded[toks]
        is_gold = list(toks) == st.answer or (bool(text) and norm == gold_norm)
        rows.append({"prefix": p, "rel_prefix": p - t0, "frac": (p - t0) / n_reason,
                     "gold_logprob": float(glp), "gold_prob": float(np.exp(glp)), "top_answer": text,
                     "top_logprob": top_lp, "top_prob": float(np.exp(top_lp)), "top_is_gold": bool(is_gold)})
    return rows


def _frame(model, trajectory: Trajectory, item: _Item, rd: Rendered, gold_text: str, suffix,
           gold, greedy) -> pd.DataFrame:
    df = pd.DataFrame(_rows(model, item, rd, gold_text, gold, greedy), columns=CURVE_COLUMNS)
    df.attrs.update({"trajectory_id": trajectory.id, "suffix": forcing_suffix(model, suffix),
                     "n_answer_tokens": len(item.st.answer), "reasoning_tokens": rd.reasoning_tokens})
    return df


def answer_probabilities(
    model: LoadedModel,
    trajectory: Trajectory,
    prefixes: Sequence[int | np.integer] | None = None,
    suffix: str | None = None,
    *,
    answer: str | None = None,
    include_close: bool = False,
    max_answer_tokens: int | None = None,
    method: str = "branch",
) -> pd.DataFrame:
    """Forced-answer probabilities at each prefix of `trajectory` (one row per prefix).

    model: a `hooks.LoadedModel`. prefixes: absolute prefix ends p (the prefix is the
    rendered ``ids[:p]``; see `choose_prefixes`), each within the reasoning ``[t0, t1]``;
    default every reasoning token. suffix: the forcing suffix (default: the model format's
    ``forcing_suffix``; an empty one is an error). answer: scored answer (default the gold).
    method: ``"branch"`` (one cached pass + batched branches) or ``"naive"`` (recompute).

    Columns: prefix, rel_prefix (reasoning tokens read), frac, gold_logprob, gold_prob,
    top_answer, top_logprob, top_prob, top_is_gold.
    """
    if method not in ("branch", "naive"):
        raise ValueError(f"method must be 'branch' or 'naive', got {method!r}")
    item, rd, gold_text = _prepare(model, trajectory, prefixes, suffix, answer, include_close, max_answer_tokens)
    if method == "branch":
        gold, greedy = _branching_batch(model, [item], include_close)[0]
    else:
        gold, greedy = _naive(model, item.ids, item.prefixes, item.st, include_close, item.cap)
    return _frame(model, trajectory, item, rd, gold_text, suffix, gold, greedy)


def answer_curves(
    model: LoadedModel,
    trajectories: Sequence[Trajectory],
    token_indices: dict[str, Iterable[int]] | None = None,
    *,
    k: int = 8,
    every: int | None = 1,
    suffix: str | None = None,
    include_close: bool = False,
    max_answer_tokens: int | None = None,
    progress: bool = False,
    batch_size: int = 16,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    padding: str = "right",
) -> pd.DataFrame:
    """`answer_probabilities` for many trajectories, at prefixes from `choose_prefixes`.

    token_indices: trajectory id -> token positions to centre ±k windows on (discourse and
    control positions). Returns one long table with trajectory_id, problem_id, correct, gold.
    Trajectories run `batch_size` at a time (grouped by size, at most `max_batch_tokens`
    context + branch tokens per batch, `padding` "right" or "left"); the numbers equal
    `answer_probabilities` one trajectory at a time within float tolerance.
    """
    forcing_suffix(model, suffix)  # fail before any forward pass
    check_padding(padding)
    trajectories = list(trajectories)
    jobs = []
    for traj in trajectories:
        rd = model.render(traj, include_answer=False)
        pref = choose_prefixes(rd, (token_indices or {}).get(traj.id, ()), k=k, every=every)
        pref = [p for p in pref if p >= 1]
        jobs.append(_prepare(model, traj, pref, suffix, None, include_close, max_answer_tokens))
    results: list = [None] * len(jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"answers {getattr(model, 'spec', '')}", unit="traj")
    for group in length_batches([j[0].cost(include_close) for j in jobs], batch_size, max_batch_tokens):
        out = _branching_batch(model, [jobs[g][0] for g in group], include_close, padding)
        for g, res in zip(group, out, strict=True):
            results[g] = res
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    rows, decoded = [], {}
    for traj, (item, rd, gold_text), (gold, greedy) in zip(trajectories, jobs, results, strict=True):
        head = {"trajectory_id": traj.id, "problem_id": traj.problem_id, "correct": traj.correct,
                "gold": traj.gold}
        n = rd.reasoning_tokens[1] - rd.reasoning_tokens[0]
        rows += [{**head, **r, "n_reasoning_tokens": n} for r in _rows(model, item, rd, gold_text, gold, greedy,
                                                                        decoded)]
    cols = ["trajectory_id", "problem_id", "correct", "gold", *CURVE_COLUMNS, "n_reasoning_tokens"]
    return pd.DataFrame(rows, columns=cols)
