"""Real tokenizers and chat templates without model weights.

`load_tokenizer(dir, chat_template=None)` loads a tokenizer directory (``tokenizer.json``, or
``vocab.json`` + ``merges.txt``) and, optionally, a chat template from a ``.jinja`` file, so
positions use a real model's exact tokenization. `r1_distill_tokenizer` builds the
DeepSeek-R1-Distill-Qwen tokenizer from the Qwen2 byte-level BPE and R1's remapped special
tokens (ids below: which are confirmed and which reconstructed). `tokenizer_model` wraps a
tokenizer as a weightless model (`TokenizerModel`) that `find_positions` and the token-count
analyses accept wherever they accept a loaded model.

Everything here needs `tokenizers`/`transformers` tokenizers only: no forward pass, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waitlens.traces.errors import WaitlensError
from waitlens.traces.formats import PromptFormat, Rendered, get_format, infer_format, render
from waitlens.traces.trajectory import Trajectory


class TokenizerLoadError(WaitlensError):
    """A tokenizer directory or chat-template file that cannot be used; the message names it."""


class ContextLengthError(WaitlensError):
    """A trajectory longer than the model's context window (reported before any search)."""


# DeepSeek-R1-Distill-Qwen's added tokens: the Qwen2 BPE (ids 0..151642) is unchanged; the
# Qwen specials from 151643 on are replaced by DeepSeek's. status "confirmed": stated by
# ../shared/realdata/SOURCES.md (151643 eos and 151646 bos from generation_config.json;
# 151644/151645 from an encoded prompt [151646, 151644, ..., 151645] quoted in a public issue).
# status "reconstructed": from memory of the upstream tokenizer.json (not available here);
# <think>/</think> = 151648/151649 is common knowledge but unconfirmed; the rest follow Qwen2.5's
# order. `special` flags are reconstructed too (they only affect skip_special_tokens on decode).
R1_DISTILL_ADDED_TOKENS: tuple[tuple[int, str, bool, str], ...] = (
    (151643, "<｜end▁of▁sentence｜>", True, "confirmed"),
    (151644, "<｜User｜>", False, "confirmed"),
    (151645, "<｜Assistant｜>", False, "confirmed"),
    (151646, "<｜begin▁of▁sentence｜>", True, "confirmed"),
    (151647, "<|EOT|>", False, "reconstructed"),
    (151648, "<think>", False, "reconstructed"),
    (151649, "</think>", False, "reconstructed"),
    (151650, "<|quad_start|>", True, "reconstructed"),
    (151651, "<|quad_end|>", True, "reconstructed"),
    (151652, "<|vision_start|>", True, "reconstructed"),
    (151653, "<|vision_end|>", True, "reconstructed"),
    (151654, "<|vision_pad|>", True, "reconstructed"),
    (151655, "<|image_pad|>", True, "reconstructed"),
    (151656, "<|video_pad|>", True, "reconstructed"),
    (151657, "<tool_call>", False, "reconstructed"),
    (151658, "</tool_call>", False, "reconstructed"),
    (151659, "<|fim_prefix|>", False, "reconstructed"),
    (151660, "<|fim_middle|>", False, "reconstructed"),
    (151661, "<|fim_suffix|>", False, "reconstructed"),
    (151662, "<|fim_pad|>", False, "reconstructed"),
    (151663, "<|repo_name|>", False, "reconstructed"),
    (151664, "<|file_sep|>", False, "reconstructed"),
)
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
QWEN2_BPE_SIZE = 151643  # vocab.json entries, ids 0..151642


def _dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TokenizerLoadError(f"{what} not found: {p} (a directory is needed)")
    return p


def read_chat_template(path: str | Path) -> str:
    """The Jinja source of a chat template file; a one-line error naming a missing/empty file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenizerLoadError(f"chat template file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerLoadError(f"chat template file is not UTF-8 text: {p}") from None
    if "{" not in text:
        raise TokenizerLoadError(f"{p}: not a Jinja chat template (no '{{' in it)")
    return text


def load_tokenizer(path: str | Path, chat_template: str | Path | None = None, *, bpe: str | Path | None = None):
    """A fast tokenizer from a local directory, with an optional chat template file.

    The directory holds ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``. An R1-distill
    config directory (DeepSeek's ``tokenizer_config.json``, no vocabulary) needs `bpe`, the
    Qwen2 BPE directory: it is built by `r1_distill_tokenizer`. Errors are one line, naming
    the path.
    """
    p = _dir(path, "tokenizer directory")
    cfg = _read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").is_file() else {}
    has_vocab = (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())
    if not has_vocab:
        if _token_text(cfg.get("bos_token")) == R1_BOS:
            if bpe is None:
                raise TokenizerLoadError(
                    f"{p}: an R1-distill tokenizer config without a vocabulary; give the Qwen2 BPE "
                    "directory too (bpe=DIR / model key bpe = \"DIR\")"
                )
            return r1_distill_tokenizer(bpe, config_dir=p, chat_template=chat_template)
        raise TokenizerLoadError(f"{p}: no tokenizer.json, and no vocab.json + merges.txt")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    declared = cfg.get("tokenizer_class")
    try:
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (p / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(p)
        else:
            tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise TokenizerLoadError(f"{p}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerLoadError(f"{p}: {type(tok).__name__} is not a fast tokenizer (waitlens needs offsets)")
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    return tok


def r1_distill_tokenizer(bpe: str | Path, *, config_dir: str | Path | None = None,
                         chat_template: str | Path | None = None):
    """The DeepSeek-R1-Distill-Qwen tokenizer: the Qwen2 BPE from `bpe` (vocab.json +
    merges.txt) with R1's added tokens at their ids (`R1_DISTILL_ADDED_TOKENS`), bos
    ``<｜begin▁of▁sentence｜>``, eos = pad ``<｜end▁of▁sentence｜>``. `config_dir` (DeepSeek's
    tokenizer_config.json) supplies the chat template and ``model_max_length`` unless a
    `chat_template` file is given."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    b = _dir(bpe, "Qwen2 BPE directory")
    vocab_file, merges_file = b / "vocab.json", b / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerLoadError(f"{b}: no {f.name} (the Qwen2 BPE needs vocab.json and merges.txt)")
    vocab = _read_json(vocab_file)
    if len(vocab) != QWEN2_BPE_SIZE or max(vocab.values()) != QWEN2_BPE_SIZE - 1:
        raise TokenizerLoadError(f"{vocab_file}: {len(vocab)} entries, not the Qwen2 BPE's {QWEN2_BPE_SIZE}")
    # merges.txt may have CRLF line endings (the realdata copy does): splitlines drops them
    merges = [tuple(ln.split(" ")) for ln in merges_file.read_text(encoding="utf-8").splitlines()
              if ln and not ln.startswith("#version")]
    cfg = _read_json(Path(config_dir) / "tokenizer_config.json") if config_dir is not None else {}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None)
    for tid, content, special, _status in R1_DISTILL_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
        got = tok.convert_tokens_to_ids(content)
        if got != tid:  # cannot happen with the 151,643-entry BPE; guard the id layout anyway
            raise TokenizerLoadError(f"{b}: {content} got id {got}, not {tid}")
    tok.bos_token, tok.eos_token, tok.pad_token = R1_BOS, R1_EOS, R1_EOS
    tok.model_max_length = int(cfg.get("model_max_length", 16384))
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    elif cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    return tok


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerLoadError(f"{path}: not valid JSON ({e})") from None


@dataclass
class TokenizerModel:
    """A model known only by its tokenizer and prompt format (no weights): what positions
    and token counts need. `n_ctx` is the context window (config.json's
    max_position_embeddings, else the tokenizer's model_max_length); None: unknown."""

    spec: str
    tokenizer: Any
    format: PromptFormat
    n_ctx: int | None = None
    source_dir: Path | None = None
    info: dict = field(default_factory=dict)
    has_weights: bool = False

    def render(self, trajectory: Trajectory, *, include_answer: bool = True) -> Rendered:
        return render(self.tokenizer, trajectory, self.format, include_answer=include_answer)

    def check_length(self, n_tokens: int, what: str = "input") -> None:
        if self.n_ctx is not None and n_tokens > self.n_ctx:
            raise ContextLengthError(
                f"trajectory {what!r} has {n_tokens} tokens, more than the context of {self.spec} "
                f"({self.n_ctx} tokens); shorten it or drop it"
            )


def tokenizer_model(path: str | Path, *, chat_template: str | Path | None = None, bpe: str | Path | None = None,
                    format: PromptFormat | str | dict | None = None, name: str | None = None,
                    n_ctx: int | None = None) -> TokenizerModel:
    """A weightless model: the tokenizer in `path` (+ chat template), its format (given, or
    inferred from the template), and its context length."""
    tok = load_tokenizer(path, chat_template, bpe=bpe)
    fmt = infer_format(tok) if format is None else get_format(format, tok)
    p = Path(path)
    if n_ctx is None:
        cfg = p / "config.json"
        if cfg.is_file():
            n_ctx = _read_json(cfg).get("max_position_embeddings")
        if n_ctx is None:
            mml = getattr(tok, "model_max_length", None)
            n_ctx = int(mml) if mml and mml < 10**8 else None
    return TokenizerModel(name or str(path), tok, fmt, n_ctx, p,
                          {"tokenizer": str(path), "chat_template": str(chat_template) if chat_template else None,
                           "bpe": str(bpe) if bpe else None, "n_vocab": len(tok)})
