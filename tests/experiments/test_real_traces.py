"""Real traces with real tokenizers: R1-distill / Qwen2 tokenization, positions on real text,
and the real-traces study. Reads ../shared/realdata (skipped with the reason when absent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from waitlens.traces import find_positions, import_records, read_records
from waitlens.traces.tokenizers import (
    R1_DISTILL_ADDED_TOKENS,
    TokenizerLoadError,
    load_tokenizer,
    r1_distill_tokenizer,
    tokenizer_model,
)

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
BPE = REALDATA / "tokenizer" / "qwen2-boundless"
R1_CONFIG = REALDATA / "tokenizer" / "deepseek-r1-distill-qwen-32b"
R1_TEMPLATE = REALDATA / "chat_templates" / "deepseek-r1-distill-qwen.current.jinja"
QWEN_TEMPLATE = REALDATA / "chat_templates" / "qwen2.5-instruct.jinja"
R1_FIELDS = {"prompt": "question", "completion": "model_answers.thinking_model", "gold": "correct_answer"}
WHOLE_WAIT = re.compile(r"(?<![\w-])wait(?![\w-])", re.IGNORECASE)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (../shared/realdata beside the repo)")
    return path


@pytest.fixture(scope="module")
def r1_model():
    _need(BPE), _need(R1_CONFIG), _need(R1_TEMPLATE)
    return tokenizer_model(R1_CONFIG, bpe=BPE, chat_template=R1_TEMPLATE, format="r1", name="r1-distill")


@pytest.fixture(scope="module")
def r1_trajectories():
    path = _need(REALDATA / "traces" / "r1distill_qwen1.5b_gsm8k500.jsonl")
    return import_records(read_records(path), format="r1", fields=R1_FIELDS, model="r1")


def test_qwen2_bpe_ids():
    tok = load_tokenizer(_need(BPE))
    assert len(tok) == 151646
    assert tok.convert_tokens_to_ids(["Wait", "ĠWait", "Ġwait", "So", "ĠAlternatively", "Hmm"]) == [
        14190, 13824, 3783, 4416, 38478, 80022]


def test_r1_distill_tokenizer_special_ids(r1_model):
    tok = r1_model.tokenizer
    for tid, content, _special, _status in R1_DISTILL_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == tid
    assert (tok.bos_token_id, tok.eos_token_id) == (151646, 151643)  # generation_config.json
    confirmed = {tid for tid, _c, _s, status in R1_DISTILL_ADDED_TOKENS if status == "confirmed"}
    assert confirmed == {151643, 151644, 151645, 151646}
    head = tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert head == "<｜begin▁of▁sentence｜><｜User｜>What is 1+1?<｜Assistant｜><think>\n"
    ids = tok(head, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [151646, 151644] and ids[-3:] == [151645, 151648, 198]  # SOURCES.md: [151646, 151644, …, 151645]
    assert r1_model.n_ctx == 131072  # config.json max_position_embeddings


def test_r1_full_response_tokenizes_like_its_prompt(r1_model):
    """The riddles file keeps the exact R1 prompt: our template renders the same head."""
    rows = read_records(_need(REALDATA / "traces" / "r1distill_qwen1.5b_reasoning_tasks50.jsonl"))
    tok = r1_model.tokenizer
    for r in rows[:5]:
        head = tok.apply_chat_template([r["original_message"]], tokenize=False, add_generation_prompt=True)
        assert r["full_response"].startswith(head.removeprefix(tok.bos_token))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match=r"^tokenizer directory not found: .*nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer.json, and no vocab.json \+ merges.txt$"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerLoadError, match=r"^chat template file not found: .*x.jinja$"):
        load_tokenizer(_need(BPE), tmp_path / "x.jinja")
    with pytest.raises(TokenizerLoadError, match="an R1-distill tokenizer config without a vocabulary"):
        load_tokenizer(_need(R1_CONFIG))
    with pytest.raises(TokenizerLoadError, match=r"^Qwen2 BPE directory not found"):
        r1_distill_tokenizer(tmp_path / "none")


def test_positions_on_real_r1_text(r1_model, r1_trajectories):
    """Must-show 3: every whole-word wait found, on the right token, none inside words."""
    tok = r1_model.tokenizer
    pos = find_positions(r1_model, r1_trajectories, ["wait"]).table
    expected = sum(len(WHOLE_WAIT.findall(t.reasoning)) for t in r1_trajectories)
    assert expected == 657 and len(pos) == expected
    by_id = {t.id: t for t in r1_trajectories}
    rendered = {tid: r1_model.render(by_id[tid]) for tid in set(pos["trajectory_id"])}
    variants = set()
    for row in pos.itertuples():
        rd = rendered[row.trajectory_id]
        assert rd.text[row.char_start: row.char_end].lower() == "wait"
        piece = tok.decode([rd.input_ids[row.token_index]])
        assert piece.strip().lower() == "wait", piece  # one token, "Wait" or " wait", never "awaits"
        s, e = rd.offsets[row.token_index]
        assert s <= row.char_start and row.char_end <= e
        before = rd.text[max(row.char_start - 3, 0): row.char_start]
        after = rd.text[row.char_end: row.char_end + 1]
        variants.add((piece, after == ",", before.endswith(".\n\n")))
    pieces = {v[0] for v in variants}
    assert {"Wait", " wait", " Wait"} <= pieces
    assert ("Wait", True, True) in variants  # ".\n\nWait," lands on "Wait" (id 14190), not ".\n\n"
    ids = {rendered[r.trajectory_id].input_ids[r.token_index] for r in pos.itertuples()}
    assert {14190, 13824, 3783} <= ids
    # no hit inside a word: the one "waiting" in these reasonings is not a position
    assert sum(len(re.findall("wait", t.reasoning, re.I)) for t in r1_trajectories) == expected + 1


def test_chunked_tokenization_equals_whole_text(r1_model, r1_trajectories, monkeypatch):
    """Long texts are tokenized in chunks; forcing that on every R1 text gives the same table."""
    import pandas as pd

    import waitlens.traces.positions as P

    words = ["wait", "so", "hmm", "alternatively", "let me check"]
    sub = r1_trajectories[:120]
    whole = {a: find_positions(r1_model, sub, words, anchor=a).table for a in ("first", "both")}
    monkeypatch.setattr(P, "LONG_TEXT", 0)
    monkeypatch.setattr(P, "CHUNK", 300)
    assert P.chunk_safe(r1_model.tokenizer)
    for a, table in whole.items():
        pd.testing.assert_frame_equal(find_positions(r1_model, sub, words, anchor=a).table, table)


def test_load_model_tokenizer_only_and_template(tmp_path):
    from tests.conftest import make_tiny_qwen
    from waitlens.hooks.models import load_model

    m = load_model(None, tokenizer=_need(BPE), chat_template=_need(QWEN_TEMPLATE), format="qwen")
    assert not m.has_weights and m.format.name == "qwen" and m.n_ctx == 32768
    assert m.render(import_records([{"p": "hi", "c": "so \\boxed{1}", "g": "1"}], format="qwen",
                                   fields={"prompt": "p", "completion": "c", "gold": "g"})[0]).text.startswith(
        "<|im_start|>system\nYou are Qwen")
    d = make_tiny_qwen(tmp_path / "tiny")
    tiny = load_model(str(d), device="cpu", chat_template=QWEN_TEMPLATE, format="plain")
    assert tiny.tokenizer.chat_template.startswith(QWEN_TEMPLATE.read_text()[:40])


# -- the real-traces study ---------------------------------------------------------------------


def _mini_config(tmp_path: Path, extra: str = "") -> Path:
    """Two weightless models on 40 R1-1.5B GSM8K records (thinking and base)."""
    src = _need(REALDATA / "traces" / "r1distill_qwen1.5b_gsm8k500.jsonl")
    small = tmp_path / "r1_40.jsonl"
    small.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    fields = '{ prompt = "question", completion = "model_answers.%s", gold = "correct_answer" }'
    cfg = tmp_path / "mini.toml"
    cfg.write_text(f'''
name = "mini"
stages = ["trajectories", "positions", "capture", "tokens", "answers", "probes", "report"]
[trajectories]
source = "jsonl"
[tokens]
n_boot = 50
min_count = 3
[patching]
source = "r1"
target = "base"
[ablations]
model = "r1"
[models.r1]
tokenizer = "{R1_CONFIG}"
bpe = "{BPE}"
chat_template = "{R1_TEMPLATE}"
format = "r1"
trajectories = {{ path = "{small}", format = "r1", unfinished = "drop", fields = {fields % "thinking_model"} }}
[models.base]
tokenizer = "{BPE}"
format = "plain"
trajectories = {{ path = "{small}", format = "plain", fields = {fields % "base_model"} }}
{extra}''')
    return cfg


def test_config_missing_realdata_path_is_one_line(tmp_path):
    from waitlens.experiments.config import ConfigError, check_models, load_config

    cfg = _mini_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(BPE), "../shared/realdata/tokenizer/no-such-bpe"))
    with pytest.raises(ConfigError, match=r"models\.r1\.bpe: not found: \.\./shared/realdata/tokenizer/no-such-bpe "
                                          r"\(looked in .*\)$") as e:
        check_models(load_config(cfg))
    assert "\n" not in str(e.value)


def test_study_imports_a_saved_hf_dataset(tmp_path):
    """source = "hf" from a dataset saved with save_to_disk (s1K-1.1's field names)."""
    datasets = pytest.importorskip("datasets")
    from waitlens.experiments.config import load_config
    from waitlens.experiments.runner import run_study
    from waitlens.experiments.study import study_stages
    from waitlens.traces import load_trajectories

    rows = [{"question": f"Q{i}", "deepseek_thinking_trajectory": "Wait, so it is 3." if i % 2 else "So 3.",
             "deepseek_attempt": f"**Final Answer**\n\\boxed{{{3 if i % 3 else 4}}}", "solution": "3"}
            for i in range(12)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "s1k"))
    cfg = tmp_path / "hf.toml"
    cfg.write_text(f'''
name = "hf"
stages = ["trajectories", "tokens"]
[trajectories]
source = "hf"
dataset = "{tmp_path / 's1k'}"
format = "s1"
fields = {{ prompt = "question", reasoning = "deepseek_thinking_trajectory", answer = "deepseek_attempt", gold = "solution" }}
[tokens]
n_boot = 20
min_count = 2
[patching]
source = "s1"
target = "s1"
[ablations]
model = "s1"
[models.s1]
tokenizer = "{_need(BPE)}"
chat_template = "{_need(QWEN_TEMPLATE)}"
format = "s1"
''')
    run = run_study(load_config(cfg), study_stages(), runs_root=tmp_path / "runs", quiet=True)
    trajs = load_trajectories(run / "trajectories" / "s1.jsonl")
    assert [t.correct for t in trajs] == [bool(i % 3) for i in range(12)]
    assert (run / "tokens" / "token_table.csv").is_file()


def test_tokens_cli_tokenizer_counts_only(tmp_path, capsys):
    """`waitlens tokens --tokenizer DIR --chat-template FILE`: counts only, token_table.csv keeps
    its columns (probabilities blank)."""
    import pandas as pd

    from waitlens.experiments.cli import main
    from waitlens.probes.tokens import TABLE_COLUMNS
    from waitlens.traces import save_trajectories

    src = _need(REALDATA / "traces" / "r1distill_qwen1.5b_gsm8k500.jsonl")
    trajs = import_records(read_records(src)[:60], format="r1", fields=R1_FIELDS, unfinished="drop")
    save_trajectories(trajs, tmp_path / "r1.jsonl")
    rc = main(["tokens", "--tokenizer", str(R1_CONFIG), "--bpe", str(BPE), "--chat-template", str(R1_TEMPLATE),
               "--format", "r1", "--name", "r1", "--trajectories", str(tmp_path / "r1.jsonl"),
               "--out", str(tmp_path / "out"), "--n-boot", "50", "--min-count", "3"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "out" / "token_table.csv")
    assert list(table.columns) == TABLE_COLUMNS and set(table["model"]) == {"r1"}
    assert table["prob_correct"].isna().all() and table["auroc"].notna().all()
    assert "r1: 'wait'" in capsys.readouterr().out
    rc = main(["tokens", "--tokenizer", str(BPE), "--model", "smollm2", "--trajectories", str(tmp_path / "r1.jsonl"),
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "one of the two" in capsys.readouterr().err
