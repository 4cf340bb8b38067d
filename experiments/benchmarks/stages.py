"""Benchmark: every stage of a study, timed in one run (default: the organism study).

Runs the study from nothing into a fresh run directory and prints the stage times the run
manifest records (wall seconds), the whole study's wall and CPU time (CPU time says how much
of the wall time was this process on a shared machine), and the two goals of issue #17:
the tokens stage at most 1.5x the capture stage, and the whole study at most 60 s.

    OMP_NUM_THREADS=1 .venv/bin/python -m waitlens.experiments.benchmarks.stages [--config organism.toml]
        [--runs DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

TOKENS_OVER_CAPTURE = 1.5
STUDY_SECONDS = 60.0


def run_and_time(config: str | None = None, runs: str | Path | None = None, *, quiet: bool = True) -> dict:
    """Run the study into `runs` (a fresh temporary directory by default); return
    {"stages": {name: seconds}, "wall": s, "cpu": s, "run_dir": path}."""
    from waitlens.experiments.config import load_config
    from waitlens.experiments.runner import read_manifest, run_study
    from waitlens.experiments.study import study_stages

    cfg = load_config(config)
    root = Path(runs) if runs is not None else Path(tempfile.mkdtemp(prefix="waitlens-stages-"))
    if (root / cfg.name).exists():
        raise ValueError(f"{root / cfg.name} exists; the benchmark times a run from nothing (use another --runs)")
    w0, c0 = time.perf_counter(), time.process_time()
    run_dir = run_study(cfg, study_stages(), runs_root=root, quiet=quiet)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    stages = {k: float(v["seconds"]) for k, v in read_manifest(run_dir)["stages"].items()}
    return {"stages": stages, "wall": wall, "cpu": cpu, "run_dir": str(run_dir)}


def table(result: dict) -> str:
    st = result["stages"]
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in st.items()]
    lines.append(f"| **whole study (wall)** | {result['wall']:.1f} |")
    lines.append(f"| whole study (CPU, all threads) | {result['cpu']:.1f} |")
    out = "\n".join(lines)
    if "tokens" in st and st.get("capture"):
        r = st["tokens"] / st["capture"]
        out += (f"\n\ntokens / capture = {r:.2f} (goal <= {TOKENS_OVER_CAPTURE}: "
                f"{'met' if r <= TOKENS_OVER_CAPTURE else 'NOT met'})")
    out += (f"\nwhole study {result['wall']:.1f} s wall (goal <= {STUDY_SECONDS:.0f} s: "
            f"{'met' if result['wall'] <= STUDY_SECONDS else 'NOT met'})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="study config (default: the organism study)")
    ap.add_argument("--runs", default=None, help="runs root (default: a fresh temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--json", default=None, help="also write the times as JSON here")
    ap.add_argument("--verbose", action="store_true", help="show the study's own log and progress bars")
    args = ap.parse_args(argv)
    result = run_and_time(args.config, args.runs, quiet=not args.verbose)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.runs is None and not args.keep:
        shutil.rmtree(Path(result["run_dir"]).parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
