"""Fused discriminator head: the final `dense_prediction` (H -> 1) projection + the RTD loss + accuracy
(docs/contracts.md#rtd_head_loss).

`logits = hidden @ weight.T + bias` `[B, L]`, `loss = rtd_bce_loss(logits, labels, attention_mask)`,
`accuracy = mean over real tokens of ((logits > 0) == labels)`, and on request the counts precision and recall
need (`COUNTS`), so a training step keeps no `[B, L]` logits for its metrics. Kernels read `hidden` once in the
forward, where
they also produce what the gradients of weight and bias need, and never keep the `[B, L]` logits' graph; the
backward then only writes the gradient of hidden. This reference computes the same in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import FLOAT_DTYPES, acc_dtype, check_same_device, check_shape, check_tensor
# What `counts` holds, over real tokens (attention_mask != 0), "positive" = replaced (label 1) or predicted so
# (logit > 0): e.g. precision = true_positive / predicted, recall = true_positive / replaced.
from electra_fast.ops._contract import COUNTS
from electra_fast.ops.rtd_bce_loss import rtd_bce_reference


def rtd_head_reference(hidden, weight, bias, labels, attention_mask):
    """Returns `(loss, accuracy, grad_logits, counts)`, all fp32 (fp64 for fp64 hidden);
    `grad_logits = d loss / d logits`, `counts` `[5]` as `COUNTS`."""
    acc = acc_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.reshape(-1).to(acc) + bias.reshape(()).to(acc)
    loss, grad = rtd_bce_reference(logits, labels, attention_mask)
    real = attention_mask != 0
    pred, actual = (logits > 0) & real, (labels.to(acc) > 0.5) & real
    right = ((logits > 0) == (labels.to(acc) > 0.5)) & real
    counts = torch.stack([real.sum(), right.sum(), pred.sum(), actual.sum(), (pred & actual).sum()]).to(acc)
    accuracy = counts[1] / counts[0].clamp(min=1)
    return loss, accuracy, grad, counts


@torch.library.custom_op("electra_fast::rtd_head_loss", mutates_args=())
def _rtd_head_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return rtd_head_reference(hidden, weight, bias, labels, attention_mask)


@_rtd_head_op.register_fake
def _(hidden, weight, bias, labels, attention_mask):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((), dtype=acc),
            hidden.new_empty(hidden.shape[:2], dtype=acc), hidden.new_empty((len(COUNTS),), dtype=acc))


def _setup(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.save_for_backward(hidden, weight, output[2])
    ctx.bias_meta = (bias.shape, bias.dtype)


def _backward(ctx, grad_loss, *_):
    hidden, weight, grad_logits = ctx.saved_tensors
    g = grad_logits * grad_loss
    w = weight.reshape(-1).to(g.dtype)
    grad_hidden = (g[..., None] * w).to(hidden.dtype)
    grad_weight = torch.einsum("blh,bl->h", hidden.to(g.dtype), g).reshape(weight.shape).to(weight.dtype)
    grad_bias = g.sum().reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
    return grad_hidden, grad_weight, grad_bias, None, None


_rtd_head_op.register_autograd(_backward, setup_context=_setup)


def rtd_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None, *, with_counts: bool = False,
                  backend: Optional[str] = None):
    """Discriminator `dense_prediction` projection, RTD loss and accuracy in one op.

    Args:
        hidden: `[B, L, H]` input of the final projection (after the head's dense + gelu), fp32/fp16/bf16.
        weight: `[1, H]` (as `nn.Linear(H, 1).weight`) or `[H]`.
        bias: `[1]` (or a 1-element tensor), or None for no bias.
        labels: `[B, L]` 1 = replaced (bool, int or float).
        attention_mask: `[B, L]`, nonzero = real token (default: all real).
        with_counts: also return the counts of `COUNTS`.

    Returns:
        `(loss, accuracy)`: fp32 scalars (fp64 for fp64 hidden on the reference path); loss = mean sigmoid BCE
        over real tokens (0 when none), differentiable w.r.t. hidden, weight and bias; accuracy = fraction of
        real tokens with `(logit > 0) == label` (no gradient). With `with_counts`, `(loss, accuracy, counts)`:
        counts `[5]` fp32 (no gradient) = real tokens, correct predictions, predicted positives (logit > 0),
        replaced tokens (label 1) and true positives, all over real tokens (fp32: exact up to 2**24 tokens).
    """
    check_tensor(hidden, "hidden", ndim=3, dtypes=FLOAT_DTYPES)
    h = hidden.shape[2]
    check_tensor(weight, "weight", dtypes=FLOAT_DTYPES)
    if tuple(weight.shape) not in ((1, h), (h,)):
        raise ValueError(f"weight must have shape (1, {h}) or ({h},) (H = hidden.shape[2]), got {tuple(weight.shape)}")
    if bias is None:
        bias = weight.new_zeros(1)
    check_tensor(bias, "bias", dtypes=FLOAT_DTYPES)
    if bias.numel() != 1:
        raise ValueError(f"bias must have 1 element (shape (1,)), got shape {tuple(bias.shape)}")
    check_tensor(labels, "labels")
    check_shape(labels, "labels", hidden.shape[:2], "one per token of hidden")
    if attention_mask is None:
        attention_mask = torch.ones_like(labels, dtype=torch.uint8)
    check_tensor(attention_mask, "attention_mask")
    check_shape(attention_mask, "attention_mask", hidden.shape[:2], "one per token of hidden")
    check_same_device({"hidden": hidden, "weight": weight, "bias": bias, "labels": labels,
                       "attention_mask": attention_mask})
    _, kernel = resolve("rtd_head_loss", backend, hidden.device, hidden.dtype)
    args = (hidden.contiguous(), weight.contiguous(), bias.contiguous(), labels.contiguous(),
            attention_mask.contiguous())
    if kernel is not None:
        return kernel(*args, bool(with_counts))
    loss, accuracy, _, counts = _rtd_head_op(*args)
    return (loss, accuracy.detach(), counts.detach()) if with_counts else (loss, accuracy.detach())
