"""Flash varlen layout plan `[B, L]` mask -> (order, inverse, cu_seqlens) in one launch (electra_fast.ops.varlen_plan).

Design: one program per row walks it in chunks twice: first counting its real tokens, then computing each token's
destination from a running count (a cumsum per chunk plus the carry) and writing both permutations (`inverse`
contiguously, `order` as a scatter of distinct indices) and the row's two sequence starts. Every element is
written once; no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from electra_fast.ops._contract import varlen_plan_fake

from ._common import loadable, pow2

BLOCK_L = 1024  # tokens per chunk


@triton.jit
def _varlen_plan_kernel(mask_ptr, order_ptr, inverse_ptr, cu_ptr, B, L, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = row * L
    n_real = 0
    for l0 in range(0, L, BLOCK_L):
        j = l0 + tl.arange(0, BLOCK_L)
        m = tl.load(mask_ptr + start + j, mask=j < L, other=0)
        n_real += tl.sum((m != 0).to(tl.int32), 0)
    before = 0  # real tokens in the chunks already done
    for l0 in range(0, L, BLOCK_L):
        j = l0 + tl.arange(0, BLOCK_L)
        inside = j < L
        real = (tl.load(mask_ptr + start + j, mask=inside, other=0) != 0).to(tl.int32)
        upto = before + tl.cumsum(real, 0)  # real tokens up to and including j
        dest = start + tl.where(real != 0, upto - 1, n_real + j - upto)
        tl.store(inverse_ptr + start + j, dest, mask=inside)
        tl.store(order_ptr + dest, start + j, mask=inside)
        before += tl.sum(real, 0)
    tl.store(cu_ptr + 2 * row, start.to(tl.int32))
    tl.store(cu_ptr + 2 * row + 1, (start + n_real).to(tl.int32))
    if row == B - 1:
        tl.store(cu_ptr + 2 * B, (start + L).to(tl.int32))


@torch.library.custom_op("electra_fast::varlen_plan_triton", mutates_args=())
def _varlen_plan_op(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order, inverse, cu_seqlens = varlen_plan_fake(attention_mask)
    b, n = attention_mask.shape
    if b * n:
        _varlen_plan_kernel[(b,)](loadable(attention_mask), order, inverse, cu_seqlens, b, n,
                                  BLOCK_L=pow2(n, hi=BLOCK_L), num_warps=4)
    else:
        cu_seqlens.zero_()
    return order, inverse, cu_seqlens


_varlen_plan_op.register_fake(varlen_plan_fake)


def varlen_plan(attention_mask):
    """Backend entry (see electra_fast.ops.varlen_plan): a contiguous `[B, L]` mask."""
    return _varlen_plan_op(attention_mask)
