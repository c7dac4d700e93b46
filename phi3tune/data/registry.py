"""User data formats: ``@register_format("name")`` on a function from one raw row to chat messages or to a
prompt/completion pair. A registered format is used exactly like the built-in ones: its output goes through
the built-in "messages" or "prompt_completion" path, so masking, truncation, packing and errors are the same.

    @register_format("qa", columns=["question", "answer"])
    def qa(row):
        return {"prompt": row["question"], "completion": row["answer"]}

    DataSpec(source="qa.jsonl", format="qa")

A config file may name the function by import path instead (``format: "mypkg.formats:qa"``); loading it
imports that module, which runs its code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import DataFormatError

FormatFn = Callable[[dict[str, Any]], Any]
BUILTIN = ("text", "alpaca", "messages", "prompt_completion", "guanaco")


@dataclass(frozen=True)
class UserFormat:
    name: str
    fn: FormatFn
    columns: tuple[str, ...]  # checked on the data set before tokenizing, like the built-ins' columns


_REGISTRY: dict[str, UserFormat] = {}


def register_format(name: str, *, columns: Iterable[str] = (), replace: bool = False) -> Callable[[FormatFn],
                                                                                                   FormatFn]:
    """Register ``fn(row) -> list of {"role", "content"} messages | {"prompt": ..., "completion": ...}`` under
    ``name`` (for DataSpec.format). ``columns``: the columns a data set must have. Re-registering a name needs
    ``replace=True``; built-in names cannot be taken."""
    if not isinstance(name, str) or not name.strip() or name == "auto" or name in BUILTIN:
        raise ValueError(f"register_format: {name!r} is taken or empty; built-in formats are {list(BUILTIN)}")

    def decorator(fn: FormatFn) -> FormatFn:
        if not callable(fn):
            raise TypeError(f"register_format({name!r}) decorates a function from a row to messages")
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise ValueError(f"register_format: {name!r} is already registered (by {_REGISTRY[name].fn!r}); "
                             "pass replace=True to replace it")
        _REGISTRY[name] = UserFormat(name, fn, tuple(columns))
        return fn

    return decorator


def unregister_format(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_formats() -> list[str]:
    """The names register_format() has registered so far."""
    return sorted(_REGISTRY)


def known_formats() -> list[str]:
    return ["auto", *BUILTIN, *registered_formats()]


def resolve_format(name: str) -> str:
    """``name`` if it is a built-in or registered format; ``module:function`` is imported and registered under
    that path. Anything else is a DataFormatError listing the known formats."""
    if name == "auto" or name in BUILTIN or name in _REGISTRY:
        return name
    if ":" in name:
        from ..errors import ConfigError
        from ..plugins import load_object

        try:
            fn = load_object(name, "data.format")
        except ConfigError as exc:
            raise DataFormatError(str(exc)) from exc
        if name not in _REGISTRY:  # importing the module may have registered it under this name already
            register_format(name)(fn)
        return name
    raise DataFormatError(f"data.format={name!r} is no known format; use one of {known_formats()}, register one "
                          'with phi3tune.register_format, or give an import path "module:function"')


def columns_of(name: str) -> list[str]:
    return list(_REGISTRY[name].columns)


def as_builtin_row(row: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    """Apply the user function; return its output as a row of the built-in format that handles it."""
    try:
        out = _REGISTRY[name].fn(row)
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(f"data.format={name!r}: the format function raised {type(exc).__name__}: {exc} "
                              f"on row {str(row)[:120]!r}") from exc
    if isinstance(out, list):
        return {"messages": out}, "messages"
    if isinstance(out, dict) and {"prompt", "completion"} <= set(out):
        return out, "prompt_completion"
    raise DataFormatError(f"data.format={name!r}: the format function must return a list of "
                          f"{{'role', 'content'}} messages or a dict with 'prompt' and 'completion', got "
                          f"{str(out)[:120]!r}")
