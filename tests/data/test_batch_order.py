"""The epoch orders of `BatchPlan`: the Feistel order is a bijection on [0, n) (exact enumeration), looks uniform
(chi-square tests over many keys), needs memory of the batch only at 70M examples on 8 ranks (tracemalloc), and the
legacy order is numpy's permutation exactly."""
import tracemalloc

import numpy as np
import pytest

from electra_fast.data.loader import BatchPlan
from electra_fast.data.order import LEGACY_ORDER, FeistelPermutation, LegacyPermutation, epoch_order
from helpers import chi2_critical


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 97, 1000, 4097, 65537])
def test_feistel_is_a_bijection(n):
    for key in ("0/0", "12345/7"):
        got = FeistelPermutation(n, key)[np.arange(n)]
        assert np.array_equal(np.sort(got), np.arange(n))
        # Any subset of positions maps as the whole does (what each rank evaluates alone).
        some = np.random.default_rng(n).integers(0, n, 9)
        assert np.array_equal(FeistelPermutation(n, key)[some], got[some])
    with pytest.raises(IndexError, match=r"positions must lie in \[0, 4097\)"):
        FeistelPermutation(4097, "0/0")[np.array([4097])]


def test_feistel_looks_uniform():
    # Over 6000 keys: where position 0 goes is uniform on [0, 11), and (where 0 goes, where 1 goes) uniform on the
    # 11*10 ordered pairs; a fixed seed, so the chi-square thresholds (p ~ 1e-4) give a test that fails only if biased.
    n, keys = 11, 6000
    firsts, pairs = np.zeros(n), np.zeros((n, n))
    for key in range(keys):
        a, b = FeistelPermutation(n, f"{key}/0")[np.array([0, 1])]
        firsts[a] += 1
        pairs[a, b] += 1
    def chi2(counts):
        expected = counts.sum() / counts.size
        return ((counts - expected) ** 2 / expected).sum()

    assert chi2(firsts) < chi2_critical(n - 1, z=3.72)
    off = pairs[~np.eye(n, dtype=bool)]
    assert np.diag(pairs).sum() == 0 and chi2(off) < chi2_critical(off.size - 1, z=3.72)
    # Consecutive epochs of one seed are unrelated: the Spearman correlation of two orders of 5000 examples (they are
    # permutations of 0..4999, their own ranks: Pearson's on the values) near 0.
    x, y = (epoch_order("feistel-1", 5000, 3, e)[np.arange(5000)] for e in (0, 1))
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.06


@pytest.mark.parametrize("n,seed,epoch", [(10, 0, 0), (1001, 7, 3)])
def test_legacy_order_is_numpys_permutation(n, seed, epoch):
    want = np.random.default_rng([seed, epoch]).permutation(n)
    assert np.array_equal(LegacyPermutation(n, seed, epoch)[np.arange(n)], want)
    plan = BatchPlan(n, 5, seed=seed, order=LEGACY_ORDER)
    k = n // 5
    assert np.array_equal(plan.global_indices(epoch * k + 1), want[5:10])


def test_plan_memory_is_the_batchs_at_70m_examples():
    # 70M examples, 8 ranks, global batch 1024: rank 3's micro-batches of a step in epoch 2 allocate well under a
    # megabyte (the whole permutation of earlier versions was 560 MB per rank).
    plan = BatchPlan(70_000_000, 1024, world_size=8, rank=3, accum_steps=2, seed=1)
    step = 2 * plan.batches_per_epoch + 5
    tracemalloc.start()
    try:
        parts = plan.micro_batches(step)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert [mb.chunk for mb in parts] == [3, 11] and all(len(mb.indices) == 64 for mb in parts)
    whole = plan.global_indices(step)
    assert np.array_equal(parts[1].indices, whole[11 * 64:12 * 64]) and whole.max() < 70_000_000
