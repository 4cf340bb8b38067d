"""`waitlens intervene`: force a "Wait" into each trajectory, continue, and grade again.

    waitlens intervene --model SPEC --trajectories F.jsonl --out DIR [--at end|steps]
                       [--word Wait] [--n 1] [--engine hf|vllm]

For every trajectory: its own prefix (the whole reasoning for --at end, s1's setting; up to one
step boundary for --at steps), the forced word, then the model continues with the same engine
and sampling settings and answers; the answer is graded again. Repeat --model/--trajectories
(in pairs) to compare models. DIR gets <model>.jsonl (the re-runs), changes.csv, rates.csv
(fix rate wrong -> right, break rate right -> wrong, unchanged, change in accuracy, 95% CIs
resampling problems), comparison.csv (between models, paired over problems), summary.json and
interventions.png. On the organism each change is checked against the ground truth.
DIR is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("intervene", help="forced-wait interventions: fix and break rates",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="SPEC", help="model spec (repeatable)")
    p.add_argument("--trajectories", action="append", required=True, metavar="FILE",
                   help="that model's trajectories JSONL (once per --model, same order)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--at", default="end", choices=["end", "steps"], help="where the word is forced (default end)")
    p.add_argument("--word", default=None, help="default Wait (wait where the tokenizer lacks Wait)")
    p.add_argument("--n", type=int, default=1, help="forced words per trajectory (default 1)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--limit", type=int, default=None, help="only the first N trajectories per model")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the trajectories' own (extra.temperature), else 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 96 on the organism, else 256")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from waitlens.experiments.analyses.interventions import interventions_to_dir
    from waitlens.experiments.organism.interventions import is_organism
    from waitlens.hooks.interventions import InterventionError
    from waitlens.hooks.vllm_engine import load_engine
    from waitlens.traces.atomic import atomic_dir
    from waitlens.traces.trajectory import load_trajectories

    if len(args.model) != len(args.trajectories):
        raise ValueError(f"give one --trajectories per --model: {len(args.model)} models, "
                         f"{len(args.trajectories)} trajectory files")
    if len(set(args.model)) != len(args.model):
        raise ValueError("a model spec is given twice; results are keyed by spec")
    if args.n < 1:
        raise InterventionError(f"--n (forced words per trajectory) must be a whole number >= 1, got {args.n}")
    trajs = [load_trajectories(f)[: args.limit] for f in args.trajectories]  # bad files fail before any model
    temp = args.temperature
    if temp is None:
        temps = {t.extra.get("temperature") for ts in trajs for t in ts}
        temp = float(temps.pop()) if len(temps) == 1 and None not in temps else 1.0
    organism = all(is_organism(ts) for ts in trajs)
    max_new = args.max_new_tokens or (96 if organism else 256)
    runs = []
    for spec, ts in zip(args.model, trajs, strict=True):
        name = spec.split(":", 1)[1] if spec.startswith("organism:") else Path(spec).name or spec
        runs.append((name, load_engine(args.engine, spec, device=args.device, dtype=args.dtype, seed=args.seed), ts))
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        summary = interventions_to_dir(runs, tmp, at=args.at, word=args.word, n=args.n, temperature=temp,
                                       top_p=args.top_p, max_new_tokens=max_new, seed=args.seed,
                                       batch_size=args.batch_size, n_boot=args.n_boot, progress=not args.quiet)
    for name, s in summary["models"].items():
        f, b, d = s["fix_rate"], s["break_rate"], s["delta_accuracy"]
        line = (f"{name}: fix {f[0]:.3f} [{f[1]:.3f}, {f[2]:.3f}] ({s['n_fixed']}/{s['n_wrong_before']}), "
                f"break {b[0]:.3f} [{b[1]:.3f}, {b[2]:.3f}] ({s['n_broken']}/{s['n_right_before']}), "
                f"accuracy change {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
        if "truth_agrees_with_grading" in s:
            line += f"; ground truth agrees with grading on {s['truth_agrees_with_grading']:.3f}"
        print(line)
    for c in summary["comparison"]:
        print(f"{c['a']} - {c['b']} {c['metric']}: {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
              + (" (apart)" if c["separated"] else ""))
    print(f"-> {out}")
    if args.debug:
        print(json.dumps(summary, indent=1))
    return 0
