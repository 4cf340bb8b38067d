"""Benchmark: every stage of a study, timed in one run (default: the organism study).

Runs the study from nothing into a fresh run directory and prints the stage times the run
manifest records (wall seconds, and CPU seconds of this process and its worker processes),
the whole study's wall and CPU time (CPU time says how much of the wall time was this process
on a shared machine), and the two goals of issue #17: the tokens stage at most 1.5x the
capture stage, and the whole study at most 60 s.

    OMP_NUM_THREADS=1 .venv/bin/python -m waitlens.experiments.benchmarks.stages [--config organism.toml]
        [--runs DIR] [--keep] [--batching]

--batching then times the patching and ablation work of that run twice on the same inputs,
batched (the default) and one case at a time (``max_batch_tokens=None``), and prints the two
side by side with their ratio and the largest difference between their effects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from waitlens.hooks.batching import MAX_BATCH_TOKENS

TOKENS_OVER_CAPTURE = 1.5
STUDY_SECONDS = 60.0


def run_and_time(config: str | None = None, runs: str | Path | None = None, *, quiet: bool = True) -> dict:
    """Run the study into `runs` (a fresh temporary directory by default); return
    {"stages": {name: seconds}, "wall": s, "cpu": s, "run_dir": path}."""
    from waitlens.experiments.config import load_config
    from waitlens.experiments.runner import cpu_time, read_manifest, run_study
    from waitlens.experiments.study import study_stages

    cfg = load_config(config)
    root = Path(runs) if runs is not None else Path(tempfile.mkdtemp(prefix="waitlens-stages-"))
    if (root / cfg.name).exists():
        raise ValueError(f"{root / cfg.name} exists; the benchmark times a run from nothing (use another --runs)")
    w0, c0 = time.perf_counter(), cpu_time()
    run_dir = run_study(cfg, study_stages(), runs_root=root, quiet=quiet)
    wall, cpu = time.perf_counter() - w0, cpu_time() - c0
    entries = read_manifest(run_dir)["stages"]
    stages = {k: float(v["seconds"]) for k, v in entries.items()}
    stage_cpu = {k: float(v.get("cpu_seconds", float("nan"))) for k, v in entries.items()}
    return {"stages": stages, "stage_cpu": stage_cpu, "wall": wall, "cpu": cpu, "run_dir": str(run_dir)}


def table(result: dict) -> str:
    st = result["stages"]
    cpu = result.get("stage_cpu", {})
    lines = ["| stage | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, float('nan')):.1f} |" for k, v in st.items()]
    lines.append(f"| **whole study** | {result['wall']:.1f} | {result['cpu']:.1f} |")
    out = "\n".join(lines)
    if "tokens" in st and st.get("capture"):
        r = st["tokens"] / st["capture"]
        out += (f"\n\ntokens / capture = {r:.2f} (goal <= {TOKENS_OVER_CAPTURE}: "
                f"{'met' if r <= TOKENS_OVER_CAPTURE else 'NOT met'})")
    out += (f"\nwhole study {result['wall']:.1f} s wall (goal <= {STUDY_SECONDS:.0f} s: "
            f"{'met' if result['wall'] <= STUDY_SECONDS else 'NOT met'})")
    return out


def batching_times(config: str | None, run_dir: str | Path) -> list[dict]:
    """Patching (one direction, as the study's patching stage selects and configures it) and the
    ablations (every kind), batched and one at a time, on the finished run's trajectories:
    [{"work", "batched", "one_at_a_time", "max_abs_diff"}] (seconds)."""
    import warnings

    import numpy as np

    from waitlens.experiments.analyses.patch import ablation_options, resolve_study_metrics
    from waitlens.experiments.config import load_config
    from waitlens.experiments.study import _has_word, _wait_after_slip
    from waitlens.hooks import load_model
    from waitlens.hooks.ablations import ablate
    from waitlens.hooks.patching import patch
    from waitlens.traces import load_trajectories

    cfg = load_config(config)
    run_dir = Path(run_dir)
    p, a = cfg.patching, cfg.ablations
    def load(name):
        m = cfg.models[name]
        return load_model(m.spec, device=cfg.device, dtype=m.dtype, revision=m.revision, format=m.format,
                          device_map=cfg.device_map)

    trajs = lambda name: load_trajectories(run_dir / "trajectories" / f"{name}.jsonl")  # noqa: E731
    pt = [t for t in trajs(p.target) if _has_word(t, "wait")]
    pt = sorted(pt, key=lambda t: not _wait_after_slip(t))[: p.max_trajectories]
    source, target, model = load(p.source), load(p.target), load(a.model)
    metrics = resolve_study_metrics(p.metrics)
    lo, hi = p.window
    seps, pick, readouts = ablation_options(model)
    at = trajs(a.model)[: a.max_trajectories]

    def run_patch(mbt):
        return patch(source, target, pt, layers=p.layers, window=f"{lo}:{hi}", metrics=metrics, control=p.controls,
                     attribution=p.attribution, seed=cfg.seed, max_batch_tokens=mbt).table

    def run_ablate(mbt):
        import pandas as pd

        return pd.concat([ablate(model, at, kind, separators=seps, pick_wait=pick, readouts=readouts, seed=cfg.seed,
                                 max_batch_tokens=mbt)[0] for kind in a.kinds], ignore_index=True)

    out = []
    for work, fn in ((f"patching {p.target} <- {p.source} ({len(pt)} trajectories)", run_patch),
                     (f"ablations {a.model} ({len(a.kinds)} kinds, {len(at)} trajectories)", run_ablate)):
        times, tables = {}, {}
        for name, mbt in (("batched", MAX_BATCH_TOKENS), ("one_at_a_time", None)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                tables[name] = fn(mbt)
                times[name] = time.perf_counter() - t0
        d = np.nanmax(np.abs(tables["batched"]["effect"].to_numpy(float) - tables["one_at_a_time"]["effect"].to_numpy(float)))
        out.append({"work": work, **times, "max_abs_diff": float(d)})
    return out


def batching_table(rows: list[dict]) -> str:
    lines = ["| work | batched | one at a time | ratio | max abs effect difference |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['work']} | {r['batched']:.1f} s | {r['one_at_a_time']:.1f} s | "
                     f"{r['one_at_a_time'] / r['batched']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="study config (default: the organism study)")
    ap.add_argument("--runs", default=None, help="runs root (default: a fresh temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--json", default=None, help="also write the times as JSON here")
    ap.add_argument("--verbose", action="store_true", help="show the study's own log and progress bars")
    ap.add_argument("--batching", action="store_true",
                    help="then time patching and ablations batched vs one at a time on the run's trajectories")
    args = ap.parse_args(argv)
    result = run_and_time(args.config, args.runs, quiet=not args.verbose)
    print(table(result))
    if args.batching:
        result["batching"] = batching_times(args.config, result["run_dir"])
        print()
        print(batching_table(result["batching"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.runs is None and not args.keep:
        shutil.rmtree(Path(result["run_dir"]).parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
