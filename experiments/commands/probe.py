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
    if args.transfer and len(args.store) < 2:
        raise ValueError("--transfer needs at least two --store directories")
    probe_to_dir(args.store, args.out, words=args.word or ["wait"], layers=args.layers, model=args.model,
                 allow_mixed=args.allow_mixed, folds=args.folds, inner_folds=args.inner_folds,
                 controls=not args.no_controls, n_boot=args.n_boot, seed=args.seed, threads=args.threads,
                 transfer=args.transfer)
    return 0


def probe_to_dir(stores, out, *, words=("wait",), layers=None, model=None, allow_mixed=False, folds=5,
                 inner_folds=3, controls=True, n_boot=1000, seed=0, threads=1, transfer=False,
                 ceilings=None) -> dict:
    """Probe every store (a directory or ActivationStore), write tables and figures into `out`.

    ceilings: `probes.feature_probes` rows to draw in the AUROC-by-layer figure (the organism's
    ground-truth ceilings), if any.

    Returns a summary: per model and word, the best layer and its AUROC.
    """
    from pathlib import Path

    import pandas as pd

    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.probes import (
        plot_auroc_by_layer,
        plot_cosine,
        plot_transfer_matrix,
    )
    from waitlens.hooks.store import ActivationStore
    from waitlens.probes.linear import CSV_COLUMNS, fit_layer_probes
    from waitlens.probes.transfer import transfer_matrix

    out = Path(out)
    words = list(words)
    stores = [s if isinstance(s, ActivationStore) else ActivationStore(s) for s in stores]
    _check_writable(out)  # before the work, not after it
    results, summary = [], {}
    for store in stores:
        res = fit_layer_probes(store, words=words, layers=layers, model=model,
                               allow_mixed=allow_mixed, n_folds=folds, n_inner=inner_folds,
                               controls=controls, n_boot=n_boot, seed=seed, threads=threads)
        results.append(res)
        for word in dict.fromkeys(res.table["word"]):
            best = res.best_layer(word)
            r = res.table[(res.table.word == word) & (res.table.layer == best)].iloc[0]
            summary[f"{res.model}/{word}"] = {"best_layer": int(best), "auroc": float(r.auroc)}
            if not controls:
                print(f"{res.model} '{word}': best layer {best}: AUROC {r.auroc:.3f} [{r.auroc_lo:.3f}, {r.auroc_hi:.3f}]")
                continue
            m = res.margins[(res.margins.word == word) & (res.margins.layer == best)].iloc[0]
            print(f"{res.model} '{word}': best layer {best}: AUROC {r.auroc:.3f} [{r.auroc_lo:.3f}, "
                  f"{r.auroc_hi:.3f}], random-position control {r.control_random_auroc:.3f}, shuffled "
                  f"{r.control_shuffled_auroc:.3f}, position baseline {r.baseline_auroc:.3f}; margin over "
                  f"random {m.margin_random:+.3f} [{m.margin_random_lo:+.3f}, {m.margin_random_hi:+.3f}], "
                  f"over baseline {m.margin_baseline:+.3f} [{m.margin_baseline_lo:+.3f}, {m.margin_baseline_hi:+.3f}]")
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([r.table for r in results], ignore_index=True)[CSV_COLUMNS]
    table.to_csv(out / "probe_results.csv", index=False)
    pd.concat([r.margins for r in results], ignore_index=True).to_csv(out / "probe_margins.csv", index=False)
    save_figure(plot_auroc_by_layer(table, ceilings=ceilings), out / "probe_auroc_by_layer.png")
    print(f"wrote {out / 'probe_results.csv'}, {out / 'probe_margins.csv'}, {out / 'probe_auroc_by_layer.png'}")
    if transfer and len(stores) > 1:
        word = words[0]
        tr = transfer_matrix(stores, word=word, layers=layers, probe_results=results,
                             n_folds=folds, n_inner=inner_folds, n_boot=n_boot,
                             seed=seed, threads=threads, names=None)
        tr.table.to_csv(out / "transfer.csv", index=False)
        tr.cosine.to_csv(out / "transfer_cosine.csv", index=False)
        matrix = tr.matrix("best")
        save_figure(plot_transfer_matrix(matrix, f"probe transfer at '{word}' (best layer of the train model)"),
                    out / "transfer_matrix.png")
        save_figure(plot_cosine(tr.cosine, f"probe directions at '{word}'"), out / "transfer_cosine.png")
        print(matrix.round(3).to_string())
        print(f"wrote {out / 'transfer.csv'}, {out / 'transfer_cosine.csv'}, {out / 'transfer_matrix.png'}")
    return summary


def _check_writable(out) -> None:
    """Create `out` and write a scratch file there: an unwritable --out fails now, naming it."""
    import os
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".waitlens-write-test.")
    os.close(fd)
    os.unlink(tmp)
