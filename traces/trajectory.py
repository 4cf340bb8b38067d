"""The trajectory record and its JSONL file format.

One JSON object per line::

    {"id": "p3-s0", "problem_id": "p3", "prompt": "...", "reasoning": "...",
     "answer": "...", "gold": "...", "correct": true, "model": "..."}

`correct` and `model` are optional (`correct` is graded when absent); any extra key is kept
in `Trajectory.extra` and written back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waitlens.traces.atomic import atomic_write
from waitlens.traces.errors import WaitlensError

REQUIRED_KEYS = ("id", "problem_id", "prompt", "reasoning", "answer", "gold")
OPTIONAL_KEYS = ("correct", "model")


class TrajectoryFileError(WaitlensError):
    """A trajectory file that cannot be read; the message names the file and line."""


@dataclass
class Trajectory:
    """One graded reasoning trajectory: a prompt, the thinking text, and the final answer."""

    id: str
    problem_id: str
    prompt: str
    reasoning: str
    answer: str
    gold: str
    correct: bool | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in REQUIRED_KEYS}
        for k in OPTIONAL_KEYS:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Trajectory:
        """Build from a parsed JSON object; raises ValueError saying what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise ValueError(f"missing key(s) {missing}; required keys are {list(REQUIRED_KEYS)}")
        for k in ("prompt", "reasoning", "answer"):
            if not isinstance(obj[k], str):
                raise ValueError(f"key {k!r} must be a string, got {type(obj[k]).__name__}")
        correct = obj.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise ValueError(f"key 'correct' must be true, false or absent, got {correct!r}")
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_KEYS + OPTIONAL_KEYS}
        return cls(
            id=str(obj["id"]),
            problem_id=str(obj["problem_id"]),
            prompt=obj["prompt"],
            reasoning=obj["reasoning"],
            answer=obj["answer"],
            gold=str(obj["gold"]),
            correct=correct,
            model=obj.get("model"),
            extra=extra,
        )


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a line that is not UTF-8 or not
    JSON raises `TrajectoryFileError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with path.open("rb") as fh:  # bytes, so a line that is not UTF-8 can be named
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrajectoryFileError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def load_trajectories(path: str | os.PathLike, *, grade_missing: bool = True) -> list[Trajectory]:
    """Read a JSONL file of trajectories.

    Every line must be a valid record: a malformed line raises `TrajectoryFileError` naming
    the file, the line number and the problem; nothing is skipped silently. Blank lines are
    allowed. Trajectories without `correct` are graded against `gold` (see `traces.grade`)
    unless `grade_missing=False`. Duplicate ids are an error.
    """
    from waitlens.traces.grading import grade

    path = Path(path)
    out: list[Trajectory] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path, "trajectory"):
        try:
            traj = Trajectory.from_dict(obj)
        except ValueError as e:
            raise TrajectoryFileError(f"{path}:{lineno}: {e}") from None
        if traj.id in seen:
            raise TrajectoryFileError(
                f"{path}:{lineno}: duplicate trajectory id {traj.id!r} (first on line {seen[traj.id]})"
            )
        seen[traj.id] = lineno
        if traj.correct is None and grade_missing:
            traj.correct = grade(traj.answer, traj.gold)
        out.append(traj)
    if not out:
        raise TrajectoryFileError(f"{path}: no trajectories in file")
    return out


def save_trajectories(trajectories: Iterable[Trajectory], path: str | os.PathLike) -> Path:
    """Write trajectories as JSONL, atomically (a temp file renamed into place)."""
    lines = [json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in trajectories]
    path = atomic_write(path, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
    return path
