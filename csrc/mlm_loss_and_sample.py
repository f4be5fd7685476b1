"""CUDA launcher of `electra_fast.ops.mlm_loss_and_sample`: the fused MLM loss + replacement sample of
`mlm_loss_and_sample.cu`.

Design (the kernels' own notes are in the .cu file). The forward reads each logit row once, one block per row, and
returns `(loss, sampled, correct, lse [M], sum(weights) + 1e-6)`; the last two are saved for the backward, which
recomputes `(softmax - onehot) * w / (sum(w) + 1e-6) * grad_loss` from the per-row lse, so nothing of size `[M, W]`
is kept besides the logits and their gradient. Logits may be padded (`[M, W]`, `vocab_size` real columns): padded
columns are never drawn and get zero gradient. The sampler is the entry's argument (the public op's `sampler=`):
"cdf", exact inverse CDF with one Philox call per row (csrc/inverse_cdf.cuh), or "gumbel", per-element Gumbel-max,
whose samples a test can replay exactly with `gumbel_sample.gumbel_noise`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from electra_fast.ops._checks import SAMPLERS, check_sampler, check_vocab_size  # noqa: F401  (SAMPLERS: API)
from electra_fast.ops._contract import mlm_kernel_fake, register_mlm_autograd

from ._extension import extension, require_cuda, require_logits
# The backend switch asks the op's module whether the extension can run here.
from ._extension import is_available, unavailable_reason  # noqa: F401


@torch.library.custom_op("electra_fast::mlm_loss_and_sample_cuda", mutates_args=(), device_types="cuda")
def _mlm_op(logits: Tensor, targets: Tensor, weights: Tensor, seed: Tensor, temperature: float,
            disallow_correct: bool, sampler: str, vocab_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, sampled, correct, lse [M], sum(weights) + 1e-6); the last two are saved for the backward."""
    return extension().mlm_forward(logits, targets, weights, seed, temperature, disallow_correct, vocab_size,
                                   sampler == "gumbel")


_mlm_op.register_fake(mlm_kernel_fake)


@torch.library.custom_op("electra_fast::mlm_loss_backward_cuda", mutates_args=(), device_types="cuda")
def _mlm_backward_op(grad_loss: Tensor, logits: Tensor, targets: Tensor, weights: Tensor, lse: Tensor,
                     wsum_eps: Tensor, vocab_size: int) -> Tensor:
    return extension().mlm_backward(grad_loss, logits, targets, weights, lse, wsum_eps, vocab_size)


@_mlm_backward_op.register_fake
def _(grad_loss, logits, targets, weights, lse, wsum_eps, vocab_size):
    return torch.empty_like(logits)


register_mlm_autograd(_mlm_op, _mlm_backward_op)


def mlm_loss_and_sample(logits: Tensor, targets: Tensor, weights: Tensor, seed: Tensor, temperature: float,
                        disallow_correct: bool, vocab_size: Optional[int] = None, sampler: str = "cdf"):
    """Backend entry (see electra_fast.ops.mlm_loss_and_sample): `(loss, sampled, correct)`, loss differentiable
    w.r.t. logits. `logits` `[M, W]` holds the vocabulary in its first `vocab_size` columns (None: all W); `sampler`:
    "cdf" or "gumbel"."""
    sampler = check_sampler(sampler)
    require_cuda({"logits": logits, "targets": targets, "weights": weights, "seed": seed})
    require_logits(logits)
    loss, sampled, correct, _, _ = _mlm_op(logits.contiguous(), targets.long().contiguous(),
                                           weights.float().contiguous(), seed, float(temperature),
                                           bool(disallow_correct), sampler,
                                           check_vocab_size(vocab_size, logits.shape[1]))
    return loss, sampled, correct
