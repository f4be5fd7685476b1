"""Gather hidden states at the masked positions: `[B, L, H]`, `[B, N]` -> `[B, N, H]`; backward scatter-adds.

The generator's LM head runs only at these N slots, never at all L positions (docs/algorithm.md#generator).
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import INT_DTYPES, check_ids, check_same_device, check_tensor
from electra_fast.ops._contract import register_gather_autograd


def masked_gather_reference(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[2]))


def masked_scatter_add_reference(grad: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    b, _, h = grad.shape
    out = grad.new_zeros((b, seq_len, h))
    return out.scatter_add_(1, positions[..., None].expand(-1, -1, h), grad)


@torch.library.custom_op("electra_fast::masked_gather", mutates_args=())
def _masked_gather_op(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return masked_gather_reference(hidden, positions)


@_masked_gather_op.register_fake
def _(hidden, positions):
    return hidden.new_empty((hidden.shape[0], positions.shape[1], hidden.shape[2]))


@torch.library.custom_op("electra_fast::masked_scatter_add", mutates_args=())
def _masked_scatter_add_op(grad: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    return masked_scatter_add_reference(grad, positions, seq_len)


@_masked_scatter_add_op.register_fake
def _(grad, positions, seq_len):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


register_gather_autograd(_masked_gather_op, _masked_scatter_add_op)


def masked_gather(hidden: torch.Tensor, positions: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """`out[b, n] = hidden[b, positions[b, n]]`, differentiable w.r.t. `hidden` (the backward scatter-adds,
    so repeated positions accumulate). Positions must lie in `[0, L)`."""
    check_tensor(hidden, "hidden", ndim=3)
    check_tensor(positions, "positions", ndim=2, dtypes=INT_DTYPES)
    if positions.shape[0] != hidden.shape[0]:
        raise ValueError(f"positions must have batch size {hidden.shape[0]} (that of hidden), got shape "
                         f"{tuple(positions.shape)}")
    check_same_device({"hidden": hidden, "positions": positions})
    check_ids(positions, "positions", hidden.shape[1], "L")
    _, kernel = resolve("masked_gather", backend, hidden.device, hidden.dtype)
    hidden, positions = hidden.contiguous(), positions.long().contiguous()
    return (kernel or _masked_gather_op)(hidden, positions)
