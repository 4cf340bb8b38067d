"""How a trajectory is laid out as one model input, per model family.

A trajectory is rendered as::

    head = chat_template(user: prompt, add_generation_prompt)   (or bos + prompt + prompt_sep)
    text = head + think_open + reasoning + think_close + answer_prefix + answer + answer_suffix

`think_close + answer_prefix` is the *forcing suffix*: appended to any prefix of the
reasoning, it asks the model for its answer now (used by `hooks.answer_probabilities`).

`render` tokenizes the text once with offsets, so every later stage (positions, capture,
answer probabilities, patching) sees exactly the same token ids, and knows which tokens are
the reasoning.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from waitlens.traces.errors import WaitlensError
from waitlens.traces.trajectory import Trajectory

FORMAT_FILE = "waitlens_format.json"


@dataclass(frozen=True)
class PromptFormat:
    """Where the reasoning and the answer go around the prompt, for one model family."""

    name: str = "plain"
    chat_template: bool = False  # use the tokenizer's chat template for the prompt
    bos: bool = True  # plain layout only: start with the tokenizer's bos token
    prompt_sep: str = "\n"  # plain layout only: between prompt and reasoning
    think_open: str = ""
    think_close: str = "\n"
    answer_prefix: str = "Answer: "
    answer_suffix: str = ""

    @property
    def forcing_suffix(self) -> str:
        """Text that, appended after a reasoning prefix, makes the model answer now."""
        return self.think_close + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> PromptFormat:
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown prompt-format key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**obj)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / FORMAT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


# DeepSeek-R1-Distill: its template's generation prompt already opens "<think>\n".
R1 = PromptFormat(
    name="r1",
    chat_template=True,
    think_open="",
    think_close="\n</think>\n\n",
    answer_prefix="**Final Answer**\n\\boxed{",
    answer_suffix="}",
)
# s1 / s1.1 (Qwen2.5 chat template): "<|im_start|>think\n ... <|im_start|>answer\nAnswer: ...".
S1 = PromptFormat(
    name="s1",
    chat_template=True,
    think_open="<|im_start|>think\n",
    think_close="\n<|im_start|>answer\n",
    answer_prefix="Answer: ",
)
# Sky-T1 (Qwen2.5 chat template with Sky-T1's system prompt in the user turn or config):
# "<|begin_of_thought|> ... <|end_of_thought|> <|begin_of_solution|> ... \boxed{} <|end_of_solution|>".
SKYT1 = PromptFormat(
    name="skyt1",
    chat_template=True,
    think_open="<|begin_of_thought|>\n\n",
    think_close="\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n",
    answer_prefix="**Final Answer**\n\\boxed{",
    answer_suffix="}",
)
# Qwen2.5-Instruct chat: no reasoning markers; the solution ends in a \boxed{} answer.
QWEN = PromptFormat(
    name="qwen",
    chat_template=True,
    think_open="",
    think_close="\n\n",
    answer_prefix="**Final Answer**\n\\boxed{",
    answer_suffix="}",
)
# A generic chat model (e.g. SmolLM2-Instruct): reasoning and answer inside the assistant turn.
CHAT = PromptFormat(name="chat", chat_template=True, think_open="", think_close="\n", answer_prefix="Final answer: ")
PLAIN = PromptFormat()
# The organism's own layout (the same fields as its shipped waitlens_format.json; a test checks).
ORGANISM = PromptFormat(name="organism", prompt_sep=" ", think_close=" ; ", answer_prefix="A ",
                        answer_suffix=" <eos>")

PRESETS: dict[str, PromptFormat] = {f.name: f for f in (R1, S1, SKYT1, QWEN, CHAT, PLAIN, ORGANISM)}
FAMILIES: tuple[str, ...] = tuple(PRESETS)


def get_format(name_or_format: str | PromptFormat | dict | None, tokenizer=None) -> PromptFormat:
    """A preset by name, a dict of fields, a PromptFormat, or None: infer from `tokenizer`."""
    if isinstance(name_or_format, PromptFormat):
        return name_or_format
    if isinstance(name_or_format, dict):
        return PromptFormat.from_dict(name_or_format)
    if name_or_format is None:
        return infer_format(tokenizer)
    if name_or_format not in PRESETS:
        raise FormatError(f"unknown format {name_or_format!r}; formats: {', '.join(FAMILIES)}")
    return PRESETS[name_or_format]


def infer_format(tokenizer) -> PromptFormat:
    """Guess the format from a tokenizer's chat template (R1's "<think>", ChatML, or plain)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<think>" in template:
        return R1
    if "<|im_start|>" in template:
        return CHAT
    return PLAIN


def load_format(model_dir: str | Path) -> PromptFormat | None:
    """The format a model directory ships in `waitlens_format.json`, if any."""
    path = Path(model_dir) / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        return PromptFormat.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid prompt format ({e})") from None


@dataclass
class Rendered:
    """A trajectory rendered for one tokenizer: the text, its token ids and offsets."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in `text`
    reasoning_chars: tuple[int, int]  # [start, end) of the reasoning in `text`
    reasoning_tokens: tuple[int, int]  # [start, end) token indices covering the reasoning
    answer_tokens: tuple[int, int]  # [start, end) token indices of the answer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def render_head(tokenizer, prompt: str, fmt: PromptFormat) -> str:
    """The text before the reasoning: the prompt (templated or plain) and `think_open`."""
    if fmt.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt format {fmt.name!r} uses a chat template, but the tokenizer has none; "
                "use format='plain' or a tokenizer with a chat template"
            )
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = (tokenizer.bos_token or "") if fmt.bos else ""
        sep = " " if bos and not bos.endswith((" ", "\n")) else ""
        head = bos + sep + prompt + fmt.prompt_sep
    return head + fmt.think_open


def render_text(tokenizer, trajectory: Trajectory, fmt: PromptFormat, *, include_answer: bool = True
                ) -> tuple[str, tuple[int, int], tuple[int | None, int | None]]:
    """The rendered text, and the character spans of the reasoning and the answer in it."""
    head = render_head(tokenizer, trajectory.prompt, fmt)
    r0 = len(head)
    r1 = r0 + len(trajectory.reasoning)
    text = head + trajectory.reasoning
    a0 = a1 = None
    if include_answer:
        text += fmt.think_close + fmt.answer_prefix
        a0 = len(text)
        text += trajectory.answer
        a1 = len(text)
        text += fmt.answer_suffix
    return text, (r0, r1), (a0, a1)


def render(tokenizer, trajectory: Trajectory, fmt: PromptFormat, *, include_answer: bool = True) -> Rendered:
    """Render and tokenize one trajectory (a fast tokenizer is needed for offsets)."""
    text, (r0, r1), (a0, a1) = render_text(tokenizer, trajectory, fmt, include_answer=include_answer)
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    rt = _token_span(offsets, r0, r1)
    at = _token_span(offsets, a0, a1) if include_answer else (len(ids), len(ids))
    return Rendered(text, ids, offsets, (r0, r1), rt, at)


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, adding no special tokens (the text has them).

    Each tokenizer remembers its last `MEMO_TOKENS` tokens of encodings (as int32 arrays), so
    the stages of a study that render the same trajectories (positions, token counts, capture)
    tokenize each text once; a hit returns fresh lists equal to a new encoding."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; waitlens needs character offsets "
            "(load the tokenizer with use_fast=True)"
        )
    memo = _memo(tokenizer)
    hit = memo.get(text) if memo is not None else None
    if hit is not None:
        ids, starts, ends = hit
        return ids.tolist(), list(zip(starts.tolist(), ends.tolist(), strict=True))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if memo is not None and len(ids) <= MEMO_TOKENS:
        import numpy as np

        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        if len(text) < 2**31:
            memo[text] = (np.asarray(ids, dtype=np.int32), off[:, 0].astype(np.int32), off[:, 1].astype(np.int32))
            memo.n_tokens += len(ids) + _ENTRY
            while memo.n_tokens > MEMO_TOKENS:
                memo.n_tokens -= len(memo.pop(next(iter(memo)))[0]) + _ENTRY
    return ids, offsets


MEMO_TOKENS = 8_000_000  # tokens of encodings kept per tokenizer (12 bytes each)
_ENTRY = 32  # what an entry's arrays cost beyond their tokens, in tokens
_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Memo(dict):
    """text -> (ids, starts, ends); `stamp` is the tokenizer state it was filled under."""

    def __init__(self, stamp):
        super().__init__()
        self.stamp = stamp
        self.n_tokens = 0


def _memo(tokenizer) -> _Memo | None:
    """The tokenizer's encoding memo (kept beside it, never in it: it is not pickled with it),
    emptied when its backend or vocabulary size changed (added tokens); None for a tokenizer
    that takes no weak reference."""
    stamp = (id(getattr(tokenizer, "backend_tokenizer", None)), len(tokenizer))
    try:
        memo = _MEMOS.get(tokenizer)
        if memo is None or memo.stamp != stamp:
            memo = _MEMOS[tokenizer] = _Memo(stamp)
    except TypeError:
        return None
    return memo


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last+1) of the tokens overlapping characters [start, end)."""
    idx = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
    if not idx:
        # empty reasoning/answer: an empty span at the first token starting at or after `start`
        nxt = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(offsets))
        return (nxt, nxt)
    return (idx[0], idx[-1] + 1)


def with_name(fmt: PromptFormat, **changes) -> PromptFormat:
    """A copy of `fmt` with some fields changed (configs override presets this way)."""
    return replace(fmt, **changes)


# ---------------------------------------------------------------------------------------------
# Reading a completion: where the reasoning ends and how the final answer is extracted.
# This is separate from forcing (`forcing_suffix` above): real models do not write the layout a
# forced answer uses (R1 closes </think> and then writes a free-form solution ending in a
# \boxed{}), so each family gets a reader of its own.


class FormatError(WaitlensError):
    """An unknown format name or an unreadable format spec; the message names it."""


@dataclass(frozen=True)
class CompletionReader:
    """How one family's completion is read.

    `opens` are stripped from the start of the reasoning; the reasoning ends at the first of
    `closes` (a completion without any is unfinished). A family without a reasoning delimiter
    (`closes == ()`) ends its reasoning at the first `answer_markers` line, if any; otherwise
    the whole completion is the reasoning and the answer is extracted from it. The text after
    the reasoning (the solution) is cut at `solution_close`, and the answer is the first of
    `extract` that finds one: ``"boxed"`` (the last ``\\boxed{}``, nested braces),
    ``"marker"`` (the rest of the line after the last of `answer_markers`), ``"gsm8k"``
    (``#### N``), ``"math_verify"`` (what math-verify extracts from the text).
    """

    name: str
    opens: tuple[str, ...] = ()
    closes: tuple[str, ...] = ()
    solution_close: tuple[str, ...] = ()
    answer_markers: tuple[str, ...] = ()
    extract: tuple[str, ...] = ("boxed", "marker", "gsm8k")


READERS: dict[str, CompletionReader] = {
    # R1 / R1-distill: "<think>\n" is the template's generation prompt (sometimes repeated in the
    # text); "</think>" closes the reasoning; the solution's final answer is its last \boxed{}.
    "r1": CompletionReader("r1", opens=("<think>",), closes=("</think>",),
                           answer_markers=("Final Answer:", "Answer:"), extract=("boxed", "marker", "gsm8k")),
    # s1 / s1.1: "<|im_start|>think\n ... <|im_start|>answer\nAnswer: ..." (simplescaling/s1).
    "s1": CompletionReader("s1", opens=("<|im_start|>think",), closes=("<|im_start|>answer",),
                           solution_close=("<|im_end|>",), answer_markers=("Final Answer:", "Answer:"),
                           extract=("marker", "boxed", "gsm8k")),
    # Sky-T1: "<|begin_of_thought|> ... <|end_of_thought|> <|begin_of_solution|> ... \boxed{} <|end_of_solution|>".
    "skyt1": CompletionReader("skyt1", opens=("<|begin_of_thought|>",), closes=("<|end_of_thought|>",),
                              solution_close=("<|end_of_solution|>",), answer_markers=("Answer:",),
                              extract=("boxed", "marker", "gsm8k")),
    # Qwen2.5-Instruct chat: no reasoning delimiter; a solution with a final \boxed{}.
    "qwen": CompletionReader("qwen", solution_close=("<|im_end|>",),
                             answer_markers=("**Final Answer**", "Final answer:", "Answer:"),
                             extract=("boxed", "marker", "gsm8k")),
    # A generic chat model asked for "Final answer: ..." (the forcing suffix of CHAT).
    "chat": CompletionReader("chat", answer_markers=("Final answer:",), extract=("marker", "boxed", "gsm8k")),
    # Plain text (e.g. a base model): "Answer: ..." if written, else the final answer as
    # math-verify extracts it from the whole completion.
    "plain": CompletionReader("plain", answer_markers=("Answer:",),
                              extract=("marker", "boxed", "gsm8k", "math_verify")),
}


def reader_for(fmt: PromptFormat | str) -> CompletionReader | None:
    """The reader of a format family, or None for a custom format (read by its forcing suffix)."""
    name = fmt if isinstance(fmt, str) else fmt.name
    return READERS.get(name)


@dataclass(frozen=True)
class ParsedCompletion:
    """A completion read by its format: reasoning, answer (None if none found), finished."""

    reasoning: str
    answer: str | None
    finished: bool
    solution: str = ""  # the text after the reasoning (R1's free-form solution), if any

    def __iter__(self):  # (reasoning, answer, finished) unpacking
        return iter((self.reasoning, self.answer, self.finished))


def parse_completion(text: str, fmt: PromptFormat | str) -> ParsedCompletion:
    """Read one completion in format `fmt` (a family name or a PromptFormat).

    Returns ``(reasoning, answer | None, finished)`` (a `ParsedCompletion`, which unpacks to
    that). The reasoning never contains the family's closing marker. A completion that never
    closes its reasoning (truncated) is unfinished and has no answer: it is not graded as if
    it had answered. A custom format (e.g. the organism's) is read by its forcing suffix: the
    reasoning is what precedes it, the answer what follows it up to `answer_suffix` (or the end
    of the line); finished when the suffix is there.
    """
    if not isinstance(text, str):
        raise TypeError(f"a completion must be a string, got {type(text).__name__}")
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    reader = READERS.get(fmt.name)
    if reader is None:
        return _read_by_suffix(text, fmt)
    body = text
    for o in reader.opens:  # the open marker, if written (possibly more than once)
        while body.lstrip().startswith(o):
            body = body.lstrip()[len(o):]
    if reader.closes:
        hits = [(body.find(c), c) for c in reader.closes if c in body]
        if not hits:
            return ParsedCompletion(body.strip(), None, False)
        i, c = min(hits)
        reasoning, solution = body[:i], body[i + len(c):]
        solution = _cut(solution, reader.solution_close)
        return ParsedCompletion(reasoning.strip(), extract_answer(solution, reader), True, solution.strip())
    # no reasoning delimiter: the reasoning ends where the answer line starts, if there is one
    body = _cut(body, reader.solution_close)
    answer = extract_answer(body, reader)
    m = _last_marker(body, reader.answer_markers)
    if m is None:
        return ParsedCompletion(body.strip(), answer, answer is not None, "")
    return ParsedCompletion(body[: m.start()].strip(), answer, answer is not None, body[m.start():].strip())


def _cut(text: str, markers: tuple[str, ...]) -> str:
    for mk in markers:
        if mk in text:
            text = text[: text.index(mk)]
    return text


def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(r"\s*".join(re.escape(p) for p in mk.split()) for mk in markers)
    return re.compile(rf"(?:\*\*)?(?:{alts})(?:\*\*)?", re.IGNORECASE)


def _last_marker(text: str, markers: tuple[str, ...]) -> re.Match | None:
    if not markers:
        return None
    last = None
    for last in _marker_pattern(markers).finditer(text):  # noqa: B007
        pass
    return last


def _line_after(text: str, m: re.Match) -> str:
    rest = text[m.end():].lstrip(" \t*")
    if rest.startswith("\n"):  # "**Final Answer**\n\\boxed{3}": the answer is on the next line
        rest = rest.lstrip()
    return rest.split("\n")[0].strip().strip("*").strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end(): i - 1]
    return best.strip() if best is not None else None


_GSM8K = re.compile(r"####[ \t]*([^\n]+)")


def extract_answer(text: str, reader: CompletionReader | str) -> str | None:
    """The final answer in `text` by the reader's `extract` methods, in order; None if none."""
    if isinstance(reader, str):
        if reader not in READERS:
            raise FormatError(f"unknown format {reader!r}; formats: {sorted(FAMILIES)}")
        reader = READERS[reader]
    for how in reader.extract:
        ans = None
        if how == "boxed":
            ans = last_boxed(text)
        elif how == "marker":
            m = _last_marker(text, reader.answer_markers)
            if m is not None:
                inner = last_boxed(text[m.end():])
                ans = inner if inner is not None else _line_after(text, m)
        elif how == "gsm8k":
            hits = _GSM8K.findall(text)
            ans = hits[-1].strip() if hits else None
        elif how == "math_verify":
            ans = _math_verify_extract(text)
        if ans:
            return ans
    return None


def _math_verify_extract(text: str) -> str | None:
    from math_verify import parse

    try:
        parsed = parse(text)
    except Exception:  # math-verify raises on some inputs; that is "no answer found"
        return None
    return str(parsed[-1]) if parsed else None


def _read_by_suffix(text: str, fmt: PromptFormat) -> ParsedCompletion:
    """The reasoning up to the forcing suffix (exact, else flexible whitespace and case) and
    the answer after it, up to `answer_suffix` (or, for formats without one, its first line)."""
    suffix = fmt.forcing_suffix
    i = text.find(suffix) if suffix else -1
    if i >= 0:
        reasoning, rest = text[:i], text[i + len(suffix):]
    else:
        parts = [re.escape(p) for p in suffix.split()]
        m = re.compile(r"\s*".join(parts), re.IGNORECASE).search(text) if parts else None
        if m is None:
            return ParsedCompletion(text.strip(), None, False)
        reasoning, rest = text[: m.start()], text[m.end():]
    tail = fmt.answer_suffix.strip()
    if tail and tail in rest:
        rest = rest[: rest.index(tail)]
    elif not tail:  # no closing marker: the answer is its first line
        rest = rest.strip().split("\n")[0]
    return ParsedCompletion(reasoning.strip(), rest.strip(), True, rest.strip())
