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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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
# A generic chat model (e.g. SmolLM2-Instruct): reasoning and answer inside the assistant turn.
CHAT = PromptFormat(name="chat", chat_template=True, think_open="", think_close="\n", answer_prefix="Final answer: ")
PLAIN = PromptFormat()

PRESETS: dict[str, PromptFormat] = {f.name: f for f in (R1, S1, CHAT, PLAIN)}


def get_format(name_or_format: str | PromptFormat | dict | None, tokenizer=None) -> PromptFormat:
    """A preset by name, a dict of fields, a PromptFormat, or None: infer from `tokenizer`."""
    if isinstance(name_or_format, PromptFormat):
        return name_or_format
    if isinstance(name_or_format, dict):
        return PromptFormat.from_dict(name_or_format)
    if name_or_format is None:
        return infer_format(tokenizer)
    if name_or_format not in PRESETS:
        raise ValueError(f"unknown prompt format {name_or_format!r}; presets: {sorted(PRESETS)}")
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


def render(tokenizer, trajectory: Trajectory, fmt: PromptFormat, *, include_answer: bool = True) -> Rendered:
    """Render and tokenize one trajectory (a fast tokenizer is needed for offsets)."""
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
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    rt = _token_span(offsets, r0, r1)
    at = _token_span(offsets, a0, a1) if include_answer else (len(ids), len(ids))
    return Rendered(text, ids, offsets, (r0, r1), rt, at)


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, adding no special tokens (the text has them)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; waitlens needs character offsets "
            "(load the tokenizer with use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


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
