"""Cross-model activation patching and within-model ablations into a directory: the library side
of `waitlens patch` / `waitlens ablate` and of the study's patching and ablations stages.

Metric names resolve to the model-agnostic built-ins of `hooks.patch_metrics` (``forced_answer``,
``next_token_kl``, ``recheck``, ``kl``, ``gold_prob``) and to the organism's own (``correction``,
`experiments.organism.metrics`). Every table and figure is computed before anything is
written, then written to a temporary folder and moved into place, so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from waitlens.hooks.batching import MAX_BATCH_TOKENS

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel
    from waitlens.traces.trajectory import Trajectory

ORGANISM_DEFAULT_METRICS = ("kl", "correction", "gold_prob")


def default_metrics(target: LoadedModel) -> tuple[str, ...]:
    """The organism's metrics on the organism, else the model-agnostic built-ins."""
    from waitlens.experiments.organism.metrics import is_organism
    from waitlens.hooks.patch_metrics import DEFAULT_METRICS

    return ORGANISM_DEFAULT_METRICS if is_organism(target) else DEFAULT_METRICS


def resolve_study_metrics(metrics, *, kl_positions: int = 8):
    """Metric names (built-ins and the organism's) or PatchMetrics -> PatchMetrics."""
    from waitlens.experiments.organism.metrics import ORGANISM_METRICS
    from waitlens.hooks.patch_metrics import resolve_metrics

    return resolve_metrics(metrics, kl_positions=kl_positions, extra=ORGANISM_METRICS)


def same_model(source: LoadedModel, target: LoadedModel) -> bool:
    """One model (or two loads of one spec): patching it into itself is the null patch."""
    return source is target or source.spec == target.spec


class _Staging:
    """Files written into a temporary folder beside `out`, moved into `out` by `commit()`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.partial-"))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.tmp.iterdir()):
            os.replace(f, self.out / f.name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def patch_to_dir(source: LoadedModel, target: LoadedModel, trajs: Sequence[Trajectory], out: Path, *, layers="all", window="-2:4", metrics=None, word="wait",
                 both_directions=True, control=True, attribution=False, sampled=False, kl_positions=8,
                 n_boot=1000, seed=0, progress=True, manifest: dict | None = None,
                 max_batch_tokens: int | None = MAX_BATCH_TOKENS, workers: int = 1) -> dict:
    """Patch `source` -> `target` (and back), write tables and figures into `out`; returns a summary.

    metrics: names or PatchMetrics (default: `default_metrics(target)`). With the same model as
    source and target (the null patch) only one direction runs; every effect is exactly 0.
    max_batch_tokens: `hooks.patching.patch`'s (None: one case at a time). Under torchrun every
    rank patches its share of the trajectories; rank 0 writes `out` and prints, the others
    return the summary only. workers: the two directions (each with its sampled continuations)
    run in up to this many forked processes on one torch thread each (`experiments.parallel.map_fork`;
    one process under torchrun).
    """
    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.patching import attribution_scatter, heatmaps, layer_curves
    from waitlens.hooks.patching import patch
    from waitlens.probes.patching import attribution_agreement, summarize_patches, wait_vs_random

    out = Path(out)
    fns = resolve_study_metrics(metrics if metrics is not None else default_metrics(target),
                                kl_positions=kl_positions)
    names = [m.name for m in fns]
    null = same_model(source, target)
    pairs = [(source, target)] + ([(target, source)] if both_directions and not null else [])
    if null and both_directions:
        print(f"source and target are both {source.spec}: the null patch, one direction")
    can_attribute = attribution and any(m.differentiable for m in fns)

    def direction(pair):  # one direction's patching, then its sampled continuations
        src, tgt = pair
        r = patch(src, tgt, trajs, layers=layers, window=window, metrics=fns, word=word,
                  control=control, kl_positions=kl_positions, seed=seed, attribution=can_attribute,
                  progress=progress, max_batch_tokens=max_batch_tokens)
        sampled_table = None
        if sampled and r.info["rank"] == 0:
            sampled_table = _sampled_direction(src, tgt, trajs, layers=layers, window=window, seed=seed,
                                               progress=progress)
        return r, sampled_table

    from waitlens.experiments.parallel import map_fork

    data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun: the ranks share the work
    done = map_fork(direction, pairs, 1 if data_parallel else workers)
    result = None
    for r, _ in done:
        result = r if result is None else result.concat(r)
        cost = r.info["cost"]
        if r.info["rank"] == 0:
            print(f"{r.info['direction']}: {r.info['n_cases']} trajectories ({r.info['n_skipped_no_wait']} without "
                  f"a {word!r} skipped), {r.info['n_anchors']} waits; {cost['tail_rows']} patched rows in "
                  f"{cost['forward_calls']} forwards ({cost['tail_token_fraction']:.1f} full-forward equivalents "
                  "of tokens)")
    table = result.table
    effects = summarize_patches(table, n_boot=n_boot, seed=seed)
    contrast = wait_vs_random(table, n_boot=n_boot, seed=seed) if control else None
    agree = attribution_agreement(table) if attribution and table["attribution"].notna().any() else None
    sampled_table = sampled_effects = None
    summary: dict = {"n_effect_rows": len(effects), "metrics": names,
                     "directions": list(result.info.get("directions", []))}
    if result.info["rank"] != 0:
        return summary  # data-parallel: rank 0 writes
    if sampled:
        summary["sampled"], sampled_table, sampled_effects = _sampled([t for _, t in done], n_boot=n_boot, seed=seed)
    stage = _Staging(out)
    try:
        table.to_csv(stage.path("patch_rows.csv.gz"), index=False)
        effects.to_csv(stage.path("patch_effects.csv"), index=False)
        if contrast is not None:
            contrast.to_csv(stage.path("wait_vs_random.csv"), index=False)
        for m in names:
            if (effects["metric"] == m).any():
                save_figure(heatmaps(effects, m), stage.path(f"patch_heatmap_{m}.png"))
                save_figure(layer_curves(effects, m), stage.path(f"patch_layers_{m}.png"))
        if agree is not None:
            agree.to_csv(stage.path("attribution.csv"), index=False)
            save_figure(attribution_scatter(table, agree), stage.path("attribution_vs_exact.png"))
        if sampled_table is not None:
            sampled_table.to_csv(stage.path("sampled_rows.csv"), index=False)
            sampled_effects.to_csv(stage.path("sampled_effects.csv"), index=False)
        stage.path("patch_manifest.json").write_text(json.dumps(
            {**(manifest or {}), "info": dict(result.info)}, indent=2, default=str) + "\n")
    except BaseException:
        stage.discard()
        raise
    stage.commit()
    if agree is not None:
        print(agree.to_string(index=False))
    elif attribution:
        print("attribution: no differentiable metric requested (a KL has zero gradient at the clean run)")
    print(f"wrote {out / 'patch_effects.csv'} ({len(effects)} rows) and figures to {out}")
    return summary


def _sampled_direction(src, tgt, trajs, *, layers, window, seed, progress):
    """One direction's greedy continuations after each patched wait that follows a slip
    (organism truth only), or the reason there are none (a string)."""
    from waitlens.experiments.organism.metrics import sampled_corrections
    from waitlens.hooks.patch_cases import parse_window

    lo, _ = parse_window(window)
    try:
        return sampled_corrections(src, tgt, trajs, layers=None if layers == "all" else layers,
                                   rel_positions=tuple(range(lo, 1)), seed=seed, progress=progress)
    except ValueError as e:  # no organism truth, or no wait after a slip: nothing to sample
        return str(e)


def _sampled(tables, *, n_boot, seed):
    """Does the patched model write the corrected value? (summary, rows, effects) from each
    direction's `_sampled_direction`; the first direction with nothing to sample skips all."""
    import pandas as pd

    from waitlens.probes.patching import summarize_sampled

    for t in tables:
        if isinstance(t, str):
            print(f"sampled corrections: {t}; skipped")
            return f"skipped: {t}", None, None
    table = pd.concat(tables, ignore_index=True)
    effects = summarize_sampled(table, n_boot=n_boot, seed=seed)
    return f"{int((table['control'] == 'clean').sum())} waits after slips per direction", table, effects


def ablation_options(model: LoadedModel, separators="auto"):
    """(separators, pick_wait, readouts) for `hooks.ablations.ablate` on this model: the
    organism's separators and correction read-out on the organism; sentences and the
    continuation read-out elsewhere; the first wait after a slip where ground truth says so."""
    from waitlens.experiments.organism.metrics import (
        ORGANISM_READOUTS,
        ORGANISM_SEPARATORS,
        first_wait_after_slip,
        is_organism,
    )
    from waitlens.hooks.ablations import continuation_reads

    org = is_organism(model)
    if separators == "auto":
        separators = ORGANISM_SEPARATORS if org else None
    elif separators == "sentences":
        separators = None
    readouts = ORGANISM_READOUTS if org else {"continuation": continuation_reads}
    return separators, first_wait_after_slip, readouts


def ablate_to_dir(model: LoadedModel, trajs: Sequence[Trajectory], out: Path, *, kinds: Sequence[str], word="wait", neutral=None, separators="auto",
                  kl_positions=8, n_boot=1000, seed=0, progress=True, model_name: str | None = None):
    """Run each ablation kind on `trajs`, write tables and a figure into `out`; returns the summary table."""
    import pandas as pd

    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.patching import ablation_bars
    from waitlens.hooks.ablations import ablate
    from waitlens.probes.patching import summarize_ablations

    out = Path(out)
    seps, pick, readouts = ablation_options(model, separators)
    tables, infos = [], []
    for kind in kinds:
        try:
            t, info = ablate(model, trajs, kind, word=word, neutral=neutral, kl_positions=kl_positions,
                             separators=seps, pick_wait=pick, readouts=readouts, seed=seed, progress=progress)
        except ValueError as e:
            if "applies to none" not in str(e):
                raise
            print(f"ablation {e}; skipped")  # e.g. no reasoning with two steps: report, do not fail the rest
            infos.append({"kind": kind, "skipped": str(e)})
            continue
        tables.append(t)
        infos.append(info)
    if not tables:
        raise ValueError(f"none of the ablations {list(kinds)} applies to any of the {len(trajs)} trajectories")
    table = pd.concat(tables, ignore_index=True)
    summary = summarize_ablations(table, n_boot=n_boot, seed=seed)
    stage = _Staging(out)
    try:
        table.to_csv(stage.path("ablation_rows.csv"), index=False)
        summary.to_csv(stage.path("ablation_effects.csv"), index=False)
        save_figure(ablation_bars(summary), stage.path("ablation_effects.png"))
        stage.path("ablation_manifest.json").write_text(
            json.dumps({"model": model_name or getattr(model, "spec", None), "runs": infos}, indent=2) + "\n")
    except BaseException:
        stage.discard()
        raise
    stage.commit()
    return summary


__all__ = ["ablate_to_dir", "ablation_options", "default_metrics", "patch_to_dir", "resolve_study_metrics",
           "same_model"]
