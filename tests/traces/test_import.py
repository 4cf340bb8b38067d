"""Importing real traces: field paths, formats, grading, sources, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from waitlens.traces import Trajectory, import_records, load_trajectories
from waitlens.traces.formats import FormatError
from waitlens.traces.importing import ImportRecordsError, get_path, import_file, read_records

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
R1_FIELDS = {"prompt": "question", "completion": "model_answers.thinking_model", "gold": "correct_answer"}


def _recs():
    return [
        {"q": "1+1?", "out": {"m": ["<think>\nWait, 2.\n</think>\n\n\\boxed{2}"]}, "gold": "#### 2", "id": 7},
        {"q": "2+2?", "out": {"m": ["hmm, 2+2 is"]}, "gold": "4", "id": 8},
    ]


FIELDS = {"prompt": "q", "completion": "out.m", "gold": "gold", "id": "id"}


def test_get_path_lists_take_first():
    assert get_path({"a": [{"b": ["x", "y"]}]}, "a.b") == "x"
    with pytest.raises(KeyError, match="'c'"):
        get_path({"a": {"b": 1}}, "a.c")


def test_import_records_split_grade_unfinished():
    trajs = import_records(_recs(), format="r1", fields=FIELDS, model="m")
    a, b = trajs
    assert isinstance(a, Trajectory) and a.id == "m/7" and a.problem_id == "7" and a.model == "m"
    assert (a.reasoning, a.answer, a.gold, a.correct) == ("Wait, 2.", "2", "2", True)
    assert a.extra["finished"] is True and a.extra["completion"].startswith("<think>")
    assert a.extra["gold_raw"] == "#### 2"
    assert (b.answer, b.correct, b.extra["finished"]) == ("", False, False)
    assert [t.id for t in import_records(_recs(), format="r1", fields=FIELDS, unfinished="drop")] == ["7"]


def test_import_pre_split_fields():
    recs = [{"question": "Q", "thinking": "Wait, so 5.", "attempt": "The answer is $\\boxed{5}$", "sol": "5"}]
    t = import_records(recs, format="s1", fields={"prompt": "question", "reasoning": "thinking",
                                                  "answer": "attempt", "gold": "sol"})[0]
    assert (t.reasoning, t.answer, t.correct) == ("Wait, so 5.", "5", True)


@pytest.mark.parametrize("recs,fields,fmt,msg", [
    (_recs(), {**FIELDS, "completion": "out.missing"}, "r1",
     r"^records: record 1: no completion at path 'out.missing': missing 'missing' \(keys there: m\)$"),
    ([{"q": "x", "out": {"m": [3]}, "gold": "1"}], FIELDS, "r1",
     r"^records: record 1: completion at path 'out.m' is a int, not a string$"),
    (_recs(), FIELDS, "r9", r"^unknown format 'r9'; formats: r1, s1"),
    (_recs(), {"prompt": "q", "gold": "gold"}, "r1", "need a completion path"),
    (_recs(), {**FIELDS, "completin": "x"}, "r1", r"unknown field\(s\) \['completin'\]"),
    ([_recs()[0], _recs()[0]], FIELDS, "r1", "record 2: duplicate trajectory id '7'"),
])
def test_import_bad_input(recs, fields, fmt, msg):
    with pytest.raises((ImportRecordsError, FormatError), match=msg):
        import_records(recs, format=fmt, fields=fields)


def test_read_records_jsonl_array_parquet_dataset(tmp_path):
    recs = _recs()
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(recs, indent=1))
    assert read_records(tmp_path / "a.jsonl") == recs == read_records(tmp_path / "b.json")
    datasets = pytest.importorskip("datasets")
    flat = [{"question": "Q1", "deepseek_thinking_trajectory": "Wait, so 3.",
             "deepseek_attempt": "**Final Answer**\n\\boxed{3}", "solution": "3"},
            {"question": "Q2", "deepseek_thinking_trajectory": "So 4.", "deepseek_attempt": "Answer: 5",
             "solution": "4"}]
    ds = datasets.Dataset.from_list(flat)
    ds.save_to_disk(str(tmp_path / "s1k"))
    ds.to_parquet(str(tmp_path / "s1k.parquet"))
    s1k = {"prompt": "question", "reasoning": "deepseek_thinking_trajectory", "answer": "deepseek_attempt",
           "gold": "solution"}
    for src in (tmp_path / "s1k", tmp_path / "s1k.parquet"):
        trajs = import_records(read_records(src), format="s1", fields=s1k)
        assert [(t.answer, t.correct) for t in trajs] == [("3", True), ("5", False)]


def test_read_records_bad_bytes_and_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ImportRecordsError, match=r"bad.jsonl:2: not UTF-8 text \(byte b'\\xff' at column 8\)$"):
        read_records(p)
    p.write_bytes(b'{"a": 1}\n{"a": \n')
    with pytest.raises(ImportRecordsError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(p)


def test_import_file_atomic(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_recs()[0]) + "\n" + json.dumps({"q": "x", "gold": "1"}) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(ImportRecordsError, match="record 2: no completion"):
        import_file(src, out, format="r1", fields=FIELDS)
    assert list(tmp_path.iterdir()) == [src]
    src.write_text(json.dumps(_recs()[0]) + "\n")
    import_file(src, out, format="r1", fields=FIELDS, model="m")
    assert load_trajectories(out)[0].correct is True


def test_import_real_r1_distill_file():
    path = REALDATA / "traces" / "r1distill_qwen1.5b_gsm8k500.jsonl"
    if not path.is_file():
        pytest.skip(f"real traces not available: {path}")
    trajs = import_records(read_records(path), format="r1", fields=R1_FIELDS, model="r1")
    assert len(trajs) == 500 and sum(t.extra["finished"] for t in trajs) == 469
    assert sum(t.correct for t in trajs) == 390


def _cli(argv, capsys):
    from waitlens.experiments.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("content,extra,msg", [
    (b'{"q": "x", "out": {"m": ["a</think>\\\\boxed{1}"]}, "gold": "1"}\n', ["--completion", "out.nope"],
     r"^waitlens import: error: .*in\.jsonl: record 1: no completion at path 'out\.nope': missing 'nope' \(keys there: m\)$"),
    (b'{"q": "x", "out": {"m": ["a"]}, "gold": "1"}\n{"q": "\xff"}\n', ["--completion", "out.m"],
     r"^waitlens import: error: .*in\.jsonl:2: not UTF-8 text \(byte b'\\xff' at column 8\)$"),
    (b'{"q": "x", "out": {"m": [{"text": "a"}]}, "gold": "1"}\n', ["--completion", "out.m"],
     r"^waitlens import: error: .*record 1: completion at path 'out\.m' is a dict, not a string$"),
    (b'{"q": "x", "out": {"m": ["a"]}, "gold": "1"}\n', ["--completion", "out.m", "--format", "deepseek"],
     r"^waitlens import: error: unknown format 'deepseek'; formats: r1, s1, skyt1, qwen, chat, plain, organism$"),
])
def test_cli_bad_input_one_line_no_output(tmp_path, capsys, content, extra, msg):
    """Must-show 5: each bad input is one line naming the problem, exit 2, no output file."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    out = tmp_path / "out" / "t.jsonl"
    argv = ["import", str(src), "--out", str(out), "--prompt", "q", "--gold", "gold"]
    if "--format" not in extra:
        argv += ["--format", "r1"]
    rc, err = _cli(argv + extra, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(msg, err), err
    assert not out.exists() and not any(p.name.startswith(".t.jsonl") for p in tmp_path.rglob("*"))


def test_cli_import_real_file(tmp_path, capsys):
    path = REALDATA / "traces" / "skyt1_32b_corrupt0.5_aime24.jsonl"
    if not path.is_file():
        pytest.skip(f"real traces not available: {path}")
    out = tmp_path / "sky.jsonl"
    rc, _ = _cli(["import", str(path), "--out", str(out), "--format", "skyt1", "--prompt", "question",
                  "--completion", "code", "--gold", "gt", "--problem-id", "idx", "--model", "corrupt"], capsys)
    assert rc == 0
    trajs = load_trajectories(out)
    rows = read_records(path)
    assert [t.correct for t in trajs] == [r["score"][0] for r in rows]
    assert trajs[0].id == "corrupt/0" and trajs[0].extra["completion"] == rows[0]["code"][0]
