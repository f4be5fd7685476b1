"""`y = LayerNorm(residual + dropout(x))` over the last dim, forward and backward (the post-LN block of BERT).

Design (after flash-attention's `flash_attn/ops/triton/layer_norm.py`, reduced to this one use).
Forward: one program per block of rows (`BLOCK_M` rows of `BLOCK_N >= N` columns, ~4k elements, so N = 256 still
keeps every thread busy). It reads x and residual once and writes y, the pre-norm sum `s` in the input dtype and
fp32 mean and rstd per row. `s` is rounded to the input dtype before the statistics, as the unfused bf16 chain
(`x + dropout(f)`, then LayerNorm) rounds it, so the saved `s` is exactly what was normalised.
Dropout: keep where `uniform > p`, Philox keyed by the seed read from a device tensor (`draw_seed`; CUDA-graph
replays draw fresh masks), counter `(salt << 40) + row * N + col`: calls that share one seed with distinct salts
(the layers of an encoder) draw disjoint counters. The mask is never stored: the backward regenerates it.
Backward: a fixed number of programs, each taking row blocks `pid, pid + P, ...`, writes `d residual = ds` (the
LayerNorm input gradient) and `dx = keep * ds / (1 - p)`, and accumulates its own fp32 partial dweight/dbias rows
`[P, N]`; a second kernel sums the P partials in a fixed order (deterministic, no float atomics) into the
weight's dtype. Statistics and all math in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import persistent_grid, pow2

MAX_N = 8192  # one row lives in registers; hidden sizes go to 1024 (large)
BLOCK_ELEMENTS = 4096  # forward rows per program = this // BLOCK_N (at least one)
BWD_BLOCK_ELEMENTS = 2048  # half in the backward: its ~6 live row tiles must fit 128 registers a thread (no spills)
SALT_SHIFT = 40  # counters of one call stay below 2**40 (M * N < 1e12)


def _blocks(n: int, elements: int) -> tuple[int, int, int]:
    block_n = pow2(n, lo=16)
    block_m = max(1, elements // block_n)
    return block_m, block_n, (8 if block_m * block_n >= 2048 else 4)


@triton.jit
def _keep(seed_ptr, counter_base, offs, p):
    """The dropout mask of the elements at `offs` (row * N + col): the same bits in the forward and the backward."""
    return tl.rand(tl.load(seed_ptr), counter_base + offs) > p


@triton.jit
def _forward_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, seed_ptr, counter_base, M, N, eps, p,
                    scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if DROPOUT:
        x = tl.where(_keep(seed_ptr, counter_base, offs, p), x * scale, 0.0)
    s = (x + tl.load(res_ptr + offs, mask=inside, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + offs, s, mask=inside)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(inside, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _backward_kernel(dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr, dres_ptr, dx_ptr, dw_ptr, db_ptr, counter_base, M,
                     N, p, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # block: an int in the interpreter
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        s = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        xhat = tl.where(inside, (s - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dres_ptr + offs, ds.to(dres_ptr.dtype.element_ty), mask=inside)
        if DROPOUT:
            dx = tl.where(_keep(seed_ptr, counter_base, offs, p), ds * scale, 0.0)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=cols < N)
    tl.store(db_ptr + pid.to(tl.int64) * N + cols, db, mask=cols < N)


@triton.jit
def _sum_partials_kernel(dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, P, N, BLOCK_P: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        inside = (parts[:, None] < P) & (cols[None, :] < N)
        offs = parts[:, None].to(tl.int64) * N + cols[None, :]
        dw += tl.sum(tl.load(dw_part_ptr + offs, mask=inside, other=0.0), axis=0)
        db += tl.sum(tl.load(db_part_ptr + offs, mask=inside, other=0.0), axis=0)
    tl.store(dw_ptr + cols, dw.to(dw_ptr.dtype.element_ty), mask=cols < N)
    tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=cols < N)


def _dropout_args(salt: int, p: float):
    # The salt pre-shifted on the host: an int64 argument, where a shift in the kernel would wrap an int32.
    return dict(counter_base=salt << SALT_SHIFT, p=float(p), scale=1.0 / (1.0 - p) if p > 0 else 1.0, DROPOUT=p > 0)


@torch.library.custom_op("electra_fast::dropout_add_layer_norm_triton", mutates_args=())
def _forward_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                seed: Optional[torch.Tensor], salt: int, p: float, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s = residual + dropout(x) in x's dtype, fp32 mean [M], fp32 rstd [M]) of `[M, N]` inputs."""
    m, n = x.shape
    y, s = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = (x.new_empty(m, dtype=torch.float32) for _ in range(2))
    if m:
        block_m, block_n, warps = _blocks(n, BLOCK_ELEMENTS)
        _forward_kernel[(triton.cdiv(m, block_m),)](
            x, residual, weight, bias, y, s, mean, rstd, seed if p > 0 else mean, M=m, N=n, eps=eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **_dropout_args(salt, p))
    return y, s, mean, rstd


@_forward_op.register_fake
def _(x, residual, weight, bias, seed, salt, p, eps):
    m = x.shape[0]
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("electra_fast::dropout_add_layer_norm_backward_triton", mutates_args=())
def _backward_op(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 seed: Optional[torch.Tensor], salt: int, p: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d residual, dx (empty [0] when p == 0: it equals d residual), dweight, dbias)."""
    m, n = s.shape
    dres = torch.empty_like(s)
    dx = torch.empty_like(s) if p > 0 else s.new_empty(0)
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    block_m, block_n, warps = _blocks(n, BWD_BLOCK_ELEMENTS)
    programs = persistent_grid(s.device, triton.cdiv(m, block_m))
    dw_part, db_part = (s.new_empty((programs, n), dtype=torch.float32) for _ in range(2))
    _backward_kernel[(programs,)](
        dy.contiguous(), s, weight, mean, rstd, seed if p > 0 else mean, dres, dx, dw_part, db_part, M=m, N=n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **_dropout_args(salt, p))
    block_n = min(block_n, 256)
    _sum_partials_kernel[(triton.cdiv(n, block_n),)](dw_part, db_part, dw, db, programs, n, BLOCK_P=16,
                                                     BLOCK_N=block_n, num_warps=4)
    return dres, dx, dw, db


@_backward_op.register_fake
def _(dy, s, weight, mean, rstd, seed, salt, p):
    return (torch.empty_like(s), torch.empty_like(s) if p > 0 else s.new_empty(0), torch.empty_like(weight),
            torch.empty_like(weight))


def _setup(ctx, inputs, output):
    x, residual, weight, bias, seed, salt, p, eps = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3], seed)
    ctx.salt, ctx.p = salt, p
    # s, mean and rstd are for the backward only: without this autograd would fill their gradients with zeros,
    # three memset launches per call.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, *_):
    if dy is None:
        return (None,) * 8
    s, weight, mean, rstd, seed = ctx.saved_tensors
    dres, dx, dw, db = _backward_op(dy, s, weight, mean, rstd, seed, ctx.salt, ctx.p)
    return (dx if ctx.p > 0 else dres), dres, dw, db, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup)


def dropout_add_layer_norm(x, residual, weight, bias, seed, salt: int, p: float, eps: float):
    """Backend entry (see electra_fast.ops.dropout_add_layer_norm): contiguous `[M, N]` x and residual of one dtype,
    weight and bias `[N]`, a 1-element int64 seed tensor (None when p == 0), p in [0, 1)."""
    if x.shape[1] > MAX_N:
        raise ValueError(f"the Triton dropout_add_layer_norm keeps a row in registers: the normalised size must be "
                         f"<= {MAX_N}, got {x.shape[1]}")
    return _forward_op(x, residual, weight, bias, seed, int(salt), float(p), float(eps))[0]
