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
log-probability. For a one-token answer (the organism) this is the argmax of the next token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

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


def forcing_suffix(model, suffix: str | None = None) -> str:
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


def suffix_tokens(model, answer: str, suffix: str | None = None) -> SuffixTokens:
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
def _neg(dtype) -> float:
    return torch.finfo(dtype).min


@torch.no_grad()
def _branch_step(hf, cache, n_cached: int, tokens: list[int], positions: list[int],
                 visible: list[np.ndarray]) -> Float[Tensor, "q vocab"]:
    """Run `tokens` as new cache entries n_cached.. with explicit visibility; return log-probs.

    visible[i]: the key columns (over cache + these tokens) query i may attend to.
    """
    dev = next(hf.parameters()).device
    dtype = next(hf.parameters()).dtype
    q = len(tokens)
    allow = torch.zeros(q, n_cached + q, dtype=torch.bool)
    for i, cols in enumerate(visible):
        allow[i, torch.as_tensor(cols, dtype=torch.long)] = True
    mask = torch.full((q, n_cached + q), _neg(dtype), dtype=dtype)
    mask.masked_fill_(allow, 0.0)
    out = hf(
        input_ids=torch.tensor([tokens], device=dev),
        position_ids=torch.tensor([positions], device=dev),
        attention_mask=mask[None, None].to(dev),
        cache_position=torch.arange(n_cached, n_cached + q, device=dev),
        past_key_values=cache,
        use_cache=True,
    )
    return torch.log_softmax(out.logits[0].float(), dim=-1)


@torch.no_grad()
def _branching(model, ids: list[int], prefixes: Sequence[int], st: SuffixTokens,
               include_close: bool, max_answer_tokens: int):
    from transformers import DynamicCache

    hf = model.hf
    dev = model.device
    scored = st.answer + (st.close if include_close else [])
    f = len(st.forcing)
    # Rows that predict the scored tokens come from the forcing tokens; only when there are none
    # is the prefix's last token re-fed (r = 1) so that its logits come out of the branch pass.
    r = 0 if f else 1
    base_len = max(prefixes) - r
    cache = DynamicCache(config=hf.config)
    if base_len > 0:
        hf(input_ids=torch.tensor([ids[:base_len]], device=dev), past_key_values=cache,
           use_cache=True, logits_to_keep=1)
    tokens, positions, visible, starts = [], [], [], []
    n = base_len
    for p in prefixes:
        branch = ids[p - r:p] + st.forcing + scored[:-1]
        start = n + len(tokens)
        starts.append(start)
        for i, t in enumerate(branch):
            tokens.append(t)
            positions.append(p - r + i)
            visible.append(np.concatenate([np.arange(p - r), np.arange(start, start + i + 1)]))
    lp = _branch_step(hf, cache, n, tokens, positions, visible)
    n += len(tokens)
    width = r + f + len(scored) - 1
    first = r + f - 1  # the row predicting the first answer token
    gold = np.zeros(len(prefixes))
    greedy: list[list[tuple[int, float]]] = [[] for _ in prefixes]
    for j in range(len(prefixes)):
        rows = lp[j * width: (j + 1) * width]
        gold[j] = float(sum(rows[first + i, t] for i, t in enumerate(scored)))
        g = int(rows[first].argmax())
        greedy[j].append((g, float(rows[first, g])))
    # further greedy steps: each active branch feeds its last greedy token
    own = [np.concatenate([np.arange(p - r), np.arange(s, s + r + f)]) for p, s in zip(prefixes, starts, strict=True)]
    fed: list[list[int]] = [[] for _ in prefixes]
    for step in range(1, max_answer_tokens):
        active = [j for j in range(len(prefixes)) if greedy[j][-1][0] not in st.stop and len(greedy[j]) == step]
        if not active:
            break
        toks, pos, vis = [], [], []
        for qi, j in enumerate(active):
            toks.append(greedy[j][-1][0])
            pos.append(prefixes[j] + f + step - 1)
            vis.append(np.concatenate([own[j], np.asarray(fed[j], dtype=int), [n + qi]]))
            fed[j].append(n + qi)
        lp = _branch_step(hf, cache, n, toks, pos, vis)
        n += len(toks)
        for qi, j in enumerate(active):
            g = int(lp[qi].argmax())
            greedy[j].append((g, float(lp[qi, g])))
    return gold, greedy


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


def answer_probabilities(
    model,
    trajectory: Trajectory,
    prefixes: Sequence[int] | None = None,
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
    run = _branching if method == "branch" else _naive
    gold, greedy = run(model, ids, prefixes, st, include_close, cap)
    rows = []
    n_reason = max(t1 - t0, 1)
    for p, glp, gr in zip(prefixes, gold, greedy, strict=True):
        toks = [t for t, _ in gr if t not in st.stop]
        top_lp = float(sum(lp for t, lp in gr if t not in st.stop)) if toks else float(gr[0][1])
        text = model.tokenizer.decode(toks).strip() if toks else ""
        is_gold = toks == st.answer or (bool(text) and normalize_answer(text) == normalize_answer(gold_text))
        rows.append({"prefix": p, "rel_prefix": p - t0, "frac": (p - t0) / n_reason,
                     "gold_logprob": float(glp), "gold_prob": float(np.exp(glp)), "top_answer": text,
                     "top_logprob": top_lp, "top_prob": float(np.exp(top_lp)), "top_is_gold": bool(is_gold)})
    df = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    df.attrs.update({"trajectory_id": trajectory.id, "suffix": forcing_suffix(model, suffix),
                     "n_answer_tokens": len(st.answer), "reasoning_tokens": (t0, t1)})
    return df


def answer_curves(
    model,
    trajectories: Sequence[Trajectory],
    token_indices: dict[str, Iterable[int]] | None = None,
    *,
    k: int = 8,
    every: int | None = 1,
    suffix: str | None = None,
    include_close: bool = False,
    max_answer_tokens: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """`answer_probabilities` for many trajectories, at prefixes from `choose_prefixes`.

    token_indices: trajectory id -> token positions to centre ±k windows on (discourse and
    control positions). Returns one long table with trajectory_id, problem_id, correct, gold.
    """
    forcing_suffix(model, suffix)  # fail before any forward pass
    frames = []
    it: Iterable = trajectories
    if progress:
        from tqdm import tqdm

        it = tqdm(trajectories, desc=f"answers {getattr(model, 'spec', '')}")
    for traj in it:
        rd = model.render(traj, include_answer=False)
        pref = choose_prefixes(rd, (token_indices or {}).get(traj.id, ()), k=k, every=every)
        pref = [p for p in pref if p >= 1]
        df = answer_probabilities(model, traj, pref, suffix, include_close=include_close,
                                  max_answer_tokens=max_answer_tokens)
        df.insert(0, "trajectory_id", traj.id)
        df.insert(1, "problem_id", traj.problem_id)
        df.insert(2, "correct", traj.correct)
        df.insert(3, "gold", traj.gold)
        df["n_reasoning_tokens"] = rd.reasoning_tokens[1] - rd.reasoning_tokens[0]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
