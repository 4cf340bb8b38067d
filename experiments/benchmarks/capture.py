"""Benchmark: capture cost vs a bare HF forward and vs TransformerLens run_with_cache.

    python experiments/benchmarks/capture.py [--tokens 4096] [--positions 100] [--repeats 3]
                                             [--smollm2 TOKENS]

On one sequence of `--tokens` tokens with `--positions` discourse positions, measured in one
run:

- bare:    `model.hf(ids, use_cache=False)`, the plain HF forward with sdpa attention
           (including its LM head; the toy vocabulary is small, so logits are cheap);
- waitlens: `hooks.capture_residuals` end to end (tokenize, validate, forward, write the
           store) for resid_post at every layer;
- tl:      `bridge.run_with_cache(ids, names_filter=<resid_post names>, pos_slice=positions)`
           (TransformerLens 4 bridge over the same weights; eager attention).

Time: the median of `--repeats` interleaved runs (bare, waitlens, tl, bare, ...) in this process.
Peak memory: each variant in a fresh subprocess, after one warm-up call: the peak resident set
during one call (VmHWM, reset just before it via /proc/self/clear_refs) minus the resident set
just before it, i.e. the extra memory the call needed. The subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536 so glibc hands freed large blocks back to the OS and the resident
set follows live memory instead of the allocator's cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[2]

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

GOAL = 1.15
TOY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2)


def build_toy(path: Path, seed: int = 0) -> Path:
    """A random Qwen2 (d_model 256, 4 layers, context 8192) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from waitlens.traces import PromptFormat

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "Q", "A", "wait"] + [str(i) for i in range(100)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(words), max_position_embeddings=8192, tie_word_embeddings=True, **TOY)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    PromptFormat(name="bench", prompt_sep=" ", think_close=" ", answer_prefix="A ").save(path)
    return path


def toy_trajectory(n_tokens: int, n_positions: int, seed: int = 0):
    """A trajectory of exactly `n_tokens` tokens on the toy tokenizer, with `n_positions` "wait"s."""
    import random

    from waitlens.traces import Trajectory

    rng = random.Random(seed)
    n_reason = n_tokens - 4  # <bos> Q reasoning A 7
    words = [str(rng.randrange(100)) for _ in range(n_reason)]
    for i in rng.sample(range(n_reason), n_positions):
        words[i] = "wait"
    return Trajectory("bench", "p", "Q", " ".join(words), "7", "7", True)


def smol_trajectory(model: LoadedModel, n_tokens: int, n_positions: int):
    from waitlens.traces import Trajectory

    unit = "Let me add the numbers one by one and keep a running total. "
    text, k = "", 0
    while True:
        piece = ("Wait, " if k % 4 == 0 and k // 4 < n_positions else "") + unit
        trial = Trajectory("bench", "p", "Add them.", text + piece, "7", "7", True)
        if len(model.render(trial).input_ids) > n_tokens:
            break
        text, k = text + piece, k + 1
    return Trajectory("bench", "p", "Add them.", text, "7", "7", True)


class Setup:
    def __init__(self, spec: str, n_tokens: int, n_positions: int, store_root: Path):
        import torch

        from waitlens.hooks import load_model
        from waitlens.traces import find_positions

        torch.manual_seed(0)
        self.model = load_model(spec, device="cpu", dtype="float32")
        if spec == "smollm2":
            self.traj = smol_trajectory(self.model, n_tokens, n_positions)
        else:
            self.traj = toy_trajectory(n_tokens, n_positions)
        self.ids = self.model.tokenize(self.traj)[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.positions = find_positions(self.model, [self.traj], ["wait"])
        self.pos = self.positions.table["token_index"].tolist()
        self.names = [f"blocks.{layer}.hook_resid_post" for layer in range(self.model.n_layers)]
        self.store_root = store_root
        self.k = 0

    def bare(self):
        import torch

        with torch.inference_mode():
            return self.model.hf(self.ids, use_cache=False).logits.shape

    def waitlens(self):
        from waitlens.hooks import capture_residuals

        self.k += 1
        return capture_residuals(self.model, [self.traj], self.positions, self.store_root / f"s{self.k}",
                                 progress=False)

    def tl(self):
        import torch

        with torch.inference_mode():
            _, cache = self.bridge.run_with_cache(self.ids, names_filter=self.names, pos_slice=self.pos)
        return len(cache)

    @property
    def bridge(self):
        return self.model.bridge


VARIANTS = ("bare", "waitlens", "tl")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """Measure one variant's peak extra memory in this (fresh) process; print JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(args.spec, args.tokens, args.positions, Path(tmp))
        fn = getattr(s, args.child)
        if args.child == "tl":
            s.bridge  # noqa: B018  (built before measuring: it is a one-off copy of the weights)
        fn()  # warm-up
        gc.collect()
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        fn()
        peak = rss_kib("VmHWM")
    print(json.dumps({"variant": args.child, "peak_extra_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}))


def measure_memory(spec: str, args) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    out = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--spec", spec, "--tokens", str(args.tokens),
               "--positions", str(args.positions)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode:
            raise RuntimeError(f"memory child {v} failed:\n{r.stderr[-2000:]}")
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    return out


def measure_time(spec: str, args) -> tuple[dict[str, float], Setup]:
    tmp = tempfile.mkdtemp(prefix="waitlens-bench-")
    s = Setup(spec, args.tokens, args.positions, Path(tmp))
    s.bridge  # noqa: B018
    for v in VARIANTS:  # warm-up
        getattr(s, v)()
    times = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            gc.collect()
            t0 = time.perf_counter()
            getattr(s, v)()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) for v, ts in times.items()}, s


def report(title: str, t: dict, m: dict, s: Setup, args) -> None:
    import torch

    cfg = s.model.config
    print(f"\n== {title}: {s.ids.shape[1]} tokens, {len(s.pos)} positions, {s.model.n_layers} layers, "
          f"d_model {s.model.d_model}, vocab {cfg.vocab_size}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'variant':<10}{'time s':>9}{'peak MiB':>10}{'time/bare':>11}{'mem/bare':>10}{'time/tl':>9}{'mem/tl':>8}")
    for v in VARIANTS:
        print(f"{v:<10}{t[v]:>9.2f}{m[v]:>10.1f}{t[v] / t['bare']:>11.2f}{m[v] / m['bare']:>10.2f}"
              f"{t[v] / t['tl']:>9.2f}{m[v] / m['tl']:>8.2f}")
    ok_t, ok_m = t["waitlens"] / t["bare"] <= GOAL, m["waitlens"] / m["bare"] <= GOAL
    print(f"goal (waitlens <= {GOAL}x bare forward): time {'MET' if ok_t else 'NOT met'}, "
          f"memory {'MET' if ok_m else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smollm2", type=int, default=0, metavar="TOKENS",
                    help="also benchmark SmolLM2-135M at this many tokens (slow on a CPU)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(build_toy(Path(tmp) / "toy"))
        m = measure_memory(spec, args)
        t, s = measure_time(spec, args)
        report("toy Qwen2", t, m, s, args)
    if args.smollm2:
        args.tokens = args.smollm2
        m = measure_memory("smollm2", args)
        t, s = measure_time("smollm2", args)
        report("SmolLM2-135M", t, m, s, args)


if __name__ == "__main__":
    main()
