"""Benchmark: all layers x folds of the probe on a 10,000-position store, fast path vs the
naive per-layer loop (re-read the layer from the store, refit the scaler, one scikit-learn
LogisticRegression per inner fold and C).

    .venv/bin/python -m experiments.benchmarks.probes [--n 10000] [--layers 8] [--d 128]

Both paths use the same folds, the same C grid and the same selection rule (mean held-out
log loss over inner folds), and fit the real and the shuffled-label task; the script prints
both times, their ratio, and the largest AUROC difference between them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np


def naive_layer_loop(
    read_layer: Callable[[int], np.ndarray], n_layers: int, labels: Sequence[np.ndarray], folds,
    Cs: Sequence[float], *, tol: float = 1e-6, max_iter: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """The obvious per-layer code. Returns (oof [task, n, layer], chosen C [fold+1, layer]).

    `read_layer(li) -> [n, d]` is called once per layer (it re-reads the store)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    Cs = sorted(Cs)
    y0 = np.asarray(labels[0]).astype(int)
    n = len(y0)
    F = folds.n_folds
    oof = np.full((len(labels), n, n_layers), np.nan)
    chosen = np.zeros((F + 1, n_layers))
    for li in range(n_layers):
        X = np.asarray(read_layer(li), dtype=np.float64)
        for f in range(F + 1):
            tr = np.flatnonzero(folds.outer != f) if f < F else np.arange(n)
            te = np.flatnonzero(folds.outer == f) if f < F else np.array([], dtype=int)
            scaler = StandardScaler().fit(X[tr])
            Xtr = scaler.transform(X[tr])
            inner = folds.inner[f][tr]
            scores = np.zeros((len(np.unique(inner)), len(Cs)))
            for j, k in enumerate(np.unique(inner)):
                fit_rows, held = inner != k, inner == k
                for c, C in enumerate(Cs):
                    m = LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit(Xtr[fit_rows], y0[tr][fit_rows])
                    scores[j, c] = log_loss(y0[tr][held], m.predict_proba(Xtr[held])[:, 1], labels=[0, 1])
            C = Cs[int(np.argmin(scores.mean(0)))]
            chosen[f, li] = C
            for t, y in enumerate(labels):
                m = LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit(Xtr, np.asarray(y)[tr])
                if len(te):
                    oof[t, te, li] = m.predict_proba(scaler.transform(X[te]))[:, 1]
    return oof, chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="positions (default 10000)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads for both paths (default 1)")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from waitlens.hooks.store import ActivationStore, write_store
    from waitlens.probes.folds import make_folds, shuffle_labels
    from waitlens.probes.linear import DEFAULT_CS, cross_validate, fit_layer_probes
    from waitlens.probes.metrics import auroc
    from waitlens.probes.probe_data import load_probe_data
    from waitlens.probes.synthetic import planted_states

    per_traj = 5
    n_traj = max(args.n // per_traj, 2)  # every row a 'wait' row (no control rows)
    X, meta = planted_states(n_traj // 2, 2, per_traj, n_layers=args.layers, d_model=args.d,
                             planted_layer=args.layers // 2, signal=1.0, seed=0, controls=False)
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(args.threads):
        write_store(f"{tmp}/store", torch.from_numpy(X), meta, {"model": "synthetic"})
        store = ActivationStore(f"{tmp}/store")
        del X
        print(f"store: {len(store)} 'wait' positions, {meta['problem_id'].nunique()} problems, "
              f"{args.layers} layers, d_model={args.d}, {args.folds} outer x 3 inner folds x {len(DEFAULT_CS)} C; "
              f"threads={args.threads}")

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        data = load_probe_data(store, words="wait", include_controls=False)
        y = data.metadata["correct"].to_numpy().astype(int)
        groups = data.metadata["problem_id"].to_numpy()
        folds = make_folds(y, groups, args.folds, 3, seed=0)
        ys = shuffle_labels(y, data.metadata["trajectory_id"].to_numpy(), 0, strata=folds.outer)
        fit = cross_validate(data.states, [y, ys], folds, Cs=DEFAULT_CS)
        t_fast = time.perf_counter() - t0
        fast_auc = [auroc(y, fit.oof[0, :, li]) for li in range(args.layers)]
        print(f"fast path  (read once, batched over layers): {t_fast:8.1f} s   [{len(y)} positions]")

        if not args.skip_naive:
            rows = store.metadata.index[store.metadata["word"] == "wait"].to_numpy()

            def read_layer(li):
                return store.states(layers=[store.layers[li]], rows=rows)[:, 0].numpy()

            t0 = time.perf_counter()
            oof, _ = naive_layer_loop(read_layer, args.layers, [y, ys], folds, DEFAULT_CS)
            t_naive = time.perf_counter() - t0
            naive_auc = [auroc(y, oof[0, :, li]) for li in range(args.layers)]
            diff = max(abs(a - b) for a, b in zip(fast_auc, naive_auc, strict=True))
            print(f"naive loop (per layer: re-read, refit scaler, sklearn): {t_naive:8.1f} s")
            print(f"ratio naive / fast: {t_naive / t_fast:.1f}x   max |AUROC fast - naive| over layers: {diff:.2e}")

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit_layer_probes(store, words="wait", n_boot=1000, threads=args.threads)
        t_all = time.perf_counter() - t0
        print(f"fit_layer_probes (+ shuffled-label and position-baseline controls, 1000-sample "
              f"bootstrap CIs; no random-position rows in this store): {t_all:8.1f} s")
        best = res.best_layer()
        print(res.table[res.table.layer == best].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
