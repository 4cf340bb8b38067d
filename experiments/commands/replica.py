"""`waitlens replica SPEC --out DIR`: a small random model with a real model's architecture
family, tokenizer, special tokens, chat template and prompt format (`hooks.replica`).

    waitlens replica deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --out replicas/r1
    waitlens replica simplescaling/s1.1-1.5B --out replicas/s1
    waitlens replica path/to/config-dir --out DIR --tokenizer DIR --chat-template FILE --format r1

Known real models (the s1.1 and R1-Distill-Qwen families) are built from the realdata folder
($WAITLENS_REALDATA, default ../shared/realdata); anything else from its own directory, or,
with the internet, from a hub id's config and tokenizer files (never its weights).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from waitlens.experiments.cli import nonnegative_int, positive_int

    p = subparsers.add_parser("replica", help="a small random model with a real model's tokenizer, template and format",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="hub id (known: s1.1, R1-Distill-Qwen), model directory, or config.json")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the spec's)")
    p.add_argument("--bpe", default=None, help="Qwen2 BPE directory, for a config-only R1-distill tokenizer")
    p.add_argument("--chat-template", default=None, help="chat template file (.jinja)")
    p.add_argument("--format", default=None, help="prompt format preset (r1, s1, chat, plain; default: inferred)")
    p.add_argument("--layers", type=positive_int, default=2, help="number of blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=64, help="residual width, a multiple of 16 (default 64)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from waitlens.experiments.analyses.replica import build_replica
    from waitlens.hooks.replica import replica_info

    out = build_replica(args.spec, args.out, n_layers=args.layers, d_model=args.d_model, seed=args.seed,
                        tokenizer=args.tokenizer, chat_template=args.chat_template, format=args.format, bpe=args.bpe,
                        overwrite=args.overwrite)
    info = replica_info(out) or {}
    print(f"replica of {info.get('replica_of', args.spec)} in {out}: {info.get('config', {}).get('model_type')}, "
          f"{args.layers} layers x d_model {args.d_model}, vocabulary {info.get('tokenizer', {}).get('n_vocab')}, "
          f"format {info.get('format', {}).get('name')} (random weights: numbers test the pipeline, not the model)")
    return 0
