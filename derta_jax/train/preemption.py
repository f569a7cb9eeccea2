"""SIGTERM / SIGINT -> stop at a step boundary that EVERY process agrees on.

A signal reaches one process (or the processes at different moments), but the checkpoint
save that follows is collective: a process that saves while another trains on hangs both.
So in multi-process runs the flag is OR-ed across processes at steps that every process
visits (every `every` steps, the logging interval), and all stop at the same step. A single
process reads its own flag at every step, with no extra host sync.
"""

from __future__ import annotations

import signal
from typing import Callable

import jax
import numpy as np


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (a collective: every
    process must call it at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


class StopFlag:
    """Set by the signal handler; `should_stop(step)` is the agreed decision."""

    def __init__(self, every: int, process_count: int = 0,
                 reduce: Callable[[bool], bool] = any_process):
        if every < 1:
            raise ValueError(f"every={every!r}: must be >= 1 (steps between agreements)")
        self.every = every
        self.process_count = process_count or jax.process_count()
        self.reduce = reduce
        self.requested = False  # this process received a signal
        self.stopped = False  # the run decided to stop (every process alike)
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """Called after every step by every process, with the same `step` sequence."""
        if self.process_count == 1:
            self.stopped = self.requested
        elif step % self.every == 0:
            self.stopped = self.reduce(self.requested)
        return self.stopped

    def reason(self) -> str:
        if self.requested:
            return f"{self.signal_name} received"
        return "stop requested by another process"
