"""GPU benchmark: a full-size randomly initialised R1-Distill-Qwen-1.5B, every costly waitlens path.

    .venv/bin/python -m waitlens.experiments.benchmarks.gpu            # on a CUDA machine: full size, bf16
    .venv/bin/python -m waitlens.experiments.benchmarks.gpu --toy      # anywhere (CI): same code, toy size

The model is built from a real Qwen2 config, ``../shared/realdata/tokenizer/<name>/config.json``
(R1-Distill-Qwen-32B's is what realdata holds; its architecture fields are kept and its size
fields replaced by the 1.5B's, `SIZES["1.5b"]`, unless ``--config`` points at a 1.5B config),
with random weights: no download, the same shapes and costs. One run measures, printing one
table (time; peak GPU memory above the weights, on CUDA):

1. capture at every layer (`hooks.capture`, resid_post at 64 positions) vs a bare forward
   (`model.hf(ids)`), at T = 4,096 and 16,384 tokens;
2. forced-answer probabilities at 64 prefixes (`hooks.answer_probabilities`, KV-cache
   branching) vs one forward over the trajectory;
3. a layer x position patch sweep on the residual stream (every layer x 16 positions): exact
   (one patched forward per cell, batched) and attribution (one forward + backward for all
   cells), with the next-token KL as the metric;
4. sampling throughput, tokens/s: HF ``generate`` (batch 16 x 256 new tokens) and vLLM's, if
   vLLM is installed (else the row says so).

Goal on one H100/H200-class GPU: the whole run under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
DEFAULT_CONFIG = REALDATA / "tokenizer" / "deepseek-r1-distill-qwen-32b" / "config.json"
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json (its size fields; not in realdata)
SIZES = {
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_window_layers": 21, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "max_position_embeddings": 131072},
    "toy": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 512, "max_window_layers": 2, "tie_word_embeddings": False,
            "max_position_embeddings": 4096},
}
FULL = {"lengths": (4096, 16384), "positions": 64, "prefixes": 64, "answer_T": 4096, "sweep_T": 1024,
        "sweep_positions": 16, "sample_batch": 16, "sample_new": 256, "prompt": 64}
TOY = {"lengths": (64, 128), "positions": 8, "prefixes": 8, "answer_T": 96, "sweep_T": 32,
       "sweep_positions": 4, "sample_batch": 2, "sample_new": 8, "prompt": 8}
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "Q", "A", ";", "=", "+", "-", "so", "wait"] + [str(i) for i in range(10)]


@dataclass
class Row:
    what: str
    seconds: float
    ratio: float | None  # to its baseline row
    peak_gib: float | None
    note: str = ""


def build_model(config: Path = DEFAULT_CONFIG, *, size: str = "1.5b", device: str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LoadedModel with random weights: the architecture of `config`, the shape of SIZES[size]
    (none: `config` as it is), a word-level tokenizer filling the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from waitlens.hooks.models import LoadedModel
    from waitlens.traces.formats import PromptFormat

    raw = json.loads(Path(config).read_text())
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    if size != "none":
        raw.update(SIZES[size])
    raw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the word-level tokenizer's specials
    cfg = Qwen2Config(**raw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).to(dtype).eval()
    vocab = {w: i for i, w in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), cfg.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>")
    fmt = PromptFormat(name="bench", prompt_sep=" ", think_close=" ; ", answer_prefix="A ", answer_suffix=" <eos>")
    return LoadedModel(f"random-qwen2-{size}", hf, tok, fmt)


def trajectory(n_tokens: int, seed: int = 0):
    from waitlens.traces.trajectory import Trajectory

    g = torch.Generator().manual_seed(seed)
    pool = WORDS[4:]
    words = [pool[int(i)] for i in torch.randint(len(pool), (max(n_tokens - 8, 1),), generator=g)]
    return Trajectory(id=f"bench{n_tokens}", problem_id="p", prompt="Q 3 + 4 ;", reasoning=" ".join(words),
                      answer="7", gold="7", correct=True)


def _timed(fn, device) -> tuple[float, float | None]:
    """(seconds, peak GiB above what was allocated before) of one call, after a warm-up call."""
    fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return sec, ((torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None)


def bench_capture(model: LoadedModel, sizes: dict) -> list[Row]:
    import pandas as pd

    from waitlens.hooks.capture import capture
    from waitlens.traces.positions import COLUMNS

    rows = []
    for T in sizes["lengths"]:
        traj = trajectory(T)
        ids = model.tokenize(traj)[None].to(model.device)
        n = ids.shape[1]
        idx = torch.linspace(1, n - 1, sizes["positions"]).long().unique().tolist()
        table = pd.DataFrame({c: None for c in COLUMNS}, index=range(len(idx)))
        table["trajectory_id"], table["problem_id"], table["word"] = traj.id, "p", "wait"
        table["token_index"] = idx
        table["correct"] = True

        def bare(ids=ids):
            with torch.inference_mode():
                model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)

        def cap(traj=traj, table=table):
            capture(model, [traj], table, batch_size=1)

        s0, m0 = _timed(bare, model.device)
        s1, m1 = _timed(cap, model.device)
        rows += [Row(f"bare forward, T={n}", s0, 1.0, m0),
                 Row(f"capture {model.n_layers} layers x {len(idx)} pos, T={n}", s1, s1 / s0, m1)]
    return rows


def bench_answers(model: LoadedModel, sizes: dict) -> list[Row]:
    from waitlens.hooks.answer import answer_probabilities

    traj = trajectory(sizes["answer_T"])
    rd = model.render(traj)
    ids = torch.tensor([rd.input_ids], device=model.device)
    t0, t1 = rd.reasoning_tokens
    step = max((t1 - t0) // sizes["prefixes"], 1)
    prefixes = list(range(t1, t0, -step))[: sizes["prefixes"]]

    def bare():
        with torch.inference_mode():
            model.hf(input_ids=ids, use_cache=False, logits_to_keep=1)

    s0, m0 = _timed(bare, model.device)
    s1, m1 = _timed(lambda: answer_probabilities(model, traj, prefixes), model.device)
    return [Row(f"one forward, T={rd.n_tokens}", s0, 1.0, m0),
            Row(f"forced answer at {len(prefixes)} prefixes", s1, s1 / s0, m1)]


def bench_sweep(model: LoadedModel, sizes: dict) -> list[Row]:
    """Layer x position residual patch sweep: source states into the target run, KL of the next token."""
    from waitlens.hooks.points import hook_name, residual_hooks

    T, P = sizes["sweep_T"], sizes["sweep_positions"]
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(len(WORDS), model.config.vocab_size, (1, T), generator=g).to(model.device)
    src = torch.randint(len(WORDS), model.config.vocab_size, (1, T), generator=g).to(model.device)
    positions = torch.linspace(0, T - 2, P).long().tolist()
    layers = list(range(model.n_layers))
    keep: dict[int, torch.Tensor] = {}

    with torch.inference_mode():
        with residual_hooks(model, {hook_name(layer, "resid_pre"): (lambda h, layer=layer: keep.__setitem__(
                layer, h[0].clone())) for layer in layers}):
            model.hf(input_ids=src, use_cache=False, logits_to_keep=1)
        clean = torch.log_softmax(model.hf(input_ids=tgt, use_cache=False, logits_to_keep=1).logits[0, -1].float(), -1)

    def exact():
        out = torch.empty(len(layers), P)
        with torch.inference_mode():
            for li, layer in enumerate(layers):
                x = tgt.expand(P, -1)

                def put(h, layer=layer):
                    h = h.clone()
                    h[torch.arange(P), positions] = keep[layer][positions].to(h.dtype)
                    return h

                with residual_hooks(model, {hook_name(layer, "resid_pre"): put}):
                    lp = torch.log_softmax(model.hf(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].float(), -1)
                out[li] = (clean.exp() * (clean - lp)).sum(-1).cpu()
        return out

    def attribution():
        grabbed: dict[int, torch.Tensor] = {}

        def grab(layer):
            def fn(h):
                h.retain_grad()
                grabbed[layer] = h
            return fn

        with torch.enable_grad(), residual_hooks(model, {hook_name(layer, "resid_pre"): grab(layer) for layer in layers}):
            logits = model.hf(input_ids=tgt, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            # the gradient of the log-prob of the clean top token (KL's first-order term is zero)
            torch.log_softmax(logits, -1)[int(clean.argmax())].backward()
        return torch.stack([((keep[layer][positions] - grabbed[layer][0, positions].detach())
                             * grabbed[layer].grad[0, positions]).sum(-1).float().cpu() for layer in layers])

    s1, m1 = _timed(exact, model.device)
    s2, m2 = _timed(attribution, model.device)
    n = len(layers) * P
    return [Row(f"patch sweep exact, {len(layers)} layers x {P} pos (T={T})", s1, 1.0, m1, f"{n} cells"),
            Row("patch sweep attribution (1 fwd + bwd)", s2, s2 / s1, m2)]


def bench_sampling(model: LoadedModel, sizes: dict) -> list[Row]:
    B, new, L = sizes["sample_batch"], sizes["sample_new"], sizes["prompt"]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(len(WORDS), model.config.vocab_size, (B, L), generator=g).to(model.device)

    def hf():
        with torch.inference_mode():
            model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=True, top_p=0.95, pad_token_id=0)

    s, m = _timed(hf, model.device)
    rows = [Row(f"sampling HF generate, {B} x {new} new tokens", s, None, m, f"{B * new / s:,.0f} tok/s")]
    try:
        import vllm  # noqa: F401
    except ImportError:
        rows.append(Row("sampling vLLM", float("nan"), None, None, "vllm not installed here"))
        return rows
    rows.append(_vllm_row(model, B, new, L))
    return rows


def _vllm_row(model, B: int, new: int, L: int) -> Row:
    import tempfile

    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        model.hf.save_pretrained(d)
        model.tokenizer.save_pretrained(d)
        llm = LLM(d, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.5)
        prompts = [{"prompt_token_ids": list(range(len(WORDS), len(WORDS) + L))} for _ in range(B)]
        sp = SamplingParams(max_tokens=new, min_tokens=new, top_p=0.95, ignore_eos=True)
        llm.generate(prompts, sp)
        t = time.perf_counter()
        llm.generate(prompts, sp)
        s = time.perf_counter() - t
    return Row(f"sampling vLLM, {B} x {new} new tokens", s, None, None, f"{B * new / s:,.0f} tok/s")


def run(toy: bool = False, config: Path = DEFAULT_CONFIG, size: str | None = None, device: str | None = None) -> list[Row]:
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    model = build_model(config, size=size or ("toy" if toy else "1.5b"), device=dev, dtype=dtype)
    sizes = TOY if toy else FULL
    rows = []
    for fn in (bench_capture, bench_answers, bench_sweep, bench_sampling):
        rows += fn(model, sizes)
    return rows


def table(rows: list[Row]) -> str:
    out = ["| measurement | seconds | x baseline | peak GiB | note |", "|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        peak = "" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        out.append(f"| {r.what} | {r.seconds:.3f} | {ratio} | {peak} | {r.note} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="toy size (runs anywhere in seconds: what CI runs)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Qwen2 config.json to take the architecture from")
    ap.add_argument("--size", choices=[*SIZES, "none"], default=None,
                    help="shape: 1.5b (default), toy, or none (the config's own size)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"config not found: {args.config} (see ../shared/realdata/SOURCES.md)")
    t = time.perf_counter()
    rows = run(args.toy, args.config, args.size, args.device)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"random Qwen2 ({args.size or ('toy' if args.toy else '1.5b')}) from {args.config.name}, on {name}")
    print(table(rows))
    print(f"whole run {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
