"""Linear probes: planted recovery, controls, leakage, fast == naive, ECE, transfer, errors, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from waitlens.probes.estimator import LinearProbe
from waitlens.probes.folds import make_folds, shuffle_labels
from waitlens.probes.linear import CSV_COLUMNS, DEFAULT_CS, cross_validate, fit_layer_probes
from waitlens.probes.metrics import auroc, expected_calibration_error
from waitlens.probes.synthetic import leaky_states, planted_states
from waitlens.probes.transfer import transfer_matrix

FAST = {"n_boot": 200, "threads": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The solvers are small: on a shared CPU one thread each is much faster than two."""
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def planted():
    return planted_states(60, 2, 3, n_layers=4, d_model=32, planted_layer=2, signal=1.5, seed=0)


@pytest.fixture(scope="module")
def planted_result(planted):
    return fit_layer_probes(*planted, **FAST)


def test_planted_direction_is_recovered_at_its_layer_only(planted_result):
    t = planted_result.table.set_index("layer")
    assert list(planted_result.table.columns) == CSV_COLUMNS
    assert planted_result.best_layer() == 2
    assert t.loc[2, "auroc"] > 0.9 and t.loc[2, "auroc_lo"] > 0.85
    for layer in (0, 1, 3):
        assert abs(t.loc[layer, "auroc"] - 0.5) < 0.1
        assert t.loc[layer, "auroc_lo"] < 0.5 < t.loc[layer, "auroc_hi"] + 0.05
    # controls: random positions carry nothing, neither does position; margins CI-separated
    assert abs(t.loc[2, "control_random_auroc"] - 0.5) < 0.1
    assert abs(t.loc[2, "baseline_auroc"] - 0.5) < 0.1
    m = planted_result.margins.set_index("layer")
    assert m.loc[2, "margin_random_lo"] > 0.2 and m.loc[2, "margin_baseline_lo"] > 0.2
    assert m.loc[2, "selectivity_lo"] > 0.2
    # the probe direction (raw units) points along the planted one
    u = np.random.default_rng(12345).standard_normal(32)
    v = planted_result.directions["wait"][2]
    assert v @ u / np.linalg.norm(u) / np.linalg.norm(v) > 0.8


def test_shuffled_label_control_sits_at_chance(planted_result):
    shuffled = planted_result.table["control_shuffled_auroc"]
    assert (shuffled - 0.5).abs().max() < 0.1  # per layer: a few hundred positions
    assert abs(shuffled.mean() - 0.5) < 0.05


def test_shuffled_labels_keep_one_label_per_trajectory_and_the_balance():
    y = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    t = np.array(["a", "a", "b", "b", "c", "d", "d", "d"])
    s = shuffle_labels(y, t, seed=3)
    for tid in np.unique(t):
        assert len(set(s[t == tid])) == 1
    assert sorted(s[[0, 2, 4, 5]]) == sorted(y[[0, 2, 4, 5]])
    strata = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # a, b in one stratum; c, d in the other
    first = [0, 2, 4, 5]  # one row per trajectory
    for seed in range(5):
        s = shuffle_labels(y, t, seed=seed, strata=strata)
        assert sorted(s[first][:2]) == [0, 1] and sorted(s[first][2:]) == [0, 1]


def test_repeated_folds_come_from_the_cache_equal_and_unshared():
    from waitlens.probes import folds as folds_mod

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(30), 4).astype(str)
    y = np.repeat(rng.integers(0, 2, 30), 4)
    a = make_folds(y, groups, 5, 3, seed=2)
    a.outer[:] = -7  # a caller's edit must not reach the next caller
    a.inner[:] = -7
    b = make_folds(y.astype(float), list(groups), 5, 3, seed=2)
    fresh = folds_mod._make_folds(y, groups, 5, 3, 2)
    assert np.array_equal(b.outer, fresh.outer) and np.array_equal(b.inner, fresh.inner)
    assert np.array_equal(b.problems, fresh.problems) and (b.n_folds, b.n_inner) == (5, 3)
    other = make_folds(y, groups, 5, 3, seed=3)  # another seed is another split
    assert not np.array_equal(other.outer, b.outer)
    y2 = y.copy()
    y2[groups == "0"] = 1 - y2[groups == "0"]  # other labels: their own split, not the cached one
    assert np.array_equal(make_folds(y2, groups, 5, 3, seed=2).inner, folds_mod._make_folds(y2, groups, 5, 3, 2).inner)


def test_planted_leakage_grouped_cv_is_chance_ungrouped_is_not():
    """Requirement 2: one label per problem, near-identical states within a problem."""
    X, meta = leaky_states(40, 20, n_layers=1, d_model=64, seed=1)
    y = meta["correct"].to_numpy().astype(int)
    groups = meta["problem_id"].to_numpy()
    grouped = fit_layer_probes(X, meta, controls=False, **FAST).table.iloc[0]
    # the same probe under plain (ungrouped) stratified K-fold: every position is its own group
    ungrouped_folds = make_folds(y, np.arange(len(y)).astype(str), 5, 3, seed=0)
    assert len(set(groups[ungrouped_folds.outer == 0]) & set(groups[ungrouped_folds.outer != 0])) > 0
    oof = cross_validate(X, [y], ungrouped_folds).oof[0, :, 0]
    ungrouped = auroc(y, oof)
    assert abs(grouped["auroc"] - 0.5) < 0.15 and grouped["auroc_lo"] < 0.5
    assert ungrouped > 0.9, ungrouped


def test_fast_path_equals_naive_per_layer_loop():
    from waitlens.experiments.benchmarks.probes import naive_layer_loop

    X, meta = planted_states(30, 2, 3, n_layers=3, d_model=16, planted_layer=1, signal=1.0, controls=False)
    y = meta["correct"].to_numpy().astype(int)
    folds = make_folds(y, meta["problem_id"].to_numpy(), 4, 3)
    ys = shuffle_labels(y, meta["trajectory_id"].to_numpy())
    fast = cross_validate(X, [y, ys], folds, tol=1e-9)
    oof, chosen = naive_layer_loop(lambda li: X[:, li], 3, [y, ys], folds, DEFAULT_CS, tol=1e-10)
    assert (fast.C == chosen).all()
    assert np.abs(fast.oof - oof).max() < 1e-5
    for li in range(3):
        assert abs(auroc(y, fast.oof[0, :, li]) - auroc(y, oof[0, :, li])) < 1e-6


def test_solver_matches_sklearn_with_badly_scaled_raw_features():
    """Standardization is inside the probe: raw residual dims with wildly different scales."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scale = np.r_[np.full(4, 300.0), np.full(12, 0.01)]
    X, meta = planted_states(30, 2, 3, n_layers=1, d_model=16, planted_layer=0, signal=1.0,
                             controls=False, noise_scale=scale)
    y = meta["correct"].to_numpy().astype(int)
    folds = make_folds(y, meta["problem_id"].to_numpy(), 3, 3)
    fit = cross_validate(X, [y], folds, Cs=[0.1], tol=1e-10)
    Xs = StandardScaler().fit_transform(X[:, 0].astype(np.float64))
    sk = LogisticRegression(C=0.1, tol=1e-12, max_iter=10000).fit(Xs, y)
    raw = sk.coef_[0] / X[:, 0].astype(np.float64).std(0)
    np.testing.assert_allclose(fit.coef[-1, 0, 0], raw, rtol=1e-5, atol=1e-9)


def test_ece_of_calibrated_probabilities_is_near_zero():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = rng.uniform(size=p.size) < p
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.3, 0, 1)) > 0.2  # and not for shifted ones
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_transfer_between_copies_of_one_store_is_the_self_probe(planted, planted_result, tmp_path):
    from waitlens.hooks.store import write_store

    X, meta = planted
    write_store(tmp_path / "a", torch.from_numpy(X), meta, {"model": "a"})
    write_store(tmp_path / "b", torch.from_numpy(X), meta, {"model": "b"})
    res = transfer_matrix([tmp_path / "a", tmp_path / "b"], **FAST)
    t = res.table
    self_auc = planted_result.table.set_index("layer")["auroc"]
    for _, g in t.groupby(["train_model", "test_model"]):
        np.testing.assert_allclose(g.set_index("layer")["auroc"], self_auc, atol=1e-9)
    m = res.matrix()
    assert m.shape == (2, 2) and np.allclose(m.to_numpy(), self_auc[2])
    cos = res.cosine
    same = cos[(cos.layer_a == cos.layer_b)]
    assert np.allclose(same["cosine"], 1.0)


def test_transfer_matches_on_the_reasoning_index_across_templates(planted, planted_result):
    """B renders the same reasoning after a 7-token-longer prompt: rows match on rel_index, so
    transfer is the self-probe (token_index alone would match other tokens, or none)."""
    X, meta = planted
    shifted = meta.assign(token_index=meta["token_index"] + 7, span_start=meta["span_start"] + 7,
                          span_end=meta["span_end"] + 7)
    t = transfer_matrix([(X, meta), (X, shifted)], names=["a", "b"], **FAST).table
    self_auc = planted_result.table.set_index("layer")["auroc"]
    for _, g in t.groupby(["train_model", "test_model"]):
        np.testing.assert_allclose(g.set_index("layer")["auroc"], self_auc, atol=1e-9)
    assert set(zip(t["train_model"], t["test_model"], strict=True)) == {("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")}


def test_transfer_refuses_unmatched_positions_and_different_widths(planted):
    X, meta = planted
    other = meta.assign(trajectory_id=meta["trajectory_id"] + "-x")
    with pytest.raises(ValueError, match="same trajectories"):
        transfer_matrix([(X, meta), (X, other)], **FAST)
    with pytest.raises(ValueError, match="d_model differs"):
        transfer_matrix([(X, meta), (X[:, :, :16], meta)], **FAST)


# -- requirement 4: clear errors ----------------------------------------------------------------
def test_single_class_is_an_error(planted):
    X, meta = planted
    with pytest.raises(ValueError, match=r"single class.*both correct and incorrect"):
        fit_layer_probes(X, meta.assign(correct=True), **FAST)


def test_too_few_problems_for_the_folds_is_an_error(planted):
    X, meta = planted
    keep = meta["problem_id"].isin(["p0", "p1", "p2"]).to_numpy()
    with pytest.raises(ValueError, match=r"only 3 problem\(s\).*5-fold.*at least 5"):
        fit_layer_probes(X[keep], meta[keep], n_folds=5, **FAST)


def test_mixed_models_are_an_error_unless_said(planted):
    X, meta = planted
    mixed = meta.assign(model=np.where(np.arange(len(meta)) % 2, "organism:sft-1k", "organism:post-large"))
    with pytest.raises(ValueError, match=r"mixes positions from 2 models.*model=NAME.*allow_mixed"):
        fit_layer_probes(X, mixed, **FAST)
    one = fit_layer_probes(X, mixed, model="organism:sft-1k", controls=False, n_folds=3, **FAST)
    assert set(one.table["model"]) == {"organism:sft-1k"}
    both = fit_layer_probes(X, mixed, allow_mixed=True, controls=False, **FAST)
    assert len(both.table) == 4


def test_missing_word_is_an_error(planted):
    X, meta = planted
    with pytest.raises(ValueError, match="no graded positions of word 'so'"):
        fit_layer_probes(X, meta, words="so", **FAST)


def test_per_word_and_store_input(planted, tmp_path):
    from waitlens.hooks.store import write_store

    X, meta = planted
    meta = meta.copy()
    is_w = (meta["word"] == "wait").to_numpy()
    meta.loc[is_w & (meta["token_index"] % 2 == 0).to_numpy(), "word"] = "so"
    write_store(tmp_path / "s", torch.from_numpy(X), meta, {"model": "m", "lexicon": ["wait", "so"]})
    res = fit_layer_probes(str(tmp_path / "s"), words=["wait", "so", "all"], layers=[1, 2], **FAST)
    assert list(res.table["word"]) == ["wait", "wait", "so", "so", "all", "all"]
    assert list(res.table["layer"]) == [1, 2] * 3
    assert (res.table[res.table.layer == 2]["auroc"] > 0.85).all()


def test_linear_probe_estimator(planted):
    X, meta = planted
    w = (meta["word"] == "wait").to_numpy()
    y = meta["correct"].to_numpy()[w].astype(int)
    Xl = X[w, 2]
    probe = LinearProbe().fit(Xl[:200], y[:200], groups=meta["problem_id"].to_numpy()[w][:200])
    p = probe.predict_proba(Xl[200:])
    assert p.shape == (len(y) - 200, 2) and np.allclose(p.sum(1), 1)
    assert probe.score(Xl[200:], y[200:]) > 0.8


def test_linear_probe_is_a_scikit_learn_estimator(planted):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, GroupKFold, PredefinedSplit, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, meta = planted
    w = (meta["word"] == "wait").to_numpy()
    y = meta["correct"].to_numpy()[w].astype(int)
    g = meta["problem_id"].to_numpy()[w]
    Xl = X[w, 2]
    probe = clone(LinearProbe(Cs=(0.1, 1.0), n_inner=2))
    assert probe.get_params()["Cs"] == (0.1, 1.0) and not hasattr(probe, "coef_")
    scores = cross_val_score(LinearProbe(), Xl, y, cv=GroupKFold(5), groups=g, scoring="roc_auc")
    assert scores.shape == (5,) and scores.min() > 0.8
    assert make_pipeline(StandardScaler(), LinearProbe()).fit(Xl, y).score(Xl, y) > 0.8
    grid = GridSearchCV(LinearProbe(), {"Cs": [(0.01,), (1.0,)]}, cv=GroupKFold(3), scoring="roc_auc")
    assert grid.fit(Xl, y, groups=g).best_params_["Cs"] in [(0.01,), (1.0,)]

    # same folds, same C: the estimator and fit_layer_probes give the same per-fold AUROCs
    res = fit_layer_probes(X, meta, words="wait", layers=[2], controls=False, Cs=(1.0,), n_boot=10)
    oof = res.oof[res.oof["layer"] == 2]
    assert (oof["trajectory_id"].to_numpy() == meta["trajectory_id"].astype(str).to_numpy()[w]).all()
    folds = oof["fold"].to_numpy()
    ours = [auroc(y[folds == f], oof["prob"].to_numpy()[folds == f]) for f in np.unique(folds)]
    theirs = cross_val_score(LinearProbe(Cs=(1.0,)), Xl, y, cv=PredefinedSplit(folds), scoring="roc_auc")
    np.testing.assert_allclose(theirs, ours, atol=1e-6)


# -- the command line ---------------------------------------------------------------------------
def test_cli_writes_probe_results_and_figures(planted, tmp_path):
    from waitlens.experiments.cli import main
    from waitlens.hooks.store import write_store

    X, meta = planted
    write_store(tmp_path / "a", torch.from_numpy(X), meta, {"model": "a"})
    write_store(tmp_path / "b", torch.from_numpy(X), meta, {"model": "b"})
    out = tmp_path / "out"
    rc = main(["probe", "--store", str(tmp_path / "a"), "--store", str(tmp_path / "b"), "--out", str(out),
               "--transfer", "--n-boot", "100", "--threads", "1"])
    assert rc == 0
    table = pd.read_csv(out / "probe_results.csv")
    assert list(table.columns) == CSV_COLUMNS
    assert set(table["model"]) == {"a", "b"} and len(table) == 8
    for name in ("probe_auroc_by_layer.png", "transfer.csv", "transfer_matrix.png", "probe_margins.csv"):
        assert (out / name).is_file(), name
    assert main(["probe", "--store", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_probe_for_another_label_column(planted):
    """`label=` probes any boolean metadata column: the planted direction encodes `correct`, so a
    column equal to it is recovered and an unrelated one is not; a missing column is an error."""
    states, meta = planted
    meta = meta.copy()
    meta["same"] = meta["correct"].astype(float)
    meta["other"] = np.random.default_rng(7).integers(0, 2, len(meta)).astype(float)
    meta.loc[meta.index[:10], "other"] = np.nan  # rows without the label are left out, with a warning
    same = fit_layer_probes(states, meta, label="same", controls=False, **FAST).table.set_index("layer")
    assert same.loc[2, "auroc"] > 0.9
    with pytest.warns(UserWarning, match="have no 'other' label"):
        other = fit_layer_probes(states, meta, label="other", controls=False, **FAST).table
    assert other["auroc"].max() < 0.65
    # a label that varies within a trajectory is shuffled per position: the control stays at chance
    with pytest.warns(UserWarning, match="have no 'other' label"):
        ctl = fit_layer_probes(states, meta, label="other", **FAST).table
    assert (abs(ctl["control_shuffled_auroc"] - 0.5) < 0.05).all()
    with pytest.raises(ValueError, match="no label column 'nope'"):
        fit_layer_probes(states, meta, label="nope", **FAST)


def test_without_margins_the_table_is_the_same_and_the_margins_are_empty(planted, planted_result):
    res = fit_layer_probes(*planted, margins=False, **FAST)
    pd.testing.assert_frame_equal(res.table, planted_result.table)
    pd.testing.assert_frame_equal(res.oof, planted_result.oof)
    cols = [c for c in res.margins.columns if c.startswith(("margin", "selectivity"))]
    assert res.margins[cols].isna().all().all()
    assert planted_result.margins[cols].notna().all().all()
    pd.testing.assert_frame_equal(res.margins.drop(columns=cols), planted_result.margins.drop(columns=cols))
