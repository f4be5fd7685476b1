"""The background batch pipeline (`electra_fast.data.prefetch.Prefetcher`): same batches, same order, errors
surface, early stop ends the thread. (The CUDA copy path runs in tests/train/test_cuda_step.py's GPU tests.)"""
import threading
import time

import pytest
import torch

from electra_fast.data.prefetch import Prefetcher


def make(i):
    return {"input_ids": torch.full((2, 3), i), "attention_mask": torch.ones(2, 3, dtype=torch.long)}


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_same_batches_in_order(depth):
    got = [b["input_ids"][0, 0].item() for b in Prefetcher(range(17), make, "cpu", depth=depth)]
    assert got == list(range(17))


def test_runs_ahead_of_the_consumer():
    made = []
    pre = Prefetcher(range(10), lambda i: made.append(i) or make(i), "cpu", depth=2)
    next(pre)
    deadline = time.time() + 5
    while len(made) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert made[:3] == [0, 1, 2]  # one handed out, two waiting in the queue
    assert len(made) <= 4         # and no further than the queue allows (+1 being made)
    pre.close()


def test_error_in_producer_is_raised_in_order():
    def bad(i):
        if i == 3:
            raise ValueError("example 3 is broken")
        return make(i)

    pre = Prefetcher(range(6), bad, "cpu")
    assert [next(pre)["input_ids"][0, 0].item() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="example 3"):
        next(pre)
    with pytest.raises(StopIteration):
        next(pre)


def test_close_stops_the_thread_early():
    before = threading.active_count()
    with Prefetcher(iter(range(10**9)), make, "cpu", depth=2) as pre:
        next(pre)
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_bad_depth_named():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(range(3), make, "cpu", depth=0)
