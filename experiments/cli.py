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
    "waitlens.experiments.commands.sample",  # waitlens sample
    "waitlens.experiments.commands.intervene",  # waitlens intervene
    "waitlens.experiments.commands.replica",  # waitlens replica
    "waitlens.experiments.commands.store",  # waitlens store verify
    "waitlens.experiments.commands.importing",  # waitlens import
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


def int_at_least(lo: int):
    """An argparse type: an integer >= lo (``--limit -1990`` is an error, not "all but 1990")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def unit_float(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _user_error(e: BaseException) -> bool:
    """An error about the input, to print as one line: a WaitlensError, an OSError (a missing,
    unreadable or unwritable file), or a ValueError that waitlens's own code raised on purpose.
    Anything else (TypeError, IndexError, a ValueError from inside a library) is a bug."""
    from pathlib import Path

    from waitlens.traces.errors import WaitlensError

    if isinstance(e, WaitlensError | OSError):
        return True
    if isinstance(e, ValueError) and type(e).__module__.startswith("waitlens"):  # e.g. InsufficientDataError
        return True
    if type(e) is ValueError:  # raised by waitlens itself (its innermost frame is in waitlens)
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        root = Path(__file__).resolve().parents[1]  # the folder holding traces/ hooks/ probes/ experiments/
        where = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
        return where is not None and where.is_relative_to(root) and \
            where.relative_to(root).parts[0] in ("traces", "hooks", "probes", "experiments", "waitlens")
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waitlens",
        description="Probe what discourse tokens ('wait', 'so', ...) do inside reasoning models.",
    )
    parser.add_argument("--debug", dest="debug_all", action="store_true",
                        help="show the full traceback of an error (any command also takes --debug)")
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
    except KeyboardInterrupt:
        if getattr(args, "debug", False) or getattr(args, "debug_all", False):
            raise
        print(f"waitlens {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or getattr(args, "debug_all", False) or not _user_error(e):
            raise
        print(f"waitlens {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        text = f"{e.filename}: {e.strerror or e}"  # PermissionError, NotADirectoryError, ...
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
