"""CUDA launcher of `electra_fast.ops.replace_tokens`: the discriminator's ids and labels (`replace_tokens.cu`).

Design. One kernel writes both outputs for every position: the real slots' samples added into the original ids as
`sample - original` (the reference's delta-add, so padding slots change nothing), and where the result differs from
the original. No atomics, deterministic, no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._extension import extension, require_cuda
# The backend switch asks the op's module whether the extension can run here.
from ._extension import is_available, unavailable_reason  # noqa: F401


@torch.library.custom_op("electra_fast::replace_tokens_cuda", mutates_args=(), device_types="cuda")
def _replace_op(input_ids: Tensor, positions: Tensor, weights: Tensor, sampled: Tensor) -> tuple[Tensor, Tensor]:
    return extension().replace_tokens(input_ids, positions, weights, sampled)


@_replace_op.register_fake
def _(input_ids, positions, weights, sampled):
    return torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.bool)


def replace_tokens(input_ids: Tensor, positions: Tensor, weights: Tensor, sampled: Tensor):
    """Backend entry (see electra_fast.ops.replace_tokens): `(disc_ids, is_replaced)`, the real slots' samples
    written into `input_ids`, and where they changed it."""
    require_cuda({"input_ids": input_ids, "positions": positions, "weights": weights, "sampled": sampled})
    return _replace_op(input_ids.contiguous(), positions.long().contiguous(), weights.float().contiguous(),
                       sampled.reshape(positions.shape).long().contiguous())
