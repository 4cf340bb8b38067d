"""The study runner: stages in order, each writing into `runs/<name>/<stage>/`.

A stage is done when the run manifest says so and its outputs are on disk; re-running skips
it. A stage writes into `<stage>.partial/` and is renamed into place when it finishes, so a
killed run leaves no half-written stage (capture, the long one, resumes shard by shard
inside its own store). `only=` runs some stages (their inputs must exist), `force=` reruns
some stages and everything after them that depends on them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from waitlens.experiments.config import STAGES, StudyConfig, check_models
from waitlens.hooks.store import versions, write_json

MANIFEST = "manifest.json"


class StageSkipped(Exception):
    """Raised by a stage that cannot run on this study's data; the reason goes in the manifest
    and the report, and the study goes on."""


@dataclass
class Stage:
    name: str
    run: Callable[[RunContext, Path], dict[str, Any]]  # writes into the given dir, returns a summary
    needs: tuple[str, ...] = ()
    resumable: bool = False  # writes in place and resumes itself (capture)


class RunContext:
    """What stages share: the config, the run directory, models loaded once, and a log."""

    def __init__(self, cfg: StudyConfig, run_dir: Path, model_facts: dict[str, dict], quiet: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.model_facts = model_facts
        self.quiet = quiet
        self._models: dict[str, Any] = {}

    def model(self, name: str):
        """The model called `name` in the config, loaded on first use and kept."""
        if name not in self._models:
            from waitlens.hooks import load_model

            m = self.cfg.models[name]
            self.log(f"loading model {name} = {m.spec}")
            self._models[name] = load_model(m.spec, device=self.cfg.device, dtype=m.dtype,
                                            revision=m.revision, format=m.format)
        return self._models[name]

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[waitlens] {msg}", file=sys.stderr, flush=True)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def run_study(
    cfg: StudyConfig,
    stages: dict[str, Stage],
    *,
    runs_root: str | Path = "runs",
    only: Iterable[str] | None = None,
    force: Iterable[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run (or resume) the study described by `cfg`; returns the run directory."""
    only = list(only or [])
    force = list(force or [])
    for s in only + force:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; stages are {list(STAGES)}")
    facts = check_models(cfg)  # every model resolvable, stage requirements met: before any work
    run_dir = Path(runs_root) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run_dir)
    if manifest and manifest.get("config") != cfg.to_dict():
        old_seed = manifest.get("config", {}).get("seed")
        raise ValueError(
            f"{run_dir} holds a run of a different config (seed {old_seed}); use another name, "
            "or delete the directory to start over"
        )
    manifest.setdefault("config", cfg.to_dict())
    manifest.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest["models"] = facts
    manifest["versions"] = versions()
    manifest.setdefault("stages", {})
    ctx = RunContext(cfg, run_dir, facts, quiet)

    selected = [s for s in STAGES if s in cfg.stages and s in stages]
    redo = _downstream(force, stages) if force else set()
    for name in selected:
        if only and name not in only:
            continue
        stage = stages[name]
        done = manifest["stages"].get(name, {}).get("status") in ("done", "skipped") and ctx.stage_dir(name).exists()
        if done and name not in redo:
            ctx.log(f"{name}: done ({manifest['stages'][name]['seconds']:.1f} s), skipping")
            continue
        missing = [n for n in stage.needs if n in cfg.stages
                   and manifest["stages"].get(n, {}).get("status") not in ("done", "skipped")]
        if missing:
            raise ValueError(f"stage {name!r} needs {missing} first; run without --only, or with --only {missing[0]}")
        ctx.log(f"{name}: running")
        t0 = time.perf_counter()
        out_dir = ctx.stage_dir(name)
        status = "done"
        if stage.resumable:
            if name in redo and out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            summary = stage.run(ctx, out_dir)
        else:
            partial = run_dir / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                summary = stage.run(ctx, partial)
            except StageSkipped as e:
                status, summary = "skipped", {"reason": str(e)}
                shutil.rmtree(partial)
                partial.mkdir()
                write_json(partial / "skipped.json", summary)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(partial, out_dir)
        seconds = time.perf_counter() - t0
        manifest["stages"][name] = {
            "status": status, "seconds": round(seconds, 2), "summary": summary,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(run_dir / MANIFEST, manifest)
        ctx.log(f"{name}: {status} in {seconds:.1f} s" + (f" ({summary['reason']})" if status == "skipped" else ""))
    write_json(run_dir / MANIFEST, manifest)
    return run_dir


def _downstream(force: list[str], stages: dict[str, Stage]) -> set[str]:
    """The forced stages and every stage that (transitively) needs one of them."""
    out = set(force)
    changed = True
    while changed:
        changed = False
        for s in stages.values():
            if s.name not in out and any(n in out for n in s.needs):
                out.add(s.name)
                changed = True
    return out
