"""Fused LM head + MLM loss + sample (`electra_fast.ops.lm_head_loss_and_sample`, Triton backend).

Design (Liger-Kernel's fused linear cross-entropy, plus the sample). One chunk of rows at a time, in one reused
`[rows, W]` buffer in the input dtype:
1. logits = bias + hidden[chunk] @ weight.T (cuBLAS, fp32 accumulation, the unfused head's output dtype);
2. the MLM row kernel (`mlm_loss_and_sample._sample_rows_kernel`): lse, ce, argmax, sample, with `row_offset` so the
   Philox counters are those of the whole-matrix launch (same seed -> same ids as the unfused op);
3. the MLM backward kernel over the chunk, in place: `(softmax - onehot) * w / (sum(w) + 1e-6)`, exactly 0 in the
   padded columns. In place is safe: each element is read, then written, by one program. `grad_loss` is 1 here;
   the backward scales by the real one (`ops._contract.attach_grads`);
4. grad_hidden[chunk] = g @ weight, grad_weight += g.T @ hidden[chunk] (fp32 accumulator: on CUDA one
   `addmm(out_dtype=float32)` into it), grad_bias += column sums of g (fp32).
The normaliser 1 / (sum(w) + 1e-6) is known from the weights before any chunk, so the gradients are final. Peak
extra memory: the chunk buffer (by default about `ops._contract.CHUNK_BYTES`, see `bytes_per_row`) plus grad_weight
in fp32, never the `[M, W]` logits (296 MB in fp32 at M = 2432, W = 30592) nor their gradient.
"""
from __future__ import annotations

import torch

from electra_fast.ops._checks import check_sampler
from electra_fast.ops._contract import WEIGHT_EPS, attach_grads, chunk_rows

from . import mlm_loss_and_sample as _mls

_ADDMM_OUT_DTYPE = [True]  # whether CUDA's torch.addmm takes out_dtype= (torch >= 2.8); cleared on the first refusal


def bytes_per_row(width: int, dtype: torch.dtype) -> int:
    """This backend's chunk temporaries per row: the `[rows, W]` logits buffer. (Under the interpreter, 16-bit inputs
    also get an fp32 copy of it in `_add_matmul`: CPU GEMMs have no fp32 output for them. The rule follows the GPU.)"""
    return width * dtype.itemsize


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with the products of 16-bit a, b summed in fp32 (not rounded to 16 bits first)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        if _ADDMM_OUT_DTYPE[0]:
            try:  # one GEMM into the accumulator: no fp32 [W, E] product beside it
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                return
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError):  # an older torch: its argument checks refuse before anything is written
                _ADDMM_OUT_DTYPE[0] = False
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:  # the interpreter (CPU tests): CPU GEMMs have no fp32 output for 16-bit inputs
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@torch.library.custom_op("electra_fast::lm_head_loss_and_sample_triton", mutates_args=())
def _lm_head_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor, seed: torch.Tensor, temperature: float, disallow_correct: bool, sampler: str,
                vocab_size: int, rows: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, e = hidden.shape
    width = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    lse, ce = torch.empty(m, **f32), torch.empty(m, **f32)
    correct = torch.empty(m, device=hidden.device, dtype=torch.bool)
    sampled = torch.empty(m, device=hidden.device, dtype=torch.int64)
    grad_hidden = torch.empty_like(hidden)
    grad_weight, grad_bias = torch.zeros((width, e), **f32), torch.zeros(width, **f32)
    inv_norm = 1.0 / (weights.sum() + WEIGHT_EPS)
    one = torch.ones((), **f32)
    buf = torch.empty((rows, width), device=hidden.device, dtype=hidden.dtype)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        h, t, logits = hidden[r0:r1], targets[r0:r1], buf[: r1 - r0]
        torch.addmm(bias, h, weight.T, out=logits)
        sampled[r0:r1] = _mls.launch_sampler(logits, seed, temperature, t if disallow_correct else None, sampler,
                                             vocab_size, targets=t,
                                             outs=(lse[r0:r1], ce[r0:r1], correct[r0:r1].view(torch.uint8)),
                                             row_offset=r0)
        _mls.launch_backward(logits, logits, t, weights[r0:r1], lse[r0:r1], inv_norm, one, vocab_size)
        torch.mm(logits, weight, out=grad_hidden[r0:r1])
        _add_matmul(grad_weight, logits.T, h)
        grad_bias += logits.sum(0, dtype=torch.float32)
    loss, _ = _mls.launch_weighted_mean(ce, weights)
    return loss, sampled, correct, grad_hidden, grad_weight, grad_bias


@_lm_head_op.register_fake
def _(hidden, weight, bias, targets, weights, seed, temperature, disallow_correct, sampler, vocab_size, rows):
    m = hidden.shape[0]
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((m,), dtype=torch.int64),
            hidden.new_empty((m,), dtype=torch.bool), torch.empty_like(hidden),
            weight.new_empty(weight.shape, dtype=torch.float32), bias.new_empty(bias.shape, dtype=torch.float32))


def lm_head_loss_and_sample(hidden, weight, bias, targets, weights, seed, temperature: float,
                            disallow_correct: bool, vocab_size: int, chunk_size=None, sampler: str = "cdf"):
    """Backend entry (see electra_fast.ops.lm_head_loss_and_sample): contiguous hidden [M, E], weight [W, E] and
    bias [W] of one dtype, int64 targets, fp32 weights, a 1-element int64 seed tensor, the real vocabulary size and
    the rows per chunk (None: `ops._contract.chunk_rows` of this backend's `bytes_per_row`), the sampler. Returns
    (loss, sampled, correct); loss differentiable w.r.t. hidden, weight and bias."""
    rows = chunk_rows(hidden.shape[0], bytes_per_row(weight.shape[0], hidden.dtype), chunk_size)
    # The op itself has no autograd: the gradients it returns reach hidden, weight and bias through attach_grads.
    loss, sampled, correct, *grads = _lm_head_op(hidden.detach(), weight.detach(), bias.detach(), targets, weights,
                                                 seed, float(temperature), bool(disallow_correct),
                                                 check_sampler(sampler), int(vocab_size), int(rows))
    return attach_grads(loss, hidden, weight, bias, *grads), sampled, correct
