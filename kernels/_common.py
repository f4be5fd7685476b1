"""Launcher helpers shared by the Triton kernels (block sizes, grid sizes, dtype views).

This folder is `electra_fast.kernels`, the "triton" backend of `electra_fast.ops`: one module per op, named after the
op, each a backend entry with the contract of `electra_fast.ops._backend` (canonical, contiguous inputs) running
registered `torch.library` custom ops (`electra_fast::*_triton`) with fake kernels and autograd, so
`torch.compile(fullgraph=True)` traces them and CUDA graphs capture them. On CPU tensors the kernels run only under
`TRITON_INTERPRET=1`. The modules import what they share with the public ops from `electra_fast.ops._contract` (and
`ops._checks`, `electra_fast.options`, `electra_fast.checks`), never a public op module: the ops import them.
"""
from __future__ import annotations

# Why the folder has no `__init__.py` (nor has `csrc/`): with the checkout root on sys.path (pytest, `python -m`,
# a notebook, PYTHONPATH=.) a top-level folder is importable under its own name, and `kernels` is the name of Hugging
# Face's package, which transformers imports. A folder without `__init__` is at most a namespace package, and the
# import system always prefers a regular package of the same name anywhere on sys.path, so the real one wins. Were
# an op module still run as `kernels.<op>` (no real package installed), it would register every op a second time
# (torch frees the first registration while handles to it live on); every op module imports this one first, so it
# refuses here instead.
if not __name__.startswith("electra_fast."):
    raise ImportError(f"the Triton kernels import only as electra_fast.kernels, not as {__name__.rpartition('.')[0]!r}")

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
