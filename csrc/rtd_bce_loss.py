"""CUDA launcher of `electra_fast.ops.rtd_bce_loss`: mean sigmoid BCE over real tokens (`rtd_bce_loss.cu`).

Design. The forward reads logits, labels and mask once and returns the loss, the unnormalised gradient
`(sigmoid(x) - y) * mask` in fp32 and `1 / max(count, 1)`, all on the device (no host sync; an all-padding batch
gives loss 0); the backward is one scaling kernel, `grad_unscaled * grad_loss * inv_count`, cast to the logits'
dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._extension import extension, require_cuda, require_logits
# The backend switch asks the op's module whether the extension can run here.
from ._extension import is_available, unavailable_reason  # noqa: F401


@torch.library.custom_op("electra_fast::rtd_bce_loss_cuda", mutates_args=(), device_types="cuda")
def _bce_op(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss, (sigmoid(x) - y) * mask in fp32, 1 / max(count, 1)); the backward scales the second by the third."""
    return extension().rtd_bce_forward(logits, labels, attention_mask)


@_bce_op.register_fake
def _(logits, labels, attention_mask):
    return (logits.new_empty((), dtype=torch.float32), torch.empty_like(logits, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("electra_fast::rtd_bce_backward_cuda", mutates_args=(), device_types="cuda")
def _bce_backward_op(grad_loss: Tensor, grad_unscaled: Tensor, inv_count: Tensor, dtype: torch.dtype) -> Tensor:
    return extension().rtd_bce_backward(grad_loss, grad_unscaled, inv_count, dtype)


@_bce_backward_op.register_fake
def _(grad_loss, grad_unscaled, inv_count, dtype):
    return torch.empty_like(grad_unscaled, dtype=dtype)


def _bce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtype = inputs[0].dtype


def _bce_backward(ctx, grad_loss, *_):
    grad_unscaled, inv_count = ctx.saved_tensors
    return _bce_backward_op(grad_loss.float().contiguous(), grad_unscaled, inv_count, ctx.dtype), None, None


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


def rtd_bce_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    """Backend entry (see electra_fast.ops.rtd_bce_loss): mean sigmoid BCE over tokens with `attention_mask != 0`
    (0 when there are none), differentiable w.r.t. logits."""
    require_cuda({"logits": logits, "labels": labels, "attention_mask": attention_mask})
    require_logits(logits)
    return _bce_op(logits.contiguous(), labels.contiguous(), attention_mask.contiguous())[0]
