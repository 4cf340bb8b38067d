"""`waitlens patch` (cross-model activation patching at "wait") and `waitlens ablate`
(within-model content/structure ablations).

    waitlens patch --source SPEC --target SPEC --trajectories F.jsonl --out DIR [--layers all]
                   [--window -2:4] [--metric forced_answer,next_token_kl,recheck] [--attribution] [--one-way]
                   [--batch-tokens 8192 | 0]
    torchrun --standalone --nproc-per-node 2 -m waitlens.experiments.cli patch ...   # data-parallel

A thin parser over `waitlens.experiments.analyses.patch` (patch_to_dir, ablate_to_dir).
    waitlens ablate --model SPEC --trajectories F.jsonl --out DIR --kind replace-wait|remove-wait|shuffle-steps|delete-steps
"""

from __future__ import annotations

import argparse
from pathlib import Path

from waitlens.experiments.cli import positive_int


def _common(p) -> None:
    p.add_argument("--trajectories", required=True, help="trajectories JSONL file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N trajectories")
    p.add_argument("--word", default="wait", help="the discourse word (default: wait)")
    p.add_argument("--kl-positions", type=int, default=8, help="positions the KL is averaged over")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the CIs")
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
    p.add_argument("--metric", default=None,
                   help="comma-separated metrics: forced_answer, next_token_kl, recheck, kl, gold_prob, and the "
                   "organism's correction (default: forced_answer,next_token_kl,recheck; on the organism "
                   "kl,correction,gold_prob)")
    p.add_argument("--attribution", action="store_true",
                   help="also run attribution patching (differentiable metrics) and its correlation with exact")
    p.add_argument("--one-way", action="store_true", help="only target <- source (default: both directions)")
    p.add_argument("--sampled", action="store_true",
                   help="also decode greedily after each patched wait that follows a slip (organism truth) "
                   "and record whether the continuation writes the corrected value")
    p.add_argument("--no-control", action="store_true", help="skip the random-position control")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batched forward (default 8192); 0 = one trajectory at a time")
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
    return trajs, Path(args.out)


def run_patch(args: argparse.Namespace) -> int:
    from waitlens.experiments.analyses.patch import patch_to_dir
    from waitlens.hooks import load_model

    trajs, out = _setup(args)
    metrics = None if args.metric is None else [m.strip() for m in args.metric.split(",") if m.strip()]
    kw = dict(device=args.device, dtype=args.model_dtype)
    source, target = load_model(args.source, **kw), load_model(args.target, **kw)
    patch_to_dir(source, target, trajs, out, layers=args.layers, window=args.window, metrics=metrics,
                 word=args.word, both_directions=not args.one_way, control=not args.no_control,
                 attribution=args.attribution, sampled=args.sampled, kl_positions=args.kl_positions, n_boot=args.n_boot,
                 seed=args.seed, progress=not args.quiet, max_batch_tokens=_batch_tokens(args.batch_tokens),
                 manifest={"source": args.source, "target": args.target, "trajectories": args.trajectories})
    return 0


def _batch_tokens(n: int | None) -> int | None:
    from waitlens.hooks.batching import MAX_BATCH_TOKENS

    if n is not None and n < 0:
        raise SystemExit(f"--batch-tokens must be 0 (one at a time) or positive, got {n}")
    return MAX_BATCH_TOKENS if n is None else (n or None)


def run_ablate(args: argparse.Namespace) -> int:
    from waitlens.experiments.analyses.patch import ablate_to_dir
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
