"""`waitlens organism train | sample | eval | detect` — the model organism's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from waitlens.experiments.organism.registry import REGIMES
from waitlens.traces.atomic import write_json

MODEL_HELP = f"organism:<regime> ({', '.join(REGIMES)}) or a regime directory from `train --out`"


def register(subparsers) -> None:
    p = subparsers.add_parser("organism", help="train, sample and evaluate the built-in model organism",
                              description="The model organism: a tiny Qwen2 trained on chained mod-10 "
                                          "arithmetic whose traces use 'wait', 'so', 'alternatively'.")
    sub = p.add_subparsers(dest="organism_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 0)[1])

    t = sub.add_parser("train", help="retrain the three regimes (base, sft-1k, post-large) from one seed")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0: the shipped weights)")
    t.add_argument("--out", default=None, help="output directory (default: the shipped weights dir)")
    t.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (for CI)")
    t.add_argument("--recipe", default="default", choices=["default", "fixed-steps", "paced", "detect"],
                   help="default: the shipped recipe (a base stopped at 0.30 held-out slips, then sft-1k and "
                        "post-large on go-on traces); fixed-steps: a base trained a fixed 450 steps, then the pair on "
                        "traces whose every 'wait' re-checks; paced: that pair from the paced base; detect: the paced "
                        "base, then the pair on checked traces (opt-in recipes; never the shipped weights)")
    t.add_argument("--regimes", nargs="+", default=None, metavar="REGIME",
                   help="train only these fine-tuned regimes (the base always); bitwise the same as in a full run")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(handler=cmd_train)

    s = sub.add_parser("sample", help="sample graded trajectories with ground truth to JSONL")
    _model_args(s)
    s.add_argument("--out", required=True, help="output JSONL file")
    s.set_defaults(handler=cmd_sample)

    e = sub.add_parser("eval", help="accuracy, wait statistics, fix and keep rates with 95% CIs")
    _model_args(e, nargs="+")
    e.add_argument("--json", default=None, help="also write the results as JSON here")
    e.set_defaults(handler=cmd_eval)

    d = sub.add_parser("detect", help="teacher-forced slip detection and logit lens (does it see its slips?)")
    d.add_argument("--model", required=True, nargs="+",
                   help=MODEL_HELP)
    d.add_argument("--n", type=int, default=400, help="held-out problems, written with 30%% slips (default 400)")
    d.add_argument("--seed", type=int, default=123, help="problem seed (default 123)")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(handler=cmd_detect)

    pr = sub.add_parser("probe", help="probe eventual correctness at 'wait' on each model's OWN samples",
                        description="For each model on its own: sample held-out trajectories, capture the residual "
                                    "stream at 'wait' and at matched random positions, fit per-layer correctness "
                                    "probes; report the best layer's margins over the random-position control and "
                                    "the position baseline (95% problem-bootstrap CIs).")
    _model_args(pr, nargs="+", n=600, per_problem=False)
    pr.add_argument("--word", default="wait", help="discourse word to probe at (default wait)")
    pr.add_argument("--folds", type=int, default=5, help="outer CV folds, grouped by problem (default 5)")
    pr.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of problems (default 1000)")
    pr.add_argument("--json", default=None, help="also write the records as JSON here")
    pr.set_defaults(handler=cmd_probe)


def _model_args(p, nargs=None, n: int = 500, per_problem: bool = True) -> None:
    p.add_argument("--model", required=True, nargs=nargs,
                   help=MODEL_HELP)
    p.add_argument("--n", type=int, default=n, help=f"number of trajectories (default {n})")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    if per_problem:
        p.add_argument("--per-problem", type=int, default=1, help="samples per problem (default 1)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_train(args) -> int:
    from waitlens.experiments.organism.registry import WEIGHTS_DIR
    from waitlens.experiments.organism.train import (
        RECIPES,
        SMOKE,
        train_all,
        write_shipped_manifest,
    )

    out = Path(args.out) if args.out else WEIGHTS_DIR
    shipped = out.resolve() == WEIGHTS_DIR.resolve()
    if shipped and (args.recipe != "default" or args.regimes):
        raise ValueError(f"--recipe {args.recipe} / --regimes would overwrite part of the shipped weights "
                         f"at {WEIGHTS_DIR}: pass --out DIR")
    train_all(out, seed=args.seed, config=SMOKE if args.smoke else RECIPES[args.recipe],
              regimes=tuple(args.regimes) if args.regimes else None)
    if shipped and not args.smoke:
        write_shipped_manifest(WEIGHTS_DIR, WEIGHTS_DIR.parent / "shipped.json")
    return 0


def _sample(spec: str, args):
    from waitlens.experiments.organism.sample import load, sample

    model = load(spec)
    return sample(model, args.n, temperature=args.temperature, seed=args.seed, n_per_problem=args.per_problem)


def cmd_sample(args) -> int:
    from waitlens.traces.trajectory import save_trajectories

    trajs = _sample(args.model, args)
    path = save_trajectories(trajs, args.out)
    acc = sum(bool(t.correct) for t in trajs) / max(1, len(trajs))
    print(f"wrote {len(trajs)} trajectories ({args.model}, accuracy {acc:.3f}) to {path}")
    return 0


def cmd_eval(args) -> int:
    from waitlens.experiments.organism.sample import evaluate, format_table, resolve_spec

    for spec in args.model:
        resolve_spec(spec)  # fail early on an unknown spec
    results = {spec: evaluate(_sample(spec, args)) for spec in args.model}
    print(f"n={args.n} trajectories per model, temperature {args.temperature}, seed {args.seed}")
    print(format_table(results))
    if args.json:
        write_json(args.json, {"n": args.n, "temperature": args.temperature, "seed": args.seed, "results": results})
    sys.stdout.flush()
    return 0


def cmd_detect(args) -> int:
    from waitlens.experiments.organism.detect import detection, format_detection
    from waitlens.experiments.organism.sample import load, resolve_spec

    for spec in args.model:
        resolve_spec(spec)  # fail early on an unknown spec
    results = {spec: detection(load(spec), n=args.n, seed=args.seed) for spec in args.model}
    print(f"{args.n} held-out problems per model, teacher-forced, 30% of steps slipped (seed {args.seed})")
    print(format_detection(results))
    return 0


def cmd_probe(args) -> int:
    from waitlens.experiments.organism.probe import format_probe, probe_own_samples
    from waitlens.experiments.organism.sample import resolve_spec

    for spec in args.model:
        resolve_spec(spec)  # fail early on an unknown spec
    records = [probe_own_samples(spec, n=args.n, seed=args.seed, temperature=args.temperature, word=args.word,
                                 folds=args.folds, n_boot=args.n_boot).record for spec in args.model]
    print(f"each model on its own samples: n={args.n} trajectories, temperature {args.temperature}, seed {args.seed}")
    print(format_probe(records))
    if args.json:
        write_json(args.json, {"n": args.n, "temperature": args.temperature, "seed": args.seed,
                               "results": [r.to_dict() for r in records]})
    sys.stdout.flush()
    return 0
