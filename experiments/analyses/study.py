"""The library side of `waitlens run`: a whole study from a config, for a notebook or a script."""

from __future__ import annotations

from pathlib import Path

from waitlens.experiments.config import StudyConfig, load_config
from waitlens.experiments.runner import run_study
from waitlens.experiments.study import study_stages


def run(config: str | Path | StudyConfig | None = None, *, runs: str | Path = "runs",
        only: list[str] | None = None, force: list[str] | None = None, dry_run: bool = False,
        quiet: bool = False) -> Path:
    """Run (or resume) a study as `waitlens run` does; returns the run directory
    (`<runs>/<name>/`, the report in `report/report.md`).

    config: a .toml path, a shipped config's file name, a parsed `StudyConfig`, or None for the
    organism study. dry_run: every model swapped for its replica and the work capped
    (`waitlens run --dry-run`: a GPU config checked end to end on a CPU)."""
    cfg = config if isinstance(config, StudyConfig) else load_config(config)
    if dry_run:
        from waitlens.experiments.analyses.replica import dry_run_config

        cfg = dry_run_config(cfg)
    return run_study(cfg, study_stages(), runs_root=runs, only=only, force=force, quiet=quiet)
