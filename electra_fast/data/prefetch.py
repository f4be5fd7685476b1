"""Batches made ahead of the step: host work in a background thread, the host-to-device copy on a side stream.

Between two steps (two graph replays) the training loop should only launch work: the NumPy gather of the next
examples, pinning and the copy to the GPU all run while the current step computes. A thread makes batches in
order into a queue of `depth` (2: double buffering), pinned when the device is CUDA; the consumer starts each
batch's copy on a side stream one step ahead (when the batch before it is handed out) and makes the compute stream
wait for that copy only, through an event, when the batch is used. Pinned blocks come from torch's caching host
allocator, which does not reuse a block before the copy out of it has finished. On a CPU device it is the same
thread-ahead pipeline without streams.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Dict, Iterable, Iterator

import torch

from electra_fast.checks import check_int

_DONE = object()


class Prefetcher:
    """Iterate `make(item)` for `item` in `items`, `depth` batches ahead, as tensors on `device`.

    `make` returns a dict of CPU tensors (e.g. `PretrainingData.gather`); what comes out is the same dict on
    `device`, in the same order. An exception raised by `make` is raised again by the iteration that reaches it.
    Use as a context manager (or call `close`) to stop the thread early.
    """

    def __init__(self, items: Iterable, make: Callable[[object], Dict[str, torch.Tensor]], device, depth: int = 2):
        check_int(depth, "depth", low=1)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._next = None  # CUDA: the batch whose copy is already under way
        self._thread = threading.Thread(target=self._produce, args=(iter(items), make), daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator, make) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                batch = make(item)
                if self._cuda:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not self._put(batch):
                    if self._stop.is_set():
                        return
            self._put(_DONE, block=True)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e, block=True)

    def _put(self, value, block: bool = False) -> bool:
        try:
            self._queue.put(value, timeout=None if block else 0.1)
            return True
        except queue.Full:
            return False

    def _take(self):
        """The next batch from the thread, its copy to the device started (CUDA: with an event to wait on)."""
        value = self._queue.get()
        if value is _DONE or isinstance(value, BaseException):
            self._queue.put(_DONE)  # later calls end too
            return value
        if not self._cuda:
            return value, None
        with torch.cuda.stream(self._copy_stream):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in value.items()}
            copied = torch.cuda.Event()
            copied.record()
        return batch, copied

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        current = self._next if self._next is not None else self._take()
        self._next = None
        if current is _DONE:
            raise StopIteration
        if isinstance(current, BaseException):
            raise current
        batch, copied = current
        if copied is not None:
            # Start the following batch's copy now, so that it runs while this batch's step computes.
            self._next = self._take()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for t in batch.values():  # made on the copy stream, used on this one: no reuse before it is done
                t.record_stream(compute)
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Prefetcher"]
