"""Sampling alone: one id per row from softmax(logits / T), optional disallowed id per row (docs/algorithm.md#sampling).

Design: the fused MLM kernel's row pass (mlm_loss_and_sample.py) with the loss switched off (`WITH_LOSS=False`):
same samplers ("cdf" inverse-CDF by default, "gumbel" Gumbel-max), same fp32 math on any input dtype, same
Philox seed read from a device tensor, the sampler passed in by the public op. No gradient flows through sampling.
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._checks import check_sampler

from . import mlm_loss_and_sample as _mls


@torch.library.custom_op("electra_fast::gumbel_sample_triton", mutates_args=())
def _gumbel_sample_op(logits: torch.Tensor, seed: torch.Tensor, temperature: float, disallow: Optional[torch.Tensor],
                      sampler: str, vocab_size: int) -> torch.Tensor:
    return _mls.launch_sampler(logits, seed, temperature, disallow, sampler, vocab_size)


@_gumbel_sample_op.register_fake
def _(logits, seed, temperature, disallow, sampler, vocab_size):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def gumbel_sample(logits, seed, temperature: float, disallow: Optional[torch.Tensor], vocab_size: int,
                  sampler: str = "cdf"):
    """Backend entry (see electra_fast.ops.gumbel_sample): contiguous logits [M, W] of which the first `vocab_size`
    columns are the vocabulary, a 1-element int64 seed tensor, optional int64 disallow [M] (negative: none), the
    sampler ("cdf" or "gumbel"). Returns [M] int64 in [0, vocab_size)."""
    return _gumbel_sample_op(logits, seed, float(temperature), disallow, check_sampler(sampler), int(vocab_size))
