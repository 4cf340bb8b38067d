"""What a patch is measured by: named metric functions (TransformerLens's `patching_metric`).

A metric is a `PatchMetric`: a function from the patched forward's output and the case to a
number, plus the *reads* it needs — the positions whose next-token distributions it looks at,
on the trajectory itself or on a *branch* (a token sequence that shares the trajectory's first
tokens, such as a prefix followed by the answer-forcing suffix). `hooks.patching.patch` runs
each read once per patched cell (patched rows after the patched position, clean rows before
it) and hands the metric a `MetricInput`; the clean value is the same function on the clean
run's distributions, and the effect is patched minus clean.

Built-ins, all model-agnostic (no task grammar):

- ``forced_answer``: the gold answer's probability when the model is forced to answer
  `after` tokens (default 8) after the wait: the branch ``ids[:wait + 1 + after]`` (clipped
  at the reasoning's end) + the format's forcing suffix + the gold answer, teacher-forced
  (`hooks.answer.suffix_tokens` tokenizes the suffix and answer). A random control anchor is
  read at its wait's branch.
- ``next_token_kl`` (alias ``kl``): KL(clean ‖ patched) of the next-token distribution,
  averaged over the patched position and the `positions - 1` after it (clipped at the end).
  Not differentiable at the clean run (its minimum): never attributed.
- ``recheck``: the probability mass the distribution right after the wait (past punctuation
  such as ``","``) puts on the first tokens of re-check openings (`DEFAULT_OPENINGS`: " Let
  me", " check", "Hmm", ...) rather than on moving on. Openings the tokenizer cannot encode
  without an unknown token are ignored; a tokenizer with none gives no value.
- ``gold_prob`` (`final_answer`): the gold answer's probability when forced at the end of
  the reasoning (read from the trajectory itself, which is rendered with the gold answer).

A plain callable ``fn(x: MetricInput) -> number`` is accepted too (`as_metric`): it reads the
trajectory's next-token distributions at the patched position and the 7 after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_OPENINGS = (" Let me", " let me", " Let", " let", " check", " Hmm", "Hmm", " verify", " double")
DEFAULT_FORCED_AFTER = 8


class MetricError(ValueError):
    """A metric name or definition that cannot be used."""


@dataclass(frozen=True)
class Read:
    """One next-token distribution a metric reads.

    position: index into the sequence (the distribution predicting token ``position + 1``);
    branch: None for the trajectory's own tokens, else a full token sequence that shares the
    trajectory's first tokens; token: the token whose probability is read (None: the next
    token of the sequence, `MetricInput.next_token`).
    """

    position: int
    branch: tuple[int, ...] | None = None
    token: int | None = None


@dataclass
class MetricInput:
    """What a metric sees for one (anchor, patched position): its reads' log-probs."""

    model: Any  # the target LoadedModel
    case: Any  # hooks.patch_cases.PatchCase
    anchor: Any  # hooks.patch_cases.Anchor
    position: int  # the patched target position
    reads: list[Read]
    lookup: Callable[[Read], Tensor]
    clean_lookup: Callable[[Read], Tensor]

    def logprobs(self, read: Read) -> Float[Tensor, " vocab"]:
        """The (patched) next-token log-probs at `read` (clean before the patched position)."""
        return self.lookup(read)

    def clean_logprobs(self, read: Read) -> Float[Tensor, " vocab"]:
        return self.clean_lookup(read)

    def next_token(self, read: Read) -> int:
        """The token `read` is scored on: its own `token`, else the sequence's next token."""
        if read.token is not None:
            return read.token
        seq = read.branch if read.branch is not None else self.case.target_ids
        return int(seq[read.position + 1])


ReadsFn = Callable[[Any, Any, Any, int], "list[Read] | None"]


@dataclass(frozen=True)
class PatchMetric:
    """A named metric: `fn(MetricInput) -> number` and the reads it needs.

    reads(model, case, anchor, position) -> list[Read], or None when the metric has no value
    for that anchor (the row is left out). differentiable: attribution patching may estimate
    it (its reads must all be on the trajectory).
    """

    name: str
    fn: Callable[[MetricInput], Any]
    reads: ReadsFn
    differentiable: bool = True
    info: dict = field(default_factory=dict)

    def __call__(self, x: MetricInput) -> Any:
        return self.fn(x)


# ---------------------------------------------------------------------------------------------
# built-ins
def _kl_fn(x: MetricInput):
    if not x.reads:
        return 0.0
    c = torch.stack([x.clean_logprobs(r) for r in x.reads])
    lp = torch.stack([x.logprobs(r) for r in x.reads])
    return (c.exp() * (c - lp)).sum(-1).clamp_min(0).mean().item()


def next_token_kl(positions: int = 8, *, name: str = "next_token_kl") -> PatchMetric:
    """KL(clean ‖ patched) of the next token, averaged over `positions` from the patched one."""
    if positions < 1:
        raise MetricError(f"next_token_kl needs positions >= 1, got {positions}")

    @no_type_check
    def reads(model, case, anchor, p):
        return [Read(i) for i in range(p, min(p + positions, len(case.target_ids)))]

    return PatchMetric(name, _kl_fn, reads, differentiable=False, info={"positions": positions})


def _sequence_prob(x: MetricInput):
    """exp(sum of the reads' log-probs of their next tokens): a teacher-forced span's probability."""
    if not x.reads:
        return float("nan")
    return sum(x.logprobs(r)[x.next_token(r)] for r in x.reads).exp()


def final_answer(*, name: str = "gold_prob") -> PatchMetric:
    """The gold answer's probability forced at the end of the reasoning (the trajectory is
    rendered with the gold answer, so its answer tokens are the gold's)."""

    @no_type_check
    def reads(model, case, anchor, p):
        a0, a1 = case.answer_tokens
        return [Read(i - 1) for i in range(a0, a1)]

    return PatchMetric(name, _sequence_prob, reads)


def forced_answer(after: int = DEFAULT_FORCED_AFTER, *, name: str = "forced_answer") -> PatchMetric:
    """The gold answer's probability forced `after` tokens after the wait (module doc)."""
    if after < 0:
        raise MetricError(f"forced_answer needs after >= 0, got {after}")

    @no_type_check
    def reads(model, case, anchor, p):
        key = ("forced_answer", after, anchor.wait_token)
        if key not in case.cache:
            from waitlens.hooks.answer import suffix_tokens

            st = case.cache.get("suffix_tokens")
            if st is None:
                st = case.cache["suffix_tokens"] = suffix_tokens(model, case.trajectory.gold)
            t1 = case.align.target_start + case.align.n_reasoning
            k = min(anchor.wait_token + 1 + after, t1)
            branch = tuple(case.target_ids[:k]) + tuple(st.forcing) + tuple(st.answer)
            first = k + len(st.forcing) - 1  # predicts the first answer token
            case.cache[key] = [Read(first + j, branch) for j in range(len(st.answer))]
        return case.cache[key]

    return PatchMetric(name, _sequence_prob, reads, differentiable=False, info={"after": after})


def opening_tokens(tokenizer, openings: Sequence[str]) -> list[int]:
    """The distinct first tokens of `openings` (those encoded without an unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[int] = []
    for text in openings:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids[0] != unk and ids[0] not in out:
            out.append(int(ids[0]))
    return out


def _recheck_fn(x: MetricInput):
    (r,) = x.reads
    ids = x.case.cache["recheck_ids"]
    return x.logprobs(r)[ids].exp().sum()


def recheck(openings: Sequence[str] = DEFAULT_OPENINGS, *, skip: str = ",.:;!?—-",
            name: str = "recheck") -> PatchMetric:
    """Probability mass on re-check openings right after the wait (module doc)."""
    openings = tuple(openings)
    if not openings:
        raise MetricError("recheck needs at least one opening, e.g. ' Let me'")

    @no_type_check
    def reads(model, case, anchor, p):
        if "recheck_ids" not in case.cache:
            case.cache["recheck_ids"] = opening_tokens(model.tokenizer, openings)
        if not case.cache["recheck_ids"]:
            return None
        t1 = case.align.target_start + case.align.n_reasoning
        r = anchor.wait_token
        while r + 1 < t1 - 1:
            nxt = model.tokenizer.decode([case.target_ids[r + 1]]).strip()
            if not nxt or any(ch not in skip for ch in nxt):
                break
            r += 1
        return [Read(r)]

    return PatchMetric(name, _recheck_fn, reads, info={"openings": list(openings)})


def _tail_reads(model, case, anchor, p):
    return [Read(i) for i in range(p, min(p + 8, len(case.target_ids)))]


def as_metric(name: str, fn) -> PatchMetric:
    """A PatchMetric as is; a plain callable reads the 8 next-token distributions from the patch."""
    if isinstance(fn, PatchMetric):
        return fn if fn.name == name else PatchMetric(name, fn.fn, fn.reads, fn.differentiable, fn.info)
    if not callable(fn):
        raise MetricError(f"metric {name!r} must be a PatchMetric or a callable, got {type(fn).__name__}")
    return PatchMetric(name, fn, _tail_reads, differentiable=False)


def builtin_metrics(*, kl_positions: int = 8, forced_after: int = DEFAULT_FORCED_AFTER,
                    openings: Sequence[str] = DEFAULT_OPENINGS) -> dict[str, PatchMetric]:
    return {
        "forced_answer": forced_answer(forced_after),
        "next_token_kl": next_token_kl(kl_positions),
        "recheck": recheck(openings),
        "kl": next_token_kl(kl_positions, name="kl"),
        "gold_prob": final_answer(),
    }


BUILTIN_NAMES = ("forced_answer", "next_token_kl", "recheck", "kl", "gold_prob")
DEFAULT_METRICS = ("forced_answer", "next_token_kl", "recheck")


def resolve_metrics(metrics, *, kl_positions: int = 8, extra: Mapping[str, PatchMetric] | None = None
                    ) -> list[PatchMetric]:
    """Names (built-ins, or keys of `extra`), a {name: fn} mapping, or PatchMetrics -> PatchMetrics."""
    known = {**builtin_metrics(kl_positions=kl_positions), **(extra or {})}
    if isinstance(metrics, Mapping):
        return [as_metric(n, f) for n, f in metrics.items()]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    out = []
    for m in metrics:
        if isinstance(m, PatchMetric):
            out.append(m)
        elif isinstance(m, str):
            if m not in known:
                raise MetricError(f"unknown metric {m!r}; known: {sorted(known)}")
            out.append(known[m])
        else:
            raise MetricError(f"a metric must be a name or a PatchMetric, got {m!r}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise MetricError(f"metric names must be unique, got {names}")
    if not out:
        raise MetricError("no metric given")
    return out


__all__ = ["BUILTIN_NAMES", "DEFAULT_METRICS", "DEFAULT_OPENINGS", "MetricError", "MetricInput", "PatchMetric",
           "Read", "as_metric", "builtin_metrics", "final_answer", "forced_answer", "next_token_kl", "opening_tokens",
           "recheck", "resolve_metrics"]
