"""The activation store on its own: write/read round trips, dtypes, selection, refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from waitlens.hooks import (
    ActivationStore,
    IncompleteStoreError,
    StoreError,
    open_store,
    write_store,
)


def synthetic(n=10, layers=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, layers, d, generator=g)
    meta = pd.DataFrame({
        "trajectory_id": [f"{i // 2:02d}" for i in range(n)],  # numeric-looking ids stay strings
        "problem_id": [f"{i // 4}" for i in range(n)],
        "word": ["wait" if i % 3 else "so" for i in range(n)],
        "token_index": np.arange(n) + 5,
        "rel_index": np.arange(n),
        "frac": np.linspace(0, 1, n),
        "correct": [bool(i % 2) for i in range(n)],
    })
    return states, meta


def test_round_trip_exact_and_typed(tmp_path):
    states, meta = synthetic()
    store = write_store(tmp_path / "s", states, meta, {"model": "toy", "lexicon": ["wait", "so"], "layers": [0, 2, 5]})
    store = open_store(tmp_path / "s")
    got, m = store.states(), store.meta
    assert got.dtype == torch.float32 and torch.equal(got, states)
    assert m["trajectory_id"].tolist() == meta["trajectory_id"].tolist()  # "00" not 0
    assert m["problem_id"].tolist() == meta["problem_id"].tolist()
    assert m["correct"].dtype == bool and m["correct"].tolist() == meta["correct"].tolist()
    assert m["row"].tolist() == list(range(10)) and set(m["model"]) == {"toy"}
    assert store.layers == [0, 2, 5] and store.d_model == 8 and store.hook == "resid_post"
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["format"] == "waitlens-activations/1" and man["complete"] and man["n_positions"] == 10
    assert {"torch", "transformers", "transformer_lens", "waitlens"} <= set(man["versions"])
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_storage_dtype_reads_back_float32(tmp_path, dtype, tol):
    states, meta = synthetic()
    store = write_store(tmp_path / "s", states, meta, {"model": "toy"}, dtype=dtype)
    assert store.manifest["dtype"] == dtype
    got = store.states()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, states, atol=tol * 4, rtol=tol)
    assert store.states(dtype=torch.float16).dtype == torch.float16


def test_states_subsets_and_select(tmp_path):
    states, meta = synthetic()
    store = write_store(tmp_path / "s", states, meta, {"model": "toy", "layers": [0, 2, 5], "lexicon": ["wait", "so"]})
    assert torch.equal(store.states(layers=[5, 0], rows=[7, 1]), states[[7, 1]][:, [2, 0]])
    s, m = store.select(words=["so"], layers=2, correct=True)
    want = meta.index[(meta["word"] == "so") & meta["correct"]].to_numpy().copy()
    assert torch.equal(s, states[want][:, [1]]) and m["row"].tolist() == want.tolist()
    assert list(m.index) == list(range(len(m)))
    with pytest.raises(ValueError, match="layer.*not in this store"):
        store.states(layers=[1])
    with pytest.raises(ValueError, match="word.*not in this store"):
        store.select(words=["hmm"])
    with pytest.raises(ValueError, match="holds model 'toy'"):
        store.select(model="other")
    with pytest.raises(IndexError):
        store.states(rows=[10])


def test_empty_store(tmp_path):
    states, meta = synthetic(n=0)
    store = write_store(tmp_path / "s", states, meta, {"model": "toy"})
    got, m = open_store(store.path).states(), open_store(store.path).meta
    assert got.shape == (0, 3, 8) and len(m) == 0


def test_refusals(tmp_path):
    states, meta = synthetic()
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path / "nothing")
    with pytest.raises(ValueError, match="lacks column"):
        write_store(tmp_path / "a", states, meta.drop(columns=["frac"]))
    with pytest.raises(ValueError, match="rows"):
        write_store(tmp_path / "a", states[:3], meta)
    with pytest.raises(ValueError, match="storage dtype"):
        write_store(tmp_path / "a", states, meta, dtype="int8")
    assert not (tmp_path / "a").exists()
    write_store(tmp_path / "b", states, meta)
    with pytest.raises(FileExistsError):
        write_store(tmp_path / "b", states, meta)
    man_path = tmp_path / "b" / "manifest.json"
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps({**man, "complete": False}))
    with pytest.raises(IncompleteStoreError, match="interrupted.*rerun"):
        open_store(tmp_path / "b")
