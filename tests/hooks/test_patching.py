"""Activation patching: invariants, KV-cache tail vs full re-run, attribution, bad pairs, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_qwen, tiny_trajectory
from waitlens.hooks import load_model
from waitlens.hooks.alignment import PairError
from waitlens.hooks.patching import capture_resid_pre, patch, prepare_cases, run_patched

ORG = ["kl", "correction", "gold_prob"]  # the organism's metric set (correction: experiments.organism.metrics)


def org_metrics(names=ORG):
    from waitlens.experiments.analyses.patch import resolve_study_metrics

    return resolve_study_metrics(names)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    a, b = make_tiny_qwen(root / "a", seed=0), make_tiny_qwen(root / "b", seed=1)
    load = lambda p: load_model(str(p), device="cpu", dtype="float32")  # noqa: E731
    return load(a), load(a), load(b)


def trajs(n=3):
    return [tiny_trajectory(i) for i in range(n)]


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_self_patch_changes_nothing_exactly(pair):
    a, a2, _ = pair
    for src in (a, a2):  # own states, and a second copy of the same weights
        for metrics in (org_metrics(), ["forced_answer", "next_token_kl", "recheck"]):
            res = quiet(patch, src, a, trajs(), use_cache=False, batch_size=1, skip_identical=False, metrics=metrics)
            t = res.table
            assert len(t) and set(t["metric"]) == {m if isinstance(m, str) else m.name for m in metrics}
            assert (t["effect"] == 0).all(), t[t["effect"] != 0].head()
            assert torch.equal(torch.tensor(t["patched"].to_numpy()), torch.tensor(t["clean"].to_numpy()))
            fast = quiet(patch, src, a, trajs(), metrics=metrics)  # default path: identical states are not re-run
            assert (fast.table["effect"] == 0).all()


def test_prefix_untouched_and_patch_lands(pair):
    a, _, b = pair
    ids = a.tokenize(tiny_trajectory(0)).tolist()
    p, layer = 12, 1
    v = capture_resid_pre(b, ids, [p], [layer])[0, 0]
    clean_logits, clean = run_patched(a, ids, {}, capture=[0, 1, 2])
    logits, seen = run_patched(a, ids, {(layer, p): v}, capture=[0, 1, 2])
    assert torch.equal(logits[:p], clean_logits[:p])
    for layer_ in (0, 1, 2):
        assert torch.equal(seen[layer_][:p], clean[layer_][:p])
    assert torch.equal(seen[0], clean[0])  # layer before the patch entirely untouched
    assert torch.equal(seen[layer][p], v)
    assert not torch.allclose(logits[p:], clean_logits[p:])


def test_cached_tail_equals_full_rerun(pair):
    a, _, b = pair
    fast = quiet(patch, b, a, trajs(), use_cache=True, metrics=org_metrics())
    slow = quiet(patch, b, a, trajs(), use_cache=False, metrics=org_metrics())
    assert len(fast.table) == len(slow.table) > 0
    np.testing.assert_allclose(fast.table["patched"], slow.table["patched"], atol=1e-5)
    assert (fast.table["effect"].abs() > 0).any()
    # the grid agrees with the reference single-patch forward
    row = fast.table.query("metric == 'gold_prob' and control == 'none' and rel_pos == 0 and layer == 2").iloc[0]
    traj = tiny_trajectory(0)
    ids = a.tokenize(traj).tolist()
    p = int(row["position"])
    v = capture_resid_pre(b, ids, [p], [2])[0, 0]
    logits, _ = run_patched(a, ids, {(2, p): v})
    lp = torch.log_softmax(logits, -1)
    rd = a.render(traj)
    gold = float(sum(lp[i - 1, ids[i]] for i in range(*rd.answer_tokens)).exp())
    assert abs(gold - row["patched"]) < 1e-5


def test_grid_shape_and_control(pair):
    a, _, b = pair
    res = quiet(patch, b, a, trajs(), layers="0,2", window="-1:2", metrics=["kl"])
    t = res.table
    assert sorted(t["layer"].unique()) == [0, 2]
    assert sorted(t["rel_pos"].unique()) == [-1, 0, 1, 2]
    assert set(t["control"]) == {"none", "random"}
    # random controls sit before their wait
    for _, g in t.groupby(["trajectory_id", "anchor"]):
        w = g.query("control == 'none' and rel_pos == 0")["position"].iloc[0]
        r = g.query("control == 'random' and rel_pos == 0")["position"].iloc[0]
        assert r < w
    assert (t["effect"] >= 0).all()  # KL


def test_attribution_tracks_exact_for_small_patches(pair):
    a, _, b = pair
    # a small perturbation of the same model: first-order should be nearly exact
    import copy

    a_small = copy.deepcopy(a)
    with torch.no_grad():
        for prm in a_small.hf.parameters():
            prm.add_(1e-3 * torch.randn_like(prm))
    res = quiet(patch, a_small, a, trajs(4), attribution=True, metrics=org_metrics(["gold_prob", "correction"]))
    t = res.table
    assert t["attribution"].notna().all()
    for m in ("gold_prob", "correction"):
        s = t[t["metric"] == m]
        r = np.corrcoef(s["effect"], s["attribution"])[0, 1]
        assert r > 0.95, (m, r)
    with pytest.raises(ValueError, match="zero gradient"):
        from waitlens.hooks.patching import attribute

        attribute(b, a, trajs(), metrics=["kl"])
    with pytest.raises(ValueError, match="zero gradient"):
        attribute(b, a, trajs(), metrics=["next_token_kl"])


def test_bad_pairs(pair, tmp_path):
    a, _, _ = pair
    deep = load_model(str(make_tiny_qwen(tmp_path / "deep", layers=4)), device="cpu", dtype="float32")
    wide = load_model(str(make_tiny_qwen(tmp_path / "wide", d_model=64)), device="cpu", dtype="float32")
    with pytest.raises(PairError, match="3 layers.*4 layers"):
        patch(a, deep, trajs())
    with pytest.raises(PairError, match="d_model 32.*d_model 64"):
        patch(a, wide, trajs())
    # different content tokenization: the target's tokenizer maps "wait" elsewhere
    other = load_model(str(make_tiny_qwen(tmp_path / "other", seed=3)), device="cpu", dtype="float32")
    vocab = json.loads(other.tokenizer.backend_tokenizer.to_str())
    model = vocab["model"]["vocab"]
    model["wait"], model["so"] = model["so"], model["wait"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    other.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(vocab)),
                                              bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(PairError, match=r"first difference at reasoning token 6: source 'wait'.*target 'wait'"):
        quiet(patch, a, other, trajs())
    # no wait anywhere: an error; some without: a counted warning
    nowait = [tiny_trajectory(10 + i, reasoning="3 + 4 = 7 so 7 - 2 = 5") for i in range(2)]
    with pytest.raises(ValueError, match="none of the 2 trajectories has a 'wait'"):
        patch(a, a, nowait)
    with pytest.warns(UserWarning, match="skipped 2 of 4 trajectories without a 'wait'"):
        cases, info = prepare_cases(a, a, nowait + trajs(2))
    assert info["n_cases"] == 2


@pytest.mark.slow
def test_cli_patch_writes_table(pair, tmp_path):
    from waitlens.experiments.cli import main
    from waitlens.traces import save_trajectories

    a, _, b = pair
    f = save_trajectories(trajs(4), tmp_path / "t.jsonl")
    out = tmp_path / "out"
    rc = main(["patch", "--source", a.spec, "--target", b.spec, "--trajectories", str(f), "--out", str(out),
               "--window", "-1:1", "--attribution", "--n-boot", "50"])
    assert rc == 0
    import pandas as pd

    t = pd.read_csv(out / "patch_effects.csv")
    assert list(t.columns) == ["direction", "control", "layer", "rel_pos", "metric", "mean", "lo", "hi", "n"]
    assert set(t["control"]) == {"none", "random"} and t["direction"].nunique() == 2
    assert (out / "attribution.csv").is_file()
    assert any(p.suffix == ".png" for p in out.iterdir())


def test_cli_ablate(pair, tmp_path):
    from waitlens.experiments.cli import main
    from waitlens.traces import save_trajectories

    a, _, _ = pair
    f = save_trajectories(trajs(4), tmp_path / "t.jsonl")
    rc = main(["ablate", "--model", a.spec, "--trajectories", str(f), "--out", str(tmp_path / "ab"), "--kind", "all",
               "--separators", ";,so,therefore", "--n-boot", "50"])
    assert rc == 0
    import pandas as pd

    s = pd.read_csv(tmp_path / "ab" / "ablation_effects.csv")
    assert set(s["kind"]) == {"replace-wait", "remove-wait", "shuffle-steps", "delete-steps"}


def test_null_patch_cli_writes_exact_zeros(pair, tmp_path):
    """#15: the same model as source and target — effects all exactly 0, exit 0, one direction."""
    import pandas as pd

    from waitlens.experiments.cli import main
    from waitlens.traces import save_trajectories

    a, _, _ = pair
    f = save_trajectories(trajs(4), tmp_path / "t.jsonl")
    out = tmp_path / "null"
    rc = main(["patch", "--source", a.spec, "--target", a.spec, "--trajectories", str(f), "--out", str(out),
               "--window", "-1:1", "--n-boot", "20", "--quiet"])
    assert rc == 0
    rows = pd.read_csv(out / "patch_rows.csv.gz")
    assert set(rows["metric"]) == {"forced_answer", "next_token_kl", "recheck"}
    assert (rows["effect"] == 0).all() and rows["direction"].nunique() == 1
    eff = pd.read_csv(out / "patch_effects.csv")
    assert (eff["mean"] == 0).all()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_builtin_metrics_equal_reference_forwards(pair):
    """forced_answer and recheck read what a full patched forward over the same tokens gives."""
    from waitlens.hooks.answer import suffix_tokens
    from waitlens.hooks.patch_metrics import opening_tokens

    a, _, b = pair
    traj = tiny_trajectory(0)
    res = quiet(patch, b, a, [traj], metrics=["forced_answer", "recheck"], window="-1:1", control=False)
    t = res.table
    rd = a.render(traj)
    ids = rd.input_ids
    st = suffix_tokens(a, traj.gold)
    for (_, row) in t[t["rel_pos"] <= 0].iterrows():
        p, layer = int(row["position"]), int(row["layer"])
        wait = p - int(row["rel_pos"])
        k = min(wait + 1 + 8, rd.reasoning_tokens[1])
        if row["metric"] == "forced_answer":
            seq = ids[:k] + st.forcing + st.answer
            v = capture_resid_pre(b, seq, [p], [layer])[0, 0]
            logits, _ = run_patched(a, seq, {(layer, p): v})
            lp = torch.log_softmax(logits.float(), -1)
            first = k + len(st.forcing) - 1
            ref = float(sum(lp[first + j, tok] for j, tok in enumerate(st.answer)).exp())
        else:
            v = capture_resid_pre(b, ids, [p], [layer])[0, 0]
            logits, _ = run_patched(a, ids, {(layer, p): v})
            lp = torch.log_softmax(logits.float(), -1)
            ref = float(lp[wait, opening_tokens(a.tokenizer, [" check"])].exp().sum())
        assert abs(ref - row["patched"]) < 1e-5, (row.to_dict(), ref)
    assert (t["effect"].abs() > 0).any()


def test_metric_functions_and_bad_names(pair):
    a, _, b = pair
    from waitlens.hooks.patch_metrics import MetricError

    def top_logprob(x):  # a plain function of the patched output
        return max(float(x.logprobs(r).max()) for r in x.reads)

    res = quiet(patch, b, a, trajs(1), metrics={"top": top_logprob}, window="0:0", control=False)
    assert set(res.table["metric"]) == {"top"} and res.table["patched"].notna().all()
    with pytest.raises(MetricError, match="unknown metric 'correctoin'"):
        patch(b, a, trajs(1), metrics=["correctoin"])


# the organism's patching and ablation sums over two trajectories, pinned: recorded with the
# one-at-a-time reference path on the shipped go-on weights (aa3d4a6)
ORGANISM_BEFORE = {
    "clean": {"correction": 66.15338784456253, "gold_prob": 0.029970064875669777, "kl": 0.0},
    "patched": {"correction": 66.50049053505063, "gold_prob": 0.02988602658297168, "kl": 10.055347766919112},
    "attribution": {"correction": 6.073998013358505, "gold_prob": -9.590583077567771e-05},
}
ABLATION_BEFORE = {("delete-steps", "gold_prob"): 2.3573372516239033e-06, ("delete-steps", "kl"): 6.889044761657715,
                   ("remove-wait", "correction"): -1.9722647262021837, ("remove-wait", "kl"): 4.9702043533325195,
                   ("replace-wait", "correction"): -1.9587223682501644, ("replace-wait", "kl"): 8.298856496810913,
                   ("shuffle-steps", "gold_prob"): 0.00010838589832928847}


@pytest.mark.slow
def test_organism_numbers_unchanged_and_hooks_know_no_organism():
    """#13 item 5: the organism's patching and ablation numbers are those of before the move of its
    metrics to experiments/organism/metrics.py, and hooks/ holds none of its grammar."""
    import re
    from pathlib import Path

    from waitlens.experiments.analyses.patch import ablation_options
    from waitlens.experiments.organism.sample import sample
    from waitlens.hooks.ablations import ablate

    sft, post = load_model("organism:sft-1k", device="cpu"), load_model("organism:post-large", device="cpu")
    ts = sample(sft, 40, seed=1, progress=False)
    ts = [t for t in ts if " wait " in f" {t.reasoning} "]
    ts = sorted(ts, key=lambda t: not any(w.get("after_slip") for w in t.extra["truth"]["waits"]))[:2]
    # the one-at-a-time reference path to 1e-9; the batched default (padded forwards) to 1e-5
    for batching, tol in ((dict(max_batch_tokens=None), dict(rel=1e-9, abs=1e-12)), ({}, dict(rel=0, abs=1e-5))):
        res = quiet(patch, post, sft, ts, layers="all", window="-2:4",
                    metrics=org_metrics(["kl", "gold_prob", "correction"]), attribution=True, **batching)
        g = res.table.groupby("metric")[["clean", "patched", "attribution"]].sum()
        for col, want in ORGANISM_BEFORE.items():
            for m, v in want.items():
                assert g.loc[m, col] == pytest.approx(v, **tol), (col, m, batching)
        seps, pick, readouts = ablation_options(post)
        for kind in ("replace-wait", "remove-wait", "shuffle-steps", "delete-steps"):
            t, _ = quiet(ablate, post, ts, kind, separators=seps, pick_wait=pick, readouts=readouts, **batching)
            for (k, m), v in ABLATION_BEFORE.items():
                if k == kind:
                    assert t.loc[t["metric"] == m, "effect"].sum() == pytest.approx(v, **tol), (k, m, batching)
    hooks_dir = Path(__file__).resolve().parents[2] / "hooks"
    grammar = re.compile(r"""["']organism["']|ORGANISM|extra\.get\(["']truth|extra\[["']truth|w \+ 5|after_slip""")
    for f in sorted(hooks_dir.glob("*.py")):
        assert not grammar.search(f.read_text()), f"{f.name} holds the organism's grammar"
    for f in sorted(hooks_dir.glob("*.py")):  # hooks/ knows no task, and does not even name one
        assert "organism" not in f.read_text().lower(), f.name


@pytest.mark.slow
def test_patch_to_dir_directions_in_two_workers_equal_one_process(tmp_path):
    """The study's patching stage runs its two directions (each with its sampled continuations)
    in two forked workers on one torch thread each: every table it writes is byte-identical to
    one process running both directions on two threads, as the stage did before."""
    import gzip

    from waitlens.experiments.analyses.patch import patch_to_dir
    from waitlens.experiments.organism.sample import sample

    sft, post = load_model("organism:sft-1k", device="cpu"), load_model("organism:post-large", device="cpu")
    ts = [t for t in sample(sft, 40, seed=1, progress=False) if " wait " in f" {t.reasoning} "]
    ts = sorted(ts, key=lambda t: not any(w.get("after_slip") for w in t.extra["truth"]["waits"]))[:2]
    kw = dict(layers="all", window="-2:4", metrics=ORG, attribution=True, sampled=True, n_boot=20, progress=False)
    torch.set_num_threads(2)
    quiet(patch_to_dir, post, sft, ts, tmp_path / "one", workers=1, **kw)
    torch.set_num_threads(1)
    quiet(patch_to_dir, post, sft, ts, tmp_path / "two", workers=2, **kw)
    names = ["patch_effects.csv", "wait_vs_random.csv", "attribution.csv", "sampled_rows.csv", "sampled_effects.csv"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    rows = [gzip.decompress((tmp_path / d / "patch_rows.csv.gz").read_bytes()) for d in ("one", "two")]
    assert rows[0] == rows[1] and rows[0].count(b"\n") > 100
    assert (tmp_path / "one" / "sampled_rows.csv").read_text().count("\n") > 10
    info = [json.loads((tmp_path / d / "patch_manifest.json").read_text())["info"] for d in ("one", "two")]
    assert info[0]["directions"] == info[1]["directions"] and len(info[0]["directions"]) == 2
