"""Probe fits in forked worker processes (`experiments.parallel`) give what one process gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from waitlens.experiments.parallel import map_fork


def _square(x):
    if x == "boom":
        raise ValueError("boom item")
    return x * x


def _threads(_):
    return torch.get_num_threads()


def test_map_fork_keeps_order_and_raises_a_workers_error():
    assert map_fork(_square, range(7), workers=2) == [x * x for x in range(7)]
    assert map_fork(_square, [3], workers=4) == [9]  # one item: in this process
    assert map_fork(_threads, range(4), workers=2) == [1] * 4  # workers run torch on one thread
    with pytest.raises(ValueError, match="boom item"):
        map_fork(_square, [1, "boom", 2], workers=2)


def test_fit_stores_in_two_processes_equals_one_process(tmp_path):
    """Every table of every store's probes (results, margins, out-of-fold predictions, weights)
    is bit-identical whether the stores are fitted here or in two workers."""
    from waitlens.experiments.analyses.probe import fit_stores
    from waitlens.hooks.store import write_store
    from waitlens.probes.synthetic import planted_states

    stores = []
    for k in range(3):
        X, meta = planted_states(40, 2, 3, n_layers=3, d_model=16, planted_layer=1, signal=1.0 + k, seed=k)
        write_store(tmp_path / f"s{k}", torch.from_numpy(X), meta, {"model": f"m{k}", "lexicon": ["wait"]})
        stores.append(tmp_path / f"s{k}")
    kw = {"words": ["wait", "all"], "n_boot": 100, "threads": 1}
    one, two = fit_stores(stores, workers=1, **kw), fit_stores(stores, workers=2, **kw)
    assert [r.model for r in two] == ["m0", "m1", "m2"]
    for a, b in zip(one, two, strict=True):
        pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
        pd.testing.assert_frame_equal(a.margins, b.margins, check_exact=True)
        pd.testing.assert_frame_equal(a.oof, b.oof, check_exact=True)
        for w in a.directions:
            np.testing.assert_array_equal(a.directions[w], b.directions[w])
            np.testing.assert_array_equal(a.fold_coef[w], b.fold_coef[w])
    assert one[2].table["auroc"].max() > one[0].table["auroc"].max()  # three different fits


def test_map_fork_runs_unpicklable_functions_on_inherited_objects():
    """Workers inherit the function and the items (a closure over an object that cannot be
    pickled); only the results come back."""
    import threading

    lock = threading.Lock()  # cannot be pickled
    items = [(lock, k) for k in range(5)]
    assert map_fork(lambda it: it[1] + 1 if it[0] is lock else None, items, workers=2) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_tokens_and_answers_in_two_workers_equal_one_process(tmp_path):
    """The tokens and answers stages run each model's forwards in a forked worker on one torch
    thread: every file they write is byte-identical to one process on two threads."""
    import warnings

    from waitlens import load_model, sample_organism
    from waitlens.experiments.analyses.tokens import answers_to_dir, tokens_to_dir

    runs = []
    for spec in ("organism:sft-1k", "organism:post-large"):
        model = load_model(spec)
        runs.append((spec.split(":")[1], model, sample_organism(model, 24, seed=2, progress=False)))
    old = torch.get_num_threads()
    outs = {}
    try:
        for workers, threads in ((1, 2), (2, 1)):
            torch.set_num_threads(threads)
            d = tmp_path / f"w{workers}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokens_to_dir(runs, d / "tokens", min_count=2, n_boot=50, progress=False, workers=workers)
                answers_to_dir(runs, d / "answers", k=4, every=4, n_boot=50, progress=False, workers=workers)
            outs[workers] = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.*sv"))
                             if p.is_file()} | {p.relative_to(d).as_posix(): p.read_bytes()
                                                for p in sorted(d.rglob("*.json"))}
    finally:
        torch.set_num_threads(old)
    assert {"tokens/token_table.csv", "answers/answer_curves.csv", "answers/alignment.json"} <= set(outs[1])
    assert outs[1] == outs[2]
