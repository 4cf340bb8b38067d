"""The study runner: stages in order, each writing into `runs/<name>/<stage>/`.

A stage is done when the run manifest says so and its outputs are on disk; re-running skips
it. A stage writes into `<stage>.partial/` and is renamed into place when it finishes, so a
killed run leaves no half-written stage (capture, the long one, resumes shard by shard
inside its own store). `only=` runs some stages (their inputs must exist), `force=` reruns
some stages and everything after them that depends on them.

What a run directory guarantees (docs/reliability.md):

- it is `<runs>/<name>` with `name` a plain name, and the runner never deletes anything in a
  directory that is not a run directory (one without a manifest is refused unless empty);
- one process at a time: a run takes an exclusive lock (`.lock`, flock) before reading or
  writing anything; a second gets `RunLockedError` ("in use by pid N") and changes nothing;
- a stage counts as done only while the files it wrote are all on disk with their sizes, and
  while the config keys it reads are unchanged; otherwise it (and what depends on it) reruns.
  A change of a key every stage reads (seed, models, lexicon, ...) is refused, naming the keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from waitlens.experiments.config import _SECTIONS, RUN_NAME, STAGES, StudyConfig, check_models
from waitlens.hooks.store import versions, write_json
from waitlens.traces.errors import WaitlensError

MANIFEST = "manifest.json"
LOCK = ".lock"
# The config sections each stage reads besides the global keys; a stage not listed reads its own
# section (if there is one). None: every section (the report reads everything).
STAGE_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "trajectories": ("trajectories",),
    "positions": ("capture",),
    "answers": ("answers", "tokens"),
    "patching": ("patching", "tokens"),
    "ablations": ("ablations", "tokens"),
    "report": None,
}


class RunError(WaitlensError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


class RunLockedError(RunError):
    """Another process holds the run directory's lock."""


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
            from waitlens.experiments.config import resolve_path
            from waitlens.hooks import load_model

            m = self.cfg.models[name]
            paths = {k: resolve_path(getattr(m, k), self.cfg.source, f"models.{name}.{k}")
                     for k in ("tokenizer", "chat_template", "bpe") if getattr(m, k) is not None}
            self.log(f"loading model {name} = {m.spec or 'tokenizer ' + str(paths['tokenizer'])}")
            self._models[name] = load_model(m.spec or None, device=self.cfg.device, dtype=m.dtype,
                                            revision=m.revision, format=m.format, device_map=self.cfg.device_map,
                                            **paths)
            if not m.spec:
                self._models[name].spec = name
        return self._models[name]

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[waitlens] {msg}", file=sys.stderr, flush=True)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: unreadable run manifest ({e}); delete {run_dir} to start the run over") from None
    if not isinstance(manifest, dict):
        raise RunError(f"{path}: not a run manifest (a JSON object); delete {run_dir} to start the run over")
    return manifest


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (released when the block ends or the process dies)."""
    import fcntl

    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = b""
        for _ in range(20):  # the holder writes its pid right after taking the lock
            pid = os.pread(fd, 32, 0).strip()
            if pid:
                break
            time.sleep(0.05)
        os.close(fd)
        raise RunLockedError(
            f"{run_dir} is in use by pid {pid.decode() or '?'} (another waitlens run); wait for it to "
            "finish, or use another name or --runs"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _run_dir(cfg: StudyConfig, runs_root: str | Path) -> Path:
    """`<runs_root>/<cfg.name>`, refusing a name that is not a plain name (it would escape)."""
    if not RUN_NAME.match(cfg.name) or cfg.name in (".", ".."):
        raise RunError(f"run name {cfg.name!r} is not a plain name (letters, digits, '.', '_', '-')")
    run_dir = Path(runs_root) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a directory")
    if run_dir.is_dir() and not (run_dir / MANIFEST).is_file() and not (run_dir / LOCK).is_file():
        foreign = sorted(p.name for p in run_dir.iterdir())  # a run writes its lock first, then all else
        if foreign:
            raise RunError(
                f"{run_dir} exists and is not a waitlens run directory (no {MANIFEST}; it holds "
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); use another name or --runs"
            )
    return run_dir


def _global_keys(config: dict[str, Any]) -> list[str]:
    """Top-level keys every stage reads (not a section, not the stage list)."""
    return [k for k in config if k not in _SECTIONS and k != "stages"]


def _stage_config(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    sections = STAGE_SECTIONS.get(stage, (stage,))
    if sections is None:
        return {k: v for k, v in config.items() if k in _SECTIONS}
    return {k: config[k] for k in sections if k in config}


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, each as 'key: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _files(stage_dir: Path) -> dict[str, int]:
    """Every file a stage wrote, with its size."""
    return {p.relative_to(stage_dir).as_posix(): p.stat().st_size
            for p in sorted(stage_dir.rglob("*")) if p.is_file()}


def _stale_reason(name: str, entry: dict[str, Any], stage_dir: Path, config: dict[str, Any]) -> str | None:
    """Why a stage the manifest calls done must rerun (None: it is done)."""
    if entry.get("status") not in ("done", "skipped"):
        return "not done"
    if not stage_dir.is_dir():
        return f"{stage_dir} is missing"
    if "config" in entry:
        diff = _changed(entry["config"], _stage_config(name, config))
        if diff:
            return "config changed (" + "; ".join(diff[:3]) + ")"
    files = entry.get("files")
    if files is not None:
        now = _files(stage_dir)
        gone = [f for f, size in files.items() if now.get(f) != size]
        if gone:
            return f"its output {stage_dir / gone[0]} is missing or changed"
    return None


class _Rewrite:
    """A text stream that shows `old` (a stage's .partial dir) as `new` (where it ends up)."""

    def __init__(self, stream, old: str, new: str):
        self._stream, self._old, self._new = stream, old, new

    def write(self, text: str) -> int:
        self._stream.write(text.replace(self._old, self._new))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _show_as(partial: Path, final: Path) -> Iterator[None]:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Rewrite(out, str(partial), str(final)), _Rewrite(err, str(partial), str(final))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


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
            raise RunError(f"unknown stage {s!r}; stages are {list(STAGES)}")
    facts = check_models(cfg)  # every model resolvable, stage requirements met: before any work
    run_dir = _run_dir(cfg, runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _run_locked(cfg, stages, run_dir, facts, only, force, quiet)


def _run_locked(cfg, stages, run_dir: Path, facts, only, force, quiet) -> Path:
    manifest = read_manifest(run_dir)
    config = cfg.to_dict()
    if manifest:
        old = manifest.get("config", {})
        diff = _changed({k: old.get(k) for k in _global_keys(old) + _global_keys(config)},
                        {k: config.get(k) for k in _global_keys(old) + _global_keys(config)})
        if diff:
            raise RunError(
                f"{run_dir} holds a run of a different study ({'; '.join(diff[:3])}); every stage reads "
                "these keys: use another name, or delete the directory to start over"
            )
        for name, entry in manifest.get("stages", {}).items():  # runs from before per-stage configs
            entry.setdefault("config", _stage_config(name, old))
    manifest["config"] = config
    manifest.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest["models"] = facts
    manifest["versions"] = versions()
    manifest.setdefault("stages", {})
    write_json(run_dir / MANIFEST, manifest)
    ctx = RunContext(cfg, run_dir, facts, quiet)

    selected = [s for s in STAGES if s in cfg.stages and s in stages]
    stale = {}
    for name in selected:
        entry = manifest["stages"].get(name)
        reason = None if entry is None else _stale_reason(name, entry, ctx.stage_dir(name), config)
        if reason:
            stale[name] = reason
    redo = _downstream(list(force) + list(stale), stages)
    # a resumable stage (capture) whose files changed repairs itself in place; one whose config
    # changed, or that is forced, starts from an empty directory
    wipe = _downstream(list(force) + [n for n, r in stale.items() if r.startswith("config")], stages)
    for name in selected:
        if only and name not in only:
            continue
        stage = stages[name]
        done = name in manifest["stages"] and name not in stale
        if done and name not in redo:
            ctx.log(f"{name}: done ({manifest['stages'][name]['seconds']:.1f} s), skipping")
            continue
        if name in stale and manifest["stages"][name].get("status") in ("done", "skipped"):
            ctx.log(f"{name}: rerunning: {stale[name]}")
        missing = [n for n in stage.needs if n in cfg.stages
                   and (manifest["stages"].get(n, {}).get("status") not in ("done", "skipped") or n in stale)]
        if missing:
            raise RunError(f"stage {name!r} needs {missing} first; run without --only, or with --only {missing[0]}")
        ctx.log(f"{name}: running")
        t0, c0 = time.perf_counter(), cpu_time()
        out_dir = ctx.stage_dir(name)
        status = "done"
        if stage.resumable:
            if name in wipe and out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            try:
                summary = stage.run(ctx, out_dir)
            except StageSkipped as e:  # e.g. capture with models that have no weights
                status, summary = "skipped", {"reason": str(e)}
                write_json(out_dir / "skipped.json", summary)
        else:
            partial = run_dir / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                with _show_as(partial, out_dir):
                    summary = stage.run(ctx, partial)
            except StageSkipped as e:
                status, summary = "skipped", {"reason": str(e)}
                shutil.rmtree(partial)
                partial.mkdir()
                write_json(partial / "skipped.json", summary)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(partial, out_dir)
        seconds, cpu = time.perf_counter() - t0, cpu_time() - c0
        manifest["stages"][name] = {
            "status": status, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "summary": summary,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": _stage_config(name, config), "files": _files(out_dir),
        }
        stale.pop(name, None)
        write_json(run_dir / MANIFEST, manifest)
        ctx.log(f"{name}: {status} in {seconds:.1f} s" + (f" ({summary['reason']})" if status == "skipped" else ""))
    write_json(run_dir / MANIFEST, manifest)
    return run_dir


def cpu_time() -> float:
    """CPU seconds of this process and of its finished worker processes (the probes' forks)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


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
