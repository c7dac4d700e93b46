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
* the CUDA caching allocator's expandable segments, while a plan that asks for them runs (``allocator_for``).
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
def allocator_for(expandable: bool) -> Iterator[None]:
    """CUDA's caching allocator with expandable segments while the block runs, then as before. Measured on the H200
    emulating a 16 GiB card (docs/performance.md, session 5): without them fixed-length micro-batches left the
    allocator 6.9 GiB reserved beyond the 8.7 GiB in use, the card filled up, the paged optimizer's state was paged
    out and steps took 0.39 s instead of 0.18 s; with them 0.5 GiB reserved beyond what is in use, on 12 GiB too."""
    if not expandable:
        yield
        return
    # torch 2.11 deprecates torch.cuda.memory's name for this setter (a FutureWarning in every run) for torch._C's
    settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    settings("expandable_segments:True")
    try:
        yield
    finally:
        settings("expandable_segments:False")


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
