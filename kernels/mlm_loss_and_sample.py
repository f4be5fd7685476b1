"""Fused MLM loss + replacement sampling: one pass over each logit row (docs/contracts.md#mlm_loss_and_sample).

Design. One program per row streams it in BLOCK-column tiles (int64 row offset, fp32 math whatever the dtype)
and keeps running scalars only: the online log-sum-exp (max, sum of exp), the argmax (for `correct`) and the
sampler's state. The target logit is one extra scalar load. A single-program kernel then reduces the per-row
cross-entropies to `loss = sum(w * ce) / (sum(w) + 1e-6)` on the device (no `.item()`) and keeps
`1 / (sum(w) + 1e-6)` for the backward, which writes `(softmax - onehot) * w * grad / (sum(w) + 1e-6)` from the
saved per-row lse in a second kernel: nothing of size [M, V] exists besides the logits and their gradient.

Sampling draws exactly from softmax(logits / T), with two samplers (constexpr `CDF`):
- "cdf" (default): inverse-CDF sampling with two uniforms per row. The online log-sum-exp already yields each
  tile's mass S_k (in units of the running max at tile k); the kernel keeps (S_k, max_k) for every tile in a
  tiny register vector. After the pass, one uniform picks tile k with probability S_k / S (inverse CDF over the
  rescaled tile masses) and a second one picks the column inside tile k by inverse CDF over its exp-weights
  (one tile re-read, from L2): P(column c of tile k) = S_k / S * w_c / S_k = softmax. One Philox call per row
  and no logs, and at T = 1 without `disallow_correct` it reuses the loss's exp(): the pass stays memory-bound,
  where per-element Philox + two logs made a naive kernel compute-bound.
- "gumbel": Gumbel-max, argmax(x / T - log(-log U)), one uniform per element, four per Philox call
  (`tl.randint4x`). Kept for comparison (benchmarks) and as the textbook method.
The entry takes the sampler as an argument (the public op's `sampler=`, by default `ELECTRA_FAST_SAMPLER` as
`electra_fast.options` reads it). The Philox seed is read from a device tensor drawn with torch's RNG, so samples
follow `torch.manual_seed`/`generator=` and CUDA-graph replays draw fresh ones.
`gumbel_sample.py` runs this same row kernel with the loss switched off (`WITH_LOSS=False`).

Padded vocabulary and 16-byte loads. Rows are `[W]` wide with only the first V columns real. Every load and store
of the logits and their gradient is masked with the row width W (`cols < W`), never with V: the model pads W to a
multiple of 128, so Triton's integer specialisation sees W and the row stride divisible by 16, the mask is constant
over 16 aligned columns and the compiler emits 16-byte accesses (LDG.E.128 / STG.E.128; masking with V = 30522
gave 2-byte ones). The real V is applied after the load with a select (-inf in the forward, 0 in the backward), so
padded columns never reach the loss, the argmax or the sampler and get a gradient of exactly 0.
tests/test_compile_sm90.py reads the widths in the sm_90 SASS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from electra_fast.ops._checks import SAMPLERS, check_sampler  # noqa: F401  (SAMPLERS: part of this module's API)
from electra_fast.ops._contract import WEIGHT_EPS, mlm_kernel_fake, register_mlm_autograd

from ._common import pow2

BLOCK_V = 4096     # columns per tile in the forward pass (tests shrink it to cover many tiles at tiny V)
BLOCK_BWD = 4096   # columns per program in the backward


@triton.jit
def _online_lse_step(x, x_max, m, s):
    """Fold a tile (fp32, -inf = excluded; x_max its maximum) into a running (max, sum exp(x - max)); also return
    the tile's mass in the new units."""
    m_new = tl.maximum(m, x_max)
    # Nothing but -inf so far: measure against 0 so exp() never sees -inf - (-inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    blk = tl.sum(tl.exp(x - m_ref), 0)
    return m_new, s * tl.exp(m - m_ref) + blk, blk


@triton.jit
def _scores(x, cols, inv_t, banned, SCALED: tl.constexpr, DISALLOW: tl.constexpr):
    if SCALED:
        x = x * inv_t
    if DISALLOW:
        x = tl.where(cols == banned, float("-inf"), x)
    return x


@triton.jit
def _uniform(r):
    """uint32 Philox output -> U[0, 1): the top 24 bits, exact in fp32."""
    return (r >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _gumbel_noise(seed, offset, BLOCK: tl.constexpr):
    """BLOCK Gumbel draws from BLOCK // 4 Philox calls (counters offset .. offset + BLOCK // 4 - 1)."""
    r0, r1, r2, r3 = tl.randint4x(seed, offset + tl.arange(0, BLOCK // 4))
    # Column 4j + k takes output k of call j: any bijection works, this one is a register-local interleave.
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
    return -tl.log(-tl.log(_uniform(r)))  # U = 0 gives -inf: that column cannot win, the right limit


@triton.jit
def _inverse_cdf(w, u, idx):
    """The first index whose running sum of the weights `w` (>= 0) exceeds u * sum(w)."""
    cdf = tl.cumsum(w, 0)
    k = tl.sum((cdf <= u * tl.max(cdf, 0)).to(tl.int32), 0)
    # u * total may round up to total: fall back to the last index with weight (0 if none, as argmax of -inf).
    last = tl.max(tl.where(w > 0, idx, -1), 0)
    return tl.maximum(tl.minimum(k, last), 0)


@triton.jit
def _load_real(row_ptr, cols, V, W):
    """A tile of a logit row in fp32, -inf outside the vocabulary. Masked with the row width W (16-byte loads when W
    and the stride are multiples of 16), the real V applied by a select."""
    x = tl.load(row_ptr + cols, mask=cols < W, other=float("-inf")).to(tl.float32)
    return tl.where(cols < V, x, float("-inf"))


@triton.jit
def _sample_rows_kernel(logits_ptr, targets_ptr, banned_ptr, seed_ptr, sampled_ptr, lse_ptr, ce_ptr, correct_ptr,
                        V, W, stride, row_offset, inv_t, BLOCK: tl.constexpr, N_TILES: tl.constexpr,
                        WITH_LOSS: tl.constexpr, CDF: tl.constexpr, SCALED: tl.constexpr, DISALLOW: tl.constexpr,
                        SHARE_EXP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    seed = tl.load(seed_ptr)
    banned = -1
    if DISALLOW:
        banned = tl.load(banned_ptr + row)
    # Disjoint Philox counters per row: one per 4 columns (gumbel), counter 0 of the row's range (cdf). They follow
    # the row's index in the whole matrix (row_offset + row), so a launch on a chunk of rows draws what one launch on
    # all rows would.
    rng = (row + row_offset) * (N_TILES * (BLOCK // 4))
    tiles = tl.arange(0, N_TILES)
    m = float("-inf")    # log-sum-exp state of x (the loss)
    s = 0.0
    top = float("-inf")  # argmax of x
    top_idx = 0
    sm = float("-inf")   # sampler: running max of the scores (cdf) or best Gumbel score
    ss = 0.0
    pick = 0             # gumbel: chosen column
    tile_max = tl.full([N_TILES], float("-inf"), tl.float32)  # cdf: each tile's mass and the max it is relative to
    tile_mass = tl.zeros([N_TILES], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _load_real(row_ptr, cols, V, W)
        if WITH_LOSS:
            blk_top, blk_idx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            m, s, blk = _online_lse_step(x, blk_top, m, s)
            top_idx = tl.where(blk_top > top, start + blk_idx, top_idx)  # strict: the first maximum wins
            top = tl.maximum(top, blk_top)
        xs = _scores(x, cols, inv_t, banned, SCALED, DISALLOW)
        if CDF:
            if SHARE_EXP:
                sm, ss, sblk = m, s, blk
            else:
                sm, ss, sblk = _online_lse_step(xs, tl.max(xs, 0), sm, ss)
            here = tiles == start // BLOCK
            tile_max = tl.where(here, sm, tile_max)
            tile_mass = tl.where(here, sblk, tile_mass)
        else:
            score = xs + _gumbel_noise(seed, rng + start // 4, BLOCK)
            blk_best, blk_arg = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
            pick = tl.where(blk_best > sm, start + blk_arg, pick)
            sm = tl.maximum(sm, blk_best)
    if CDF:
        r0, r1, _, _ = tl.randint4x(seed, rng + tl.zeros([1], tl.int64))
        # Rescale every tile's mass to the final max (exp <= 1, no overflow); tiles without mass stay 0.
        w = tl.where(tile_mass > 0, tile_mass * tl.exp(tile_max - tl.where(sm == float("-inf"), 0.0, sm)), 0.0)
        start = _inverse_cdf(w, tl.sum(_uniform(r0), 0), tiles) * BLOCK
        idx = tl.arange(0, BLOCK)
        cols = start + idx
        x = _scores(_load_real(row_ptr, cols, V, W), cols, inv_t, banned, SCALED, DISALLOW)
        mx = tl.max(x, 0)
        pick = start + _inverse_cdf(tl.exp(x - tl.where(mx == float("-inf"), 0.0, mx)), tl.sum(_uniform(r1), 0), idx)
    tl.store(sampled_ptr + row, pick.to(tl.int64))
    if WITH_LOSS:
        target = tl.load(targets_ptr + row)
        x_t = tl.load(row_ptr + target, mask=(target >= 0) & (target < V), other=0.0).to(tl.float32)
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        tl.store(ce_ptr + row, lse - x_t)
        tl.store(correct_ptr + row, (top_idx == target).to(tl.uint8))


@triton.jit
def _weighted_mean_kernel(ce_ptr, w_ptr, loss_ptr, inv_norm_ptr, M, EPS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = sum(w * ce) / (sum(w) + eps), and 1 / (sum(w) + eps) for the backward. Deterministic."""
    num = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + i, mask=i < M, other=0.0)
        # Weight-0 rows contribute 0 even if their ce were not finite.
        num += tl.where(w != 0, w * tl.load(ce_ptr + i, mask=i < M, other=0.0), 0.0)
        den += w
    inv = 1.0 / (tl.sum(den, 0) + EPS)
    tl.store(loss_ptr, tl.sum(num, 0) * inv)
    tl.store(inv_norm_ptr, inv)


@triton.jit
def _mlm_backward_kernel(grad_ptr, logits_ptr, targets_ptr, w_ptr, lse_ptr, inv_norm_ptr, grad_loss_ptr, V, W,
                         stride, grad_stride, BLOCK: tl.constexpr):
    """Program (row, j): columns [j * BLOCK, (j + 1) * BLOCK) of `grad = (softmax - onehot) * w * grad_loss * inv_norm`,
    exactly 0 in the padded columns [V, W)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(w_ptr + row) * tl.load(inv_norm_ptr) * tl.load(grad_loss_ptr).to(tl.float32)
    x = _load_real(logits_ptr + row * stride, cols, V, W)
    p = tl.exp(x - tl.load(lse_ptr + row))
    g = (p - (cols == tl.load(targets_ptr + row)).to(tl.float32)) * scale
    g = tl.where(cols < V, g, 0.0)  # exactly 0 even when scale is not finite
    tl.store(grad_ptr + row * grad_stride + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < W)


def launch_sampler(logits, seed, temperature: float, banned, sampler: str, vocab_size: int, *, targets=None,
                   outs=None, row_offset: int = 0):
    """Run the row kernel on `logits` `[m, W]` (unit column stride; columns >= `vocab_size` are padding) and return
    the `[m]` int64 samples. `banned`: optional `[m]` int64 id per row that may not be drawn (negative: none).
    With `targets` (`[m]` int64) it also computes the loss terms into `outs` = (lse `[m]` fp32, ce `[m]` fp32,
    correct `[m]` uint8), each contiguous.

    `row_offset`: the index of `logits`' first row in the whole matrix. The Philox counters follow the whole-matrix
    row, so launching on the chunks `logits[r0:r0 + c]` with `row_offset=r0` (same W, seed, temperature, sampler)
    draws exactly the samples of one launch on all rows; that is how a chunked caller (the fused LM head) calls it."""
    m, w = logits.shape
    sampled = torch.empty(m, device=logits.device, dtype=torch.int64)
    if m == 0:
        return sampled
    block = pow2(w, lo=4, hi=BLOCK_V)
    with_loss = targets is not None
    scaled, disallow = temperature != 1.0, banned is not None
    lse, ce, correct = outs if with_loss else (sampled, sampled, sampled)  # unused pointers when not WITH_LOSS
    _sample_rows_kernel[(m,)](
        logits, targets if with_loss else sampled, banned if disallow else sampled, seed, sampled, lse, ce, correct,
        vocab_size, w, logits.stride(0), row_offset, 1.0 / temperature, BLOCK=block,
        N_TILES=pow2(triton.cdiv(w, block)), WITH_LOSS=with_loss, CDF=check_sampler(sampler) == "cdf",
        SCALED=scaled, DISALLOW=disallow, SHARE_EXP=with_loss and not scaled and not disallow,
        num_warps=8 if block >= 2048 else 4)
    return sampled


def launch_weighted_mean(ce, weights):
    """`(loss, inv_norm)`: fp32 scalars `sum(w * ce) / (sum(w) + 1e-6)` and `1 / (sum(w) + 1e-6)` over all M rows
    (`ce`, `weights`: contiguous fp32 `[M]`), on the device, deterministic."""
    loss, inv_norm = (torch.empty((), device=ce.device, dtype=torch.float32) for _ in range(2))
    _weighted_mean_kernel[(1,)](ce, weights, loss, inv_norm, ce.shape[0], EPS=WEIGHT_EPS, BLOCK=1024)
    return loss, inv_norm


def launch_backward(grad, logits, targets, weights, lse, inv_norm, grad_loss, vocab_size: int) -> None:
    """Write the MLM gradient of `logits` `[m, W]` into `grad` (same shape, unit column stride): rows' `targets`,
    `weights` (fp32), `lse` (fp32) are `[m]` contiguous; `inv_norm` and `grad_loss` are the fp32 scalars of the
    whole batch (from `launch_weighted_mean` and autograd). Columns >= `vocab_size` get exactly 0. Rows are
    independent, so a chunked caller passes a chunk of rows with the matching slices; `grad` may be `logits` itself
    (each element is read, then written, by one program)."""
    m, w = logits.shape
    if m:
        block = pow2(w, lo=16, hi=BLOCK_BWD)
        _mlm_backward_kernel[(m, triton.cdiv(w, block))](
            grad, logits, targets, weights, lse, inv_norm, grad_loss, vocab_size, w, logits.stride(0), grad.stride(0),
            BLOCK=block, num_warps=8 if block >= 2048 else 4)


@torch.library.custom_op("electra_fast::mlm_loss_and_sample_triton", mutates_args=())
def _mlm_op(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, seed: torch.Tensor,
            temperature: float, disallow_correct: bool, sampler: str, vocab_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m = logits.shape[0]
    lse, ce = (torch.empty(m, device=logits.device, dtype=torch.float32) for _ in range(2))
    correct = torch.empty(m, device=logits.device, dtype=torch.bool)
    sampled = launch_sampler(logits, seed, temperature, targets if disallow_correct else None, sampler, vocab_size,
                             targets=targets, outs=(lse, ce, correct.view(torch.uint8)))
    loss, inv_norm = launch_weighted_mean(ce, weights)
    return loss, sampled, correct, lse, inv_norm


_mlm_op.register_fake(mlm_kernel_fake)


@torch.library.custom_op("electra_fast::mlm_loss_backward_triton", mutates_args=())
def _mlm_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     lse: torch.Tensor, inv_norm: torch.Tensor, vocab_size: int) -> torch.Tensor:
    grad = torch.empty_like(logits)
    launch_backward(grad, logits, targets, weights, lse, inv_norm, grad_loss, vocab_size)
    return grad


@_mlm_backward_op.register_fake
def _(grad_loss, logits, targets, weights, lse, inv_norm, vocab_size):
    return torch.empty_like(logits)


register_mlm_autograd(_mlm_op, _mlm_backward_op)


def mlm_loss_and_sample(logits, targets, weights, seed, temperature: float, disallow_correct: bool,
                        vocab_size: int, sampler: str = "cdf"):
    """Backend entry (see electra_fast.ops.mlm_loss_and_sample): contiguous logits [M, W] of which the first
    `vocab_size` columns are the vocabulary, int64 targets, fp32 weights, a 1-element int64 seed tensor, the sampler
    ("cdf" or "gumbel"). Returns (loss, sampled, correct); loss differentiable."""
    loss, sampled, correct, _, _ = _mlm_op(logits, targets, weights, seed, float(temperature), bool(disallow_correct),
                                           check_sampler(sampler), int(vocab_size))
    return loss, sampled, correct
