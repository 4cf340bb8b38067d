"""The traces layer: trajectory files (and their errors), grading, lexicon, positions —
positions on SmolLM2's real BPE tokenizer (variants, multi-token words, no false hits)."""

from __future__ import annotations

import json
import warnings

import pytest

from waitlens.traces import (
    Lexicon,
    Trajectory,
    TrajectoryFileError,
    control_positions,
    find_positions,
    grade,
    load_trajectories,
    save_trajectories,
)

GOOD = {"id": "a", "problem_id": "p", "prompt": "Q", "reasoning": "wait", "answer": "1", "gold": "1"}


def write_lines(path, *lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# -- files ------------------------------------------------------------------------------------
def test_round_trip_and_grading_of_missing_correct(tmp_path):
    f = write_lines(tmp_path / "t.jsonl", GOOD, "", {**GOOD, "id": "b", "answer": "2", "extra_key": [1]},
                    {**GOOD, "id": "c", "answer": "2", "correct": True})
    ts = load_trajectories(f)
    assert [t.id for t in ts] == ["a", "b", "c"]
    assert [t.correct for t in ts] == [True, False, True]  # graded, graded, as given
    assert ts[1].extra == {"extra_key": [1]}
    again = load_trajectories(save_trajectories(ts, tmp_path / "u.jsonl"))
    assert [t.to_dict() for t in again] == [t.to_dict() for t in ts]


@pytest.mark.parametrize("lines,msg", [
    ([GOOD, "{not json"], r"t\.jsonl:2: not valid JSON"),
    ([GOOD, {**GOOD, "id": "b"}, {k: v for k, v in GOOD.items() if k != "prompt"}],
     r"t\.jsonl:3: missing key\(s\) \['prompt'\]"),
    ([GOOD, GOOD], r"t\.jsonl:2: duplicate trajectory id 'a' \(first on line 1\)"),
    ([{**GOOD, "correct": "yes"}], r"t\.jsonl:1: key 'correct' must be true, false or absent"),
    ([{**GOOD, "reasoning": 3}], r"t\.jsonl:1: key 'reasoning' must be a string"),
    (["[1, 2]"], r"t\.jsonl:1: expected a JSON object"),
    ([""], r"no trajectories"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, msg):
    f = write_lines(tmp_path / "t.jsonl", *lines)
    with pytest.raises(TrajectoryFileError, match=msg):
        load_trajectories(f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="trajectory file not found"):
        load_trajectories(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("answer,gold,ok", [
    ("42", "42", True), (" 42. ", "42", True), ("$42$", "42", True), ("41", "42", False),
    ("\\boxed{\\frac{1}{2}}", "0.5", True), ("1/2", "\\frac{1}{2}", True), ("x = 3", "3", True),
    ("the answer is banana", "42", False),
])
def test_grade(answer, gold, ok):
    assert grade(answer, gold) is ok


def test_grade_modes():
    assert grade("1/2", "0.5", mode="exact") is False
    with pytest.raises(ValueError, match="grading mode"):
        grade("1", "1", mode="fuzzy")


# -- lexicon ----------------------------------------------------------------------------------
def test_lexicon_whole_words_any_case_and_phrases():
    lex = Lexicon(["wait", "so", "let me check", "check"])
    text = "Wait, so... awaits also WAIT; let  me\ncheck. checked So-so so-called -so"
    got = [(m.word, m.surface) for m in lex.finditer(text)]
    assert got == [("wait", "Wait"), ("so", "so"), ("wait", "WAIT"), ("let me check", "let  me\ncheck")]
    with pytest.raises(ValueError, match="empty"):
        Lexicon([])
    assert Lexicon.parse("Wait, so").words == ("wait", "so")


# -- positions on SmolLM2's tokenizer ---------------------------------------------------------
REASONING = ("Wait, the sum is 7. Let me wait a moment. WAIT. Alternatively, we could check "
             "whether 7 awaits also a proof; alternatively it is prime. Hmm, done.")


@pytest.mark.slow
def test_positions_on_smollm2(smollm2):
    t = Trajectory("t", "p", "Is 7 prime?", REASONING, "yes", "yes", True)
    pos = find_positions(smollm2, [t], ["wait", "alternatively", "hmm", "so"], anchor="both")
    tab = pos.table
    rd = smollm2.render(t)
    assert rd.input_ids == smollm2.tokenize(t).tolist()
    surfaces = tab.drop_duplicates("char_start")["surface"].tolist()
    assert surfaces == ["Wait", "wait", "WAIT", "Alternatively", "alternatively", "Hmm"]  # not awaits/also
    assert set(tab["word"]) == {"wait", "alternatively", "hmm"}
    for _, r in tab.iterrows():
        # the span's tokens decode to (a piece of text containing) exactly this occurrence
        span = smollm2.tokenizer.decode(rd.input_ids[r.span_start:r.span_end]).strip()
        assert span.lower().startswith(r.surface.lower()) and r.surface == rd.text[r.char_start:r.char_end]
        assert r.span_start <= r.token_index < r.span_end
        assert r.rel_index == r.token_index - rd.reasoning_tokens[0] and 0 <= r.frac < 1
    wait_caps = tab[tab["surface"] == "WAIT"]
    assert wait_caps["span_end"].iloc[0] - wait_caps["span_start"].iloc[0] == 2  # " WA" + "IT"
    assert sorted(wait_caps["anchor"]) == ["first", "last"]  # anchor="both": two rows
    first = find_positions(smollm2, [t], ["wait"], anchor="first").table
    last = find_positions(smollm2, [t], ["wait"], anchor="last").table
    assert (last["token_index"] - first["token_index"]).tolist() == [0, 0, 1]
    ctrl = control_positions(smollm2, [t], pos, seed=0).table
    assert len(ctrl) == len(tab) and set(ctrl["word"]) == {"<control>"}
    taken = {i for s, e in zip(tab["span_start"], tab["span_end"], strict=True) for i in range(s, e)}
    assert not taken & set(ctrl["token_index"])


@pytest.mark.slow
def test_no_match_warns_and_gives_empty_table(smollm2):
    t = Trajectory("t", "p", "Q", "The weights await us, also the bonus.", "1", "1", True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pos = find_positions(smollm2, [t], ["wait", "so"])
    assert len(pos) == 0 and any("no lexicon word" in str(x.message) for x in w)


def _word_tokenizer():
    """A word-level fast tokenizer (whitespace split), like the organism's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<bos>", "<eos>", "<unk>", "Q", "A", ";", "=", "+", "-", "wait", "so"] + [str(i) for i in range(10)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


ORG_FMT = {"name": "org", "prompt_sep": " ", "think_close": " ; ", "answer_prefix": "A ", "answer_suffix": " <eos>"}


@pytest.mark.slow
def test_find_positions_linear_on_10mb_reasoning():
    """#15 item 6: 10 MB of reasoning in under 10 s of CPU (it never finished before)."""
    import time

    tok = _word_tokenizer()
    unit = "3 + 4 = 7 ; wait 7 - 1 = 6 ; "
    text = unit * (10_000_000 // len(unit))
    traj = Trajectory("t", "p", "Q 3 + 4", text, "6", "6", True)
    t0 = time.process_time()
    pos = find_positions(tok, [traj], ["wait"], format=ORG_FMT)
    assert time.process_time() - t0 < 10
    assert len(pos) == text.count("wait")
    first = pos.table.iloc[[0, -1]]
    rd_ids = tok(traj.prompt, add_special_tokens=False)["input_ids"]
    n_head = 1 + len(rd_ids)  # <bos> and the prompt's words
    per_unit = len(unit.split())
    assert list(first["token_index"]) == [n_head + 6, n_head + 6 + per_unit * (len(pos) - 1)]  # 7th word


def test_context_length_reported_before_the_search(monkeypatch):
    """#15 item 6: a trajectory longer than the model's context is an error before any search,
    and a long one stops tokenizing as soon as it is too long."""
    import time

    import waitlens.traces.positions as P
    from waitlens.traces.formats import get_format
    from waitlens.traces.tokenizers import ContextLengthError, TokenizerModel

    model = TokenizerModel("tiny-ctx", _word_tokenizer(), get_format(ORG_FMT), n_ctx=100)
    short = Trajectory("s", "p", "Q 1", "1 + 1 = 2 ; wait", "2", "2", True)
    long = Trajectory("l", "p", "Q 1", "1 + 1 = 2 ; wait " * 30, "2", "2", True)
    huge = Trajectory("h", "p", "Q 1", "1 + 1 = 2 ; wait " * 700_000, "2", "2", True)

    def no_search(*a, **k):
        raise AssertionError("searched before checking the length")

    monkeypatch.setattr(P, "_rows_for", no_search)
    monkeypatch.setattr(P, "_rows_chunked", no_search)
    with pytest.raises(ContextLengthError, match=r"^trajectory 'l' has \d+ tokens, more than the context of tiny-ctx \(100 tokens\)"):
        find_positions(model, [long, short], ["wait"])
    t0 = time.process_time()
    with pytest.raises(ContextLengthError, match="trajectory 'h'"):
        find_positions(model, [huge], ["wait"])
    assert time.process_time() - t0 < 2  # 12 MB: only its first chunks are tokenized


def test_a_match_on_the_unknown_token_is_left_out_with_a_warning():
    """A word-level vocabulary (the organism's) has "wait" but not "Wait" or "wait,": such a
    match would put a `wait` row on `<unk>`, whose state means any unknown word."""
    from waitlens.hooks import load_model

    model = load_model("organism:post-large")
    t = Trajectory("t", "p", "Q 3 + 7 - 8 ;", "3 + 7 = 1 Wait 3 + 7 = 0 wait 0 - 8 = 2 wait, so", "2", "2")
    with pytest.warns(UserWarning, match=r"left out 2 lexicon match\(es\) that tokenize to the unknown token '<unk>'"):
        pos = find_positions(model, [t])
    from waitlens.traces.formats import render

    ids = render(model.tokenizer, t, model.format).input_ids
    assert sorted(pos.table["word"]) == ["so", "wait"]
    assert model.tokenizer.unk_token_id not in [ids[i] for i in pos.table["token_index"]]
    assert not pos.table.duplicated(["trajectory_id", "token_index"]).any()


def test_encodings_are_remembered_per_tokenizer_and_forgotten_when_it_changes(monkeypatch):
    """A second tokenization of a text is the memo's: equal fresh lists; added tokens empty the
    memo (the text tokenizes anew); the oldest encodings go past MEMO_TOKENS."""
    import waitlens.traces.formats as F

    tok = _word_tokenizer()
    text = "Q 3 + 4 ; wait 7 - 1 = 6 so 6 <eos>"
    calls = {"n": 0}
    real_call = type(tok).__call__

    def counting(self, *a, **k):
        calls["n"] += 1
        return real_call(self, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", counting)
    ids, offs = F.tokenize_with_offsets(tok, text)
    again = F.tokenize_with_offsets(tok, text)
    assert calls["n"] == 1 and again == (ids, offs) and again[0] is not ids
    assert all(type(o) is tuple and all(type(x) is int for x in o) for o in again[1])
    again[0].append(-1)  # a caller's list is its own
    assert F.tokenize_with_offsets(tok, text)[0] == ids
    tok.add_tokens(["check"])
    assert F.tokenize_with_offsets(tok, text + " check")[0][-1] == tok.convert_tokens_to_ids("check")
    assert F.tokenize_with_offsets(tok, text) == (ids, offs) and calls["n"] == 3  # tokenized anew
    monkeypatch.setattr(F, "MEMO_TOKENS", len(ids) + F._ENTRY)  # room for one encoding
    F.tokenize_with_offsets(tok, "Q 1")
    F.tokenize_with_offsets(tok, text)
    assert calls["n"] == 5 and list(F._MEMOS[tok]) == [text]
