"""Discriminator loss (docs/algorithm.md#discriminator-loss): sigmoid BCE over every real token, mean over those tokens.

The normaliser is a tensor, `clamp(sum(mask), min=1)`, never `.item()`; an all-padding batch gives loss 0.
The gradient is computed in the forward pass (it costs one more write of `[B, L]`, and the backward is then a
scale), which is what the kernels do too.
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import FLOAT_DTYPES, acc_dtype, check_same_device, check_shape, check_tensor


def rtd_bce_reference(logits, labels, attention_mask):
    """Returns `(loss, grad)` with `grad = d loss / d logits`, both fp32 (fp64 for fp64 logits)."""
    acc = acc_dtype(logits.dtype)
    x, y, m = logits.to(acc), labels.to(acc), (attention_mask != 0).to(acc)
    count = m.sum().clamp(min=1.0)
    # Stable BCE-with-logits: max(x, 0) - x * y + log(1 + exp(-|x|)).
    bce = x.clamp(min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
    return (bce * m).sum() / count, (torch.sigmoid(x) - y) * m / count


@torch.library.custom_op("electra_fast::rtd_bce_loss", mutates_args=())
def _rtd_bce_op(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return rtd_bce_reference(logits, labels, attention_mask)


@_rtd_bce_op.register_fake
def _(logits, labels, attention_mask):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), torch.empty_like(logits, dtype=acc)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss).to(ctx.dtype), None, None


_rtd_bce_op.register_autograd(_backward, setup_context=_setup)


def rtd_bce_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Mean sigmoid binary cross-entropy over real tokens.

    Args:
        logits: `[B, L]` discriminator logits (fp32/fp16/bf16).
        labels: `[B, L]` 1 = replaced (bool, int or float).
        attention_mask: `[B, L]`, nonzero = real token (default: all real).

    Returns: fp32 scalar, differentiable w.r.t. logits; 0 when no token is real.
    """
    check_tensor(logits, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(labels, "labels")
    check_shape(labels, "labels", logits.shape, "same as logits")
    if attention_mask is None:
        attention_mask = torch.ones_like(logits, dtype=torch.uint8)
    check_tensor(attention_mask, "attention_mask")
    check_shape(attention_mask, "attention_mask", logits.shape, "same as logits")
    check_same_device({"logits": logits, "labels": labels, "attention_mask": attention_mask})
    _, kernel = resolve("rtd_bce_loss", backend, logits.device, logits.dtype)
    if kernel is not None:
        return kernel(logits.contiguous(), labels.contiguous(), attention_mask.contiguous())
    return _rtd_bce_op(logits.contiguous(), labels.contiguous(), attention_mask.contiguous())[0]
