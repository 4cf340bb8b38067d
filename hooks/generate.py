"""Sampling reasoning trajectories from a model, with s1's budget forcing.

`generate` renders each prompt's head exactly as `traces.render` would (chat template or
plain layout, then `think_open`), samples a completion with a KV cache in left-padded
batches, and returns the completion text up to (not including) the first eos token.
`split_completion` cuts a completion at the format's forcing suffix into reasoning and
answer; `generate_trajectories` does both and grades the answers.

Engines: a `LoadedModel` samples with Hugging Face `generate` (`HFEngine`, the default);
`hooks.vllm_engine.VLLMEngine` samples the same prompts with vLLM. Both implement
`continue_batch(texts, max_new_tokens=...) -> list[Continuation]`, and everything here
(budget forcing, forced answers, interventions) is written once on top of it.

Budget forcing (s1, Muennighoff et al. 2025): `max_thinking_tokens` caps the reasoning, after
which the format's forcing suffix is appended and the answer sampled; `extend_thinking = N`
drops the model's close of its reasoning N times and appends `extend_word` ("Wait") so it keeps
reasoning. Each inserted word is recorded in ``extra["forced_waits"]`` as a character offset
into the trajectory's `reasoning`.

Deterministic given `seed` (and the batch size): each batch reseeds its own generator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from waitlens.traces.formats import PromptFormat, parse_completion, render_head
from waitlens.traces.grading import grade
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel
    from waitlens.hooks.vllm_engine import VLLMEngine


class BudgetError(ValueError):
    """A budget-forcing setting that cannot run (e.g. a thinking budget below 1)."""


def split_completion(text: str, fmt: PromptFormat) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion, read by `traces.formats.parse_completion`; answer
    is None when the completion never answered (e.g. R1 without ``</think>``)."""
    parsed = parse_completion(text, fmt)
    return parsed.reasoning, parsed.answer


def _flexible(text: str) -> re.Pattern:
    """A pattern matching `text` with any run of whitespace where it has whitespace (or none)."""
    parts = [re.escape(p) for p in text.split()]
    return re.compile(r"\s*".join(parts), re.IGNORECASE) if parts else re.compile(r"(?!)")


# ---------------------------------------------------------------------------------------------
@dataclass
class Continuation:
    """What one engine call produced for one text: the new text, its token ids, and why it
    stopped ("eos": the model ended it, "length": the token budget ran out)."""

    text: str
    token_ids: list[int]
    finish: str


@dataclass(frozen=True)
class Sampling:
    """The sampling settings every engine takes (temperature 0: greedy)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64


class HFEngine:
    """Hugging Face `generate` on static left-padded batches over a `hooks.load_model` result."""

    name = "hf"

    def __init__(self, model):
        self.model = model
        self.tokenizer = model.tokenizer
        self.format = model.format
        self.spec = getattr(model, "spec", None)

    def continue_batch(self, texts: Sequence[str], *, max_new_tokens: int | Sequence[int], sampling: Sampling,
                       progress: bool = False, desc: str = "sampling") -> list[Continuation]:
        """Continue each already-rendered text (special tokens included).

        max_new_tokens: one budget for all, or one per text (a batch runs to its largest budget
        and each row is cut to its own: generation is causal, so the cut row is what a run with
        that budget samples).
        """
        import torch
        from tqdm.auto import tqdm

        model = self.model
        tok, hf = model.tokenizer, model.hf
        budgets = [int(max_new_tokens)] * len(texts) if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
        device = getattr(model, "device", None) or next(hf.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_id = tok.eos_token_id
        bs = sampling.batch_size
        out: list[Continuation] = []
        for b, start in enumerate(tqdm(range(0, len(texts), bs), desc=desc, disable=not progress)):
            chunk = texts[start: start + bs]
            limits = budgets[start: start + bs]
            enc = [tok(h, add_special_tokens=False)["input_ids"] for h in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):  # left padding: every row ends where generation starts
                ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
                mask[i, width - len(e):] = 1
            gen = torch.Generator(device="cpu").manual_seed(int(sampling.seed) * 1_000_003 + b)
            kwargs: dict[str, Any] = dict(max_new_tokens=max(max(limits), 1), pad_token_id=pad_id, eos_token_id=eos_id)
            if sampling.temperature and sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                              top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(int(gen.initial_seed()))
                if device is not None and str(device).startswith("cuda"):
                    torch.cuda.manual_seed_all(int(gen.initial_seed()))
                seqs = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row, limit in zip(seqs[:, width:].tolist(), limits, strict=True):
                finish = "length"
                if eos_id is not None and eos_id in row[:limit]:
                    row, finish = row[: row.index(eos_id)], "eos"
                row = [t for t in row[:limit] if t != pad_id]
                text = tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                out.append(Continuation(text, row, finish))
        return out


def as_engine(model_or_engine: LoadedModel | HFEngine | VLLMEngine) -> HFEngine | VLLMEngine:
    """An engine for `model_or_engine`: engines pass through, a loaded model gets `HFEngine`."""
    return model_or_engine if hasattr(model_or_engine, "continue_batch") else HFEngine(model_or_engine)


def generate(
    model: LoadedModel | HFEngine | VLLMEngine,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Sample one completion per prompt (the text after the rendered head, eos excluded).

    model: a `hooks.load_model` result (`.hf`, `.tokenizer`, `.format`, `.device`) or an engine.
    temperature 0 means greedy decoding.
    """
    engine = as_engine(model)
    heads = [render_head(engine.tokenizer, p, engine.format) for p in prompts]
    return continue_texts(engine, heads, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          seed=seed, batch_size=batch_size, progress=progress)


def continue_texts(
    model: LoadedModel | HFEngine | VLLMEngine,
    heads: Sequence[str],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "sampling",
) -> list[str]:
    """Continue each already-rendered text (special tokens included); the new text only."""
    conts = as_engine(model).continue_batch(list(heads), max_new_tokens=max_new_tokens,
                                            sampling=Sampling(temperature, top_p, seed, batch_size),
                                            progress=progress, desc=desc)
    return [c.text for c in conts]


# -- budget forcing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """s1's budget forcing. `max_thinking_tokens`: cap the reasoning (then force the answer);
    `extend_thinking`: how many times to drop the model's close of its reasoning and append
    `extend_word` instead; `answer_tokens`: the most tokens of an answer after the forcing suffix."""

    max_thinking_tokens: int | None = None
    extend_thinking: int = 0
    extend_word: str = "Wait"
    answer_tokens: int = 32

    def __post_init__(self):
        m = self.max_thinking_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise BudgetError(f"max_thinking_tokens must be a whole number >= 1 (or absent), got {m!r}")
        e = self.extend_thinking
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise BudgetError(f"extend_thinking must be a whole number >= 0, got {e!r}")
        if e and not str(self.extend_word).strip():
            raise BudgetError(f"extend_word must be a non-empty word, got {self.extend_word!r}")
        if isinstance(self.answer_tokens, bool) or not isinstance(self.answer_tokens, int) or self.answer_tokens < 1:
            raise BudgetError(f"answer_tokens must be a whole number >= 1, got {self.answer_tokens!r}")

    @property
    def active(self) -> bool:
        return self.max_thinking_tokens is not None or self.extend_thinking > 0


def close_marker(fmt: PromptFormat) -> str:
    """The text whose appearance means the model closed its reasoning: the format's
    `think_close` when it is distinctive (``</think>``, ``<|im_start|>answer``), else the whole
    forcing suffix (a short close such as " ; " may also separate steps; "; A" does not)."""
    close = fmt.think_close.strip()
    return close if len(close) >= 3 else fmt.forcing_suffix.strip()


def join_word(text: str, word: str) -> tuple[str, int]:
    """`text` with `word` appended (a space between unless `text` ends in whitespace or is
    empty), and the character offset where the word starts."""
    sep = "" if not text or text[-1].isspace() else " "
    return text + sep + word, len(text) + len(sep)


@dataclass
class Thought:
    """The reasoning of one row while it is being forced: the text after the head so far, the
    thinking tokens used, and the offsets of the words inserted into it."""

    text: str
    used: int = 0
    waits: list[int] = field(default_factory=list)
    extensions_left: int = 0
    status: str = "thinking"  # thinking | closed | capped | unfinished


def think(engine: HFEngine | VLLMEngine, heads: Sequence[str], thoughts: list[Thought], *, budget: Budget, max_new_tokens: int,
          sampling: Sampling, progress: bool = False) -> list[Thought]:
    """Run every row's reasoning to its end under `budget`, in rounds: each round continues all
    rows still thinking; a row that closes its reasoning either gets `extend_word` in place of
    the close (while it has extensions left and tokens to spend) or is done ("closed"); a row
    whose tokens run out is "capped" under a thinking budget, else "unfinished"."""
    cap = budget.max_thinking_tokens if budget.max_thinking_tokens is not None else max_new_tokens
    cap = min(cap, max_new_tokens)
    marker = close_marker(engine.format)
    tok = engine.tokenizer

    def n_tokens(s: str) -> int:
        return len(tok(s, add_special_tokens=False)["input_ids"]) if s else 0

    word_tokens = n_tokens(" " + budget.extend_word.strip())
    rnd = 0
    while True:
        todo = [i for i, t in enumerate(thoughts) if t.status == "thinking"]
        for i in todo:
            if cap - thoughts[i].used < 1:
                thoughts[i].status = "capped" if budget.max_thinking_tokens is not None else "unfinished"
        todo = [i for i in todo if thoughts[i].status == "thinking"]
        if not todo:
            return thoughts
        conts = engine.continue_batch([heads[i] + thoughts[i].text for i in todo],
                                      max_new_tokens=[cap - thoughts[i].used for i in todo],
                                      sampling=Sampling(sampling.temperature, sampling.top_p,
                                                        sampling.seed * 7919 + rnd, sampling.batch_size),
                                      progress=progress, desc=f"thinking (round {rnd + 1})")
        rnd += 1
        for i, c in zip(todo, conts, strict=True):
            t = thoughts[i]
            if t.text:  # decoded alone, a word-level tokenizer's first word loses its space
                c = Continuation(_spaced(tok, heads[i] + t.text, c), c.token_ids, c.finish)
            j = c.text.find(marker)
            if j < 0:
                m = _flexible(marker).search(c.text)
                j = m.start() if m else -1
            if j < 0:
                t.text += c.text
                t.used += len(c.token_ids)
                if c.finish == "eos":
                    # ended without closing its reasoning: as in s1, the answer is forced after an
                    # inserted word or under a thinking budget; else it is left as the model wrote it
                    forced = t.waits or budget.max_thinking_tokens is not None
                    t.status = "closed" if forced else "unfinished"
                continue  # "length": the next round sees no tokens left and caps it
            before = c.text[:j]
            t.used += min(n_tokens(before), len(c.token_ids))
            if t.extensions_left > 0 and cap - t.used - word_tokens >= 1:
                t.text, at = join_word(t.text + before.rstrip(), budget.extend_word.strip())
                t.waits.append(at)
                t.used += word_tokens
                t.extensions_left -= 1
            else:
                t.text += before
                t.status = "closed"


def _spaced(tok, context: str, cont: Continuation) -> str:
    """The text of `cont` as it reads after `context`: decoded together with the context's last
    token (incremental detokenization), so a separating space the tokenizer implies is kept."""
    tail = tok(context, add_special_tokens=False)["input_ids"][-1:]
    if not tail or not cont.token_ids:
        return cont.text
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pre, full = tok.decode(tail, **kw), tok.decode(tail + list(cont.token_ids), **kw)
    return full[len(pre):] if full.startswith(pre) else cont.text


def _trim_to_tokens(tok, text: str, limit: int) -> str:
    """`text` cut so that it re-tokenizes to at most `limit` tokens (a decode/encode round trip
    can merge or split tokens at the edge)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    while len(ids) > limit and text:
        ids = ids[:limit]
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        limit -= 1
    return text


def answer_after(engine: HFEngine | VLLMEngine, heads: Sequence[str], reasonings: Sequence[str], *, answer_tokens: int,
                 sampling: Sampling, progress: bool = False) -> list[str]:
    """The completion `reasoning + forcing suffix + answer` for each row, the answer sampled
    with `sampling` (at most `answer_tokens` tokens, cut at the format's answer suffix)."""
    fmt = engine.format
    suffix = fmt.forcing_suffix
    texts = [h + r.rstrip() + suffix for h, r in zip(heads, reasonings, strict=True)]
    conts = engine.continue_batch(texts, max_new_tokens=answer_tokens, sampling=sampling, progress=progress,
                                  desc="answering")
    out = []
    for r, c in zip(reasonings, conts, strict=True):
        ans = c.text
        tail = fmt.answer_suffix.strip()
        if tail and tail in ans:
            ans = ans[: ans.index(tail)] + fmt.answer_suffix
        elif not tail:
            ans = ans.split("\n")[0]
        out.append(r.rstrip() + suffix + ans)
    return out


def forced_completions(engine: HFEngine | VLLMEngine, heads: Sequence[str], *, budget: Budget, max_new_tokens: int, sampling: Sampling,
                       prefixes: Sequence[str] | None = None, prefix_waits: Sequence[list[int]] | None = None,
                       progress: bool = False) -> list[tuple[str, Thought]]:
    """(completion, its Thought) per head under `budget`, starting each row's reasoning from
    `prefixes` (default empty; `prefix_waits`: words already inserted there). A row that closed
    its reasoning, or was capped by `max_thinking_tokens`, gets the forcing suffix and its answer;
    an unfinished row is left as the model wrote it (graded as malformed, or force_answer)."""
    prefixes = list(prefixes) if prefixes is not None else [""] * len(heads)
    waits = [list(w) for w in prefix_waits] if prefix_waits is not None else [[] for _ in heads]
    thoughts = [Thought(p, waits=w, extensions_left=budget.extend_thinking) for p, w in zip(prefixes, waits, strict=True)]
    thoughts = think(engine, heads, thoughts, budget=budget, max_new_tokens=max_new_tokens, sampling=sampling,
                     progress=progress)
    if budget.max_thinking_tokens is not None:
        for t in thoughts:
            if t.status == "capped":
                t.text = _trim_to_tokens(engine.tokenizer, t.text, budget.max_thinking_tokens)
    done = [i for i, t in enumerate(thoughts) if t.status in ("closed", "capped")]
    answered = answer_after(engine, [heads[i] for i in done], [thoughts[i].text for i in done],
                            answer_tokens=budget.answer_tokens, sampling=sampling, progress=progress) if done else []
    out = [(t.text, t) for t in thoughts]
    for i, text in zip(done, answered, strict=True):
        out[i] = (text, thoughts[i])
    return out


def reasoning_offsets(completion: str, reasoning: str, offsets: Sequence[int], word: str) -> list[int]:
    """Offsets of inserted words, from the completion into its (stripped) reasoning; only those
    that point at the word."""
    base = completion.find(reasoning) if reasoning else -1
    if base < 0:
        base = len(completion) - len(completion.lstrip())
    out = [o - base for o in offsets]
    return [o for o in out if reasoning[o: o + len(word)] == word]


# -- trajectories -----------------------------------------------------------------------------
def generate_trajectories(
    model: LoadedModel | HFEngine | VLLMEngine,
    problems: Sequence[Any],
    n_per_problem: int = 1,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    model_name: str | None = None,
    progress: bool = False,
    force_answer: bool = False,
    answer_tokens: int = 12,
    max_thinking_tokens: int | None = None,
    extend_thinking: int = 0,
    extend_word: str = "Wait",
) -> list[Trajectory]:
    """Sample `n_per_problem` trajectories per problem and grade them.

    model: a `hooks.load_model` result (sampled with HF `generate`) or an engine
    (`HFEngine`, `hooks.vllm_engine.VLLMEngine`).
    problems: objects or dicts with ``prompt``, ``gold`` and optionally ``id`` (the
    problem id; default ``q{index}``). A completion without the forcing suffix gets an empty
    answer, ``correct=False`` and ``extra["malformed"] = True`` — unless `force_answer`: then,
    as with budget forcing (s1), the forcing suffix is appended to the whole completion and the
    model's greedy answer (at most `answer_tokens` tokens, up to the end of the line) is taken,
    marked ``extra["forced_answer"] = True``.

    Budget forcing (`Budget`): `max_thinking_tokens` caps the reasoning, then the answer is
    forced (``extra["budget_forced"] = True``); `extend_thinking` times the model's close of its
    reasoning is replaced by `extend_word`; ``extra["forced_waits"]`` lists each inserted word's
    character offset in `reasoning`. Without either, one plain sampling pass (as before).
    """
    budget = Budget(max_thinking_tokens, extend_thinking, extend_word, max(answer_tokens, 1))
    engine = as_engine(model)

    def get(p, key, default=None):
        return p.get(key, default) if isinstance(p, dict) else getattr(p, key, default)

    items = [(i, p, s) for i, p in enumerate(problems) for s in range(n_per_problem)]
    prompts = [get(p, "prompt") for _, p, _ in items]
    sampling = Sampling(temperature, top_p, seed, batch_size)
    thoughts: list[Thought | None] = [None] * len(items)
    if budget.active:
        heads = [render_head(engine.tokenizer, p, engine.format) for p in prompts]
        pairs = forced_completions(engine, heads, budget=budget, max_new_tokens=max_new_tokens, sampling=sampling,
                                   progress=progress)
        completions = [c for c, _ in pairs]
        thoughts = [t for _, t in pairs]
    else:
        completions = generate(engine, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               seed=seed, batch_size=batch_size, progress=progress)
    forced: dict[int, str] = {}
    if force_answer:
        forced = _force_answers(engine, prompts, completions, answer_tokens=answer_tokens,
                                batch_size=batch_size, progress=progress)
    name = model_name or getattr(model, "spec", None)
    out = []
    for k, ((i, p, s), text) in enumerate(zip(items, completions, strict=True)):
        reasoning, answer = split_completion(text, engine.format)
        if answer is None and k in forced:
            answer = forced[k]
        pid = str(get(p, "id", None) or f"q{i}")
        gold = str(get(p, "gold"))
        extra: dict[str, Any] = {"completion": text, "temperature": temperature, "seed": seed}
        if k in forced:
            extra["forced_answer"] = True  # the completion ran out before answering: answer forced
        elif answer is None:
            extra["malformed"] = True
        th = thoughts[k]
        if th is not None:
            extra["forced_waits"] = reasoning_offsets(th.text, reasoning, th.waits, extend_word.strip())
            if th.status == "capped":
                extra["budget_forced"] = True
        out.append(Trajectory(
            id=f"{pid}-s{s}", problem_id=pid, prompt=get(p, "prompt"), reasoning=reasoning,
            answer=answer or "", gold=gold, correct=answer is not None and grade(answer, gold),
            model=name, extra=extra,
        ))
    return out


def _force_answers(model, prompts, completions, *, answer_tokens: int, batch_size: int,
                   progress: bool) -> dict[int, str]:
    """Greedy answers after `reasoning + forcing suffix` for completions that never answered."""
    engine = as_engine(model)
    fmt = engine.format
    todo = [k for k, text in enumerate(completions) if split_completion(text, fmt)[1] is None]
    if not todo:
        return {}
    texts = [render_head(engine.tokenizer, prompts[k], fmt) + split_completion(completions[k], fmt)[0]
             + fmt.forcing_suffix for k in todo]
    outs = continue_texts(engine, texts, temperature=0, max_new_tokens=answer_tokens, batch_size=batch_size,
                          progress=progress, desc="forcing answers")
    tail = fmt.answer_suffix.strip()
    answers = {}
    for k, out in zip(todo, outs, strict=True):
        ans = out.split("\n")[0]
        if tail and tail in ans:
            ans = ans[: ans.index(tail)]
        answers[k] = ans.strip()
    return answers
