"""A step watchdog for multi-process runs: a rank whose step does not finish in time ends its process.

A collective waits for every rank. When one rank dies or hangs (a stuck disk, a deadlocked data thread, a GPU that
stopped answering), the others wait inside an all-reduce; torch's own process-group timeout (30 minutes for gloo,
10 for NCCL) may come late, and a hang without it never ends. `StepWatchdog` is a daemon thread armed around each
training step and what follows it (logging, evaluation), though not around a checkpoint write, which may rightly
take long (the process group's timeout bounds the others' wait for it): if the step has not finished `timeout_s`
seconds later it prints one line naming the rank and the
step to stderr and ends the process with `WATCHDOG_EXIT_CODE` (`os._exit`: the main thread is stuck and cannot be
asked to stop). torchrun then sees a failed worker, stops the others and restarts the group (`--max-restarts`), which
continues from the last checkpoint with `--resume auto`.

The thread needs no GIL from the stuck thread: collectives wait in C++ with the GIL released, and a Python loop
gives it up every few milliseconds.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

# As timeout(1) reports a command it stopped.
WATCHDOG_EXIT_CODE = 124
DEFAULT_COLLECTIVE_TIMEOUT = 600.0
# The first step after a start or restart compiles the step (torch.compile, CUDA graphs) and may wait for the other
# ranks to load their checkpoint: it gets at least this long.
FIRST_STEP_TIMEOUT = 1800.0


def timeout_message(rank: int, step: int, timeout_s: float) -> str:
    """The one line a rank prints when its step overran."""
    return (f"electra-fast: error: rank {rank}: step {step} did not finish within {timeout_s:g} s (a collective "
            "waiting on another rank?); exiting so that torchrun can restart the group")


class StepWatchdog:
    """Ends the process if an armed step runs past its limit; a no-op where `timeout_s` is None.

    Use as a context manager (the thread stops on leaving it, an exception included); `arm(step)` before each step,
    `disarm()` after it. The first step armed gets `max(timeout_s, FIRST_STEP_TIMEOUT)`.
    """

    def __init__(self, rank: int, timeout_s: Optional[float], exit_code: int = WATCHDOG_EXIT_CODE):
        self.rank, self.timeout_s, self.exit_code = rank, timeout_s, exit_code
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._step, self._limit, self._armed_once, self._closed = 0, 0.0, False, False
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "StepWatchdog":
        if self.timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, name="electra-fast-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def arm(self, step: int) -> None:
        """The limit starts now for `step`."""
        if self._thread is None:
            return
        limit = self.timeout_s if self._armed_once else max(self.timeout_s, FIRST_STEP_TIMEOUT)
        with self._cond:
            self._step, self._limit, self._armed_once = step, limit, True
            self._deadline = time.monotonic() + limit
            self._cond.notify()

    def disarm(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def close(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._closed, self._deadline = True, None
            self._cond.notify()
        self._thread.join()
        self._thread = None

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                sys.stderr.write(timeout_message(self.rank, self._step, self._limit) + "\n")
                sys.stderr.flush()
                os._exit(self.exit_code)


__all__ = ["StepWatchdog", "timeout_message", "WATCHDOG_EXIT_CODE", "DEFAULT_COLLECTIVE_TIMEOUT",
           "FIRST_STEP_TIMEOUT"]
