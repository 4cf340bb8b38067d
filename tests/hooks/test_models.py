"""Model loading: every spec kind, clear errors for bad ones, and the hook points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import WORDS, make_tiny_qwen, tiny_trajectory
from waitlens.hooks import ContextLengthError, ModelLoadError, load_model
from waitlens.hooks.points import hook_name, parse_hook_name, residual_hooks, resolve_layers


def write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_model_facts_and_tokenize(tiny_model):
    assert tiny_model.n_layers == 3 and tiny_model.d_model == 32 and tiny_model.n_ctx == 4096
    assert tiny_model.hf.config._attn_implementation == "sdpa"
    assert tiny_model.format.name == "tiny"  # from the directory's waitlens_format.json
    t = tiny_trajectory()
    ids = tiny_model.tokenize(t)
    assert ids.dtype == torch.long and ids.tolist() == tiny_model.render(t).input_ids
    # the word-level tokenizer is loaded as saved: every word is its own token, none dropped
    words = tiny_model.render(t).text.split()
    assert [WORDS[i] for i in ids.tolist()] == words


@pytest.mark.parametrize("spec,msg", [
    ("/nonexistent/model", "model path not found: /nonexistent/model"),
    ("./missing.gguf", "model path not found"),
    ("nosuchfamily:v1", "unknown model family 'nosuchfamily'"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(ModelLoadError, match=msg):
        load_model(spec, device="cpu")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path), device="cpu")


def test_unsupported_gguf_architecture(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", "bogus")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'bogus' is not supported"):
        load_model(str(f), device="cpu")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(junk), device="cpu")


def test_gguf_cache_key_is_the_file_content(tmp_path, monkeypatch):
    """Copies of one GGUF at other paths and mtimes (a fresh clone's venv) share a cache entry
    and reuse a conversion already there; one changed byte is another entry."""
    import os

    from waitlens.hooks import models

    monkeypatch.setenv("WAITLENS_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB read
    a, b, c = (tmp_path / d / "m.gguf" for d in "abc")
    changed = bytearray(data)
    changed[-1] ^= 1  # in the second read
    for p, content in ((a, data), (b, data), (c, bytes(changed))):
        p.parent.mkdir()
        p.write_bytes(content)
    os.utime(b, ns=(10**9, 10**9))
    assert a.stat().st_mtime_ns != b.stat().st_mtime_ns
    target = models.gguf_cache_target(a)
    assert target == models.gguf_cache_target(b) and target.parent == tmp_path / "cache" / "gguf"
    assert models.gguf_cache_key(c) != models.gguf_cache_key(a)
    a.write_bytes(bytes(changed))  # the same path changed in place: hashed again
    os.utime(a, ns=(2 * 10**9, 2 * 10**9))
    assert models.gguf_cache_key(a) == models.gguf_cache_key(c)
    # a conversion already cached for one copy is found for another (no conversion runs)
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    g1.mkdir(), g2.mkdir()
    write_gguf(g1 / "m.gguf", "llama")
    (g2 / "m.gguf").write_bytes((g1 / "m.gguf").read_bytes())
    done = models.gguf_cache_target(g1 / "m.gguf")
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert models._gguf_to_dir(g2 / "m.gguf") == done


def test_context_length_error(tmp_path):
    m = load_model(str(make_tiny_qwen(tmp_path / "short", max_pos=16)), device="cpu", dtype="float32")
    with pytest.raises(ContextLengthError, match=r"trajectory 't0' has \d+ tokens, more than the context .*16 tokens"):
        m.tokenize(tiny_trajectory())


def test_hook_names():
    assert hook_name(3) == "blocks.3.hook_resid_post" and parse_hook_name("blocks.2.hook_resid_pre") == (2, "resid_pre")
    assert resolve_layers("all", 4) == [0, 1, 2, 3] and resolve_layers("3,0", 4) == [0, 3]
    for bad, msg in [("blocks.x.hook_resid_post", "not a residual hook name"), ("blocks.1.hook_attn", "not a residual")]:
        with pytest.raises(ValueError, match=msg):
            parse_hook_name(bad)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match="comma-separated"):
        resolve_layers("1;2", 4)


def test_hooks_can_replace_and_are_removed(tiny_model):
    ids = tiny_model.tokenize(tiny_trajectory())[None]
    with torch.inference_mode():
        bare = tiny_model.hf(ids).logits
        with residual_hooks(tiny_model, {"blocks.1.hook_resid_pre": lambda h: torch.zeros_like(h)}):
            zeroed = tiny_model.hf(ids).logits
        after = tiny_model.hf(ids).logits
    assert not torch.allclose(bare, zeroed) and torch.equal(bare, after)


@pytest.mark.slow
def test_smollm2_from_gguf(smollm2):
    assert smollm2.n_layers == 30 and smollm2.d_model == 576 and smollm2.format.name == "chat"
    assert smollm2.tokenizer("Wait", add_special_tokens=False).input_ids == [33359]
    with pytest.raises(ContextLengthError, match="more than the context"):
        smollm2.check_length(smollm2.n_ctx + 1, "long")


# -- a model split across devices (Accelerate device_map) ---------------------------------------
def _organism_trajs(n=6):
    from waitlens.experiments.organism.task import TRACE_CORPUS, make_trace, random_problem
    from waitlens.traces import Trajectory

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prob = random_problem(rng, split="eval")
        reasoning, answer, _ = make_trace(prob, TRACE_CORPUS, rng)
        out.append(Trajectory(id=f"o{i}", problem_id=prob.id, prompt=prob.prompt, reasoning=reasoning,
                              answer=answer, gold=prob.gold, correct=answer == prob.gold))
    return out


def test_device_map_split_across_two_devices():
    """The organism with its first half of blocks on the CPU and the second half offloaded to
    disk (Accelerate streams them in per forward, its own hooks around each block): capture,
    log-probs and a patching hook give what the one-device model gives (1e-5)."""
    from waitlens.hooks.capture import capture
    from waitlens.hooks.logprobs import token_logprobs_batch
    from waitlens.traces import control_positions, find_positions

    ref = load_model("organism:post-large", device="cpu", dtype="float32")
    n = ref.n_layers
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm |= {f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}
    split = load_model("organism:post-large", device_map=dm, dtype="float32")
    assert set(split.hf.hf_device_map.values()) == {"cpu", "disk"} and split.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in split.blocks[n - 1].parameters())  # really offloaded
    trajs = _organism_trajs()
    pos = find_positions(ref, trajs, ["wait", "so", "therefore"])
    pos = pos.concat(control_positions(ref, trajs, pos, seed=0))
    a, b = capture(ref, trajs, pos, batch_size=3), capture(split, trajs, pos, batch_size=3)
    assert len(a) > 10 and (a.states - b.states).abs().max().item() <= 1e-5
    for x, y in zip(token_logprobs_batch(ref, trajs), token_logprobs_batch(split, trajs), strict=True):
        np.testing.assert_allclose(x["logprob"], y["logprob"], atol=1e-5, rtol=0)
    ids = ref.tokenize(trajs[0])[None]
    swap = {f"blocks.{n - 1}.hook_resid_pre": lambda h: h.flip(1)}  # a patch on an offloaded block
    with torch.inference_mode():
        with residual_hooks(ref, swap):
            want = ref.hf(ids).logits
        with residual_hooks(split, swap):
            got = split.hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="device_map must be"):
        load_model("organism:post-large", device_map=3)


def test_a_gguf_conversion_parses_the_file_once(tmp_path):
    """While converting, transformers' loads of that file get the one reader already open and
    each tensor-name map is built once; any other file gets a reader of its own; gguf is as it
    was afterwards."""
    import gguf

    from waitlens.hooks.models import _gguf_reader, _one_gguf_parse

    f = write_gguf(tmp_path / "m.gguf", "llama")
    other = write_gguf(tmp_path / "o.gguf", "qwen2")
    real = (gguf.GGUFReader, gguf.get_tensor_name_map)
    reader = _gguf_reader(f)
    with _one_gguf_parse(f, reader):
        assert gguf.GGUFReader(str(tmp_path / "." / "m.gguf")) is reader
        assert gguf.GGUFReader(str(other)) is not reader
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == real
