"""`waitlens import`: other people's reasoning traces as graded waitlens trajectories.

    waitlens import FILE --out OUT.jsonl --format FAMILY --prompt PATH --gold PATH
                    (--completion PATH | --reasoning PATH --answer PATH)
                    [--id PATH] [--problem-id PATH] [--model NAME] [--unfinished keep|drop]

FILE is a JSONL file, a JSON array, a parquet file, or a Hugging Face dataset saved with
``save_to_disk`` (``--split`` picks a split of a DatasetDict). Each PATH is a dotted path into
every record (``model_answers.thinking_model``; a list takes its first element). FAMILY is how
the completion is read: r1, s1, skyt1, qwen, chat, plain, organism. A completion that never
closes its reasoning is kept unfinished (``extra.finished = false``, no answer, not correct) or
dropped (``--unfinished drop``). Nothing is written unless every record imports.

Example (R1-Distill-Qwen-1.5B on GSM8K):

    waitlens import ../shared/realdata/traces/r1distill_qwen1.5b_gsm8k500.jsonl --out r1.jsonl \\
        --format r1 --prompt question --completion model_answers.thinking_model --gold correct_answer

The library side is `waitlens.traces.importing` (`import_records`, `read_records`).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="import reasoning traces (JSONL, JSON, parquet, datasets) as trajectories",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="records: .jsonl, .json array, .parquet, or a save_to_disk directory")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="trajectories file to write")
    p.add_argument("--format", required=True, metavar="FAMILY",
                   help="how completions are read: r1, s1, skyt1, qwen, chat, plain, organism")
    p.add_argument("--prompt", required=True, metavar="PATH", help="dotted path of the prompt")
    p.add_argument("--gold", required=True, metavar="PATH", help="dotted path of the gold answer")
    p.add_argument("--completion", metavar="PATH", help="dotted path of the raw completion")
    p.add_argument("--reasoning", metavar="PATH", help="dotted path of the reasoning (pre-split data)")
    p.add_argument("--answer", metavar="PATH", help="dotted path of the answer text (pre-split data)")
    p.add_argument("--id", metavar="PATH", help="dotted path of the trajectory id (default: the record index)")
    p.add_argument("--problem-id", metavar="PATH", help="dotted path of the problem id (default: the id)")
    p.add_argument("--model", metavar="NAME", help="model name for every trajectory (also prefixes ids)")
    p.add_argument("--unfinished", choices=("keep", "drop"), default="keep",
                   help="unfinished (truncated) completions: keep them ungraded-as-answered, or drop them")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run_import)


def fields_from_args(args) -> dict[str, str]:
    names = {"prompt": args.prompt, "gold": args.gold, "completion": args.completion,
             "reasoning": args.reasoning, "answer": args.answer, "id": args.id, "problem_id": args.problem_id}
    return {k: v for k, v in names.items() if v is not None}


def run_import(args) -> int:
    from waitlens.traces.importing import import_file

    trajs = import_file(args.file, args.out, format=args.format, fields=fields_from_args(args), model=args.model,
                        unfinished=args.unfinished, split=args.split)
    n_fin = sum(bool(t.extra.get("finished", True)) for t in trajs)
    n_ok = sum(bool(t.correct) for t in trajs)
    print(f"wrote {args.out}: {len(trajs)} trajectories ({n_fin} finished, {len(trajs) - n_fin} unfinished), "
          f"{n_ok} correct ({n_ok / max(n_fin, 1):.1%} of finished)")
    return 0
