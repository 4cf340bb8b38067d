"""Feature probes (baselines and ground-truth ceilings): planted recovery, agreement with the
state probe's position baseline, shared rows, and errors."""

from __future__ import annotations

import numpy as np
import pytest

from waitlens.probes.feature_probes import FEATURE_COLUMNS, feature_probes
from waitlens.probes.linear import fit_layer_probes
from waitlens.probes.synthetic import planted_states


@pytest.fixture(scope="module")
def meta():
    states, meta = planted_states(60, 2, 3, n_layers=2, d_model=8, planted_layer=1, seed=1)
    rng = np.random.default_rng(0)
    y = meta["correct"].astype(bool).to_numpy()
    meta = meta.copy()
    # a feature that says the answer 85% of the time, and one that is pure noise
    meta["flag"] = np.where(rng.random(len(meta)) < 0.85, ~y, y)
    meta["noise"] = rng.standard_normal(len(meta))
    return states, meta


def test_planted_feature_is_recovered_with_a_margin_over_position(meta):
    _, m = meta
    table = feature_probes(m, {"position + flag": ["frac", "rel_index", "n_reasoning_tokens", "flag"],
                               "noise": ["noise"]}, n_boot=200)
    assert list(table.columns) == FEATURE_COLUMNS
    t = table.set_index("features")
    assert t.loc["position + flag", "auroc"] > 0.8
    assert t.loc["position + flag", "margin_lo"] > 0.2
    for name in ("position", "noise"):
        assert abs(t.loc[name, "auroc"] - 0.5) < 0.1
    assert t.loc["position", "margin_vs_reference"] == 0.0
    assert t["n_positions"].nunique() == 1  # every set on the same rows


def test_position_row_equals_the_state_probes_baseline(meta):
    states, m = meta
    probe = fit_layer_probes(states, m, n_boot=50, threads=1)
    t = feature_probes(m, {"flag": ["flag"]}, n_boot=50).set_index("features")
    assert t.loc["position", "auroc"] == pytest.approx(probe.table["baseline_auroc"].iloc[0], abs=1e-9)


def test_rows_missing_a_feature_leave_every_set(meta):
    _, m = meta
    m = m.copy()
    words = np.flatnonzero((m["word"] == "wait").to_numpy())
    m["flag"] = m["flag"].astype(float)
    m.loc[m.index[words[:30]], "flag"] = np.nan
    t = feature_probes(m, {"flag": ["flag"]}, n_boot=50)
    assert set(t["n_positions"]) == {len(words) - 30}


def test_bad_input_is_a_clear_error(meta):
    _, m = meta
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['nope'\]"):
        feature_probes(m, {"x": ["nope"]})
    with pytest.raises(ValueError, match="no positions of word 'hmm'"):
        feature_probes(m, {"flag": ["flag"]}, word="hmm")
    with pytest.raises(ValueError, match="reference 'other'"):
        feature_probes(m, {"flag": ["flag"]}, reference="other")
    with pytest.raises(ValueError, match="no feature sets"):
        feature_probes(m, {})


def test_boolean_strings_count_and_other_strings_are_an_error(meta):
    _, m = meta
    as_strings = m.copy()
    as_strings["flag"] = as_strings["flag"].map({True: "True", False: "False"})  # a CSV round trip
    a = feature_probes(m, {"flag": ["flag"]}, n_boot=50).set_index("features")
    b = feature_probes(as_strings, {"flag": ["flag"]}, n_boot=50).set_index("features")
    assert b.loc["flag", "auroc"] == pytest.approx(a.loc["flag", "auroc"], abs=1e-12)
    as_strings.loc[as_strings.index[3], "flag"] = "maybe"
    with pytest.raises(ValueError, match=r"'flag' holds values that are not numbers or booleans: 'maybe'"):
        feature_probes(as_strings, {"flag": ["flag"]})
