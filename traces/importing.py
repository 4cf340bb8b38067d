"""Importing other people's reasoning traces as graded waitlens trajectories.

A record is any JSON object; `fields` maps each trajectory field to a dotted path into it
(``model_answers.thinking_model``; a list on the way, or at the end, takes its first element):

- ``prompt``, ``gold``: required;
- ``completion``: the model's raw output, split into reasoning and answer by the format
  (`traces.formats.parse_completion`); or, for data that is already split (s1K-1.1's
  ``deepseek_thinking_trajectory`` / ``deepseek_attempt``), ``reasoning`` and ``answer``
  (the attempt text, from which the final answer is extracted the same way);
- ``id``, ``problem_id``: optional (default: the record's index).

The raw completion is kept in ``extra["completion"]``, and whether the reasoning was closed in
``extra["finished"]``: an unfinished (truncated) trajectory has no answer and is not graded
as if it had answered (``correct = False``; `unfinished="drop"` leaves it out). The gold is
normalised (GSM8K's ``#### 18`` becomes ``18``; the original is kept in ``extra["gold_raw"]``).

Bad input raises `ImportRecordsError`, one line naming the record number and the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from waitlens.traces.errors import WaitlensError
from waitlens.traces.formats import extract_answer, get_format, parse_completion, reader_for
from waitlens.traces.grading import grade, normalize_gold
from waitlens.traces.trajectory import (
    Trajectory,
    TrajectoryFileError,
    iter_jsonl,
    save_trajectories,
)

FIELD_NAMES = ("prompt", "completion", "reasoning", "answer", "gold", "id", "problem_id")
UNFINISHED = ("keep", "drop")
_MISSING = object()


class ImportRecordsError(WaitlensError):
    """Records that cannot be imported; the message names the file, record and path."""


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted `path` in `obj`; a list takes its first element. Raises KeyError
    naming the first missing part."""
    cur = obj
    for part in path.split("."):
        while isinstance(cur, list):
            if not cur:
                raise KeyError(f"{part!r} (an empty list before it)")
            cur = cur[0]
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, Mapping):
            known = ", ".join(sorted(map(str, cur))[:12])
            raise KeyError(f"{part!r} (keys there: {known})")
        else:
            raise KeyError(f"{part!r} (a {type(cur).__name__} has no fields)")
    while isinstance(cur, list) and cur:
        cur = cur[0]
    return cur


def check_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """The field mapping, checked: known names, string paths, prompt/gold and a completion or
    reasoning + answer."""
    if not isinstance(fields, Mapping):
        raise ImportRecordsError(f"fields must map trajectory fields to dotted paths, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise ImportRecordsError(f"unknown field(s) {unknown}; fields are {list(FIELD_NAMES)}")
    for k, v in fields.items():
        if not isinstance(v, str) or not v:
            raise ImportRecordsError(f"field {k!r} must be a dotted path (a non-empty string), got {v!r}")
    missing = [k for k in ("prompt", "gold") if k not in fields]
    if missing:
        raise ImportRecordsError(f"fields lack {missing} (the dotted path of each is needed)")
    if "completion" in fields and ("reasoning" in fields or "answer" in fields):
        raise ImportRecordsError("give fields.completion, or fields.reasoning and fields.answer, not both")
    if "completion" not in fields and not ("reasoning" in fields and "answer" in fields):
        raise ImportRecordsError("fields need a completion path, or both a reasoning and an answer path")
    return dict(fields)


def import_records(
    records: Iterable[Any],
    format: str = "r1",
    fields: Mapping[str, str] | None = None,
    *,
    model: str | None = None,
    source: str = "records",
    unfinished: str = "keep",
) -> list[Trajectory]:
    """Graded trajectories from records (dicts), read by format family `format`.

    `source` names the input in errors and in ``extra["source"]``; `model` goes into each
    trajectory's ``model`` and prefixes its id (``model/problem``), so several models' imports
    pool without clashes.
    """
    fmt = get_format(format)
    if unfinished not in UNFINISHED:
        raise ImportRecordsError(f"unfinished must be one of {UNFINISHED}, got {unfinished!r}")
    f = check_fields(fields or {"prompt": "prompt", "completion": "completion", "gold": "gold"})
    out: list[Trajectory] = []
    seen: dict[str, int] = {}
    for n, rec in enumerate(records, start=1):
        where = f"{source}: record {n}"

        def value(key: str, *, string: bool = True, default: Any = _MISSING, rec=rec, where=where) -> Any:
            return _value(rec, f, key, where, string=string, default=default)

        if not isinstance(rec, Mapping):
            raise ImportRecordsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        prompt = value("prompt")
        gold_raw = value("gold", string=False)
        if gold_raw is None or isinstance(gold_raw, (dict, list)):
            raise ImportRecordsError(f"{where}: gold at path {f['gold']!r} is {type(gold_raw).__name__}, not a value")
        gold_raw = str(gold_raw)
        extra: dict[str, Any] = {"format": fmt.name, "source": source, "record": n}
        if "completion" in f:
            completion = value("completion")
            parsed = parse_completion(completion, fmt)
            reasoning, answer, finished = parsed.reasoning, parsed.answer, parsed.finished
            extra["completion"] = completion
        else:
            reasoning, attempt = value("reasoning"), value("answer")
            reader = reader_for(fmt)
            answer = extract_answer(attempt, reader) if reader is not None else parse_completion(
                fmt.forcing_suffix + attempt, fmt).answer
            finished = True
            extra["attempt"] = attempt
        if not finished and unfinished == "drop":
            continue
        pid = value("problem_id", string=False, default=None) if "problem_id" in f else None
        tid = value("id", string=False, default=None) if "id" in f else None
        pid = str(pid if pid is not None else tid if tid is not None else n - 1)
        tid = str(tid if tid is not None else pid)
        if model:
            tid = f"{model}/{tid}"
        if tid in seen:
            raise ImportRecordsError(f"{where}: duplicate trajectory id {tid!r} (first in record {seen[tid]})")
        seen[tid] = n
        gold = normalize_gold(gold_raw)
        if gold != gold_raw:
            extra["gold_raw"] = gold_raw
        extra["finished"] = finished
        if finished and answer is None:
            extra["no_answer"] = True  # closed its reasoning but wrote no final answer we can find
        out.append(Trajectory(id=tid, problem_id=pid, prompt=prompt, reasoning=reasoning, answer=answer or "",
                              gold=gold, correct=bool(finished and grade(answer, gold)), model=model, extra=extra))
    if not out:
        raise ImportRecordsError(f"{source}: no trajectories imported (no records, or every one unfinished)")
    return out


def _value(rec: Any, f: Mapping[str, str], key: str, where: str, *, string: bool, default: Any) -> Any:
    """The record's value for trajectory field `key`; errors name the record and the path."""
    try:
        v = get_path(rec, f[key])
    except KeyError as e:
        if default is not _MISSING:
            return default
        raise ImportRecordsError(f"{where}: no {key} at path {f[key]!r}: missing {e.args[0]}") from None
    if string and not isinstance(v, str):
        raise ImportRecordsError(f"{where}: {key} at path {f[key]!r} is a {type(v).__name__}, not a string")
    return v


# -- reading record files ----------------------------------------------------------------------
def read_records(path: str | os.PathLike, *, split: str | None = None) -> list[Any]:
    """Records from a JSONL file, a JSON array file, a parquet file, or a Hugging Face dataset
    saved with ``save_to_disk`` (a `split` of a DatasetDict). Errors name the file and line."""
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, split)
    if not p.is_file():
        raise FileNotFoundError(f"records file not found: {p}")
    if p.suffix == ".parquet":
        return _read_parquet(p)
    return list(_iter_json_records(p))


def _iter_json_records(p: Path) -> Iterator[Any]:
    with p.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):  # a JSON array
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ImportRecordsError(f"{p}:{line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ImportRecordsError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield from data
        return
    try:  # JSONL: the trajectory reader's line reader, its errors as import errors
        for _, obj in iter_jsonl(p):
            yield obj
    except TrajectoryFileError as e:
        raise ImportRecordsError(str(e)) from None


def _read_parquet(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ImportRecordsError(f"{p}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _read_saved_dataset(p: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ImportRecordsError(f"{p}: not a dataset saved with save_to_disk ({str(e).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        if split is None or split not in ds:
            raise ImportRecordsError(f"{p}: choose a split ({sorted(ds)}), not {split!r}")
        ds = ds[split]
    return ds.to_list()


def load_hf_records(dataset: str, split: str = "train") -> list[dict]:
    """Records of a Hugging Face dataset: a local ``save_to_disk`` directory or parquet file,
    else a hub name (``simplescaling/s1K-1.1``; needs the internet or the datasets cache)."""
    p = Path(dataset).expanduser()
    if p.exists():
        return read_records(p, split=split)
    from datasets import load_dataset

    try:
        return load_dataset(dataset, split=split).to_list()
    except Exception as e:  # datasets raises many types when offline or for a bad name
        raise ImportRecordsError(f"cannot load Hugging Face dataset {dataset!r} split {split!r} "
                                 f"({str(e).splitlines()[0]})") from None


def import_file(path: str | os.PathLike, out: str | os.PathLike, *, format: str, fields: Mapping[str, str],
                model: str | None = None, unfinished: str = "keep", split: str | None = None) -> list[Trajectory]:
    """`read_records` + `import_records`, written to `out` as trajectory JSONL (atomically:
    nothing is written when any record is bad)."""
    trajs = import_records(read_records(path, split=split), format=format, fields=fields, model=model,
                           source=str(path), unfinished=unfinished)
    save_trajectories(trajs, out)
    return trajs
