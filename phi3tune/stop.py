"""Ctrl-C and SIGTERM during a run: finish the step, save, then stop (the loop and ``FineTuner.run`` read it)."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGINT/SIGTERM set a flag so the current step finishes and a checkpoint is saved (or, after the last step,
    the final adapter); a second Ctrl-C aborts. A signal the process ignores (``nohup``, a background job) stays
    ignored."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
