"""Stopping a run cleanly on a signal, and checkpoints by the clock, decided the same way on every process.

SIGTERM and SIGUSR1 (what schedulers send ahead of a kill: SLURM's `--signal`, Kubernetes, preemptible clouds) only
set a flag here. The loop reads the flag between steps, so the step in flight finishes; it then logs the open
window's metrics, writes a checkpoint and exits with the run's `requeue_exit_code`. A second signal, more than
`REPEAT_S` after the first, ends the process at once by that signal's default action: the checkpoint being written
is then a hidden temporary (ignored, cleaned up by the next save) and the previous one stays the newest.
A repeat within `REPEAT_S` is the same request delivered twice: launchers forward the signals they receive (torchrun
to each worker), and SLURM signals every process of a step, so a worker under `srun torchrun` gets both at once.

Under torchrun the processes must stop after the same step (every collective of the step and of the checkpoint
needs all of them), but a signal reaches each at its own moment. So every `interval` steps they agree: one
`all_reduce(MAX)` of [my flag, rank 0's "a timed checkpoint is due"] over a CPU (gloo) process group. It never touches
the device, so the compiled or captured step keeps no host sync; its cost is one small message per `interval` steps.
One process reads its flag and its clock after every step. The time from a signal to the exit is at most `interval`
steps, plus one checkpoint write (docs in README.md, "Long runs: preemption and faults").
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_S = 2.0  # a repeat within this many seconds of the first signal is taken as the same request


class Preemption:
    """The signal flag and the processes' agreement on stopping and on timed checkpoints (a context manager: the
    handlers are installed on entry and the previous ones restored on exit).

    `interval`: steps between agreements when `world_size > 1` (one process decides after every step).
    `save_every_minutes`: a checkpoint is due when this much time has passed on rank 0's clock since the last one
    (None: never by the clock). `clock`: seconds, monotonic (replaceable in tests).
    """

    def __init__(self, rank: int, world_size: int, interval: int, save_every_minutes: Optional[float] = None,
                 clock=time.monotonic):
        self.rank, self.world_size = rank, world_size
        self.interval = interval if world_size > 1 else 1
        self.save_every_s = None if save_every_minutes is None else 60.0 * save_every_minutes
        self.clock = clock
        self.signum: Optional[int] = None  # the first signal received, if any (set by the handler only)
        self._first_at = 0.0
        self._previous: dict = {}
        self._group = None
        self.last_save = clock()

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # the only thread that may install handlers
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        if self.world_size > 1:
            # Its own gloo group: host tensors, whatever the training group's backend (NCCL on GPUs).
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    def decide(self, done: int) -> tuple:
        """`(stop, timed_save)` after `done` steps: the same pair on every process (a collective every `interval`
        steps, which every process calls after the same steps)."""
        if done % self.interval:
            return False, False
        stop = self.signum is not None
        due = self.rank == 0 and self.save_every_s is not None and self.clock() - self.last_save >= self.save_every_s
        if self.world_size > 1:
            flags = torch.tensor([int(stop), int(due)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            stop, due = bool(flags[0]), bool(flags[1])
        return stop, due

    def restart_clock(self) -> None:
        """The interval of timed checkpoints starts again: at the first step (opening the data may take long) and
        after each checkpoint written."""
        self.last_save = self.clock()

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (a collective when there are several): a failed write on one of them
        is then handled the same way by all."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
        return bool(flag[0])


__all__ = ["Preemption", "SIGNALS", "REPEAT_S"]
