"""`waitlens probe`: per-layer correctness probes on one or more activation stores.

    waitlens probe --store DIR [--store DIR2 ...] --out DIR [--word wait ...] [--transfer]

Writes probe_results.csv (one row per model, word, layer), probe_margins.csv (each probe's
margin over its controls, paired-bootstrap CIs), probe_auroc_by_layer.png; with --transfer
also transfer.csv, transfer_cosine.csv, transfer_matrix.png and transfer_cosine.png.
"""

from __future__ import annotations

import argparse

from waitlens.experiments.cli import int_at_least, nonnegative_int, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="linear probes for eventual correctness, per layer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, metavar="DIR",
                   help="activation store directory (repeat for several models)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--word", action="append", default=None,
                   help="discourse word to probe at (repeatable; 'all' pools every word; default wait)")
    p.add_argument("--layers", type=nonnegative_int, nargs="+", default=None, help="layer numbers (default: all stored)")
    p.add_argument("--model", default=None, help="probe only this model's positions of a mixed store")
    p.add_argument("--allow-mixed", action="store_true", help="probe a store that mixes models, as one")
    p.add_argument("--folds", type=int_at_least(2), default=5, help="outer CV folds, grouped by problem (default 5)")
    p.add_argument("--inner-folds", type=int_at_least(2), default=3, help="inner CV folds choosing C (default 3)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of problems (default 1000)")
    p.add_argument("--no-controls", action="store_true", help="skip the controls (faster)")
    p.add_argument("--transfer", action="store_true", help="also the transfer table between the stores")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads for the solver (default 1: its matrices are small, and extra threads "
                        "on a shared CPU slow it down; raise it on a machine of your own)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args) -> int:
    from waitlens.experiments.analyses.probe import probe_to_dir

    if args.transfer and len(args.store) < 2:
        raise ValueError("--transfer needs at least two --store directories")
    probe_to_dir(args.store, args.out, words=args.word or ["wait"], layers=args.layers, model=args.model,
                 allow_mixed=args.allow_mixed, folds=args.folds, inner_folds=args.inner_folds,
                 controls=not args.no_controls, n_boot=args.n_boot, seed=args.seed, threads=args.threads,
                 transfer=args.transfer)
    return 0
