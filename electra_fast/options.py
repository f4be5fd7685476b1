"""Which kernel path each part of a step takes: one small object, `KernelOptions`, carried by the model config
and set from the command line. The environment variables below are read here and nowhere else, as the defaults of
the fields they name; an explicit value always wins.

    ELECTRA_FAST_BACKEND   backend   "torch" | "triton" | "cuda"  (unset: each op's default order on GPUs)
    ELECTRA_FAST_SAMPLER   sampler   "cdf" (exact inverse CDF, one draw per row) | "gumbel" (Gumbel-max)

The options change how a step is computed, never what a model is: they are not part of a model's saved config
(`config.json`, checkpoints' model specs), and a checkpoint trained with one backend loads under any other.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from electra_fast.checks import check_choice

BACKENDS = ("torch", "triton", "cuda")
SAMPLERS = ("cdf", "gumbel")
ATTENTION = ("auto", "sdpa", "varlen", "flex")
ENV = {"backend": "ELECTRA_FAST_BACKEND", "sampler": "ELECTRA_FAST_SAMPLER"}


def env_backend() -> Optional[str]:
    """`ELECTRA_FAST_BACKEND`, checked, or None when unset."""
    value = os.environ.get(ENV["backend"])
    return check_choice(value, ENV["backend"], BACKENDS) if value else None


def env_sampler() -> str:
    """`ELECTRA_FAST_SAMPLER`, checked, or "cdf" when unset."""
    value = os.environ.get(ENV["sampler"])
    return check_choice(value, ENV["sampler"], SAMPLERS) if value else "cdf"


@dataclass(frozen=True)
class KernelOptions:
    """How the kernels run; every field None means "the default".

    backend: "torch" (the PyTorch reference), "triton" or "cuda" for every op; None: `ELECTRA_FAST_BACKEND`, else
        each op's own order on CUDA tensors and the reference on CPU tensors (`electra_fast/ops/_backend.py`).
    sampler: "cdf" or "gumbel", how the kernels draw the generator's samples; None: `ELECTRA_FAST_SAMPLER`, else "cdf".
        Both draw exactly from softmax(logits / T); the PyTorch reference always uses Gumbel-max noise.
    attention: the slim encoder's attention path: "auto", "sdpa" (dense additive mask), "varlen" (flash
        variable-length), "flex" (FlexAttention); see `electra_fast/model/attention.py`. None: "auto".
    fused_lm_head: the generator's LM head, loss and sample as one chunked op (`ops.lm_head_loss_and_sample`);
        None: on, except for transformers' `ElectraForMaskedLM`, whose head runs as it is. The discriminator's head
        is always fused (`ops.rtd_head_loss`).
    """
    backend: Optional[str] = None
    sampler: Optional[str] = None
    attention: Optional[str] = None
    fused_lm_head: Optional[bool] = None

    def __post_init__(self):
        if self.backend is not None:
            check_choice(self.backend, "backend", BACKENDS)
        if self.sampler is not None:
            check_choice(self.sampler, "sampler", SAMPLERS)
        if self.attention is not None:
            check_choice(self.attention, "attention", ATTENTION)
        if self.fused_lm_head is not None and not isinstance(self.fused_lm_head, bool):
            raise ValueError(f"fused_lm_head must be True, False or None, got {self.fused_lm_head!r}")

    def replace(self, **changes) -> "KernelOptions":
        return dataclasses.replace(self, **changes)

    @property
    def resolved_sampler(self) -> str:
        return self.sampler if self.sampler is not None else env_sampler()

    @property
    def resolved_attention(self) -> str:
        return self.attention if self.attention is not None else "auto"

    def to_dict(self) -> dict:
        """The fields that differ from the defaults (for logs and benchmark rows; never saved with a model)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
