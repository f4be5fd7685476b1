"""Masked gather `[B, L, H] x [B, N] -> [B, N, H]` and its scatter-add backward (docs/contracts.md#masked_gather).

Design. Forward: one program per slot copies one hidden row (int64 offsets, the input dtype, no arithmetic).
Backward: output-centric, so it is deterministic and needs neither atomics nor a zero-filled buffer: one program
per output row (b, l) finds the slots of row b that point at l (positions [B, N] is tiny and stays in L1/L2),
copies the first one's gradient and writes 0 where none does. Real slots have distinct positions, so a second
match only happens for the padding slots that all point at position 0; those rows add the remaining matches in
chunks, in fp32. Every element of the result is written exactly once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from electra_fast.ops._contract import register_gather_autograd

from ._common import pow2

BLOCK_H = 1024        # hidden columns per step (gather)
SCATTER_BLOCK_H = 256  # hidden columns per step (scatter): the [DUP_CHUNK, H] duplicate tile sizes the registers
DUP_CHUNK = 16         # slots per step when a row collects several gradients


@triton.jit
def _gather_kernel(hidden_ptr, positions_ptr, out_ptr, L, N, H, BLOCK_H: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # b * N + n
    pos = tl.load(positions_ptr + slot)
    # Out-of-range positions give zeros instead of reading out of bounds (a scalar folded into the column limit).
    h_lim = tl.where((pos >= 0) & (pos < L), H, 0)
    src = hidden_ptr + (slot // N * L + pos) * H
    dst = out_ptr + slot * H
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        tl.store(dst + h, tl.load(src + h, mask=h < h_lim, other=0.0), mask=h < H)


@triton.jit
def _scatter_add_kernel(grad_ptr, positions_ptr, out_ptr, L, N, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                        DUP_CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * L + l
    b = row // L
    l = row % L
    n = tl.arange(0, BLOCK_N)
    pos = tl.load(positions_ptr + b * N + n, mask=n < N, other=-1)
    match = pos == l
    count = tl.sum(match.to(tl.int32), 0)
    first = tl.min(tl.where(match, n, BLOCK_N), 0)
    src = grad_ptr + (b * N + first) * H
    h_lim = tl.where(count > 0, H, 0)  # no slot points here: write zeros
    dst = out_ptr + row * H
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        acc = tl.load(src + h, mask=h < h_lim, other=0.0).to(tl.float32)
        if count > 1:
            for n0 in range(0, N, DUP_CHUNK):
                k = n0 + tl.arange(0, DUP_CHUNK)
                p = tl.load(positions_ptr + b * N + k, mask=k < N, other=-1)
                take = (p == l) & (k > first)
                g = tl.load(grad_ptr + (b * N + k)[:, None] * H + h[None, :], mask=take[:, None] & (h < H)[None, :],
                            other=0.0)
                acc += tl.sum(g.to(tl.float32), 0)
        tl.store(dst + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


@torch.library.custom_op("electra_fast::masked_scatter_add_triton", mutates_args=())
def _scatter_add_op(grad: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    b, n, h = grad.shape
    out = grad.new_empty((b, seq_len, h))
    if out.numel():
        block_h = pow2(h, hi=SCATTER_BLOCK_H)
        _scatter_add_kernel[(b * seq_len,)](grad, positions, out, seq_len, n, h, BLOCK_N=pow2(n), BLOCK_H=block_h,
                                            DUP_CHUNK=DUP_CHUNK, num_warps=4)
    return out


@_scatter_add_op.register_fake
def _(grad, positions, seq_len):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


@torch.library.custom_op("electra_fast::masked_gather_triton", mutates_args=())
def _gather_op(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    b, seq_len, h = hidden.shape
    n = positions.shape[1]
    out = hidden.new_empty((b, n, h))
    if out.numel():
        _gather_kernel[(b * n,)](hidden, positions, out, seq_len, n, h, BLOCK_H=pow2(h, hi=BLOCK_H), num_warps=4)
    return out


@_gather_op.register_fake
def _(hidden, positions):
    return hidden.new_empty((hidden.shape[0], positions.shape[1], hidden.shape[2]))


register_gather_autograd(_gather_op, _scatter_add_op)


def masked_gather(hidden, positions):
    """Backend entry (see electra_fast.ops.masked_gather): contiguous hidden [B, L, H], int64 positions [B, N]."""
    return _gather_op(hidden, positions)
