"""Discriminator input and labels (docs/algorithm.md#replacement-and-labels): scatter the generator's samples into the
*original* ids at real slots; `is_replaced` is 1 only where the token actually changed (a sample equal to the original
is labelled 0).
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import FLOAT_DTYPES, INT_DTYPES, check_ids, check_same_device, check_shape, check_tensor


def replace_tokens_reference(input_ids, positions, weights, sampled):
    original = input_ids.gather(1, positions)
    # Add deltas rather than scatter values: padding slots may share a position with a real slot, and add 0.
    delta = torch.where(weights > 0, sampled.to(input_ids.dtype) - original, 0)
    disc_ids = input_ids + torch.zeros_like(input_ids).scatter_add_(1, positions, delta)
    return disc_ids, disc_ids != input_ids


def replace_tokens_mean_reference(input_ids, positions, weights, sampled):
    """The reference's `scatter_update` for integer ids: a position that several real slots point at (masking with
    replacement) gets the floor of the mean of their samples; a position one slot points at gets its sample."""
    real = weights > 0
    count = torch.zeros_like(input_ids).scatter_add_(1, positions, real.to(input_ids.dtype))
    total = torch.zeros_like(input_ids).scatter_add_(1, positions, torch.where(real, sampled.to(input_ids.dtype), 0))
    disc_ids = torch.where(count > 0, torch.div(total, count.clamp(min=1), rounding_mode="floor"), input_ids)
    return disc_ids, disc_ids != input_ids


@torch.library.custom_op("electra_fast::replace_tokens", mutates_args=())
def _replace_tokens_op(input_ids: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                       sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return replace_tokens_reference(input_ids, positions, weights, sampled)


@_replace_tokens_op.register_fake
def _(input_ids, positions, weights, sampled):
    return torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.bool)


def replace_tokens(input_ids: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, sampled: torch.Tensor,
                   *, duplicates: str = "add", backend: Optional[str] = None):
    """Build the discriminator's ids and labels in one pass.

    Args:
        input_ids: `[B, L]` original (unmasked) ids.
        positions, weights: `[B, N]` from `mask_tokens` (real slots have weight > 0, at distinct positions unless
            drawn with replacement).
        sampled: `[B, N]` (or `[B * N]`) generator samples.
        duplicates: what a position that several real slots point at becomes (masking with replacement only).
            "add" (default; every backend): the original plus each slot's `sample - original`. "mean": the floor of
            the mean of the samples, as the reference's `scatter_update` does; the PyTorch reference runs it (no
            kernel has this rule: asking for another backend is an error).

    Returns: `(disc_ids [B, L] like input_ids, is_replaced [B, L] bool)`.
    """
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INT_DTYPES)
    check_tensor(positions, "positions", ndim=2, dtypes=INT_DTYPES)
    if positions.shape[0] != input_ids.shape[0]:
        raise ValueError(f"positions must have batch size {input_ids.shape[0]} (that of input_ids), got shape "
                         f"{tuple(positions.shape)}")
    check_tensor(weights, "weights", ndim=2, dtypes=FLOAT_DTYPES + INT_DTYPES + (torch.bool,))
    check_shape(weights, "weights", positions.shape, "same as positions")
    check_tensor(sampled, "sampled", dtypes=INT_DTYPES)
    if sampled.numel() != positions.numel():
        raise ValueError(f"sampled must have {positions.numel()} elements (one per slot of positions "
                         f"{tuple(positions.shape)}), got shape {tuple(sampled.shape)}")
    check_same_device({"input_ids": input_ids, "positions": positions, "weights": weights, "sampled": sampled})
    check_ids(positions, "positions", input_ids.shape[1], "L")
    if duplicates not in ("add", "mean"):
        raise ValueError(f"duplicates must be 'add' or 'mean', got {duplicates!r}")
    args = (input_ids.contiguous(), positions.long().contiguous(), weights.float().contiguous(),
            sampled.reshape(positions.shape).long().contiguous())
    if duplicates == "mean":
        if backend not in (None, "torch"):
            raise ValueError(f"duplicates='mean' runs the PyTorch reference only, got backend={backend!r}")
        return replace_tokens_mean_reference(*args)  # plain torch ops: traced and captured as they are
    _, kernel = resolve("replace_tokens", backend, input_ids.device)
    return (kernel or _replace_tokens_op)(*args)
