"""Sampling graded, ground-truthed trajectories from an organism model, and the eval table.

Every sampled trajectory is a `traces.Trajectory` with ``extra["truth"]`` from
`task.analyze`: the slips, one entry per "wait" (step index, `after_slip`,
`changed_answer`, `recheck_correct`), and every written step with its running value and
the true running value. Problems come from the held-out split (never trained on).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from waitlens.experiments.organism.task import Problem, analyze, random_problem
from waitlens.probes.stats import wilson_ci
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel


def resolve_spec(spec: str) -> Path:
    """``organism:<regime>`` or a directory holding one regime (e.g. from ``train --out``)."""
    from waitlens.experiments.organism.registry import REGIMES, resolve

    spec = str(spec)
    if spec.startswith("organism:"):
        return resolve(spec.split(":", 1)[1])
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"unknown organism model {spec!r}: use organism:<regime> ({', '.join(REGIMES)}) "
        "or a directory written by `waitlens organism train --out DIR` (e.g. DIR/post-large)"
    )


def load(spec: str):
    """Load an organism model the way every model is loaded (`hooks.load_model`)."""
    path = resolve_spec(spec)
    try:
        from waitlens.hooks.models import load_model
    except ImportError:  # the foundation's loader not available: a minimal equivalent
        load_model = None
    if load_model is not None:
        model = load_model(str(path), device="cpu", dtype="float32")
        model.spec = spec
        return model
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from waitlens.traces.formats import load_format

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return SimpleNamespace(spec=spec, hf=hf, tokenizer=AutoTokenizer.from_pretrained(path),
                           format=load_format(path), device=torch.device("cpu"))


def eval_problems(n: int, seed: int = 0) -> list[Problem]:
    rng = np.random.default_rng([seed, 100])
    return [random_problem(rng, split="eval") for _ in range(n)]


def sample(model: LoadedModel, n: int, *, temperature: float = 1.0, seed: int = 0, n_per_problem: int = 1,
           batch_size: int = 250, progress: bool = True) -> list[Trajectory]:
    """`n` trajectories (n // n_per_problem held-out problems), graded, with `truth`."""
    from waitlens.hooks.generate import generate_trajectories

    problems = eval_problems(math.ceil(n / n_per_problem), seed)
    rows = [{"id": p.id, "prompt": p.prompt, "gold": p.gold} for p in problems]
    trajs = generate_trajectories(model, rows, n_per_problem, temperature=temperature, seed=seed,
                                  max_new_tokens=96, batch_size=batch_size, progress=progress,
                                  model_name=getattr(model, "spec", None))[:n]
    by_id = {p.id: p for p in problems}
    for i, t in enumerate(trajs):
        t.id = f"{t.problem_id}-{i}"  # problems may repeat across the sample: keep ids unique
        add_truth(t, by_id[t.problem_id])
    return trajs


def add_truth(t: Trajectory, problem: Problem) -> Trajectory:
    truth = analyze(problem, t.reasoning).to_dict()
    if t.extra.pop("malformed", False):
        truth["malformed"] = True
        truth.setdefault("error", "no answer (the forcing suffix never came)")
    t.extra.pop("completion", None)
    t.extra["truth"] = truth
    if truth["malformed"]:
        t.correct = False
    return t


# ---------------------------------------------------------------------------------------------
def evaluate(trajs: list[Trajectory]) -> dict[str, Any]:
    """The organism's eval table: each metric as {value, low, high, k, n} (95% CIs)."""
    n = len(trajs)
    correct = sum(bool(t.correct) for t in trajs)
    truths = [t.extra["truth"] for t in trajs]
    waits = [w for tr in truths for w in tr["waits"]]
    n_waits = np.array([len(tr["waits"]) for tr in truths], dtype=float)
    steps = [s for tr in truths for s in tr["steps"] if s["kind"] == "step"]
    slip_followed = []  # for every slipped step: was it followed directly by a wait?
    for tr in truths:
        st = tr["steps"]
        for j, s in enumerate(st):
            if s["kind"] == "step" and s["slip"]:
                slip_followed.append(j + 1 < len(st) and st[j + 1]["kind"] == "wait")

    def prop(k, m):
        v, lo, hi = wilson_ci(int(k), int(m))
        return {"value": v, "low": lo, "high": hi, "k": int(k), "n": int(m)}

    after = [w for w in waits if w["after_slip"]]
    clean = [w for w in waits if not w["after_slip"]]
    mean = float(n_waits.mean()) if n else float("nan")
    half = 1.96 * float(n_waits.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "n": n,
        "accuracy": prop(correct, n),
        "waits_per_trajectory": {"value": mean, "low": mean - half, "high": mean + half, "n": n},
        "slip_rate": prop(sum(s["slip"] for s in steps), len(steps)),
        "p_slip_before_wait": prop(len(after), len(waits)),
        "p_wait_after_slip": prop(sum(slip_followed), len(slip_followed)),
        "fix_rate": prop(sum(w["recheck_correct"] for w in after), len(after)),
        "keep_rate": prop(sum(w["recheck_correct"] for w in clean), len(clean)),
        "p_changed_after_wait": prop(sum(w["changed_answer"] for w in waits), len(waits)),
        "p_recheck_after_wait": prop(sum(w.get("rechecked", True) for w in waits), len(waits)),
        "malformed": prop(sum(bool(tr["malformed"]) for tr in truths), n),
    }


ROWS = [
    ("accuracy", "accuracy"),
    ("waits_per_trajectory", "waits / trajectory"),
    ("slip_rate", "slip rate (per step)"),
    ("p_slip_before_wait", "P(slip before | wait)"),
    ("p_wait_after_slip", "P(wait | slip)"),
    ("fix_rate", "fix rate P(recheck correct | wait after slip)"),
    ("keep_rate", "keep rate P(recheck correct | wait after correct step)"),
    ("p_recheck_after_wait", "P(wait re-checks the step | wait)"),
    ("p_changed_after_wait", "P(answer changes | wait)"),
    ("malformed", "malformed"),
]


def fmt_metric(m: dict) -> str:
    if m["value"] != m["value"]:  # nan
        return "n/a"
    s = f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
    return s + (f" ({m['k']}/{m['n']})" if "k" in m else "")


def format_table(results: dict[str, dict]) -> str:
    """A markdown table: one column per model (a "|" inside a metric's name is escaped)."""
    names = list(results)
    lines = ["| metric (95% CI) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        label = label.replace("|", "\\|")
        lines.append(f"| {label} | " + " | ".join(fmt_metric(results[m][key]) for m in names) + " |")
    return "\n".join(lines)
