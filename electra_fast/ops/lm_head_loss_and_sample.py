"""Fused generator LM head + MLM loss + sample: the `[M, W]` logits of `hidden @ weight.T + bias` never exist whole.

Same results as `mlm_loss_and_sample(F.linear(hidden, weight, bias), ...)`, computed over chunks of rows: per chunk
the logits, then each row's sample, argmax and log-softmax, then, already in the forward, the chunk's gradient
`g = (softmax - onehot) * w / (sum(w) + 1e-6)` (the normaliser is known from `weights` up front) and from it
`grad_hidden[chunk] = g @ weight`, `grad_weight += g.T @ hidden[chunk]`, `grad_bias += g.sum(0)` (fp32
accumulators). The loss is the step's scalar, so the backward only scales these three by the incoming gradient
(`_loss_with_grads`, shared by every backend).

Memory: each backend holds a fixed number of bytes per logit of a chunk (this reference: the logits in the
accumulation dtype and the fp32 sampling noise, reused in place for the log-softmax and then the gradient; the
Triton backend: one logits buffer in the input dtype), and the default chunks are the fewest equal ones whose
temporaries fit about `CHUNK_BYTES` (rounded up to a multiple of 8 rows). The peak is those buffers plus the fp32
`[W, E]` gradient accumulator (then, in the backward, the gradients): under 40% of one `[M, V]` fp32 buffer in fp32
at ELECTRA-small and -base sizes (tests/ops/test_lm_head_loss_and_sample_chunking.py measures it at the default).

Samples equal the unfused op's for the same RNG state whenever the chunk logits equal the unfused logits' rows
(always when the matmul is exact; BLAS may round a row differently at another shape): the Triton backend's
Philox counters follow the row index in the whole matrix (`launch_sampler(..., row_offset=)`), and this reference
draws its uniforms chunk by chunk with `torch.rand`, which on the CPU gives the same numbers as one `[M, V]` draw
(tested). On CUDA, consecutive Philox draws are not one big draw, so the reference's CUDA samples follow the same
distribution but not the same ids as the unfused reference (the Triton backend, the CUDA default, is exact).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from electra_fast.checks import check_int
from electra_fast.ops._backend import draw_seed, resolve, uniform
from electra_fast.ops._checks import FLOAT_DTYPES, acc_dtype, check_same_device, check_sampler, check_shape, \
    check_ids, check_temperature, check_tensor, check_vocab_size
from electra_fast.ops._contract import WEIGHT_EPS, attach_grads, chunk_rows
# Shared with the kernel backends, and this op's too: the default chunking's budget and the autograd glue.
from electra_fast.ops._contract import CHUNK_BYTES, ROW_MULTIPLE, _loss_with_grads  # noqa: F401
from electra_fast.ops.mlm_loss_and_sample import check_slot_targets, weighted_mean
from electra_fast.options import env_sampler


def reference_bytes_per_row(vocab_size: int, dtype: torch.dtype) -> int:
    """This reference's live chunk temporaries per row: the logits in the accumulation dtype and the fp32 noise (and
    for fp64 inputs the fp64 scores, then log-softmax, that the fp32 noise cannot hold)."""
    return vocab_size * (acc_dtype(dtype).itemsize + 4 + (8 if dtype == torch.float64 else 0))


def lm_head_chunk_reference(x, uniform, weight_acc, hidden_acc, targets, scale, neg_scale, ones, r0: int,
                            temperature: float, disallow_correct: bool, target_logp, ids, grad_hidden, grad_weight,
                            grad_bias) -> None:
    """One chunk: rows `r0 : r0 + len(x)` of the logits `x` `[rows, V]` (acc dtype: fp32, fp64 for fp64). Writes
    their `log_softmax(x)[target]` into `target_logp`, their sample and argmax into `ids[0]`, `ids[1]`, their
    gradient rows of `sum(w * ce) * inv_norm` into `grad_hidden`, and adds their share to `grad_weight`, `grad_bias`
    (acc dtype, `[W, E]`, `[W]`: the padded rows stay untouched). `scale`, `neg_scale`: `w * inv_norm` and its
    negative per row; `weight_acc`, `hidden_acc`: the real vocabulary's weight rows and hidden in the acc dtype;
    `ones`: at least as many ones as rows. `uniform` `[rows, V]` fp32 is consumed: it is the chunk's scratch."""
    rows = x.shape[0]
    r1 = r0 + rows
    t = targets[r0:r1, None]
    torch.argmax(x, 1, out=ids[1, r0:r1])
    # Sampling, as gumbel_sample's reference computes it: x / T - log(-log(u)), in place in the noise when the
    # dtypes allow (the same operations, the same rounding).
    gumbel = uniform.log_().neg_().log_()
    if x.dtype != uniform.dtype:
        scores = x / temperature - gumbel  # fp64: the reference's fp64 scores
    elif temperature == 1.0:
        scores = torch.sub(x, gumbel, out=gumbel)
    else:  # -g + x / T: the same sum as x / T - g
        scores = gumbel.neg_().addcdiv_(x, torch.full((), temperature, dtype=x.dtype, device=x.device))
    if disallow_correct:
        scores.scatter_(1, t, float("-inf"))
    torch.argmax(scores, 1, out=ids[0, r0:r1])
    del scores
    # The loss terms and the gradient in one buffer: log_softmax, its target entry (-ce), then
    # softmax * scale - onehot * scale.
    g = torch.log_softmax(x, 1, out=uniform if x.dtype == uniform.dtype else torch.empty_like(x))
    torch.gather(g, 1, t, out=target_logp[r0:r1, None])
    g.exp_().mul_(scale[r0:r1, None]).scatter_add_(1, t, neg_scale[r0:r1, None])
    torch.mm(g, weight_acc, out=grad_hidden[r0:r1])
    grad_weight[:weight_acc.shape[0]].addmm_(g.T, hidden_acc[r0:r1])
    grad_bias[:weight_acc.shape[0]].addmv_(g.T, ones[:rows])


@torch.library.custom_op("electra_fast::lm_head_chunk",
                         mutates_args=("uniform", "target_logp", "ids", "grad_hidden", "grad_weight", "grad_bias"))
def _chunk_op(x: torch.Tensor, uniform: torch.Tensor, weight_acc: torch.Tensor, hidden_acc: torch.Tensor,
              targets: torch.Tensor, scale: torch.Tensor, neg_scale: torch.Tensor, ones: torch.Tensor, r0: int,
              temperature: float, disallow_correct: bool, target_logp: torch.Tensor, ids: torch.Tensor,
              grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
    lm_head_chunk_reference(x, uniform, weight_acc, hidden_acc, targets, scale, neg_scale, ones, r0, temperature,
                            disallow_correct, target_logp, ids, grad_hidden, grad_weight, grad_bias)


@_chunk_op.register_fake
def _(x, uniform, weight_acc, hidden_acc, targets, scale, neg_scale, ones, r0, temperature, disallow_correct,
      target_logp, ids, grad_hidden, grad_weight, grad_bias):
    return None


def _reference(hidden, weight, bias, targets, weights, temperature, disallow_correct, generator, vocab_size, rows):
    m, e = hidden.shape
    acc = acc_dtype(hidden.dtype)
    w = weights.to(acc)
    scale = w * (1.0 / (w.sum() + WEIGHT_EPS))
    hidden_d, weight_d, bias_d = hidden.detach(), weight.detach(), bias.detach()
    # The gradient GEMMs' operands in the acc dtype, converted once rather than per chunk (no copy in fp32).
    weight_acc, hidden_acc = weight_d[:vocab_size].to(acc), hidden_d.to(acc)
    target_logp = hidden.new_empty((m,), dtype=acc)
    ids = hidden.new_empty((2, m), dtype=torch.int64)  # sample, argmax
    grad_hidden = hidden.new_empty((m, e), dtype=acc)
    grad_weight = weight.new_zeros(weight.shape, dtype=acc)
    grad_bias = bias.new_zeros(bias.shape, dtype=acc)
    neg_scale, ones = -scale, hidden.new_ones((min(rows, m),), dtype=acc)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        # The unfused head's values (in the input dtype), real columns only; a 16-bit copy dies before the noise
        # is drawn, so a chunk holds two [rows, V] buffers at most.
        x = F.linear(hidden_d[r0:r1], weight_d[:vocab_size], bias_d[:vocab_size]).to(acc)
        # Chunk by chunk from the generator: on the CPU the same numbers as the unfused op's one [M, V] draw.
        noise = uniform((r1 - r0, vocab_size), hidden.device, generator)
        _chunk_op(x, noise, weight_acc, hidden_acc, targets, scale, neg_scale, ones, r0, temperature,
                  disallow_correct, target_logp, ids, grad_hidden, grad_weight, grad_bias)
        del x, noise  # freed before the next chunk's logits
    loss = weighted_mean(target_logp.neg_(), w)  # ce = -log_softmax[target]; the unfused reference's mean
    sampled, correct = ids[0], ids[1] == targets
    return attach_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias), sampled, correct


def lm_head_loss_and_sample(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                            weights: torch.Tensor, *, temperature: float = 1.0, disallow_correct: bool = False,
                            generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
                            chunk_size: Optional[int] = None, backend: Optional[str] = None,
                            sampler: Optional[str] = None):
    """The generator's output projection, MLM loss and replacement samples, fused: the `[M, W]` logits are
    computed a chunk of rows at a time and never held whole.

    Equivalent to `mlm_loss_and_sample(F.linear(hidden, weight, bias), targets, weights, ...)`: same loss and
    correctness, and the same samples for the same RNG state (see the module notes for when ids match exactly).
    Under autocast, hidden, weight and bias are cast to the autocast dtype first, as `F.linear` would.

    Args:
        hidden: `[M, E]` the LM head's input at the M slots (after its dense, gelu and LayerNorm).
        weight: `[W, E]` the (tied) output embedding; rows >= `vocab_size` are vocabulary padding.
        bias: `[W]` the output bias.
        targets: `[M]` original token ids in `[0, V)`. weights: `[M]` slot weights (1 real, 0 padding).
        temperature, disallow_correct, generator: as `mlm_loss_and_sample`.
        vocab_size: the real vocabulary V <= W (None: V = W); padded columns never reach the loss or the sampler
            and their gradients (rows of grad_weight and grad_bias) are exactly 0.
        chunk_size: rows per chunk (default: the fewest equal chunks whose temporaries in the chosen backend fit
            about CHUNK_BYTES = 64 MiB; at V = 30522 about 274 rows for the fp32 reference, 548 for the Triton
            backend in fp32, 1096 in bf16). Results do not depend on it.
        sampler: how the kernels draw, as `mlm_loss_and_sample`'s (None: `ELECTRA_FAST_SAMPLER`, else "cdf").

    Returns:
        `(loss, sampled, correct)`: fp32 scalar, differentiable w.r.t. hidden, weight and bias (the gradients are
        computed in the forward); `[M]` int64 samples in `[0, V)`; `[M]` bool `argmax == target`.
    """
    check_tensor(hidden, "hidden", ndim=2, dtypes=FLOAT_DTYPES)
    m, e = hidden.shape
    if m == 0:
        raise ValueError(f"hidden must have at least one row (slot), got shape {tuple(hidden.shape)}")
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES)
    if weight.shape[1] != e or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (W, {e}) with W >= 1 (E = hidden.shape[1]), "
                         f"got {tuple(weight.shape)}")
    width = weight.shape[0]
    check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES)
    check_shape(bias, "bias", (width,), "one per row of weight")
    check_slot_targets(targets, weights, m, "hidden")
    check_same_device({"hidden": hidden, "weight": weight, "bias": bias, "targets": targets, "weights": weights})
    vocab_size = check_vocab_size(vocab_size, width)
    temperature = check_temperature(temperature)
    check_ids(targets, "targets", vocab_size, "vocab_size")
    check_int(chunk_size, "chunk_size", low=1, allow_none=True)
    if sampler is not None:
        check_sampler(sampler)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    if not hidden.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"hidden, weight and bias must have one dtype (outside autocast), got {hidden.dtype}, "
                        f"{weight.dtype} and {bias.dtype}")
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), bias.contiguous()
    targets, weights = targets.long().contiguous(), weights.float().contiguous()
    _, kernel = resolve("lm_head_loss_and_sample", backend, hidden.device, hidden.dtype)
    if kernel is not None:  # the kernel sizes its default chunks by its own temporaries
        return kernel(hidden, weight, bias, targets, weights, draw_seed(hidden.device, generator), temperature,
                      bool(disallow_correct), vocab_size, chunk_size,
                      sampler=env_sampler() if sampler is None else sampler)
    rows = chunk_rows(m, reference_bytes_per_row(vocab_size, hidden.dtype), chunk_size)
    return _reference(hidden, weight, bias, targets, weights, temperature, bool(disallow_correct), generator,
                      vocab_size, rows)
