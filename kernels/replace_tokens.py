"""Discriminator ids and labels in one kernel (docs/algorithm.md#replacement-and-labels,
docs/contracts.md#replace_tokens).

Design: output-centric, one program per (batch row, tile of BLOCK_L positions). It loads the row's N slots
(positions, weights, samples: tiny, from L1/L2) and, for every position of the tile, adds
`sampled - original` of each real slot (weight > 0) that points at it: exactly the reference's delta-add, so padding
slots (weight 0, position 0) change nothing, and a sample equal to the original is labelled 0.
Both outputs are written for every position; no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2

BLOCK_L = 16  # positions per program: the [BLOCK_L, N] int64 match tile sizes the registers


@triton.jit
def _replace_tokens_kernel(ids_ptr, positions_ptr, weights_ptr, sampled_ptr, out_ptr, replaced_ptr, L, N,
                           BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n = tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + b * L + l, mask=l < L, other=0).to(tl.int64)
    slot = b * N + n
    pos = tl.load(positions_ptr + slot, mask=n < N, other=-1)
    real = tl.load(weights_ptr + slot, mask=n < N, other=0.0) > 0
    new = tl.load(sampled_ptr + slot, mask=n < N, other=0)
    hit = (pos[None, :] == l[:, None]) & real[None, :]
    disc = ids + tl.sum(tl.where(hit, new[None, :] - ids[:, None], 0), 1)
    tl.store(out_ptr + b * L + l, disc.to(out_ptr.dtype.element_ty), mask=l < L)
    tl.store(replaced_ptr + b * L + l, (disc != ids).to(tl.uint8), mask=l < L)


@torch.library.custom_op("electra_fast::replace_tokens_triton", mutates_args=())
def _replace_tokens_op(input_ids: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
                       sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, seq_len = input_ids.shape
    n = positions.shape[1]
    disc, replaced = torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.bool)
    if disc.numel():
        _replace_tokens_kernel[(b, triton.cdiv(seq_len, BLOCK_L))](
            input_ids, positions, weights, sampled, disc, replaced.view(torch.uint8), seq_len, n,
            BLOCK_L=BLOCK_L, BLOCK_N=pow2(n), num_warps=4)
    return disc, replaced


@_replace_tokens_op.register_fake
def _(input_ids, positions, weights, sampled):
    return torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.bool)


def replace_tokens(input_ids, positions, weights, sampled):
    """Backend entry (see electra_fast.ops.replace_tokens): contiguous int ids [B, L], int64 positions and
    samples [B, N], fp32 weights [B, N]. Returns (disc_ids like input_ids, is_replaced bool)."""
    return _replace_tokens_op(input_ids, positions, weights, sampled)
