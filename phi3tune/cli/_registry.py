"""The registry of ``phi3tune`` subcommands: each is a function adding its arguments and a function running it."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass

Configure = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Configure
    run: Handler
    description: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Configure) -> Callable[[Handler], Handler]:
    """Register ``fn(args) -> exit status`` as ``phi3tune NAME``; its docstring is the --help description."""

    def register(fn: Handler) -> Handler:
        SUBCOMMANDS[name] = Subcommand(name, help, configure, fn, inspect.cleandoc(fn.__doc__ or help))
        return fn

    return register

