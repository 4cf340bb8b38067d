"""The library side of `waitlens probe` and the study's probes stage: per-layer correctness
probes on one or more activation stores, with controls and transfer, written into a directory
(probe_results.csv, probe_margins.csv, probe_auroc_by_layer.png; transfer tables and figures)."""

from __future__ import annotations


def probe_to_dir(stores, out, *, words=("wait",), layers=None, model=None, allow_mixed=False, folds=5,
                 inner_folds=3, controls=True, n_boot=1000, seed=0, threads=1, transfer=False,
                 ceilings=None, results=None, workers=1) -> dict:
    """Probe every store (a directory or ActivationStore), write tables and figures into `out`.

    ceilings: `probes.feature_probes` rows to draw in the AUROC-by-layer figure (the organism's
    ground-truth ceilings), if any. results: the stores' `fit_layer_probes` results, if the caller
    fitted them already (with these settings); else each store is fitted here, in up to `workers`
    processes (`experiments.parallel.map_fork`: the same results as one process at threads=1).

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
    from waitlens.probes.linear import CSV_COLUMNS
    from waitlens.probes.transfer import transfer_matrix
    from waitlens.traces.atomic import atomic_write

    out = Path(out)
    words = list(words)
    stores = [s if isinstance(s, ActivationStore) else ActivationStore(s) for s in stores]
    _check_writable(out)  # before the work, not after it
    if results is None:
        results = fit_stores(stores, words=words, layers=layers, model=model, allow_mixed=allow_mixed,
                             folds=folds, inner_folds=inner_folds, controls=controls, n_boot=n_boot, seed=seed,
                             threads=threads, workers=workers)
    if len(results) != len(stores):
        raise ValueError(f"{len(results)} probe results for {len(stores)} stores")
    summary = {}
    for res in results:
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
    margins = pd.concat([r.margins for r in results], ignore_index=True)
    atomic_write(out / "probe_results.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "probe_margins.csv", lambda tmp: margins.to_csv(tmp, index=False))
    save_figure(plot_auroc_by_layer(table, ceilings=ceilings), out / "probe_auroc_by_layer.png")
    print(f"wrote {out / 'probe_results.csv'}, {out / 'probe_margins.csv'}, {out / 'probe_auroc_by_layer.png'}")
    if transfer and len(stores) > 1:
        word = words[0]
        tr = transfer_matrix(stores, word=word, layers=layers, probe_results=results,
                             n_folds=folds, n_inner=inner_folds, n_boot=n_boot,
                             seed=seed, threads=threads, names=None)
        atomic_write(out / "transfer.csv", lambda tmp: tr.table.to_csv(tmp, index=False))
        atomic_write(out / "transfer_cosine.csv", lambda tmp: tr.cosine.to_csv(tmp, index=False))
        matrix = tr.matrix("best")
        save_figure(plot_transfer_matrix(matrix, f"probe transfer at '{word}' (best layer of the train model)"),
                    out / "transfer_matrix.png")
        save_figure(plot_cosine(tr.cosine, f"probe directions at '{word}'"), out / "transfer_cosine.png")
        print(matrix.round(3).to_string())
        print(f"wrote {out / 'transfer.csv'}, {out / 'transfer_cosine.csv'}, {out / 'transfer_matrix.png'}")
    return summary


def fit_stores(stores, *, words=("wait",), layers=None, model=None, allow_mixed=False, folds=5, inner_folds=3,
               controls=True, n_boot=1000, seed=0, threads=1, workers=1) -> list:
    """`fit_layer_probes` on each store (probe_to_dir's settings), in up to `workers` processes."""
    from functools import partial

    from waitlens.experiments.parallel import map_fork
    from waitlens.probes.linear import fit_layer_probes

    fit = partial(fit_layer_probes, words=list(words), layers=layers, model=model, allow_mixed=allow_mixed,
                  n_folds=folds, n_inner=inner_folds, controls=controls, n_boot=n_boot, seed=seed, threads=threads)
    return map_fork(fit, stores, workers if threads == 1 else 1)


def _check_writable(out) -> None:
    """Create `out` and write a scratch file there: an unwritable --out fails now, naming it."""
    import os
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".waitlens-write-test.")
    os.close(fd)
    os.unlink(tmp)
