"""Benchmark: forced-answer probabilities at 64 prefixes of a 2,048-token trajectory.

Prints, side by side, the cost of the KV-cache branching method (`hooks.answer_probabilities`,
the default) and of naive recompute (every prefix re-run from scratch), each as a ratio to one
plain forward pass over the trajectory. Median of interleaved repeats. Goal: branching ≤ 1.5×.

    .venv/bin/python -m experiments.benchmarks.answers [--tokens 2048] [--prefixes 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from waitlens.hooks.answer import answer_probabilities
from waitlens.hooks.models import LoadedModel
from waitlens.traces.formats import PromptFormat
from waitlens.traces.trajectory import Trajectory

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "Q", "A", ";", "=", "+", "-", "so", "wait"] + [str(i) for i in range(10)]


def toy_model(*, layers: int = 4, d_model: int = 256, max_pos: int = 4096, seed: int = 0) -> LoadedModel:
    """A random Qwen2 (word-level tokenizer) wrapped as a LoadedModel, in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<bos>", eos_token="<eos>")
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=d_model, intermediate_size=4 * d_model,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=max_pos, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    hf = Qwen2ForCausalLM(cfg).eval()
    fmt = PromptFormat(name="toy", prompt_sep=" ", think_close=" ; ", answer_prefix="A ", answer_suffix=" <eos>")
    return LoadedModel("toy-qwen2", hf, tok, fmt)


def toy_trajectory(n_tokens: int, seed: int = 0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    pool = WORDS[4:]
    words = [pool[int(i)] for i in torch.randint(len(pool), (n_tokens - 6,), generator=g)]
    return Trajectory(id="bench", problem_id="p", prompt="Q 3 + 4 ;", reasoning=" ".join(words),
                      answer="7", gold="7", correct=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefixes", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=1,
                    help="rounds that also time naive recompute (it costs ~30x a forward; default 1)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = toy_model(layers=args.layers, d_model=args.d_model, max_pos=max(4096, args.tokens + 64))
    traj = toy_trajectory(args.tokens)
    rd = model.render(traj)
    ids = torch.tensor([rd.input_ids])
    t0, t1 = rd.reasoning_tokens
    step = max((t1 - t0) // args.prefixes, 1)
    prefixes = list(range(t1, t0, -step))[: args.prefixes]

    def forward():
        with torch.no_grad():
            model.hf(input_ids=ids)

    def branch():
        answer_probabilities(model, traj, prefixes)

    def naive():
        answer_probabilities(model, traj, prefixes, method="naive")

    fns = {"forward": forward, "branch": branch, "naive": naive}
    forward()  # warm-up (naive runs the same forward)
    branch()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        for name, fn in fns.items():
            if name == "naive" and r >= args.naive_repeats:
                continue
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"toy Qwen2: {args.layers} layers, d_model {args.d_model}; trajectory {rd.n_tokens} tokens; "
          f"{len(prefixes)} prefixes; answer '7' (1 token); torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats} interleaved repeats (naive: {min(args.naive_repeats, args.repeats)})")
    print(f"{'method':<10}{'seconds':>10}{'x one forward':>16}")
    print(f"{'forward':<10}{med['forward']:>10.3f}{1.0:>16.2f}")
    for k in ("branch", "naive"):
        print(f"{k:<10}{med[k]:>10.3f}{med[k] / med['forward']:>16.2f}")
    ok = med["branch"] / med["forward"] <= 1.5
    print(f"goal branch <= 1.5x: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
