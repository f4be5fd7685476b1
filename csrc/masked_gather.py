"""CUDA launcher of `electra_fast.ops.masked_gather`: `[B, L, H]`, `[B, N]` -> `[B, N, H]` (`masked_gather.cu`).

Design. The forward copies one hidden row per slot; the backward is the deterministic scatter-add of
`masked_gather.cu` (output-centric: each row of the result is written once, no atomics), registered as the op's
autograd with the helper the reference and the Triton backend use too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from electra_fast.ops._contract import register_gather_autograd

from ._extension import extension, require_cuda
# The backend switch asks the op's module whether the extension can run here.
from ._extension import is_available, unavailable_reason  # noqa: F401


@torch.library.custom_op("electra_fast::masked_gather_cuda", mutates_args=(), device_types="cuda")
def _gather_op(hidden: Tensor, positions: Tensor) -> Tensor:
    return extension().masked_gather(hidden, positions)


@_gather_op.register_fake
def _(hidden, positions):
    return hidden.new_empty((hidden.shape[0], positions.shape[1], hidden.shape[2]))


@torch.library.custom_op("electra_fast::masked_scatter_add_cuda", mutates_args=(), device_types="cuda")
def _scatter_add_op(grad: Tensor, positions: Tensor, seq_len: int) -> Tensor:
    return extension().masked_scatter_add(grad, positions, seq_len)


@_scatter_add_op.register_fake
def _(grad, positions, seq_len):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


register_gather_autograd(_gather_op, _scatter_add_op)


def masked_gather(hidden: Tensor, positions: Tensor) -> Tensor:
    """Backend entry (see electra_fast.ops.masked_gather): `hidden[b, positions[b, n]]`, differentiable (the backward
    is a deterministic scatter-add)."""
    require_cuda({"hidden": hidden, "positions": positions})
    return _gather_op(hidden.contiguous(), positions.long().contiguous())
