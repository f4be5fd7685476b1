"""What the public ops (`electra_fast.ops.<op>`) and their kernel backends (`electra_fast.kernels.<op>`, Triton;
`electra_fast.csrc.<op>`, CUDA) share: constants both sides compute with, the autograd glue every backend
registers, and fake kernels used on both sides.

It sits below both: the kernel modules import this module (with `ops._checks`, `electra_fast.options` and
`electra_fast.checks`) and never a public op module, so an op's module can dispatch to a kernel module without an
import circle. Nothing here imports more of the package than the foundation layer.
"""
from __future__ import annotations

from typing import Optional

import torch

# mlm_loss_and_sample, lm_head_loss_and_sample: the weighted mean's denominator guard, `sum(w * ce) / (sum(w) + eps)`.
# A batch with no real slot gives loss 0, not NaN.
WEIGHT_EPS = 1e-6

# mask_tokens: a chosen slot becomes [MASK] with this probability, else keeps its token.
MASK_REPLACE_PROB = 0.85

# rtd_head_loss: what `counts` holds, over real tokens (attention_mask != 0), "positive" = replaced (label 1) or
# predicted so (logit > 0): e.g. precision = true_positive / predicted, recall = true_positive / replaced.
COUNTS = ("real", "correct", "predicted", "replaced", "true_positive")

# lm_head_loss_and_sample: the default chunks' budget and row alignment.
CHUNK_BYTES = 2 ** 26  # default bytes of a chunk's temporaries (64 MiB: 548 rows of fp32 logits at W = 30592)
ROW_MULTIPLE = 8  # default chunks hold a multiple of 8 rows (aligned GEMM shapes); a last chunk may hold fewer


def chunk_rows(m: int, bytes_per_row: int, chunk_size: Optional[int] = None) -> int:
    """Rows per chunk of the fused LM head: `chunk_size`, or else the fewest chunks whose temporaries (`bytes_per_row`
    per row) fit CHUNK_BYTES, split into equal chunks (rounded up to ROW_MULTIPLE rows, so a chunk may exceed
    CHUNK_BYTES by up to 7 rows) rather than full chunks and a small last one. At least 1, at most m."""
    if chunk_size is None:
        chunks = max(1, -(-m * bytes_per_row // CHUNK_BYTES))
        rows = -(-m // chunks)
        chunk_size = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    return max(1, min(chunk_size, m))


# ---------------------------------------------------------------------------------------------------------------
# The fused LM head's autograd: every backend computes the gradients in the forward and returns the loss through
# this op, whose backward only scales them by the incoming gradient.


@torch.library.custom_op("electra_fast::loss_with_grads", mutates_args=())
def _loss_with_grads(loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """`loss` (a copy), whose gradients w.r.t. hidden, weight and bias are the given ones times the incoming one."""
    return loss.clone()


@_loss_with_grads.register_fake
def _(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    return torch.empty_like(loss)


def _loss_with_grads_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[4:])
    ctx.dtypes = [t.dtype for t in inputs[1:4]]


def _loss_with_grads_backward(ctx, grad_loss):
    # Written straight in the parameter's dtype: a 16-bit weight gets no second fp32 [W, E] copy beside the saved one.
    grads = [torch.mul(g, grad_loss.to(g.dtype), out=torch.empty(g.shape, dtype=dt, device=g.device))
             for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
    return (None, *grads, None, None, None)


_loss_with_grads.register_autograd(_loss_with_grads_backward, setup_context=_loss_with_grads_setup)


def attach_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias) -> torch.Tensor:
    """The shared autograd glue of every LM-head backend: `loss`, differentiable w.r.t. hidden, weight and bias with
    the gradients computed in the forward (of a loss with d loss / d loss = 1)."""
    return _loss_with_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


# ---------------------------------------------------------------------------------------------------------------
# Autograd registrations shared by the reference and the kernel backends of one op.


def mlm_kernel_fake(logits, *_):
    """Fake of the kernel backends' MLM forward `(logits, targets, weights, seed, ...)` -> (loss, sampled [M],
    correct [M], lse [M], sum(weights) + eps): fp32 statistics whatever the logits' dtype."""
    m = logits.shape[0]
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty((m,), dtype=torch.int64),
            logits.new_empty((m,), dtype=torch.bool), logits.new_empty((m,), dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


def register_mlm_autograd(mlm_op, backward_op) -> None:
    """Autograd of an MLM op `(logits, targets, weights, ..., vocab_size) -> (loss, sampled, correct, *saved)` whose
    backward is `backward_op(grad_loss, logits, targets, weights, *saved, vocab_size)`: the op's LAST input is the
    int vocabulary size V (columns >= V are padding, their gradient must be exactly 0) and saved[0] is the per-row
    lse."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], *output[3:])
        ctx.num_inputs, ctx.vocab_size = len(inputs), inputs[-1]

    def backward(ctx, grad_loss, *_):
        saved = ctx.saved_tensors
        grad = backward_op(grad_loss.to(saved[3].dtype).contiguous(), *saved, ctx.vocab_size)
        return (grad,) + (None,) * (ctx.num_inputs - 1)

    mlm_op.register_autograd(backward, setup_context=setup)


def register_gather_autograd(gather_op, scatter_add_op) -> None:
    """Autograd of a `(hidden, positions)` gather op: its backward is `scatter_add_op(grad, positions, L)`."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.seq_len = inputs[0].shape[1]

    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return scatter_add_op(grad.contiguous(), positions, ctx.seq_len), None

    gather_op.register_autograd(backward, setup_context=setup)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (output shapes and dtypes) that the reference op and a kernel op share.


def varlen_plan_fake(attention_mask):
    """`(order [B, L] int64, inverse [B, L] int64, cu_seqlens [2B + 1] int32)` of a `[B, L]` mask."""
    b, n = attention_mask.shape
    index = attention_mask.new_empty((b, n), dtype=torch.int64)
    return index, torch.empty_like(index), attention_mask.new_empty((2 * b + 1,), dtype=torch.int32)
