"""A correctness probe at "wait" on ONE organism model's own samples (`waitlens organism probe`).

The sequence a new user would run by hand — ``organism sample`` -> ``capture --controls`` ->
``probe`` — as one library call on one model, so "eventual correctness" cannot be "which model
wrote this text" (pooled writers of very different accuracy):

1. sample `n` held-out trajectories from the model (temperature 1, ground truth attached);
2. find every discourse word (the organism's lexicon) and one matched random non-discourse
   position per word (the random-position control), capture the residual stream at every layer;
3. fit the cross-validated per-layer probes for eventual correctness at "wait"
   (`probes.fit_layer_probes`: problem-grouped folds, shuffled-label control, position
   baseline, paired problem-bootstrap CIs on the margins).

The result names the best layer and its margins over the random-position control and the
position baseline; `separated` says whether both margins' 95% CIs lie above 0.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LEXICON = ("wait", "so", "therefore", "alternatively")


class OrganismProbeError(ValueError):
    """A within-model probe that cannot be fitted (too few waits or too few wrong answers)."""


@dataclass(frozen=True)
class OwnSampleProbe:
    """The best layer's probe at `word` on one model's own samples (AUROCs, margins, 95% CIs)."""

    model: str
    n_trajectories: int
    accuracy: float
    word: str
    n_positions: int
    n_problems: int
    n_wrong_positions: int
    layer: int
    auroc: float
    auroc_lo: float
    auroc_hi: float
    control_random_auroc: float
    margin_random: float
    margin_random_lo: float
    margin_random_hi: float
    baseline_auroc: float
    margin_baseline: float
    margin_baseline_lo: float
    margin_baseline_hi: float
    control_shuffled_auroc: float

    @property
    def separated(self) -> bool:
        """Above the random-position control and the position baseline, both CIs above 0."""
        return bool(self.margin_random_lo > 0 and self.margin_baseline_lo > 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "separated": self.separated}


@dataclass
class OwnSampleProbeRun:
    """What `probe_own_samples` did: the best layer's record, every layer's probes, the samples."""

    record: OwnSampleProbe
    probes: Any  # probes.linear.ProbeResult
    trajectories: list


def probe_own_samples(spec: str, *, n: int = 600, seed: int = 0, temperature: float = 1.0, word: str = "wait",
                      folds: int = 5, n_boot: int = 1000, store_dir: str | Path | None = None,
                      progress: bool = True) -> OwnSampleProbeRun:
    """Sample `spec`'s own trajectories, capture its states, probe correctness at `word`.

    The activation store goes to `store_dir` if given (kept), else to a temporary directory.
    `OrganismProbeError` when the samples hold fewer than `folds` positions of `word` in right or
    in wrong answers.
    """
    from waitlens.experiments.organism.sample import load, resolve_spec, sample

    resolve_spec(spec)  # fail early on an unknown spec
    model = load(spec)
    trajs = sample(model, n, temperature=temperature, seed=seed, progress=progress)
    if store_dir is not None:
        return _probe(model, spec, trajs, Path(store_dir), word, folds, n_boot, seed, progress)
    with tempfile.TemporaryDirectory(prefix="waitlens-organism-probe-") as tmp:
        return _probe(model, spec, trajs, Path(tmp) / "store", word, folds, n_boot, seed, progress)


def _probe(model, spec, trajs, store_dir: Path, word, folds, n_boot, seed, progress):
    from waitlens.hooks import capture_residuals
    from waitlens.probes.linear import fit_layer_probes
    from waitlens.traces import control_positions, find_positions

    acc = sum(bool(t.correct) for t in trajs) / max(1, len(trajs))
    positions = find_positions(model, trajs, list(LEXICON))
    at_word = positions.table[positions.table["word"].astype(str).str.lower() == word]
    n_wrong = int((~at_word["correct"].astype(bool)).sum())
    if len(at_word) == 0 or n_wrong < folds or len(at_word) - n_wrong < folds:
        raise OrganismProbeError(
            f"{spec}: {len(at_word)} '{word}' positions in {len(trajs)} samples, {n_wrong} of them in wrong "
            f"answers (accuracy {acc:.3f}); a probe needs at least {folds} of each: sample more (--n)")
    positions = positions.concat(control_positions(model, trajs, positions, seed=seed))
    store = capture_residuals(model, trajs, positions, store_dir, layers="all", progress=progress)
    res = fit_layer_probes(store, words=word, n_folds=folds, n_boot=n_boot, seed=seed)
    table = res.table.merge(res.margins, on=["model", "word", "layer"])
    best = table.loc[table["auroc"].idxmax()]
    rec = OwnSampleProbe(
        model=spec, n_trajectories=len(trajs), accuracy=acc, word=word,
        n_positions=int(best["n_positions"]), n_problems=int(best["n_problems"]), n_wrong_positions=n_wrong,
        layer=int(best["layer"]), **{k: float(best[k]) for k in (
            "auroc", "auroc_lo", "auroc_hi", "control_random_auroc", "margin_random", "margin_random_lo",
            "margin_random_hi", "baseline_auroc", "margin_baseline", "margin_baseline_lo", "margin_baseline_hi",
            "control_shuffled_auroc")})
    return OwnSampleProbeRun(rec, res, trajs)


def _f(x: float, signed: bool = False) -> str:
    if x != x or math.isinf(x):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def format_probe(records: list[OwnSampleProbe]) -> str:
    """A markdown table, one row per model."""
    lines = ["| model | accuracy | 'wait' positions (wrong) | best layer | AUROC | random-position control, margin "
             "| position baseline, margin | shuffled | separated |", "|---" * 9 + "|"]
    for r in records:
        lines.append(
            f"| {r.model} | {r.accuracy:.3f} (n={r.n_trajectories}) | {r.n_positions} ({r.n_wrong_positions}) | "
            f"{r.layer} | {_f(r.auroc)} [{_f(r.auroc_lo)}, {_f(r.auroc_hi)}] | {_f(r.control_random_auroc)}, "
            f"{_f(r.margin_random, True)} [{_f(r.margin_random_lo, True)}, {_f(r.margin_random_hi, True)}] | "
            f"{_f(r.baseline_auroc)}, {_f(r.margin_baseline, True)} [{_f(r.margin_baseline_lo, True)}, "
            f"{_f(r.margin_baseline_hi, True)}] | {_f(r.control_shuffled_auroc)} | {'yes' if r.separated else 'no'} |")
    return "\n".join(lines)
