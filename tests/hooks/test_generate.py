"""hooks.generate: rendering heads, batching, determinism and splitting completions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from waitlens.hooks.generate import generate, generate_trajectories, split_completion  # noqa: E402
from waitlens.traces.formats import PLAIN, PromptFormat  # noqa: E402

FMT = PromptFormat(name="organism", prompt_sep=" ", think_close=" ; ", answer_prefix="A ", answer_suffix=" <eos>")


def test_split_completion_plain_and_flexible():
    assert split_completion("3 + 4 = 7 ; 7 - 1 = 6 ; A 6", FMT) == ("3 + 4 = 7 ; 7 - 1 = 6", "6")
    assert split_completion("3 + 4 = 7 ; A 7 <eos>", FMT) == ("3 + 4 = 7", "7")
    # whitespace differs from the suffix: still found
    assert split_completion("3 + 4 = 7 ;A  7", FMT) == ("3 + 4 = 7", "7")
    assert split_completion("3 + 4 = 7 so", FMT) == ("3 + 4 = 7 so", None)
    assert split_completion("think\nAnswer: 42", PLAIN) == ("think", "42")
    # a chat model's own capitalisation, and chatter after the answer line
    from waitlens.traces.formats import CHAT

    assert split_completion("6 + 15 = 21\nFinal Answer: 21\n\nI checked it.", CHAT) == ("6 + 15 = 21", "21")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from waitlens.experiments.organism.model import FORMAT, build_model, build_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(d)
    hf = build_model(0, arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2)).eval()
    return SimpleNamespace(hf=hf, tokenizer=tok, format=FORMAT, device=torch.device("cpu"), spec="tiny")


PROMPTS = ["Q 3 + 4 - 1 ;", "Q 1 - 2 + 3 - 4 + 5 ;", "Q 0 + 0 + 0 ;"]


def test_generate_deterministic_and_batch_padding(tiny_model):
    a = generate(tiny_model, PROMPTS, max_new_tokens=12, seed=3, batch_size=3)
    b = generate(tiny_model, PROMPTS, max_new_tokens=12, seed=3, batch_size=3)
    c = generate(tiny_model, PROMPTS, max_new_tokens=12, seed=4, batch_size=3)
    assert a == b and len(a) == 3 and a != c
    assert all("<pad>" not in s and "<eos>" not in s for s in a)
    # greedy: left padding must not change what a prompt generates
    g1 = generate(tiny_model, PROMPTS, temperature=0, max_new_tokens=8, batch_size=3)
    g2 = [generate(tiny_model, [p], temperature=0, max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert g1 == g2


def test_generate_trajectories_graded(tiny_model):
    probs = [{"id": "a", "prompt": PROMPTS[0], "gold": "6"}, {"id": "b", "prompt": PROMPTS[1], "gold": "3"}]
    trajs = generate_trajectories(tiny_model, probs, 2, max_new_tokens=10, seed=0, batch_size=4)
    assert [t.id for t in trajs] == ["a-s0", "a-s1", "b-s0", "b-s1"]
    assert all(t.problem_id in ("a", "b") and t.correct in (True, False) and t.model == "tiny" for t in trajs)
    for t in trajs:  # an untrained model: malformed answers are flagged, never crash
        if t.extra.get("malformed"):
            assert t.correct is False and t.answer == ""


def test_forced_answer_is_the_greedy_continuation_after_the_suffix(tiny_model):
    from waitlens.hooks.generate import continue_texts
    from waitlens.traces.formats import render_head

    probs = [{"id": "a", "prompt": PROMPTS[0], "gold": "6"}, {"id": "b", "prompt": PROMPTS[1], "gold": "3"}]
    plain = generate_trajectories(tiny_model, probs, 2, max_new_tokens=6, seed=0, batch_size=4)
    forced = generate_trajectories(tiny_model, probs, 2, max_new_tokens=6, seed=0, batch_size=4,
                                   force_answer=True, answer_tokens=3)
    assert [t.reasoning for t in plain] == [t.reasoning for t in forced]  # same samples
    n_forced = 0
    for p, f in zip(plain, forced, strict=True):
        assert not f.extra.get("malformed")
        if p.extra.get("malformed"):
            n_forced += 1
            assert f.extra["forced_answer"] is True
            head = render_head(tiny_model.tokenizer, f.prompt, tiny_model.format)
            want = continue_texts(tiny_model, [head + f.reasoning + tiny_model.format.forcing_suffix],
                                  temperature=0, max_new_tokens=3)[0].split("\n")[0].strip()
            assert f.answer == want
        else:
            assert f.answer == p.answer and "forced_answer" not in f.extra
    assert n_forced > 0, "an untrained model with 6 new tokens should rarely answer by itself"


# -- budget forcing (s1) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def post_large():
    from waitlens.experiments.organism.sample import load

    return load("organism:post-large")


def _organism_rows(n):
    from waitlens.experiments.organism.sample import eval_problems

    return [{"id": p.id, "prompt": p.prompt, "gold": p.gold} for p in eval_problems(n, 0)]


def test_extend_thinking_inserts_exactly_one_word_at_the_recorded_offset(post_large):
    trajs = generate_trajectories(post_large, _organism_rows(60), temperature=1.0, seed=0, max_new_tokens=96,
                                  batch_size=64, extend_thinking=1, extend_word="wait")
    finished = [t for t in trajs if not t.extra.get("malformed") and not t.extra.get("forced_answer")]
    assert len(finished) >= 55
    for t in finished:
        (off,) = t.extra["forced_waits"]
        assert t.reasoning[off:off + 4] == "wait"
        assert t.reasoning[:off].endswith(" ") and t.reasoning[off + 4:].startswith(" ")
        assert t.extra["completion"].count(" ; A ") == 1  # the model's first close was dropped


def test_max_thinking_tokens_caps_the_reasoning_and_forces_the_answer(post_large):
    tok = post_large.tokenizer
    trajs = generate_trajectories(post_large, _organism_rows(40), temperature=1.0, seed=0, max_new_tokens=96,
                                  batch_size=64, max_thinking_tokens=16)
    lengths = [len(tok(t.reasoning, add_special_tokens=False)["input_ids"]) for t in trajs]
    assert max(lengths) <= 16
    capped = [t for t in trajs if t.extra.get("budget_forced")]
    assert len(capped) >= 30  # organism traces are 15-40 tokens long: most hit the cap
    assert all(t.answer != "" and not t.extra.get("malformed") for t in capped)
    assert all(t.extra["forced_waits"] == [] for t in trajs)


@pytest.mark.slow
def test_budget_forcing_on_a_real_bpe_model(smollm2):
    """SmolLM2 (a real BPE tokenizer, chat template): the cap holds token for token, and an
    extension inserts "Wait" where the model wrote its close."""
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i + 2}? End with 'Final answer: N'.", "gold": str(2 * i + 2)}
            for i in range(4)]
    capped = generate_trajectories(smollm2, rows, temperature=0, max_new_tokens=64, max_thinking_tokens=16)
    tok = smollm2.tokenizer
    assert all(len(tok(t.reasoning, add_special_tokens=False)["input_ids"]) <= 16 for t in capped)
    ext = generate_trajectories(smollm2, rows, temperature=0, max_new_tokens=96, extend_thinking=1)
    for t in ext:
        for off in t.extra["forced_waits"]:
            assert t.reasoning[off:off + 4] == "Wait"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_thinking_tokens=0), "max_thinking_tokens must be a whole number >= 1 (or absent), got 0"),
    (dict(max_thinking_tokens=2.5), "max_thinking_tokens must be a whole number >= 1 (or absent), got 2.5"),
    (dict(extend_thinking=-1), "extend_thinking must be a whole number >= 0, got -1"),
    (dict(extend_thinking=1, extend_word=" "), "extend_word must be a non-empty word, got ' '"),
])
def test_bad_budget_is_one_clear_error(tiny_model, kwargs, message):
    from waitlens.hooks.generate import BudgetError

    with pytest.raises(BudgetError) as e:
        generate_trajectories(tiny_model, [{"prompt": PROMPTS[0], "gold": "6"}], **kwargs)
    assert str(e.value) == message


def test_no_budget_is_the_plain_sampling_pass(tiny_model):
    """Without budget forcing the records are exactly what one sampling pass gives."""
    probs = [{"id": "a", "prompt": PROMPTS[0], "gold": "6"}]
    a = generate_trajectories(tiny_model, probs, 2, max_new_tokens=10, seed=1, batch_size=4)
    texts = generate(tiny_model, [PROMPTS[0]] * 2, max_new_tokens=10, seed=1, batch_size=4)
    assert [t.extra["completion"] for t in a] == texts
    assert all("forced_waits" not in t.extra for t in a)
