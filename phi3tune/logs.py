"""phi3tune's one logger, and who shows its lines.

Library code never prints: it logs to the ``phi3tune`` logger (INFO: the data summary, the plan, resume and
compile notes; WARNING: things the user should fix). Who shows those lines:

* the CLI, for the whole command (``console(level, force=True)``): INFO and up, or WARNING with ``--quiet``;
* ``FineTuner.run`` for the duration of a run (``console(logging.INFO)``), but only when nobody configured
  logging: the ``phi3tune`` logger has no handler and the root logger has none either. Then a user in a
  script or notebook still sees the data summary and the plan, as before. An application that configures
  logging (``logging.basicConfig``, its own handlers) gets the records through its own handlers instead, and
  nothing is changed for it. The handler is removed and the logger's level restored when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("phi3tune")
FORMAT = "phi3tune: %(message)s"


def configured() -> bool:
    """Has anyone configured where phi3tune's records go (a handler on our logger or on the root logger)?"""
    return bool(log.handlers) or bool(logging.getLogger().handlers)


@contextmanager
def console(level: int = logging.INFO, force: bool = False) -> Iterator[None]:
    """phi3tune's records of ``level`` and up to stderr while the block runs, then the logger as it was.

    Without ``force`` nothing changes when logging is already configured (see the module docstring)."""
    if not force and configured():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    old_level, old_propagate = log.level, log.propagate
    if force or log.level == logging.NOTSET:  # a level the user set on our logger stays
        log.setLevel(level)
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """While PEFT wraps a model (get_peft_model, PeftModel.from_pretrained): PEFT reads transformers'
    deprecated ``is_gradient_checkpointing`` property there, which warns (a FutureWarning) on every run and
    every load, about code neither we nor the user can change. That one warning is ignored, nothing else."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide datasets' and transformers' progress bars (phi3tune shows its own); restore them after."""
    import datasets
    import transformers

    ds_off = datasets.utils.logging.is_progress_bar_enabled() is False
    tf_off = not transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not ds_off:
            datasets.enable_progress_bars()
        if not tf_off:
            transformers.utils.logging.enable_progress_bar()
