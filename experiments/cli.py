"""The `waitlens` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`; heavy imports (torch, transformers) happen inside the handlers so
`waitlens --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# module path -> registers one or more subcommands
COMMAND_MODULES = [
    "waitlens.experiments.commands.capture",  # waitlens capture
    "waitlens.experiments.commands.tokens",  # waitlens tokens, waitlens answers
    "waitlens.experiments.commands.probe",  # waitlens probe
    "waitlens.experiments.commands.patch",  # waitlens patch, waitlens ablate
    "waitlens.experiments.commands.run",  # waitlens run
    "waitlens.experiments.organism.cli",  # waitlens organism train|sample|eval|detect
]
# options whose values may start with "-" (argparse would read "--window -2:4" as two options)
NEGATIVE_VALUE_OPTIONS = ("--window",)
_NEGATIVE_VALUE = re.compile(r"^-\d+(:-?\d+)?$")


def join_negative_values(argv: list[str]) -> list[str]:
    """``["--window", "-2:4"]`` -> ``["--window=-2:4"]``, so both spellings work."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1] in NEGATIVE_VALUE_OPTIONS and _NEGATIVE_VALUE.match(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waitlens",
        description="Probe what discourse tokens ('wait', 'so', ...) do inside reasoning models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a subcommand not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"waitlens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
