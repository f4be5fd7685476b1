"""Fused discriminator head: `dense_prediction` (H -> 1) + sigmoid BCE + accuracy (docs/contracts.md#rtd_head_loss).

Design. `hidden [T = B*L, H]` is read exactly once, in the forward: a persistent kernel (PROGRAMS_PER_SM per SM)
walks tiles of BLOCK_T tokens x all H columns (fp32 math), computes each logit as a row dot product, then the
BCE terms, and per token the unnormalised gradient `g = (sigmoid(logit) - y) * mask`; it accumulates in registers
the partial sums of loss, mask, correct predictions, `g` (for the bias), `g * hidden` (for the weight) and the
counts precision/recall need (predicted, actual and true positives among real tokens).
A reduce kernel folds the per-program partials in a fixed order (deterministic) into the loss, the accuracy,
`1 / clamp(count, 1)` (a device tensor), the counts and the unnormalised weight/bias gradients. Counts are summed
in fp32: exact up to 2**24 tokens per batch.
The backward only writes `grad_hidden = g * w * grad_loss / count` (one write of [T, H], no read of hidden) and
scales the weight/bias gradients: the logits never exist as a tensor with a graph, and hidden is never re-read.
(Writing grad_hidden already in the forward would cost a write there plus a read-scale-write by grad_loss in the
backward; producing it in the backward from `g` and `w` is the cheaper order.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from electra_fast.ops._contract import COUNTS

from ._common import loadable, persistent_grid, pow2
from .rtd_bce_loss import _bce_terms

# BLOCK_T * BLOCK_H per step. The [BLOCK_T, BLOCK_H] fp32 tile lives in registers: at 2048 a 4-warp program needs
# 72 (H = 768) to 123 (H = 256) registers (ptxas, sm_90), so 4-7 programs share an SM and keep 16-21 KB of loads in
# flight; 8192 with 8 warps needed 164 registers (one program per SM). To be tuned on the GPU (benchmarks/).
TILE_ELEMS = 2048
PROGRAMS_PER_SM = 8
BWD_TILE_ELEMS = 4096  # the backward only stores: bigger tiles
# Per-program partials: loss, count, correct, sum(g), predicted, replaced, true positives, and 0 (a power of two).
N_PARTIALS = tl.constexpr(8)


@triton.jit
def _head_forward_kernel(hidden_ptr, w_ptr, b_ptr, labels_ptr, mask_ptr, g_ptr, partial_ptr, dw_partial_ptr, T, H,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr).to(tl.float32)
    dw = tl.zeros([BLOCK_H], tl.float32)
    loss_acc = tl.zeros([BLOCK_T], tl.float32)
    count_acc = tl.zeros([BLOCK_T], tl.float32)
    right_acc = tl.zeros([BLOCK_T], tl.float32)
    g_acc = tl.zeros([BLOCK_T], tl.float32)
    pred_acc = tl.zeros([BLOCK_T], tl.float32)
    actual_acc = tl.zeros([BLOCK_T], tl.float32)
    tp_acc = tl.zeros([BLOCK_T], tl.float32)
    for tile in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # tokens < 2**31; t * H needs int64
        x = tl.load(hidden_ptr + t[:, None] * H + h[None, :], mask=(t < T)[:, None] & (h < H)[None, :],
                    other=0.0).to(tl.float32)
        logit = tl.sum(x * w[None, :], 1) + bias
        y = tl.load(labels_ptr + t, mask=t < T, other=0).to(tl.float32)
        real = (tl.load(mask_ptr + t, mask=t < T, other=0) != 0).to(tl.float32)
        loss, g = _bce_terms(logit, y)
        g = g * real
        tl.store(g_ptr + t, g, mask=t < T)
        dw += tl.sum(x * g[:, None], 0)
        loss_acc += loss * real
        count_acc += real
        pred = (logit > 0).to(tl.float32) * real
        actual = (y > 0.5).to(tl.float32) * real
        right_acc += ((logit > 0) == (y > 0.5)).to(tl.float32) * real
        g_acc += g
        pred_acc += pred
        actual_acc += actual
        tp_acc += pred * actual
    out = partial_ptr + pid * N_PARTIALS  # per-program partials, in PARTIALS order
    tl.store(out, tl.sum(loss_acc, 0))
    tl.store(out + 1, tl.sum(count_acc, 0))
    tl.store(out + 2, tl.sum(right_acc, 0))
    tl.store(out + 3, tl.sum(g_acc, 0))
    tl.store(out + 4, tl.sum(pred_acc, 0))
    tl.store(out + 5, tl.sum(actual_acc, 0))
    tl.store(out + 6, tl.sum(tp_acc, 0))
    tl.store(out + 7, 0.0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * H + h, dw, mask=h < H)


@triton.jit
def _head_reduce_kernel(partial_ptr, dw_partial_ptr, loss_ptr, accuracy_ptr, inv_ptr, db_ptr, dw_ptr, counts_ptr, P,
                        H, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    dw = tl.zeros([BLOCK_P, BLOCK_H], tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        dw += tl.load(dw_partial_ptr + p[:, None].to(tl.int64) * H + h[None, :],
                      mask=(p < P)[:, None] & (h < H)[None, :], other=0.0)
    tl.store(dw_ptr + h, tl.sum(dw, 0), mask=h < H)
    if pid == 0:
        acc = tl.zeros([BLOCK_P, N_PARTIALS], tl.float32)
        k = tl.arange(0, N_PARTIALS)
        for start in range(0, P, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            acc += tl.load(partial_ptr + p[:, None] * N_PARTIALS + k[None, :], mask=(p < P)[:, None], other=0.0)
        sums = tl.sum(acc, 0)
        loss = tl.sum(tl.where(k == 0, sums, 0.0), 0)
        count = tl.sum(tl.where(k == 1, sums, 0.0), 0)
        right = tl.sum(tl.where(k == 2, sums, 0.0), 0)
        inv = 1.0 / tl.maximum(count, 1.0)
        tl.store(loss_ptr, loss * inv)
        tl.store(accuracy_ptr, right * inv)
        tl.store(inv_ptr, inv)
        tl.store(db_ptr, tl.sum(tl.where(k == 3, sums, 0.0), 0))
        # counts = (real, correct, predicted, replaced, true positives): partials 1, 2, 4, 5, 6
        tl.store(counts_ptr + tl.where(k < 3, k - 1, k - 2), sums, mask=(k != 0) & (k != 3) & (k < 7))


@triton.jit
def _head_backward_kernel(g_ptr, w_ptr, grad_loss_ptr, inv_ptr, dw_ptr, db_ptr, grad_hidden_ptr, grad_w_ptr,
                          grad_b_ptr, T, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    s = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(inv_ptr)
    h = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.load(g_ptr + t, mask=t < T, other=0.0) * s
    grad = (g[:, None] * w[None, :]).to(grad_hidden_ptr.dtype.element_ty)
    tl.store(grad_hidden_ptr + t[:, None] * H + h[None, :], grad, mask=(t < T)[:, None] & (h < H)[None, :])
    if pid == 0:
        tl.store(grad_w_ptr + h, (tl.load(dw_ptr + h, mask=h < H, other=0.0) * s).to(grad_w_ptr.dtype.element_ty),
                 mask=h < H)
        tl.store(grad_b_ptr, (tl.load(db_ptr) * s).to(grad_b_ptr.dtype.element_ty))


def _blocks(h: int, tile_elems: int):
    block_h = pow2(h)
    return max(1, tile_elems // block_h), block_h


@torch.library.custom_op("electra_fast::rtd_head_loss_triton", mutates_args=())
def _head_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor]:
    b, seq_len, h = hidden.shape
    t = b * seq_len
    block_t, block_h = _blocks(h, TILE_ELEMS)
    p = persistent_grid(hidden.device, triton.cdiv(t, block_t), per_sm=PROGRAMS_PER_SM)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    g = torch.empty((b, seq_len), **f32)
    # With no token at all no program writes its partials: start from zeros then (a tiny memset otherwise skipped).
    alloc = torch.empty if t else torch.zeros
    partial, dw_partial = alloc((p, N_PARTIALS.value), **f32), alloc((p, h), **f32)
    if t:
        _head_forward_kernel[(p,)](hidden, weight, bias, loadable(labels), loadable(attention_mask), g, partial,
                                   dw_partial, t, h, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    loss, accuracy, inv, db = (torch.empty((), **f32) for _ in range(4))
    dw, counts = torch.empty(h, **f32), torch.empty(len(COUNTS), **f32)
    reduce_h = pow2(h, hi=128)
    _head_reduce_kernel[(triton.cdiv(h, reduce_h),)](partial, dw_partial, loss, accuracy, inv, db, dw, counts, p, h,
                                                     BLOCK_P=32, BLOCK_H=reduce_h, num_warps=4)
    return loss, accuracy, g, inv, dw, db, counts


@_head_op.register_fake
def _(hidden, weight, bias, labels, attention_mask):
    scalar = lambda: hidden.new_empty((), dtype=torch.float32)  # noqa: E731
    return (scalar(), scalar(), hidden.new_empty(hidden.shape[:2], dtype=torch.float32), scalar(),
            hidden.new_empty((hidden.shape[2],), dtype=torch.float32), scalar(),
            hidden.new_empty((len(COUNTS),), dtype=torch.float32))


@torch.library.custom_op("electra_fast::rtd_head_backward_triton", mutates_args=())
def _head_backward_op(grad_loss: torch.Tensor, g: torch.Tensor, inv: torch.Tensor, dw: torch.Tensor,
                      db: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hidden_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = weight.numel()
    grad_hidden = g.new_empty((*g.shape, h), dtype=hidden_dtype)
    grad_w, grad_b = torch.empty_like(weight), torch.empty_like(bias)
    t = g.numel()
    block_t, block_h = _blocks(h, BWD_TILE_ELEMS)
    _head_backward_kernel[(max(1, triton.cdiv(t, block_t)),)](
        g, weight, grad_loss.contiguous(), inv, dw, db, grad_hidden, grad_w, grad_b, t, h,
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return grad_hidden, grad_w, grad_b


@_head_backward_op.register_fake
def _(grad_loss, g, inv, dw, db, weight, bias, hidden_dtype):
    return g.new_empty((*g.shape, weight.numel()), dtype=hidden_dtype), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, _, g, inv, dw, db, _ = output
    ctx.save_for_backward(g, inv, dw, db, weight, bias)
    ctx.hidden_dtype = hidden.dtype
    ctx.mark_non_differentiable(output[1], output[6])


def _backward(ctx, grad_loss, *_):
    g, inv, dw, db, weight, bias = ctx.saved_tensors
    grad_hidden, grad_w, grad_b = _head_backward_op(grad_loss, g, inv, dw, db, weight, bias, ctx.hidden_dtype)
    return grad_hidden, grad_w, grad_b, None, None


_head_op.register_autograd(_backward, setup_context=_setup)


def rtd_head_loss(hidden, weight, bias, labels, attention_mask, with_counts: bool = False):
    """Backend entry (see electra_fast.ops.rtd_head_loss): contiguous hidden [B, L, H], weight [1, H] or [H],
    bias [1], labels and mask [B, L]. Returns (loss, accuracy) fp32 scalars, plus the fp32 `[5]` counts
    (`ops._contract.COUNTS`) with `with_counts`; loss differentiable w.r.t. hidden, weight and bias."""
    loss, accuracy, *_, counts = _head_op(hidden, weight, bias, labels, attention_mask)
    return (loss, accuracy.detach(), counts.detach()) if with_counts else (loss, accuracy.detach())
