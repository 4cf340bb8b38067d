"""`waitlens tokens` and `waitlens answers`: token signals of reasoning trajectories.

    waitlens tokens  --model SPEC [--model SPEC2 ...] --trajectories FILE.jsonl [...] --out DIR
    waitlens tokens  --tokenizer DIR [--chat-template FILE] [--format NAME] [--name NAME] --trajectories F [...] --out DIR
    waitlens answers --model SPEC [--model SPEC2 ...] --trajectories FILE.jsonl [...] --out DIR

`--trajectories` is given once (every model scores the same trajectories) or once per model,
in the same order (each model its own samples, e.g. one organism regime each).

`--tokenizer` (repeatable, instead of --model) counts tokens with a real tokenizer and chat
template and no weights: token_table.csv keeps its columns, the probability ones blank.
The library side is `waitlens.experiments.analyses.tokens`.

tokens writes token_table.csv / token_table.md (ranked token–correctness association per
model), token_compare.csv (difference in effect size per token, with two or more models),
wait_by_model.csv / .md (the word's rank, AUROC, CI and q per model),
wait_distribution.csv (one row per wait), wait_summary.json, token_top.png, wait_position.png.

answers writes answer_curves.csv (forced-answer probability per prefix), transitions.csv,
alignment.json (waits vs matched random positions followed by a high-confidence transition,
per model, and differences between models), answer_around_wait.png, alignment.png.
"""

from __future__ import annotations

import argparse

from waitlens.experiments.cli import positive_int


def _common(p) -> None:
    p.add_argument("--model", action="append", default=None, metavar="SPEC",
                   help="model spec (repeat for several models)")
    p.add_argument("--tokenizer", action="append", default=None, metavar="DIR",
                   help="a tokenizer directory instead of a model: counts only, no weights (repeatable)")
    p.add_argument("--chat-template", action="append", default=None, metavar="FILE",
                   help="a .jinja chat template for the tokenizer(s) (once, or once per --model/--tokenizer)")
    p.add_argument("--name", action="append", default=None, metavar="NAME",
                   help="a name per --model/--tokenizer for the tables (default: the spec or directory)")
    p.add_argument("--bpe", default=None, metavar="DIR",
                   help="the Qwen2 BPE directory, for an R1-distill tokenizer config without a vocabulary")
    p.add_argument("--trajectories", action="append", required=True, metavar="FILE",
                   help="trajectories JSONL (once for all models, or once per model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", default=None, help="prompt format preset for every model (default: the model's)")
    p.add_argument("--lexicon", default=None, help="comma-separated discourse words (default: built-in)")
    p.add_argument("--word", default="wait", help="the discourse word studied (default wait)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N trajectories per model")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of problems (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def register(subparsers) -> None:
    p = subparsers.add_parser("tokens", help="token–correctness association and the wait distribution",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--min-count", type=positive_int, default=5, help="test only keys with this many occurrences (default 5)")
    p.add_argument("--top", type=positive_int, default=15, help="keys per model in the figure and markdown (default 15)")
    p.set_defaults(handler=run_tokens)

    a = subparsers.add_parser("answers", help="forced-answer curves, answer transitions, wait alignment",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    a.add_argument("--suffix", default=None, help="answer-forcing suffix (default: the model format's)")
    a.add_argument("-k", "--k", type=positive_int, default=8, help="window in tokens around waits/controls (default 8)")
    a.add_argument("--every", type=positive_int, default=4, help="also a prefix every N reasoning tokens (default 4)")
    a.add_argument("--delta", type=float, default=0.3, help="gold-probability jump that counts as a transition")
    a.add_argument("--min-confidence", type=float, default=0.5,
                   help="a transition is high-confidence when the new answer's probability is at least this")
    a.add_argument("--max-answer-tokens", type=int, default=None,
                   help="greedy answer length cap (default: the gold answer's token count)")
    a.set_defaults(handler=run_answers)


def _load(args):
    """[(spec, model, trajectories)] with the trajectory files paired to the models."""
    from waitlens.hooks.models import load_model
    from waitlens.traces.trajectory import load_trajectories

    if bool(args.model) == bool(args.tokenizer):
        raise ValueError("give --model SPEC (with weights) or --tokenizer DIR (counts only), one of the two")
    specs = args.model or args.tokenizer
    names = args.name or specs
    if len(specs) == 1 and len(names) > 1:  # one tokenizer or model for several named runs
        specs = specs * len(names)
    if len(names) != len(specs):
        raise ValueError(f"give --name once per model ({len(specs)}), not {len(names)} times")
    files, templates = args.trajectories, args.chat_template or [None]
    if len(files) not in (1, len(specs)):
        raise ValueError(f"give --trajectories once, or once per model ({len(specs)}), not {len(files)} times")
    if len(templates) not in (1, len(specs)):
        raise ValueError(f"give --chat-template once, or once per model ({len(specs)}), not {len(templates)} times")
    twice = sorted({s for s in names if names.count(s) > 1})
    if twice and args.name:
        raise ValueError(f"--name {twice[0]} is given twice: results are keyed by name")
    if twice:
        raise ValueError(f"--model {twice[0]} is given twice: results are keyed by model spec, so one would "
                         "overwrite the other; run the command once per trajectory file instead")
    files = files * len(specs) if len(files) == 1 else files
    templates = templates * len(specs) if len(templates) == 1 else templates
    cache: dict[str, list] = {}
    out = []
    for name, spec, f, template in zip(names, specs, files, templates, strict=True):
        trajs = cache.setdefault(f, load_trajectories(f))
        if args.limit:
            trajs = trajs[: args.limit]
        if args.model:
            model = load_model(spec, device=args.device, format=args.format, chat_template=template)
        else:
            model = load_model(None, tokenizer=spec, chat_template=template, bpe=args.bpe, format=args.format)
        out.append((name, model, trajs))
    return out


def run_tokens(args) -> int:
    from waitlens.experiments.analyses.tokens import tokens_to_dir

    tokens_to_dir(_load(args), args.out, lexicon=args.lexicon, word=args.word, min_count=args.min_count,
                  n_boot=args.n_boot, seed=args.seed, top=args.top)
    return 0


def run_answers(args) -> int:
    from waitlens.experiments.analyses.tokens import answers_to_dir

    if args.tokenizer:
        raise ValueError("waitlens answers needs model weights (--model SPEC); --tokenizer gives counts only")
    answers_to_dir(_load(args), args.out, lexicon=args.lexicon, word=args.word, suffix=args.suffix, k=args.k,
                   every=args.every, delta=args.delta, min_confidence=args.min_confidence,
                   max_answer_tokens=args.max_answer_tokens, n_boot=args.n_boot, seed=args.seed)
    return 0
