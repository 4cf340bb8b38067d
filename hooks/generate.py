"""Sampling reasoning trajectories from a model.

`generate` renders each prompt's head exactly as `traces.render` would (chat template or
plain layout, then `think_open`), samples a completion with a KV cache in left-padded
batches, and returns the completion text up to (not including) the first eos token.
`split_completion` cuts a completion at the format's forcing suffix into reasoning and
answer; `generate_trajectories` does both and grades the answers.

Deterministic given `seed` (and the batch size): each batch reseeds its own generator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from waitlens.traces.formats import PromptFormat, render_head
from waitlens.traces.grading import grade
from waitlens.traces.trajectory import Trajectory


def _flexible(text: str) -> re.Pattern:
    """A pattern matching `text` with any run of whitespace where it has whitespace (or none)."""
    parts = [re.escape(p) for p in text.split()]
    return re.compile(r"\s*".join(parts), re.IGNORECASE) if parts else re.compile(r"(?!)")


def split_completion(text: str, fmt: PromptFormat) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion; answer is None when the forcing suffix is absent.

    The reasoning is everything before the first occurrence of ``fmt.forcing_suffix``
    (matched exactly, else with flexible whitespace and case); the answer is what follows, up
    to ``fmt.answer_suffix`` (or, for formats without one, to the end of its first line).
    """
    suffix = fmt.forcing_suffix
    i = text.find(suffix) if suffix else -1
    if i >= 0:
        reasoning, rest = text[:i], text[i + len(suffix):]
    else:
        m = _flexible(suffix).search(text) if suffix.strip() else None
        if m is None:
            return text.strip(), None
        reasoning, rest = text[: m.start()], text[m.end():]
    tail = fmt.answer_suffix.strip()
    if tail and tail in rest:
        rest = rest[: rest.index(tail)]
    elif not tail:  # no closing marker: the answer is its first line
        rest = rest.strip().split("\n")[0]
    return reasoning.strip(), rest.strip()


def generate(
    model,
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

    model: a `hooks.load_model` result (`.hf`, `.tokenizer`, `.format`, `.device`).
    temperature 0 means greedy decoding.
    """
    heads = [render_head(model.tokenizer, p, model.format) for p in prompts]
    return continue_texts(model, heads, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          seed=seed, batch_size=batch_size, progress=progress)


def continue_texts(
    model,
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
    import torch
    from tqdm.auto import tqdm

    tok, hf = model.tokenizer, model.hf
    device = getattr(model, "device", None) or next(hf.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos_id = tok.eos_token_id
    out: list[str] = []
    starts = range(0, len(heads), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, disable=not progress)):
        chunk = heads[start: start + batch_size]
        enc = [tok(h, add_special_tokens=False)["input_ids"] for h in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding: every row ends where generation starts
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + b)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(int(gen.initial_seed()))
            if device is not None and str(device).startswith("cuda"):
                torch.cuda.manual_seed_all(int(gen.initial_seed()))
            seqs = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row in seqs[:, width:].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            row = [t for t in row if t != pad_id]
            out.append(tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return out


def generate_trajectories(
    model,
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
) -> list[Trajectory]:
    """Sample `n_per_problem` trajectories per problem and grade them.

    problems: objects or dicts with ``prompt``, ``gold`` and optionally ``id`` (the
    problem id; default ``q{index}``). A completion without the forcing suffix gets an empty
    answer, ``correct=False`` and ``extra["malformed"] = True`` — unless `force_answer`: then,
    as with budget forcing (s1), the forcing suffix is appended to the whole completion and the
    model's greedy answer (at most `answer_tokens` tokens, up to the end of the line) is taken,
    marked ``extra["forced_answer"] = True``.
    """
    def get(p, key, default=None):
        return p.get(key, default) if isinstance(p, dict) else getattr(p, key, default)

    items = [(i, p, s) for i, p in enumerate(problems) for s in range(n_per_problem)]
    prompts = [get(p, "prompt") for _, p, _ in items]
    completions = generate(model, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                           seed=seed, batch_size=batch_size, progress=progress)
    forced: dict[int, str] = {}
    if force_answer:
        forced = _force_answers(model, prompts, completions, answer_tokens=answer_tokens,
                                batch_size=batch_size, progress=progress)
    name = model_name or getattr(model, "spec", None)
    out = []
    for k, ((i, p, s), text) in enumerate(zip(items, completions, strict=True)):
        reasoning, answer = split_completion(text, model.format)
        if answer is None and k in forced:
            answer = forced[k]
        pid = str(get(p, "id", None) or f"q{i}")
        gold = str(get(p, "gold"))
        extra: dict[str, Any] = {"completion": text, "temperature": temperature, "seed": seed}
        if k in forced:
            extra["forced_answer"] = True  # the completion ran out before answering: answer forced
        elif answer is None:
            extra["malformed"] = True
        out.append(Trajectory(
            id=f"{pid}-s{s}", problem_id=pid, prompt=get(p, "prompt"), reasoning=reasoning,
            answer=answer or "", gold=gold, correct=answer is not None and grade(answer, gold),
            model=name, extra=extra,
        ))
    return out


def _force_answers(model, prompts, completions, *, answer_tokens: int, batch_size: int,
                   progress: bool) -> dict[int, str]:
    """Greedy answers after `reasoning + forcing suffix` for completions that never answered."""
    fmt = model.format
    todo = [k for k, text in enumerate(completions) if split_completion(text, fmt)[1] is None]
    if not todo:
        return {}
    texts = [render_head(model.tokenizer, prompts[k], fmt) + split_completion(completions[k], fmt)[0]
             + fmt.forcing_suffix for k in todo]
    outs = continue_texts(model, texts, temperature=0, max_new_tokens=answer_tokens, batch_size=batch_size,
                          progress=progress, desc="forcing answers")
    tail = fmt.answer_suffix.strip()
    answers = {}
    for k, out in zip(todo, outs, strict=True):
        ans = out.split("\n")[0]
        if tail and tail in ans:
            ans = ans[: ans.index(tail)]
        answers[k] = ans.strip()
    return answers
