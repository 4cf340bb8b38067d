"""`waitlens patch` (cross-model activation patching at "wait") and `waitlens ablate`
(within-model content/structure ablations).

    waitlens patch --source SPEC --target SPEC --trajectories F.jsonl --out DIR [--layers all]
                   [--window -2:4] [--metric kl,correction,gold_prob] [--attribution] [--one-way]
    waitlens ablate --model SPEC --trajectories F.jsonl --out DIR --kind replace-wait|remove-wait|shuffle-steps|delete-steps
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _common(p) -> None:
    p.add_argument("--trajectories", required=True, help="trajectories JSONL file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N trajectories")
    p.add_argument("--word", default="wait", help="the discourse word (default: wait)")
    p.add_argument("--kl-positions", type=int, default=8, help="positions the KL is averaged over")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--model-dtype", default="auto", help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy box)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "patch", help="cross-model activation patching at 'wait' positions (layer x relative-position grid)",
        description="Replace the target's resid_pre states at each 'wait' (and a window around it) with the "
        "source's, layer by layer, and measure what changes after it; a random-position control is patched "
        "the same way. Writes patch_effects.csv (+ wait_vs_random.csv, figures).",
    )
    p.add_argument("--source", required=True, help="model whose states are patched in")
    p.add_argument("--target", required=True, help="model that is patched")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers")
    p.add_argument("--window", default="-2:4", help="relative positions around the wait, inclusive (default -2:4)")
    p.add_argument("--metric", default="kl,correction,gold_prob",
                   help="comma-separated metrics among kl, correction, gold_prob (default: all)")
    p.add_argument("--attribution", action="store_true",
                   help="also run attribution patching (correction, gold_prob) and its correlation with exact")
    p.add_argument("--one-way", action="store_true", help="only target <- source (default: both directions)")
    p.add_argument("--sampled", action="store_true",
                   help="also decode greedily after each patched wait that follows a slip (organism truth) "
                   "and record whether the continuation writes the corrected value")
    p.add_argument("--no-control", action="store_true", help="skip the random-position control")
    _common(p)
    p.set_defaults(handler=run_patch)

    a = subparsers.add_parser(
        "ablate", help="within-model ablations: replace/remove the wait word, shuffle/delete reasoning steps",
        description="Edit each trajectory's reasoning (content: the wait word; structure: the steps) and "
        "measure the forced gold-answer probability, next-token KL and correction against the original.",
    )
    a.add_argument("--model", required=True)
    a.add_argument("--kind", default="replace-wait",
                   help="comma-separated among replace-wait, remove-wait, shuffle-steps, delete-steps, or 'all'")
    a.add_argument("--neutral", default=None, help="replacement word for replace-wait (default: auto)")
    a.add_argument("--separators", default="auto",
                   help="step separators: 'auto' (organism words for the organism, else sentences/lines), "
                   "'sentences', or comma-separated words like ';,so,therefore'")
    _common(a)
    a.set_defaults(handler=run_ablate)


def _setup(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from waitlens.traces import load_trajectories

    trajs = load_trajectories(args.trajectories)
    if args.limit:
        trajs = trajs[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return trajs, out


def run_patch(args: argparse.Namespace) -> int:
    from waitlens.hooks import load_model

    trajs, out = _setup(args)
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    kw = dict(device=args.device, dtype=args.model_dtype)
    source, target = load_model(args.source, **kw), load_model(args.target, **kw)
    patch_to_dir(source, target, trajs, out, layers=args.layers, window=args.window, metrics=metrics,
                 word=args.word, both_directions=not args.one_way, control=not args.no_control,
                 attribution=args.attribution, sampled=args.sampled, kl_positions=args.kl_positions, n_boot=args.n_boot,
                 seed=args.seed, progress=not args.quiet,
                 manifest={"source": args.source, "target": args.target, "trajectories": args.trajectories})
    return 0


def patch_to_dir(source, target, trajs, out: Path, *, layers="all", window="-2:4",
                 metrics=("kl", "correction", "gold_prob"), word="wait", both_directions=True, control=True,
                 attribution=False, sampled=False, kl_positions=8, n_boot=1000, seed=0, progress=True,
                 manifest: dict | None = None) -> dict:
    """Patch `source` -> `target` (and back), write tables and figures into `out`; returns a summary."""
    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.patching import attribution_scatter, heatmaps, layer_curves
    from waitlens.hooks.patching import DIFFERENTIABLE, patch
    from waitlens.probes.patching import attribution_agreement, summarize_patches, wait_vs_random

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    pairs = [(source, target)] + ([(target, source)] if both_directions else [])
    result = None
    for src, tgt in pairs:
        r = patch(src, tgt, trajs, layers=layers, window=window, metrics=metrics, word=word,
                  control=control, kl_positions=kl_positions, seed=seed,
                  attribution=attribution and any(m in DIFFERENTIABLE for m in metrics),
                  progress=progress)
        result = r if result is None else result.concat(r)
        cost = r.info["cost"]
        print(f"{r.info['direction']}: {r.info['n_cases']} trajectories ({r.info['n_skipped_no_wait']} without a "
              f"{word!r} skipped), {r.info['n_anchors']} waits; {cost['tail_rows']} patched forwards "
              f"({cost['tail_token_fraction']:.1f} full-forward equivalents of tokens)")
    table = result.table
    table.to_csv(out / "patch_rows.csv.gz", index=False)
    effects = summarize_patches(table, n_boot=n_boot, seed=seed)
    effects.to_csv(out / "patch_effects.csv", index=False)
    summary: dict = {"n_effect_rows": len(effects)}
    if control:
        contrast = wait_vs_random(table, n_boot=n_boot, seed=seed)
        contrast.to_csv(out / "wait_vs_random.csv", index=False)
    for m in metrics:
        if (effects["metric"] == m).any():
            save_figure(heatmaps(effects, m), out / f"patch_heatmap_{m}.png")
            save_figure(layer_curves(effects, m), out / f"patch_layers_{m}.png")
    if attribution and table["attribution"].notna().any():
        agree = attribution_agreement(table)
        agree.to_csv(out / "attribution.csv", index=False)
        save_figure(attribution_scatter(table, agree), out / "attribution_vs_exact.png")
        print(agree.to_string(index=False))
    elif attribution:
        print("attribution: no differentiable metric requested (kl has zero gradient at the clean run)")
    if sampled:
        summary["sampled"] = _sampled_to_dir(pairs, trajs, out, layers=layers, window=window, n_boot=n_boot, seed=seed,
                                             progress=progress)
    (out / "patch_manifest.json").write_text(json.dumps(
        {**(manifest or {}), "info": dict(result.info)}, indent=2, default=str) + "\n")
    print(f"wrote {out / 'patch_effects.csv'} ({len(effects)} rows) and figures to {out}")
    return summary


def _sampled_to_dir(pairs, trajs, out: Path, *, layers, window, n_boot, seed, progress) -> str:
    """Greedy continuations after each patched wait that follows a slip (organism truth only):
    does the patched model write the corrected value?"""
    import pandas as pd

    from waitlens.hooks.patch_cases import parse_window
    from waitlens.hooks.sampled import sampled_corrections
    from waitlens.probes.patching import summarize_sampled

    lo, _ = parse_window(window)
    tables = []
    for src, tgt in pairs:
        try:
            tables.append(sampled_corrections(src, tgt, trajs, layers=None if layers == "all" else layers,
                                              rel_positions=tuple(range(lo, 1)), seed=seed, progress=progress))
        except ValueError as e:  # no organism truth, or no wait after a slip: nothing to sample
            print(f"sampled corrections: {e}; skipped")
            return f"skipped: {e}"
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / "sampled_rows.csv", index=False)
    summarize_sampled(table, n_boot=n_boot, seed=seed).to_csv(out / "sampled_effects.csv", index=False)
    return f"{int((table['control'] == 'clean').sum())} waits after slips per direction"


def run_ablate(args: argparse.Namespace) -> int:
    from waitlens.hooks import load_model
    from waitlens.hooks.ablations import KINDS

    trajs, out = _setup(args)
    kinds = list(KINDS) if args.kind == "all" else [k.strip() for k in args.kind.split(",") if k.strip()]
    seps = args.separators
    seps = None if seps == "sentences" else seps if seps == "auto" else [x for x in seps.split(",") if x]
    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    summary = ablate_to_dir(model, trajs, out, kinds=kinds, word=args.word, neutral=args.neutral,
                            separators=seps, kl_positions=args.kl_positions, n_boot=args.n_boot,
                            seed=args.seed, progress=not args.quiet, model_name=args.model)
    print(summary.to_string(index=False))
    print(f"wrote {out / 'ablation_effects.csv'}")
    return 0


def ablate_to_dir(model, trajs, out: Path, *, kinds, word="wait", neutral=None, separators="auto",
                  kl_positions=8, n_boot=1000, seed=0, progress=True, model_name: str | None = None):
    """Run each ablation kind on `trajs`, write tables and a figure into `out`; returns the summary table."""
    import pandas as pd

    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.patching import ablation_bars
    from waitlens.hooks.ablations import ablate
    from waitlens.probes.patching import summarize_ablations

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, infos = [], []
    for kind in kinds:
        try:
            t, info = ablate(model, trajs, kind, word=word, neutral=neutral, kl_positions=kl_positions,
                             separators=separators, seed=seed, progress=progress)
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
    table.to_csv(out / "ablation_rows.csv", index=False)
    summary = summarize_ablations(table, n_boot=n_boot, seed=seed)
    summary.to_csv(out / "ablation_effects.csv", index=False)
    save_figure(ablation_bars(summary), out / "ablation_effects.png")
    (out / "ablation_manifest.json").write_text(
        json.dumps({"model": model_name or getattr(model, "spec", None), "runs": infos}, indent=2) + "\n")
    return summary
