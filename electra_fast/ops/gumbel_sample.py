"""Gumbel-max sampling from `softmax(logits / T)`: `argmax(logits / T + g)`, `g = -log(-log(U))`.

Always in fp32 whatever the logits' dtype (fp16 Gumbel noise is a known source of biased samples).
Logits may be padded: `[M, W]` with only the first `vocab_size` columns real; the others are never drawn.
The reference takes its uniforms as a tensor drawn with torch's RNG; kernels draw in-kernel Philox
from a seed tensor (see `_backend.draw_seed`).
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import draw_seed, resolve, uniform
from electra_fast.ops._checks import INT_DTYPES, acc_dtype, check_logits, check_same_device, check_sampler, \
    check_shape, check_tensor, check_temperature, check_vocab_size
from electra_fast.options import env_sampler


def gumbel_scores(logits: torch.Tensor, uniform: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / T + g` in fp32. U = 0 gives g = -inf: that token cannot win, which is the right limit."""
    return logits.to(acc_dtype(logits.dtype)) / temperature - torch.log(-torch.log(uniform))


def disallow_ids(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set `scores[m, ids[m]] = -inf` where `ids[m] >= 0`; negative ids disallow nothing."""
    hit = torch.arange(scores.shape[1], device=scores.device) == ids[:, None]
    return scores.masked_fill(hit, float("-inf"))


def gumbel_sample_reference(logits, uniform, temperature: float, disallow, vocab_size: int) -> torch.Tensor:
    """`uniform` is `[M, vocab_size]`: the padded columns take no noise and cannot be drawn."""
    scores = gumbel_scores(logits[:, :vocab_size], uniform, temperature)
    if disallow is not None:
        scores = disallow_ids(scores, disallow)
    return scores.argmax(dim=1)


@torch.library.custom_op("electra_fast::gumbel_sample", mutates_args=())
def _gumbel_sample_op(logits: torch.Tensor, uniform: torch.Tensor, temperature: float,
                      disallow: Optional[torch.Tensor], vocab_size: int) -> torch.Tensor:
    return gumbel_sample_reference(logits, uniform, temperature, disallow, vocab_size)


@_gumbel_sample_op.register_fake
def _(logits, uniform, temperature, disallow, vocab_size):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def gumbel_sample(logits: torch.Tensor, *, temperature: float = 1.0, disallow: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                  vocab_size: Optional[int] = None, sampler: Optional[str] = None) -> torch.Tensor:
    """Draw one id per row from `softmax(logits[:, :vocab_size] / temperature)`.

    Args:
        logits: `[M, W]` fp32/fp16/bf16 (fp64 on the reference path).
        temperature: > 0.
        disallow: optional `[M]` int ids that row m may not draw (negative: none), e.g. the original token.
        generator: torch RNG (default the global one; `torch.manual_seed` makes draws reproducible).
        vocab_size: the real vocabulary V <= W (None: V = W). Columns >= V are padding (e.g. a vocabulary padded to
            a multiple of 128 for 16-byte loads): never drawn, whatever they hold.
        sampler: how the kernels draw: "cdf" (exact inverse CDF) or "gumbel" (Gumbel-max); None: `ELECTRA_FAST_SAMPLER`,
            else "cdf" (`electra_fast.options`). The PyTorch reference always uses Gumbel-max.

    Returns: `[M]` int64 ids in `[0, V)`. No gradient flows through sampling.
    """
    check_logits(logits)
    vocab_size = check_vocab_size(vocab_size, logits.shape[1])
    temperature = check_temperature(temperature)
    if sampler is not None:
        check_sampler(sampler)
    if disallow is not None:
        check_tensor(disallow, "disallow", ndim=1, dtypes=INT_DTYPES)
        check_shape(disallow, "disallow", (logits.shape[0],), "one id per row of logits")
        check_same_device({"logits": logits, "disallow": disallow})
        disallow = disallow.long().contiguous()
    logits = logits.detach().contiguous()
    _, kernel = resolve("gumbel_sample", backend, logits.device, logits.dtype)
    if kernel is not None:
        return kernel(logits, draw_seed(logits.device, generator), temperature, disallow, vocab_size,
                      sampler=env_sampler() if sampler is None else sampler)
    noise = uniform((logits.shape[0], vocab_size), logits.device, generator)
    return _gumbel_sample_op(logits, noise, temperature, disallow, vocab_size)
