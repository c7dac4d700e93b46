"""The ``phi3tune`` command line (also ``python -m phi3tune``): train, init, generate, merge, export, push, demo,
bench.

Every subcommand is one entry in ``SUBCOMMANDS`` (``_registry.py``): a function that adds its arguments to an
argparse parser and a function that runs it and returns an exit status. Adding one is a few lines::

    def _bench_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=int, default=20)

    @subcommand("bench", "time training steps", _bench_args)
    def _bench(args: argparse.Namespace) -> int:
        ...
        return 0

``train.py`` holds the subcommands that train, ``use.py`` those that use a trained adapter. Every subcommand gets
``--help`` and ``-q/--quiet``; phi3tune errors become one line on stderr and exit status 1, usage errors exit
status 2, an interrupted run exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..files import read_config as read_config
from ..logs import console, quiet_libraries
from . import train as train  # registers train, init, demo, bench (first: the order of --help)
from . import use as use  # registers generate, merge, export, push
from ._registry import SUBCOMMANDS as SUBCOMMANDS
from ._registry import subcommand as subcommand
from .train import apply_overrides as apply_overrides
from .train import parse_assignment as parse_assignment
from .train import train_config as train_config


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3tune", description="QLoRA fine-tuning for Microsoft Phi-3. "
                                     "Start with `phi3tune demo`; `phi3tune COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"phi3tune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        sp = subs.add_parser(cmd.name, help=cmd.help, description=cmd.description, parents=[common],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``phi3tune`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not args.command:  # a usage error (status 2): the help goes to stderr, where errors go
        parser.print_help(sys.stderr)
        return 2
    if unknown:  # the command's own usage, not the top level's
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")

    from pydantic import ValidationError

    from ..errors import Phi3TuneError, TrainingInterrupted

    try:  # phi3tune's log lines to stderr while the command runs (logs.py); the libraries' progress bars off
        with console(logging.WARNING if args.quiet else logging.INFO, force=True), quiet_libraries():
            return SUBCOMMANDS[args.command].run(args)
    except TrainingInterrupted as exc:  # the command line's words: --resume, not resume=True
        print(f"phi3tune {args.command}: {exc.cli_message()}", file=sys.stderr)
        return 130
    except Phi3TuneError as exc:
        print(f"phi3tune {args.command}: error: {exc.cli_message()}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"phi3tune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"phi3tune {args.command}: interrupted", file=sys.stderr)
        return 130
