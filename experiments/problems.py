"""Where the problems of a study come from: the organism's held-out split, simple arithmetic
word problems (for small real LMs), a JSONL file, or a Hugging Face dataset (online)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from waitlens.experiments.config import TrajectoryConfig
from waitlens.traces.trajectory import iter_jsonl


def load_problems(cfg: TrajectoryConfig, seed: int) -> list[dict]:
    """Problems as dicts with ``id``, ``prompt`` and ``gold``."""
    if cfg.problems == "organism":
        from waitlens.experiments.organism.sample import eval_problems

        return [{"id": p.id, "prompt": p.prompt, "gold": p.gold} for p in eval_problems(cfg.n_problems, seed)]
    if cfg.problems == "arithmetic":
        return arithmetic_problems(cfg.n_problems, seed)
    if cfg.problems == "jsonl":
        return _jsonl_problems(Path(cfg.path), cfg.fields, cfg.n_problems)
    if cfg.problems == "hf":
        return hf_problems(cfg.dataset, cfg.split, cfg.fields, cfg.n_problems, seed)
    raise ValueError(f"unknown problem source {cfg.problems!r}")


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    """Small additions a 135M chat model can attempt (some right, some wrong), integer answers."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(2, 20, 2))
        out.append({
            "id": f"arith{i}",
            "prompt": f"What is {a} + {b}? Think step by step, check your work, "
                      "and end with 'Final answer:' followed by the number.",
            "gold": str(a + b),
        })
    return out


def _jsonl_problems(path: Path, fields: dict, n: int) -> list[dict]:
    out = []
    for lineno, row in iter_jsonl(path, "problem"):
        out.append(_pick(row, fields, f"{path}:{lineno}", len(out)))
        if len(out) >= n:
            break
    return out


def hf_problems(dataset: str, split: str, fields: dict, n: int, seed: int) -> list[dict]:
    """Problems from a Hugging Face dataset (needs `pip install datasets` and the internet)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    ds = load_dataset(dataset, split=split).shuffle(seed=seed)
    return [_pick(row, fields, f"{dataset}[{i}]", i) for i, row in zip(range(n), ds, strict=False)]


def _pick(row: dict, fields: dict, where: str, index: int) -> dict:
    prompt_key, gold_key = fields.get("prompt", "prompt"), fields.get("gold", "gold")
    missing = [k for k in (prompt_key, gold_key) if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; map them with trajectories.fields")
    return {"id": str(row.get(fields.get("id", "id"), f"q{index}")), "prompt": str(row[prompt_key]), "gold": str(row[gold_key])}
