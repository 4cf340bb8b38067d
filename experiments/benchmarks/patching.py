"""Attribution patching vs exact patching over the full grid: Pearson r and cost.

    python -m experiments.benchmarks.patching [--source organism:post-large] [--target organism:sft-1k]
        [--trajectories F.jsonl | --n 60] [--window=-2:4] [--threads 1]
    python -m experiments.benchmarks.patching --stand-in   # no organism: a tiny Qwen2 and a
                                                           # fine-tune-like perturbed copy

Cost is in forward-pass equivalents per trajectory, from wall-clock time divided by the time
of one clean full forward of the target (the unit both methods share):

- exact = source forward + clean target forward (with KV cache) + every patched tail forward
  (one batched forward per patched position, all layers as batch rows);
- attribution = source forward + one target forward with gradient hooks + one backward per
  scalar metric (gold_prob: 1; correction: 1 per distinct wait read-out).

Also printed: the token-count estimate of the exact tails (rows × tail length / sequence
length), which is what the cost would be without per-call overhead.
"""

from __future__ import annotations

import argparse
import time
import warnings


def _stand_in(tmp: str, n: int, perturb: float):
    import torch

    from tests.conftest import make_tiny_qwen, tiny_trajectory
    from waitlens.hooks import load_model

    base = load_model(str(make_tiny_qwen(f"{tmp}/base", layers=4, d_model=64, seed=0)), device="cpu", dtype="float32")
    tuned = load_model(str(make_tiny_qwen(f"{tmp}/tuned", layers=4, d_model=64, seed=0)), device="cpu",
                       dtype="float32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "fine-tune": a small relative perturbation of every weight
        for p in tuned.hf.parameters():
            p.add_(perturb * p.std() * torch.randn(p.shape, generator=g))
    tuned.spec = "tiny-tuned"
    base.spec = "tiny-base"
    reasons = ["3 + 4 = 7 ; wait 3 + 4 = 7 so 7 - 2 = 5 therefore 5",
               "3 + 4 = 8 wait 3 + 4 = 7 ; 7 - 2 = 5 so 5",
               "3 + 4 = 7 so 7 - 2 = 4 wait 7 - 2 = 5 therefore 5"]
    trajs = [tiny_trajectory(i, reasoning=reasons[i % 3]) for i in range(n)]
    return base, tuned, trajs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="organism:post-large")
    ap.add_argument("--target", default="organism:sft-1k")
    ap.add_argument("--trajectories", default=None, help="JSONL (default: sample --n from the target)")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--window", default="-2:4")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stand-in", action="store_true", help="tiny Qwen2 + perturbed copy instead of the organism")
    ap.add_argument("--perturb", type=float, default=0.3, help="stand-in: weight noise, in units of each tensor's std")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from waitlens.experiments.analyses.patch import resolve_study_metrics
    from waitlens.hooks import load_model
    from waitlens.hooks.patching import patch
    from waitlens.probes.patching import attribution_agreement

    torch.set_num_threads(args.threads)
    if args.stand_in:
        import tempfile

        source, target, trajs = _stand_in(tempfile.mkdtemp(), args.n, args.perturb)
    else:
        source, target = load_model(args.source, device="cpu"), load_model(args.target, device="cpu")
        if args.trajectories:
            from waitlens.traces import load_trajectories

            trajs = load_trajectories(args.trajectories)[: args.n]
        else:
            from waitlens.experiments.organism.sample import sample

            trajs = sample(target, args.n, seed=0)
    print(f"{target.spec} <- {source.spec}: {len(trajs)} trajectories, window {args.window}, layers {args.layers}")
    for metrics in (["gold_prob"], ["correction"], ["gold_prob", "correction"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            res = patch(source, target, trajs, layers=args.layers, window=args.window,
                        metrics=resolve_study_metrics(metrics),
                        attribution=True)
            wall = time.perf_counter() - t0
        c, n = res.info["cost"], res.info["n_cases"]
        if not len(res.table):
            print(f"  {metrics}: no rows (no wait after a slip?)")
            continue
        unit = c["clean_s"] / max(c["clean_forwards"], 1)
        exact_fe = (c["source_s"] + c["clean_s"] + c["tail_s"]) / unit / n
        attr_fe = (c["source_s"] + c["attribution_s"]) / unit / n
        tok_fe = 2 + c["tail_token_fraction"] / n
        agree = attribution_agreement(res.table)
        for _, row in agree.iterrows():
            print(f"  metric {row['metric']:<10} r(cells) = {row['r_cells']:.3f}  r(grid means) = "
                  f"{row['r_grid_means']:.3f}  ({row['n_cells']} cells, {row['n_grid']} grid points)")
        print(f"  cost per trajectory [{'+'.join(metrics)}]: exact {exact_fe:.1f} forward-equivalents "
              f"(token estimate {tok_fe:.1f}; {c['tail_rows'] / n:.0f} patched rows), attribution {attr_fe:.1f} "
              f"forward-equivalents ({c['backward_passes'] / n:.1f} backward passes); one forward = "
              f"{unit * 1e3:.1f} ms; total wall {wall:.1f} s")
        t = res.table
        nz = np.abs(t["effect"]).max()
        print(f"  max |exact effect| {nz:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
