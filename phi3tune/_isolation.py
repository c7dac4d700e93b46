"""A run leaves the process as it found it: notebooks, pipelines and sweeps call ``run()`` many times.

What a run changes process-wide, and what ``leaves_process_as_found`` puts back when it ends (success or error):

* accelerate's singletons. ``AcceleratorState`` (mixed precision, fixed at first creation) and ``GradientState``
  are emptied for the run and given back their contents after it, so a second run with another precision, or
  the caller's own ``Accelerator(mixed_precision=...)``, is not refused with "AcceleratorState has already been
  initialized". The caller's own ``Accelerator`` objects share those dicts, so they see their state again after
  the run. ``PartialState`` (the processes: rank, world size, device) is kept if the caller had one (a run under
  ``accelerate launch`` / ``torchrun`` joins it) and emptied after the run if the run created it. A
  ``torch.distributed`` process group is left alone either way: several runs of one launched script share it.
* the global RNGs (Python ``random``, NumPy, torch CPU and every initialized CUDA device) that a run seeds with
  ``training.seed``: a caller's random search draws the same numbers with or without runs in between.
* environment variables (accelerate sets ``ACCELERATE_USE_FSDP`` and friends), torch's thread count, default
  dtype and float32 matmul precision.
* the garbage collector's frozen generation, while the steps run (``frozen_heap``).
"""

from __future__ import annotations

import functools
import gc
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialize CUDA just to read it
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_environ(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive when the block starts (the model, its compiled graphs: ~10^6 of them) are kept out of the
    garbage collector's full collections until it ends, which then scan only what the steps create. Unfrozen, a
    full collection lands in some step and stops it for 0.6 s (tiny model on the CPU, 755k objects; ~1 s steps
    were measured on 2x H200, where every rank also waits for the one collecting). Reference counting still frees
    everything as before. A caller who froze objects already is left as found: nothing is frozen or unfrozen."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def process_as_found() -> Iterator[None]:
    """Snapshot the process-wide state a run touches; restore it when the block ends (see the module docstring)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    shared = {cls: dict(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)}
    # The run gets fresh accelerator/gradient states; the processes (PartialState) are shared with the caller.
    AcceleratorState._shared_state.clear()
    GradientState._shared_state.clear()
    rng, environ = _rng_state(), dict(os.environ)
    threads, dtype, matmul = torch.get_num_threads(), torch.get_default_dtype(), torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        for cls, saved in shared.items():
            cls._shared_state.clear()  # in place: the caller's Accelerator objects hold these very dicts
            cls._shared_state.update(saved)
        _set_rng_state(rng)
        _restore_environ(environ)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_float32_matmul_precision(matmul)


def leaves_process_as_found(fn: F) -> F:
    """Decorator form of ``process_as_found`` for FineTuner.run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with process_as_found():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
