"""Launcher helpers shared by the Triton kernels (block sizes, grid sizes, dtype views)."""
from __future__ import annotations

import functools

import torch
import triton


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(1, int(n))))
    return p if hi is None else min(p, hi)


def loadable(t: torch.Tensor) -> torch.Tensor:
    """Bool tensors as uint8 views (same bytes): kernels load/store bytes and compare with 0."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_grid(device: torch.device, n_tiles: int, per_sm: int = 4) -> int:
    """Program count for persistent kernels: a few per SM (the interpreter runs programs one by one: keep it small)."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 4))
    return max(1, min(n_tiles, per_sm * _sm_count(device.index if device.index is not None else 0)))
