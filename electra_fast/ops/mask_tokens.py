"""Masking for replaced-token detection (SPEC 1.1; reference `pretrain/pretrain_helpers.py::mask`).

Static shapes are the point: `positions [B, N]` and `weights [B, N]` with N fixed by the sequence length, so no
boolean indexing and no host sync. Slots past a row's real count are padding (position 0, weight 0).
Positions are drawn uniformly among candidates without replacement as the top-N of i.i.d. uniform scores;
the real ones are sorted ascending for memory locality, padding slots come last.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import INT_DTYPES, check_same_device, check_shape, check_tensor

MASK_REPLACE_PROB = 0.85  # a chosen slot becomes [MASK] with this probability, else keeps its token


def num_slots(seq_len: int, mask_prob: float) -> int:
    """The static number of prediction slots per sequence: int((mask_prob + 0.005) * L), at least 1, at most L."""
    return max(1, min(seq_len, int((mask_prob + 0.005) * seq_len)))


def mask_tokens_reference(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob: float,
                          mask_token_id: int):
    """Plain PyTorch masking. `scores [B, L]` and `keep_draw [B, N]` are uniform draws in [0, 1)."""
    n = keep_draw.shape[1]
    real = attention_mask != 0
    candidate = real & ~torch.isin(input_ids, special_ids)
    # round half to even, as tf.round in the reference; float64 keeps e.g. 0.15 * 100 exact enough
    k = torch.round(real.sum(1).double() * mask_prob).clamp(1, n).long()
    k = torch.minimum(k, candidate.sum(1))
    top = torch.where(candidate, scores, -1.0).topk(n, dim=1).indices
    valid = torch.arange(n, device=input_ids.device) < k[:, None]
    # Sort real positions ascending, padding last (keyed past L), then point padding slots at position 0.
    seq_len = input_ids.shape[1]
    key = torch.where(valid, top, seq_len + torch.arange(n, device=input_ids.device))
    positions = torch.where(valid, key.sort(dim=1).values, 0)
    to_mask = valid & (keep_draw < MASK_REPLACE_PROB)
    # scatter_add is safe with the duplicate padding positions: they add 0.
    hit = torch.zeros_like(input_ids).scatter_add_(1, positions, to_mask.to(input_ids.dtype)) > 0
    masked_ids = torch.where(hit, torch.full_like(input_ids, mask_token_id), input_ids)
    return masked_ids, positions, valid.float()


@torch.library.custom_op("electra_fast::mask_tokens", mutates_args=())
def _mask_tokens_op(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor,
                    scores: torch.Tensor, keep_draw: torch.Tensor, mask_prob: float,
                    mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mask_tokens_reference(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob, mask_token_id)


@_mask_tokens_op.register_fake
def _(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob, mask_token_id):
    b, n = keep_draw.shape
    return (torch.empty_like(input_ids), input_ids.new_empty((b, n), dtype=torch.int64),
            input_ids.new_empty((b, n), dtype=torch.float32))


def mask_tokens(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, mask_prob: float = 0.15,
                mask_token_id: int, special_token_ids: Union[Sequence[int], torch.Tensor],
                max_predictions: Optional[int] = None, generator: Optional[torch.Generator] = None,
                backend: Optional[str] = None):
    """Choose the positions to predict and mask them (SPEC 1.1).

    Args:
        input_ids: `[B, L]` int64/int32 token ids.
        attention_mask: `[B, L]`, nonzero = real token (default: all real).
        mask_prob: fraction of real tokens to predict, in (0, 1). 0.15 for small/base, 0.25 for large.
        mask_token_id: id of `[MASK]`.
        special_token_ids: ids never chosen (`[CLS]`, `[SEP]`, `[MASK]`, `[PAD]`, ...).
        max_predictions: slots per row N; default `int((mask_prob + 0.005) * L)`.
        generator: torch RNG for the draws (default: the global one, so `torch.manual_seed` applies).

    Returns:
        `(masked_ids [B, L], positions [B, N] int64, weights [B, N] float32)`. Row b has
        `min(max(1, min(N, round(sum(mask_b) * mask_prob))), candidates_b)` real slots (weight 1) first,
        sorted by position, then padding slots (position 0, weight 0). Each real slot becomes `[MASK]`
        with probability 0.85, otherwise keeps its token.
    """
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INT_DTYPES)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_tensor(attention_mask, "attention_mask", ndim=2)
    check_shape(attention_mask, "attention_mask", input_ids.shape, "same as input_ids")
    check_same_device({"input_ids": input_ids, "attention_mask": attention_mask})
    if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be a number in (0, 1), got {mask_prob!r}")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise TypeError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    b, seq_len = input_ids.shape
    if seq_len == 0:
        raise ValueError(f"input_ids must have a non-empty sequence dimension, got shape {tuple(input_ids.shape)}")
    n = num_slots(seq_len, mask_prob) if max_predictions is None else max_predictions
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= seq_len:
        raise ValueError(f"max_predictions must be an int in [1, {seq_len}] (the sequence length), got {n!r}")
    device = input_ids.device
    if isinstance(special_token_ids, torch.Tensor):
        special = special_token_ids.to(device=device, dtype=input_ids.dtype).reshape(-1)
    else:
        special = torch.tensor(list(special_token_ids), dtype=input_ids.dtype, device=device)
    resolve("mask_tokens", backend, device)  # only the reference exists; an explicit kernel backend raises
    scores = torch.rand((b, seq_len), device=device, generator=generator)
    keep_draw = torch.rand((b, n), device=device, generator=generator)
    return _mask_tokens_op(input_ids, attention_mask, special, scores, keep_draw, float(mask_prob), mask_token_id)
