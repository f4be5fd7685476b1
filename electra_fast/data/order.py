"""The epoch orders `loader.BatchPlan` reads examples in: seeded bijections on `[0, n)`, evaluated where needed.

`ORDER` (the default, "feistel-1"): position `p` of epoch `e` holds example `FeistelPermutation(n, (seed, e))[p]`,
a keyed 6-round Feistel network on the smallest even-bit domain `2**(2h) >= n` (at most 4n), walked around its
cycles until the value falls inside `[0, n)` (a bijection on `[0, n)` because the network is one on the domain).
Any batch's indices are computed from the batch's positions alone, in memory proportional to the batch: nothing of
size `n` is ever built, so 70M examples on 8 ranks cost each rank nothing per epoch (measured in
benchmarks/RESULTS.md) where the full permutation cost 560 MB.

`LEGACY_ORDER` ("permutation-0"): `numpy.random.default_rng([seed, e]).permutation(n)`, the order of earlier
versions, built whole per epoch (as an int32 array, the same values at half the memory): for resuming their runs on
the same data order. The two orders differ: a run keeps the one it started with.
"""
from __future__ import annotations

import hashlib

import numpy as np

ORDER = "feistel-1"
LEGACY_ORDER = "permutation-0"
ORDERS = (ORDER, LEGACY_ORDER)
ROUNDS = 6

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every output bit depends on every input bit (uint64 arithmetic wraps)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


class FeistelPermutation:
    """A seeded bijection on `[0, n)`; `perm[positions]` maps an int array of positions to examples.

    `key`: a string (here "SEED/EPOCH"): the round keys are its hash, so neighbouring keys give unrelated orders.
    """

    def __init__(self, n: int, key: str):
        self.n = int(n)
        self.half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.blake2b(f"feistel/{key}".encode(), digest_size=8 * ROUNDS).digest()
        self.keys = [np.uint64(int.from_bytes(digest[8 * i:8 * i + 8], "little")) for i in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __getitem__(self, positions) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n}), got [{p.min()}, {p.max()}]")
        y = self._encrypt(p.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: at most a few rounds, the domain being under 4n
            y[out] = self._encrypt(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


class LegacyPermutation:
    """The earlier versions' epoch order, `default_rng([seed, epoch]).permutation(n)`, built whole (int32 where
    n allows: `shuffle` draws the same numbers whatever the dtype, so the values are the same)."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        np.random.default_rng([seed, epoch]).shuffle(self.perm)

    def __getitem__(self, positions) -> np.ndarray:
        return self.perm[positions].astype(np.int64)


def epoch_order(order: str, n: int, seed: int, epoch: int):
    """Epoch `epoch`'s order of `n` examples: an object mapping positions to examples with `[...]`."""
    if order == ORDER:
        return FeistelPermutation(n, f"{int(seed)}/{int(epoch)}")
    return LegacyPermutation(n, seed, epoch)
