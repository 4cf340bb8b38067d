"""`waitlens run [CONFIG.toml]`: the whole study, stage by stage, resumable.

With no config, the organism study that ships with waitlens. Every stage writes into
runs/<name>/<stage>/ under the current directory, with runs/<name>/manifest.json recording
the config, models, versions and the wall time of each stage. Re-running skips finished
stages (a stage whose config keys or files changed reruns); an interrupted capture resumes
shard by shard. One run at a time per run directory: a second one exits 2 ("in use by pid N").
The config's `name` is a plain name (no '/' or '..'): the run lives in <runs>/<name>.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the whole study (default: the built-in organism)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="study config (.toml); a shipped config's file name works too (default: organism.toml)")
    p.add_argument("--runs", default="runs", help="root directory of runs (default: ./runs)")
    p.add_argument("--only", action="append", default=None, metavar="STAGE",
                   help="run only this stage (repeatable); its inputs must exist")
    p.add_argument("--force", action="append", default=None, metavar="STAGE",
                   help="rerun this stage and every stage that depends on it (repeatable)")
    p.add_argument("--figures", default=None, metavar="DIR", help="also copy the figures here (make demo: figures/)")
    p.add_argument("--dry-run", action="store_true",
                   help="swap each model for its replica (small random weights, the real tokenizer and template) "
                   "and cap the work: check a GPU config end to end on a CPU (run name <name>-dry-run)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from waitlens.experiments.analyses.study import run as run_study
    from waitlens.experiments.runner import read_manifest

    run_dir = run_study(args.config, runs=args.runs, only=args.only, force=args.force, dry_run=args.dry_run,
                        quiet=args.quiet)
    manifest = read_manifest(run_dir)
    times = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in manifest.get("stages", {}).items())
    print(f"study {run_dir.name!r} in {run_dir} ({times})")
    report = run_dir / "report" / "report.md"
    if report.is_file():
        print(f"report: {report}")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        pngs = sorted(p for p in run_dir.glob("*/*.png") if p.parent.name != "report")  # the report holds copies
        for png in pngs:
            stage = png.relative_to(run_dir).parts[0]
            shutil.copy2(png, dest / f"{stage}_{png.name}")
        print(f"copied {len(pngs)} figures to {dest}")
    return 0
