"""`waitlens capture`: residual-stream states at discourse-token positions, to an activation store."""

from __future__ import annotations

import argparse
import os

from waitlens.experiments.cli import nonnegative_int, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "capture",
        help="capture residual-stream states at discourse-token positions into an activation store",
        description="Find lexicon words in each trajectory's reasoning (as this model tokenizes it) and "
        "store the residual stream at those tokens, for the chosen layers. Rerun the same command "
        "to resume an interrupted capture.",
    )
    p.add_argument("--model", required=True, help="model spec: local dir, .gguf file, 'smollm2', 'organism:VARIANT' or hub id")
    p.add_argument("--trajectories", required=True, help="trajectories JSONL file")
    p.add_argument("--out", required=True, help="activation store directory (created; resumed if interrupted)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers, e.g. 0,3,5")
    p.add_argument("--words", default=None, help="comma-separated lexicon (default: the built-in discourse lexicon)")
    p.add_argument("--hook", default="resid_post", choices=["resid_post", "resid_pre"])
    p.add_argument("--anchor", default="first", choices=["first", "last", "both"],
                   help="which token of a multi-token word")
    p.add_argument("--controls", action="store_true",
                   help="also capture one matched random non-discourse position per discourse position")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for --controls")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype")
    p.add_argument("--model-dtype", default="auto", help="dtype to run the model in (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--format", default=None, help="prompt format preset (default: the model's own)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--shard-size", type=positive_int, default=64, help="trajectories per shard (the unit of resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from waitlens.hooks import capture_residuals, load_model
    from waitlens.traces import control_positions, find_positions, load_trajectories

    trajectories = load_trajectories(args.trajectories)
    check_out_dir(args.out)  # before the model loads
    model = load_model(args.model, device=args.device, dtype=args.model_dtype, format=args.format)
    positions = find_positions(model, trajectories, args.words, anchor=args.anchor)
    if args.controls and len(positions):
        positions = positions.concat(control_positions(model, trajectories, positions, seed=args.seed))
    store = capture_residuals(
        model, trajectories, positions, args.out, layers=args.layers, hook=args.hook,
        batch_size=args.batch_size, storage_dtype=args.dtype, shard_size=args.shard_size,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # data-parallel (torchrun): rank 0 reports the store
    words = store.metadata["word"].value_counts().to_dict() if len(store) else {}
    print(f"captured {len(store)} positions x {len(store.layers)} layers ({store.hook}, d_model {store.d_model}, "
          f"{store.manifest['dtype']}) from {len(trajectories)} trajectories of {args.model} -> {store.path}"
          f"  words: {words}")
    return 0


def check_out_dir(out) -> None:
    """An --out that can never be a directory (it, or a folder above it, is a file) fails now."""
    from pathlib import Path

    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(p))
