"""Token-level sigmoid BCE, the discriminator loss (docs/algorithm.md#discriminator-loss): mean over real tokens,
gradient in the forward.

Design. The forward kernel reads logits, labels and mask once and writes, per element, the unnormalised gradient
`(sigmoid(x) - y) * mask` (fp32) plus per-program partial sums of the loss and of the mask. A one-program kernel
reduces the partials in a fixed order (deterministic) into `loss = sum / clamp(count, 1)` and `1 / clamp(count, 1)`:
the normaliser stays a device tensor, and an all-padding batch gives loss 0 and gradient 0. The backward is then one
elementwise kernel, `grad = g * grad_loss / count`, cast to the logits' dtype (the scaling by grad_loss must happen
somewhere; folding 1/count into it costs nothing).
Labels and mask may be bool, int or float (bool is read as bytes); math in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import loadable

BLOCK = 2048


@triton.jit
def _bce_terms(x, y):
    """Per-token (loss, dloss/dx) of sigmoid BCE in fp32, stable for any |x| and without libdevice."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
    # log1p(e) as log(1 + e): the absolute error is below 1e-7 per token, far under the loss' own rounding.
    loss = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + e)
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, sig - y


@triton.jit
def _bce_forward_kernel(logits_ptr, labels_ptr, mask_ptr, grad_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    y = tl.load(labels_ptr + i, mask=i < n, other=0).to(tl.float32)
    real = (tl.load(mask_ptr + i, mask=i < n, other=0) != 0).to(tl.float32)
    loss, g = _bce_terms(x, y)
    tl.store(grad_ptr + i, g * real, mask=i < n)
    tl.store(partial_ptr + 2 * pid, tl.sum(loss * real, 0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(real, 0))


@triton.jit
def _bce_reduce_kernel(partial_ptr, loss_ptr, inv_count_ptr, P, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for start in range(0, P, BLOCK):
        p = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + 2 * p, mask=p < P, other=0.0)
        count += tl.load(partial_ptr + 2 * p + 1, mask=p < P, other=0.0)
    inv = 1.0 / tl.maximum(tl.sum(count, 0), 1.0)
    tl.store(loss_ptr, tl.sum(total, 0) * inv)
    tl.store(inv_count_ptr, inv)


@triton.jit
def _scale_kernel(g_ptr, out_ptr, grad_loss_ptr, inv_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(inv_ptr)
    g = tl.load(g_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, (g * s).to(out_ptr.dtype.element_ty), mask=i < n)


@torch.library.custom_op("electra_fast::rtd_bce_backward_triton", mutates_args=())
def _backward_op(g: torch.Tensor, grad_loss: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`g * grad_loss * inv` in one kernel, cast to `dtype` (g: the fp32 unnormalised gradient)."""
    out = torch.empty_like(g, dtype=dtype)
    n = out.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, BLOCK),)](g, out, grad_loss.contiguous(), inv, n, BLOCK=BLOCK, num_warps=4)
    return out


@_backward_op.register_fake
def _(g, grad_loss, inv, dtype):
    return torch.empty_like(g, dtype=dtype)


@torch.library.custom_op("electra_fast::rtd_bce_loss_triton", mutates_args=())
def _rtd_bce_op(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.numel()
    p = max(1, triton.cdiv(n, BLOCK))
    f32 = dict(device=logits.device, dtype=torch.float32)
    grad, partial = torch.empty(logits.shape, **f32), (torch.empty if n else torch.zeros)(2 * p, **f32)
    loss, inv = torch.empty((), **f32), torch.empty((), **f32)
    if n:
        _bce_forward_kernel[(p,)](logits, loadable(labels), loadable(attention_mask), grad, partial, n, BLOCK=BLOCK,
                                  num_warps=4)
    _bce_reduce_kernel[(1,)](partial, loss, inv, p, BLOCK=1024)
    return loss, grad, inv


@_rtd_bce_op.register_fake
def _(logits, labels, attention_mask):
    return (logits.new_empty((), dtype=torch.float32), torch.empty_like(logits, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtype = inputs[0].dtype


def _backward(ctx, grad_loss, *_):
    g, inv = ctx.saved_tensors
    return _backward_op(g, grad_loss, inv, ctx.dtype), None, None


_rtd_bce_op.register_autograd(_backward, setup_context=_setup)


def rtd_bce_loss(logits, labels, attention_mask):
    """Backend entry (see electra_fast.ops.rtd_bce_loss): contiguous logits, labels, mask of one shape.
    Returns the fp32 mean loss over real tokens, differentiable w.r.t. logits."""
    return _rtd_bce_op(logits, labels, attention_mask)[0]
