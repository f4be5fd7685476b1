"""Generator MLM loss and replacement sampling from the same logits (docs/algorithm.md#mlm-loss,
docs/algorithm.md#sampling).

`loss = sum(w * ce) / (sum(w) + 1e-6)`, `sampled = argmax(logits / T + gumbel)`, `correct = argmax(logits) == target`.
The backward is `(softmax - onehot) * w / (sum(w) + 1e-6)`, recomputed from the saved per-row log-sum-exp
so nothing else of size `[M, V]` is kept. Kernels fuse all of it into one pass over each logit row.
Logits may be padded, `[M, W]` with only the first `vocab_size` columns real (a vocabulary padded to a multiple of
128 gives rows the kernels read with 16-byte loads): padded columns never reach the loss, the argmax or the sampler,
and their gradient is exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from electra_fast.ops._backend import draw_seed, resolve, uniform
from electra_fast.ops._checks import FLOAT_DTYPES, INT_DTYPES, acc_dtype, check_ids, check_logits, check_same_device, \
    check_sampler, check_shape, check_tensor, check_temperature, check_vocab_size
from electra_fast.ops._contract import WEIGHT_EPS, register_mlm_autograd
from electra_fast.ops.gumbel_sample import disallow_ids, gumbel_scores
from electra_fast.options import env_sampler


def weighted_mean(ce: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`sum(w * ce) / (sum(w) + 1e-6)` where a weight-0 row adds exactly 0, even if its ce is not finite (a padding
    slot whose target logit is -inf), as the kernels do."""
    return torch.where(w != 0, w * ce, 0.0).sum() / (w.sum() + WEIGHT_EPS)


def row_terms(logits, targets, uniform, temperature: float, disallow_correct: bool):
    """The reference's per-row terms from `logits [M, V]` (vocabulary columns only): `(x, lse, ce, sampled,
    correct)`, x = the logits in the accumulation dtype (fp32, fp64 for fp64) and lse, ce in it too."""
    x = logits.to(acc_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=1)
    ce = lse - x.gather(1, targets[:, None])[:, 0]
    scores = gumbel_scores(logits, uniform, temperature)
    if disallow_correct:
        scores = disallow_ids(scores, targets)
    return x, lse, ce, scores.argmax(dim=1), x.argmax(dim=1) == targets


def softmax_minus_onehot(x, lse, targets):
    """`softmax(x) - onehot(targets)` from the rows' log-sum-exp: the gradient of each row's cross-entropy."""
    g = torch.exp(x - lse[:, None])
    return g.scatter_add_(1, targets[:, None], -torch.ones_like(g[:, :1]))


def check_slot_targets(targets, weights, m: int, rows_of: str) -> None:
    """`targets [M]` int ids and `weights [M]` (float, int or bool), one per row of `rows_of`."""
    check_tensor(targets, "targets", ndim=1, dtypes=INT_DTYPES)
    check_shape(targets, "targets", (m,), f"one per row of {rows_of}")
    check_tensor(weights, "weights", ndim=1, dtypes=FLOAT_DTYPES + INT_DTYPES + (torch.bool,))
    check_shape(weights, "weights", (m,), f"one per row of {rows_of}")


def mlm_loss_and_sample_reference(logits, targets, weights, uniform, temperature: float, disallow_correct: bool,
                                  vocab_size: int):
    """Returns `(loss, sampled, correct, lse)`; lse `[M]` (fp32, fp64 for fp64 logits) is what the backward needs.
    Only `logits[:, :vocab_size]` is read (the same as masking the padding to -inf); `uniform` is `[M, vocab_size]`."""
    x, lse, ce, sampled, correct = row_terms(logits[:, :vocab_size], targets, uniform, temperature,
                                             disallow_correct)
    return weighted_mean(ce, weights.to(x.dtype)), sampled, correct, lse


def mlm_loss_backward_reference(grad_loss, logits, targets, weights, lse, vocab_size: int):
    w = weights.to(lse.dtype)
    scale = (w / (w.sum() + WEIGHT_EPS) * grad_loss)[:, None]
    grad = softmax_minus_onehot(logits[:, :vocab_size].to(lse.dtype), lse, targets)
    return F.pad((grad * scale).to(logits.dtype), (0, logits.shape[1] - vocab_size))  # padded columns: exactly 0


@torch.library.custom_op("electra_fast::mlm_loss_and_sample", mutates_args=())
def _mlm_op(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, uniform: torch.Tensor,
            temperature: float, disallow_correct: bool, vocab_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlm_loss_and_sample_reference(logits, targets, weights, uniform, temperature, disallow_correct, vocab_size)


@_mlm_op.register_fake
def _(logits, targets, weights, uniform, temperature, disallow_correct, vocab_size):
    m, acc = logits.shape[0], acc_dtype(logits.dtype)
    return (logits.new_empty((), dtype=acc), logits.new_empty((m,), dtype=torch.int64),
            logits.new_empty((m,), dtype=torch.bool), logits.new_empty((m,), dtype=acc))


@torch.library.custom_op("electra_fast::mlm_loss_backward", mutates_args=())
def _mlm_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     lse: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return mlm_loss_backward_reference(grad_loss, logits, targets, weights, lse, vocab_size)


@_mlm_backward_op.register_fake
def _(grad_loss, logits, targets, weights, lse, vocab_size):
    return torch.empty_like(logits)


register_mlm_autograd(_mlm_op, _mlm_backward_op)


def mlm_loss_and_sample(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
                        temperature: float = 1.0, disallow_correct: bool = False,
                        generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                        vocab_size: Optional[int] = None, sampler: Optional[str] = None):
    """Masked-LM loss and Gumbel-max replacement samples from one set of logits.

    Args:
        logits: `[M, W]` generator logits at the M gathered slots (fp32/fp16/bf16); the first V = `vocab_size`
            columns are the vocabulary.
        targets: `[M]` original token ids, each in `[0, V)` (padding slots too: use any valid id).
        weights: `[M]` slot weights (1 real, 0 padding).
        temperature: sampling temperature > 0 (the loss is always at T = 1).
        disallow_correct: forbid sampling the original token.
        generator: torch RNG for the sampling noise.
        vocab_size: the real vocabulary V <= W (None: V = W). Columns >= V are padding (e.g. a vocabulary padded to
            a multiple of 128, whose rows the kernels read with 16-byte loads): they never reach the loss, the
            log-sum-exp, `correct` or the sampler, whatever they hold, and their gradient is exactly 0.
        sampler: how the kernels draw: "cdf" (exact inverse CDF, one draw per row) or "gumbel" (Gumbel-max); None:
            `ELECTRA_FAST_SAMPLER`, else "cdf" (`electra_fast.options`). The PyTorch reference always uses Gumbel-max.

    Returns:
        `(loss, sampled, correct)`: fp32 scalar `sum(w * ce) / (sum(w) + 1e-6)`, differentiable w.r.t. logits;
        `[M]` int64 samples in `[0, V)` (no gradient); `[M]` bool, whether `argmax(logits[:, :V]) == targets`.
    """
    check_logits(logits)
    vocab_size = check_vocab_size(vocab_size, logits.shape[1])
    m = logits.shape[0]
    check_slot_targets(targets, weights, m, "logits")
    check_same_device({"logits": logits, "targets": targets, "weights": weights})
    temperature = check_temperature(temperature)
    if sampler is not None:
        check_sampler(sampler)
    check_ids(targets, "targets", vocab_size, "vocab_size")
    logits, targets, weights = logits.contiguous(), targets.long().contiguous(), weights.float().contiguous()
    _, kernel = resolve("mlm_loss_and_sample", backend, logits.device, logits.dtype)
    if kernel is not None:
        return kernel(logits, targets, weights, draw_seed(logits.device, generator), temperature,
                      bool(disallow_correct), vocab_size, sampler=env_sampler() if sampler is None else sampler)
    noise = uniform((m, vocab_size), logits.device, generator)
    loss, sampled, correct, _ = _mlm_op(logits, targets, weights, noise, temperature, bool(disallow_correct),
                                        vocab_size)
    return loss, sampled, correct
