"""CUDA launcher of `electra_fast.ops.gumbel_sample`: one draw per row from `softmax(logits / T)`.

Design. No kernel of its own: `mlm_loss_and_sample.cu` holds it, the fused MLM row kernel with the loss switched
off, so sampling alone and the fused op draw with the same code (the same samplers, the same fp32 math on any input
dtype, the same Philox seed read from a device tensor). The sampler is the entry's argument: "cdf" (exact inverse
CDF, one Philox call per row) or "gumbel" (per-element Gumbel-max, whose noise `gumbel_noise` returns so that tests
can replay its draws exactly). Padded columns (`[M, W]` logits, `vocab_size` real columns) are never drawn.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from electra_fast.ops._checks import check_sampler, check_vocab_size

from ._extension import extension, require_cuda, require_logits
# The backend switch asks the op's module whether the extension can run here.
from ._extension import is_available, unavailable_reason  # noqa: F401


@torch.library.custom_op("electra_fast::gumbel_sample_cuda", mutates_args=(), device_types="cuda")
def _gumbel_op(logits: Tensor, seed: Tensor, temperature: float, disallow: Optional[Tensor], sampler: str,
               vocab_size: int) -> Tensor:
    return extension().gumbel_sample(logits, seed, temperature, disallow, vocab_size, sampler == "gumbel")


@_gumbel_op.register_fake
def _(logits, seed, temperature, disallow, sampler, vocab_size):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def gumbel_sample(logits: Tensor, seed: Tensor, temperature: float, disallow: Optional[Tensor] = None,
                  vocab_size: Optional[int] = None, sampler: str = "cdf") -> Tensor:
    """Backend entry (see electra_fast.ops.gumbel_sample): one draw per row from
    `softmax(logits[:, :vocab_size] / temperature)`; `disallow[m]` (>= 0) is excluded from row m; `sampler`: "cdf"
    or "gumbel"."""
    sampler = check_sampler(sampler)
    require_cuda({"logits": logits, "seed": seed, "disallow": disallow})
    require_logits(logits)
    if disallow is not None:
        disallow = disallow.long().contiguous()
    return _gumbel_op(logits.detach().contiguous(), seed, float(temperature), disallow, sampler,
                      check_vocab_size(vocab_size, logits.shape[1]))


def gumbel_noise(seed: Tensor, m: int, w: int) -> Tensor:
    """The `[m, w]` fp32 Gumbel noise the "gumbel" sampler adds to `[m, w]` logits under `seed` (element (i, j) gets
    `out[i, j]`). For tests and debugging: `argmax(logits / T + gumbel_noise(seed, *logits.shape))` over the real
    columns is that sampler's draw, so it can be checked exactly."""
    require_cuda({"seed": seed})
    return extension().gumbel_noise(seed, int(m), int(w))
