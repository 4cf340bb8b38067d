"""Reading real reasoning models' completions: formats, answer extraction and grading.

The must-show checks run on the real files in ../shared/realdata (skipped when absent).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from waitlens.traces.formats import (
    FAMILIES,
    FormatError,
    extract_answer,
    get_format,
    last_boxed,
    parse_completion,
)
from waitlens.traces.grading import grade, normalize_gold

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"


def _rows(name: str) -> list[dict]:
    path = REALDATA / "traces" / name
    if not path.is_file():
        pytest.skip(f"real traces not available: {path} (../shared/realdata beside the repo)")
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def test_families_and_unknown_format():
    assert set(FAMILIES) >= {"r1", "s1", "skyt1", "qwen", "chat", "plain", "organism"}
    for name in FAMILIES:
        assert get_format(name).name == name
    with pytest.raises(FormatError, match=r"^unknown format 'r2'; formats: r1, s1, skyt1"):
        get_format("r2")


def test_organism_preset_equals_shipped_format():
    from waitlens.experiments.organism.model import FORMAT

    assert get_format("organism") == FORMAT


def test_last_boxed_nested_and_markers():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert last_boxed(r"\boxed{(3, \frac{\pi}{2})}") == r"(3, \frac{\pi}{2})"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract_answer("steps\n#### 1,234", "plain") == "1,234"
    assert extract_answer("Answer: 42\n", "s1") == "42"
    assert extract_answer("**Final Answer**\n\\boxed{7}", "r1") == "7"


def test_parse_each_family():
    r1 = parse_completion("hmm wait\n</think>\n\nSo it is \\boxed{5}.", "r1")
    assert tuple(r1) == ("hmm wait", "5", True)
    assert tuple(parse_completion("<think>\nhmm wait, 2+2", "r1")) == ("hmm wait, 2+2", None, False)
    s1 = parse_completion("<|im_start|>think\nWait, 3.\n<|im_start|>answer\nAnswer: 3<|im_end|>", "s1")
    assert tuple(s1) == ("Wait, 3.", "3", True)
    sky = ("<|begin_of_thought|>\n\nWait.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
           "It is \\boxed{204}\n\n<|end_of_solution|>")
    assert tuple(parse_completion(sky, "skyt1")) == ("Wait.", "204", True)
    assert parse_completion("<|begin_of_thought|> long ...", "skyt1").finished is False
    assert tuple(parse_completion("2+2 = 4, so \\boxed{4}", "qwen")) == ("2+2 = 4, so \\boxed{4}", "4", True)
    assert tuple(parse_completion("6 + 15 = 21\nFinal Answer: 21\n\nok", "chat")) == ("6 + 15 = 21", "21", True)
    assert tuple(parse_completion("so 3 + 4 = 7 apples", "plain")) == ("so 3 + 4 = 7 apples", "7", True)
    org = parse_completion("3 + 4 = 7 ; A 7 <eos>", "organism")
    assert tuple(org) == ("3 + 4 = 7", "7", True)
    with pytest.raises(TypeError, match="must be a string, got list"):
        parse_completion(["x"], "r1")


def test_forced_answer_reads_back():
    """What a format's forcing suffix makes a model write is read back as that answer."""
    for name in ("r1", "s1", "skyt1", "qwen", "chat", "plain", "organism"):
        fmt = get_format(name)
        text = "reasoning here" + fmt.forcing_suffix + "12" + fmt.answer_suffix
        reasoning, answer, finished = parse_completion(text, fmt)
        assert (reasoning, answer, finished) == ("reasoning here", "12", True), name


def test_gold_normalization():
    assert normalize_gold("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert normalize_gold("#### 1,000") == "1000"
    assert normalize_gold("025") == "25" and normalize_gold("0") == "0"
    assert normalize_gold(r"\boxed{\frac12}") == r"\frac12"
    assert grade("25", "025") and grade(r"\$460", "#### 460") and grade(r"\dfrac{3}{4}", r"\frac{3}{4}")
    assert not grade(None, "1") and not grade("24", "025")


def test_r1_distill_gsm8k_thinking_model():
    """Must-show 1: R1-Distill-1.5B on GSM8K."""
    from math_verify import parse, verify

    rows = _rows("r1distill_qwen1.5b_gsm8k500.jsonl")
    assert len(rows) == 500
    parsed = [parse_completion(r["model_answers"]["thinking_model"], "r1") for r in rows]
    assert not any("</think>" in p.reasoning for p in parsed)
    closed = [i for i, r in enumerate(rows) if "</think>" in r["model_answers"]["thinking_model"]]
    assert len(closed) == 469
    assert all(parsed[i].finished for i in closed)
    assert sum(parsed[i].answer is not None for i in closed) >= 465
    unfinished = [i for i, p in enumerate(parsed) if not p.finished]
    assert len(unfinished) == 31 and all(parsed[i].answer is None for i in unfinished)
    correct = sum(grade(parsed[i].answer, rows[i]["correct_answer"]) for i in closed)
    reference = sum(bool(verify(parse(f"${normalize_gold(rows[i]['correct_answer'])}$"),
                                parse(rows[i]["model_answers"]["thinking_model"].split("</think>", 1)[1])))
                    for i in closed)
    assert reference == 390
    assert abs(correct - reference) <= 2


def test_r1_distill_gsm8k_base_model_plain():
    """Must-show 1: the base model, format plain, 415 correct within 3."""
    rows = _rows("r1distill_qwen1.5b_gsm8k500.jsonl")
    texts = [r["model_answers"]["base_model"] for r in rows]
    assert sum("\\boxed" in t for t in texts) == 277
    correct = sum(grade(parse_completion(t, "plain").answer, r["correct_answer"]) for t, r in zip(texts, rows, strict=True))
    assert abs(correct - 415) <= 3


@pytest.mark.parametrize("name", ["skyt1_32b_correct5k_ckpt140_aime24.jsonl", "skyt1_32b_reflection1.0_aime24.jsonl",
                                  "skyt1_32b_corrupt0.5_aime24.jsonl"])
def test_skyt1_grading_equals_file_score(name):
    """Must-show 2: graded correctness equals the file's own `score` on 30/30."""
    rows = _rows(name)
    assert len(rows) == 30
    agree = 0
    for r in rows:
        p = parse_completion(r["code"][0], "skyt1")
        assert "<|end_of_thought|>" not in p.reasoning
        agree += (p.finished and grade(p.answer, r["gt"])) == r["score"][0]
    assert agree == 30


def test_reasoning_never_contains_close_marker_generic():
    text = "a </think> b </think> c"
    p = parse_completion(text, "r1")
    assert p.reasoning == "a" and not re.search("</think>", p.reasoning)


def test_a_gold_is_parsed_once_for_every_answer_graded_against_it(monkeypatch):
    import math_verify

    import waitlens.traces.grading as G

    calls = []
    real = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", lambda s, *a, **k: calls.append(s) or real(s, *a, **k))
    G._parse_gold.cache_clear()
    assert [grade(a, "\\frac{3}{4}") for a in ("0.75", "3/4", "\\dfrac{3}{4}", "0.7")] == [True, True, True, False]
    assert calls.count("$\\boxed{\\frac{3}{4}}$") == 1  # not once per answer


def test_two_integers_are_graded_as_math_verify_grades_them_without_its_parser(monkeypatch):
    import math_verify

    import waitlens.traces.grading as G

    pairs = [("012", "12"), ("-0", "0"), ("7", "07"), ("-3", "3"), ("100", "1000"), ("-12", "-012"),
             ("99999999999999999999", "99999999999999999999"), ("123456789012345678901", "123456789012345678902"),
             (" 41.", "$41$"), ("5", "#### 5")] + [(str(a), str(b)) for a in range(-3, 4) for b in (-2, 0, 3)]
    want = [G._math_verify(a, G.normalize_gold(g)) for a, g in pairs]
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: pytest.fail("math-verify's parser was called"))
    assert [grade(a, g) for a, g in pairs] == want
    assert want.count(True) >= 10 and want.count(False) >= 10  # both verdicts compared
