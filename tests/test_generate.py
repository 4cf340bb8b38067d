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
