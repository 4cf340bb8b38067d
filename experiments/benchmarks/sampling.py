"""Benchmark: the same prompts through both sampling engines in one run — HF `generate`
(static left-padded batches) and vLLM (continuous batching, paged KV cache).

Prints useful tokens per second (tokens up to each row's eos) and wall time for each engine,
and their ratio (vLLM / HF). The engines alternate within the run (HF, vLLM, HF, vLLM, ...),
so a busy machine slows both alike; the ratio is the number to read. Goal: vLLM >= 2x HF.
Needs vLLM (`make test-vllm` builds .venv-vllm):

    .venv-vllm/bin/python experiments/benchmarks/sampling.py [--model smollm2] [--prompts 32]
        [--new-tokens 256] [--temperature 0.7] [--repeats 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from waitlens.hooks.generate import HFEngine
    from waitlens.hooks.vllm_engine import VLLMEngine


def measure(engine: HFEngine | VLLMEngine, heads: list[str], *, new_tokens: int, temperature: float, seed: int) -> dict:
    from waitlens.hooks.generate import Sampling

    t0 = time.perf_counter()
    conts = engine.continue_batch(heads, max_new_tokens=new_tokens,
                                  sampling=Sampling(temperature=temperature, seed=seed, batch_size=len(heads)))
    wall = time.perf_counter() - t0
    useful = sum(len(c.token_ids) for c in conts)
    return {"wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall,
            "finished": sum(c.finish == "eos" for c in conts)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model spec (a local dir, a GGUF, smollm2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds per engine (median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from waitlens.hooks.generate import HFEngine
    from waitlens.hooks.models import load_model
    from waitlens.hooks.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    hf = HFEngine(load_model(args.model, device="cpu", dtype="float32"))
    t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl = VLLMEngine(args.model, dtype="float32", seed=args.seed)
    t_vl = time.perf_counter() - t0
    out = compare(hf, vl, prompts=args.prompts, new_tokens=args.new_tokens, temperature=args.temperature,
                  repeats=args.repeats, seed=args.seed, model=args.model)
    out["load_s"] = {"hf": t_hf, "vllm": t_vl}
    print(f"(load: HF {t_hf:.0f} s, vLLM {t_vl:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


def compare(hf, vl, *, prompts: int = 32, new_tokens: int = 256, temperature: float = 0.7, repeats: int = 1,
            seed: int = 0, model: str = "") -> dict:
    """Both engines on the same prompts, alternating; medians and the vLLM/HF ratios."""
    from waitlens.experiments.problems import arithmetic_problems
    from waitlens.traces.formats import render_head

    problems = arithmetic_problems(prompts, seed)
    heads = [render_head(hf.tokenizer, p["prompt"], hf.format) for p in problems]
    for e in (hf, vl):  # warm-up: first-call costs (allocation, vLLM's graph) are not sampling
        measure(e, heads[:2], new_tokens=4, temperature=temperature, seed=seed)
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for r in range(repeats):
        for name, e in (("hf", hf), ("vllm", vl)):
            runs[name].append(measure(e, heads, new_tokens=new_tokens, temperature=temperature, seed=seed + r))
            m = runs[name][-1]
            print(f"round {r + 1} {name:4s}: {m['useful_tokens']} useful tokens in {m['wall_s']:.1f} s "
                  f"= {m['tokens_per_s']:.1f} tok/s ({m['finished']}/{len(heads)} reached eos)", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "tokens_per_s", "useful_tokens")}
           for k, v in runs.items()}
    ratio = med["vllm"]["tokens_per_s"] / med["hf"]["tokens_per_s"]
    out = {"model": model, "prompts": prompts, "new_tokens": new_tokens, "temperature": temperature,
           "median": med, "ratio_tokens_per_s": ratio, "ratio_wall": med["hf"]["wall_s"] / med["vllm"]["wall_s"],
           "runs": runs}
    print(f"{model}, {prompts} prompts x {new_tokens} new tokens, T={temperature}: "
          f"HF {med['hf']['tokens_per_s']:.1f} tok/s, vLLM {med['vllm']['tokens_per_s']:.1f} tok/s -> "
          f"vLLM/HF {ratio:.2f}x tokens/s, {out['ratio_wall']:.2f}x wall", flush=True)
    return out


if __name__ == "__main__":  # vLLM's engine starts a subprocess
    main()
