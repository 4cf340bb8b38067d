"""Replicas of the real pair (s1.1 and R1-Distill-Qwen): real tokenizers, templates and special
tokens around small random weights; their agreement with TransformerLens; bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_qwen

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
R1_TRACES = REALDATA / "traces" / "r1distill_qwen1.5b_gsm8k500.jsonl"
S1, R1 = "simplescaling/s1.1-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
TOL = 1e-4


def needs_realdata():
    if not (REALDATA / "tokenizer" / "qwen2-boundless" / "vocab.json").is_file():
        pytest.skip(f"the realdata folder is not at {REALDATA} (third-party tokenizer files, see SOURCES.md)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    """The s1.1 and R1-distill replicas (built once into the cache, then reused), and a second
    load of the R1 replica (same weights, another copy)."""
    needs_realdata()
    from waitlens.experiments.analyses.replica import build_replica
    from waitlens.hooks import load_model

    s1_dir, r1_dir = build_replica(S1, seed=0), build_replica(R1, seed=1)
    load = lambda p: load_model(p, device="cpu", dtype="float32")  # noqa: E731
    return load(s1_dir), load(r1_dir), load(r1_dir)


@pytest.fixture(scope="module")
def real_trace():
    """A short real R1-Distill-Qwen-1.5B GSM8K trajectory with 'Wait' in its reasoning."""
    needs_realdata()
    from waitlens.traces.importing import import_records, read_records

    recs = read_records(R1_TRACES)[:120]
    trajs = import_records(recs, format="r1", fields={"prompt": "question", "completion": "model_answers.thinking_model",
                                                      "gold": "correct_answer"}, unfinished="drop")
    waits = [t for t in trajs if "Wait" in t.reasoning]
    return min(waits, key=lambda t: len(t.reasoning))


@pytest.mark.slow
def test_pair_same_content_tokens_different_renderings(pair, real_trace):
    from waitlens.hooks.alignment import align_content
    from waitlens.traces import find_positions

    s1, r1, _ = pair
    assert (s1.format.name, r1.format.name) == ("s1", "r1")
    # the same id means different things in the two tokenizers
    assert s1.tokenizer.convert_ids_to_tokens(151644) == "<|im_start|>"
    assert r1.tokenizer.convert_ids_to_tokens(151644) == "<｜User｜>"
    assert r1.tokenizer.convert_tokens_to_ids("<｜begin▁of▁sentence｜>") == 151646
    a, b = s1.render(real_trace), r1.render(real_trace)
    assert a.input_ids != b.input_ids and a.text != b.text
    assert a.text.startswith("<|im_start|>system\n") and b.text.startswith("<｜begin▁of▁sentence｜><｜User｜>")
    al = align_content(a, b)
    ra = a.input_ids[a.reasoning_tokens[0]:a.reasoning_tokens[1]]
    rb = b.input_ids[b.reasoning_tokens[0]:b.reasoning_tokens[1]]
    assert ra == rb and al.n_reasoning == len(ra) > 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pa, pb = find_positions(s1, [real_trace], ["wait"]), find_positions(r1, [real_trace], ["wait"])
    wa = pa.table[pa.table["word"] == "wait"]
    wb = pb.table[pb.table["word"] == "wait"]
    assert len(wa) == len(wb) >= 1
    assert (wa["token_index"] - a.reasoning_tokens[0]).tolist() == (wb["token_index"] - b.reasoning_tokens[0]).tolist()
    assert wa["surface"].tolist() == wb["surface"].tolist()


@pytest.mark.slow
def test_replica_into_itself_changes_nothing_exactly(pair, real_trace):
    from waitlens.hooks.patching import patch

    _, r1, r1_copy = pair
    metrics = ["forced_answer", "next_token_kl", "recheck"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = patch(r1_copy, r1, [real_trace], layers="all", window="-2:4", metrics=metrics)
        t = res.table
        assert set(t["metric"]) == set(metrics) and set(t["control"]) == {"none", "random"}
        assert (t["effect"] == 0).all() and (t["patched"] == t["clean"]).all()
        # re-running the identical states anyway: a tail forward cut at the last read equals the
        # clean forward up to float error only
        rerun = patch(r1_copy, r1, [real_trace], layers="all", window="0:1", metrics=metrics, control=False,
                      skip_identical=False).table
        assert rerun["effect"].abs().max() < 1e-6


@pytest.mark.slow
def test_cross_model_patching_both_directions_on_real_text(pair, real_trace):
    from waitlens.hooks.patching import patch

    s1, r1, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd = patch(r1, s1, [real_trace], window="0:0", metrics=["forced_answer", "next_token_kl", "recheck"],
                    control=False)
        back = patch(s1, r1, [real_trace], window="0:0", metrics=["forced_answer", "next_token_kl", "recheck"],
                     control=False)
    for res in (fwd, back):
        t = res.table
        assert set(t["metric"]) == {"forced_answer", "next_token_kl", "recheck"}
        assert (t.loc[t["metric"] == "next_token_kl", "effect"] > 0).all()  # different prompts: different states
    # aligned on content: the same reasoning offset in both directions
    off = lambda res, m: (res.table["position"] - m.render(real_trace).reasoning_tokens[0]).tolist()  # noqa: E731
    assert off(fwd, s1) == off(back, r1)


@pytest.mark.slow
def test_replica_agrees_with_transformerlens(pair, real_trace, tmp_path):
    """Forward, capture and forced-answer probabilities vs the TransformerLens bridge (fp32)."""
    from waitlens.hooks import answer_probabilities, capture_residuals
    from waitlens.hooks.answer import suffix_tokens
    from waitlens.traces import find_positions

    _, r1, _ = pair
    ids = r1.tokenize(real_trace)[None]
    bridge = r1.bridge
    with torch.inference_mode():
        hf_logits = r1.hf(input_ids=ids).logits[0]
        tl_logits = bridge(ids)[0]
    assert (hf_logits - tl_logits).abs().max().item() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pos = find_positions(r1, [real_trace], ["wait", "so"])
    store = capture_residuals(r1, [real_trace], pos, tmp_path / "s", layers="all", progress=False)
    names = [f"blocks.{layer}.hook_resid_post" for layer in store.layers]
    idx = store.metadata["token_index"].tolist()
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(ids, names_filter=names, pos_slice=idx)
    states = store.states()
    for j, name in enumerate(names):
        assert (states[:, j] - cache[name][0]).abs().max().item() <= TOL
    rd = r1.render(real_trace, include_answer=False)
    t0, t1 = rd.reasoning_tokens
    prefixes = [t0 + 5, (t0 + t1) // 2, t1]
    curve = answer_probabilities(r1, real_trace, prefixes)
    st = suffix_tokens(r1, real_trace.gold)
    for p, got in zip(prefixes, curve["gold_logprob"], strict=True):
        seq = torch.tensor([rd.input_ids[:p] + st.forcing + st.answer])
        with torch.inference_mode():
            lp = torch.log_softmax(bridge(seq)[0].float(), -1)
        first = p + len(st.forcing) - 1
        ref = sum(float(lp[first + j, tok]) for j, tok in enumerate(st.answer))
        assert abs(ref - got) <= TOL, (p, ref, got)


@pytest.mark.slow
def test_target_logprobs_equal_the_full_head(pair, real_trace, monkeypatch):
    """The LM head read a few rows at a time (151k vocabulary: several chunks, a short last one)
    equals row_logprobs on all rows, on both paths (reused buffers; any other head)."""
    import waitlens.hooks.logprobs as L

    _, r1, _ = pair
    ids = r1.tokenize(real_trace)[None]
    with torch.inference_mode():
        hidden = r1.hf.base_model(input_ids=ids).last_hidden_state[0]
        tgt = ids[0, 1:]
        full = L.row_logprobs(r1, hidden[:-1]).gather(1, tgt[:, None])[:, 0]
        n, vocab = len(tgt), r1.hf.get_output_embeddings().weight.shape[0]
        assert n % (L.HEAD_CHUNK // vocab) and n > 2 * (L.HEAD_CHUNK // vocab)
        fast = L.target_logprobs(r1, hidden[:-1], tgt)
        lp_full = L.row_logprobs(r1, hidden[:-1])
        _, top_id, top_lp = L.head_logprobs(r1, hidden[:-1], top=True)
        assert top_id.tolist() == lp_full.argmax(-1).tolist()
        assert (top_lp - lp_full.max(-1).values).abs().max().item() <= 1e-6
        monkeypatch.setattr(L.torch.nn, "Linear", type("NotLinear", (), {}))  # forces the generic path
        generic = L.target_logprobs(r1, hidden[:-1], tgt)
    assert fast.shape == generic.shape == (n,)
    assert (fast - full).abs().max().item() <= 1e-5 and (generic - full).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_forced_answers_read_the_head_in_chunks_as_whole(pair, real_trace, monkeypatch):
    """answer_curves reads the LM head a chunk of rows at a time (151k vocabulary: 55 rows per
    chunk); the curves equal those of one whole [rows, vocab] log-softmax within 1e-6, with the
    same greedy answers."""
    import waitlens.hooks.answer as A
    import waitlens.hooks.logprobs as L

    _, r1, _ = pair
    rd = r1.render(real_trace, include_answer=False)
    every = 2
    got = A.answer_curves(r1, [real_trace], every=every, max_answer_tokens=3)
    assert len(got) > 2 * (L.HEAD_CHUNK // r1.hf.get_output_embeddings().weight.shape[0])  # several chunks

    def whole(model, hidden, targets=None, *, top=False):
        lp = L.row_logprobs(model, hidden)
        t = lp.gather(1, targets[:, None])[:, 0] if targets is not None else None
        return (t, lp.argmax(-1), lp.max(-1).values) if top else (t, None, None)

    monkeypatch.setattr(A, "head_logprobs", whole)
    ref = A.answer_curves(r1, [real_trace], every=every, max_answer_tokens=3)
    assert list(got["prefix"]) == list(ref["prefix"]) and rd.reasoning_tokens[1] in set(got["prefix"])
    assert list(got["top_answer"]) == list(ref["top_answer"])
    for c in ("gold_logprob", "top_logprob", "gold_prob", "top_prob"):
        assert (got[c] - ref[c]).abs().max() <= 1e-6, c


@pytest.mark.slow
def test_replica_directory_loads_with_provenance(pair):
    from waitlens.hooks.replica import replica_info

    s1, r1, _ = pair
    for m, of in ((s1, S1), (r1, R1)):
        info = replica_info(m.source_dir)
        assert info["replica_of"] == of and info["random_weights"] is True
        assert (m.n_layers, m.d_model, m.config.model_type) == (2, 64, "qwen2")
        assert m.config.vocab_size >= len(m.tokenizer)
    gen = r1.hf.generation_config  # R1's generation_config.json: bos 151646, eos 151643
    assert (gen.bos_token_id, gen.eos_token_id) == (151646, 151643)


# -- bad input (fast: a tiny tokenizer) -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny-src") / "m")


def _no_leftovers(parent: Path):
    return not [p for p in parent.iterdir() if ".partial" in p.name]


def test_replica_of_a_local_model_dir(tiny_dir, tmp_path):
    from waitlens.hooks import load_model
    from waitlens.hooks.replica import replica

    out = replica(tiny_dir, tmp_path / "rep", n_layers=2, d_model=32, seed=3)
    m = load_model(out, device="cpu")
    assert (m.n_layers, m.d_model) == (2, 32)
    again = replica(tiny_dir, tmp_path / "rep", n_layers=2, d_model=32, seed=3)  # same key: reused
    assert again == out


def test_bad_architecture_is_one_line(tiny_dir, tmp_path):
    from waitlens.hooks.replica import ReplicaError, replica

    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReplicaError, match="transformers cannot build a model of type 'no-such-arch'") as e:
        replica(src / "config.json", tmp_path / "out", tokenizer=tiny_dir)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_chat_template_that_does_not_render(tiny_dir, tmp_path):
    from waitlens.hooks.replica import ReplicaError, replica

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ReplicaError, match="bad.jinja: the chat template does not render") as e:
        replica(tiny_dir, tmp_path / "out", chat_template=bad)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_tokenizer_dir_without_vocabulary(tiny_dir, tmp_path, capsys):
    from waitlens.experiments.cli import main
    from waitlens.hooks.replica import ReplicaError, replica

    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ReplicaError, match="no tokenizer.json, and no vocab.json"):
        replica(tiny_dir, tmp_path / "out", tokenizer=empty)
    rc = main(["replica", str(tiny_dir), "--out", str(tmp_path / "out"), "--tokenizer", str(empty)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("waitlens replica: error:") and "\n" not in err
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)
