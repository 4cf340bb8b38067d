"""The organism's tokenizer, prompt format and model architecture.

Everything loads through the same path as a real model: a saved HF fast tokenizer
(WordLevel over whitespace-split words), a `Qwen2ForCausalLM` in safetensors, and a
`waitlens_format.json` whose plain layout renders a trajectory to exactly the training
sequence::

    <bos> Q 3 + 7 - 8 ; 3 + 7 = 0 ; 0 - 8 = 2 ; A 2 <eos>
    head ^^^^^^^^^^^^^^ reasoning ^^^^^^^^^^^^ ^^^ forcing suffix " ; A "
"""

from __future__ import annotations

from pathlib import Path

from waitlens.experiments.organism.task import TOKEN_ID, VOCAB, Problem
from waitlens.traces.formats import PromptFormat

FORMAT = PromptFormat(
    name="organism", chat_template=False, bos=True, prompt_sep=" ", think_open="",
    think_close=" ; ", answer_prefix="A ", answer_suffix=" <eos>",
)

ARCH = dict(
    hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_dropout=0.0,
)


def build_tokenizer(save_dir: str | Path):
    """Build the word-level fast tokenizer, save it to `save_dir` and return it reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=ARCH["max_position_embeddings"],
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(save_dir)
    return AutoTokenizer.from_pretrained(save_dir)


def build_model(seed: int, arch: dict | None = None):
    """A freshly initialised Qwen2 causal LM (deterministic given `seed`)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(VOCAB), bos_token_id=TOKEN_ID["<bos>"], eos_token_id=TOKEN_ID["<eos>"],
        pad_token_id=TOKEN_ID["<pad>"], use_cache=True, **{**ARCH, **(arch or {})},
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    return model


def head_text(problem: Problem) -> str:
    return f"<bos> {problem.prompt}{FORMAT.prompt_sep}"


def encode(problem: Problem, reasoning: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the full training sequence and the number of head (prompt) tokens.

    Equal to ``traces.render(tokenizer, trajectory, FORMAT).input_ids`` (checked in tests).
    """
    head = head_text(problem).split()
    body = (reasoning + FORMAT.forcing_suffix + answer + FORMAT.answer_suffix).split()
    return [TOKEN_ID[w] for w in head + body], len(head)
