"""Fused generator LM head + MLM loss + sample (SPEC 4, "fused LM head + loss + sample"): the `[M, W]` logits of
`hidden @ weight.T + bias` never exist whole.

Same results as `mlm_loss_and_sample(F.linear(hidden, weight, bias), ...)`, computed over chunks of rows: per chunk
the logits, then each row's log-sum-exp, cross-entropy, argmax and sample, then, already in the forward, the chunk's
gradient `g = (softmax - onehot) * w / (sum(w) + 1e-6)` (the normaliser is known from `weights` up front) and from
it `grad_hidden[chunk] = g @ weight`, `grad_weight += g.T @ hidden[chunk]`, `grad_bias += g.sum(0)` (fp32
accumulators). The loss is the step's scalar, so the backward only scales these three by the incoming gradient
(`_loss_with_grads`, shared by every backend); peak memory is one chunk of logits plus the fp32 `[W, E]` gradient.

Samples equal the unfused op's for the same RNG state whenever the chunk logits equal the unfused logits' rows
(always when the matmul is exact; BLAS may round a row differently at another row count): the Triton backend's
Philox counters follow the row index in the whole matrix (`launch_sampler(..., row_offset=)`), and this reference
draws its uniforms chunk by chunk with `torch.rand`, which on the CPU gives the same numbers as one `[M, V]` draw
(tested). On CUDA, consecutive Philox draws are not one big draw, so the reference's CUDA samples follow the same
distribution but not the same ids as the unfused reference (the Triton backend, the CUDA default, is exact).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from electra_fast.ops._backend import draw_seed, resolve, uniform
from electra_fast.ops._checks import FLOAT_DTYPES, acc_dtype, check_same_device, check_shape, check_ids, \
    check_temperature, check_tensor, check_vocab_size
from electra_fast.ops.mlm_loss import WEIGHT_EPS, check_slot_targets, row_terms, softmax_minus_onehot, \
    weighted_mean

CHUNK_ELEMS = 2 ** 24  # logits per chunk by default (548 rows at W = 30592: 32 MB in bf16)


def chunk_rows(m: int, width: int, chunk_size: Optional[int]) -> int:
    """Rows per chunk: `chunk_size`, or as many as fit CHUNK_ELEMS logits; at least 1, at most m."""
    rows = max(1, CHUNK_ELEMS // width) if chunk_size is None else chunk_size
    return max(1, min(rows, m))


def lm_head_chunk_reference(hidden, weight, bias, targets, weights, uniform, inv_norm, temperature: float,
                            disallow_correct: bool, vocab_size: int):
    """One chunk of rows. Returns `(ce, sampled, correct, grad_hidden, grad_weight, grad_bias)`: per-row
    cross-entropy, sample and correctness, and this chunk's share of the gradients of
    `sum(w * ce) * inv_norm` (acc dtype: fp32, fp64 for fp64). `uniform`: `[rows, vocab_size]`."""
    logits = F.linear(hidden, weight, bias)[:, :vocab_size]  # the unfused head's values, in the input dtype
    x, lse, ce, sampled, correct = row_terms(logits, targets, uniform, temperature, disallow_correct)
    g = softmax_minus_onehot(x, lse, targets) * (weights.to(x.dtype) * inv_norm)[:, None]
    pad = weight.shape[0] - vocab_size  # padded vocabulary rows: gradient exactly 0
    grad_weight = F.pad(g.T @ hidden.to(x.dtype), (0, 0, 0, pad))
    return ce, sampled, correct, g @ weight[:vocab_size].to(x.dtype), grad_weight, F.pad(g.sum(0), (0, pad))


@torch.library.custom_op("electra_fast::lm_head_chunk", mutates_args=())
def _chunk_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
              weights: torch.Tensor, uniform: torch.Tensor, inv_norm: torch.Tensor, temperature: float,
              disallow_correct: bool, vocab_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return lm_head_chunk_reference(hidden, weight, bias, targets, weights, uniform, inv_norm, temperature,
                                   disallow_correct, vocab_size)


@_chunk_op.register_fake
def _(hidden, weight, bias, targets, weights, uniform, inv_norm, temperature, disallow_correct, vocab_size):
    m, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return (hidden.new_empty((m,), dtype=acc), hidden.new_empty((m,), dtype=torch.int64),
            hidden.new_empty((m,), dtype=torch.bool), hidden.new_empty(hidden.shape, dtype=acc),
            weight.new_empty(weight.shape, dtype=acc), bias.new_empty(bias.shape, dtype=acc))


@torch.library.custom_op("electra_fast::loss_with_grads", mutates_args=())
def _loss_with_grads(loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """`loss` (a copy), whose gradients w.r.t. hidden, weight and bias are the given ones times the incoming one."""
    return loss.clone()


@_loss_with_grads.register_fake
def _(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    return torch.empty_like(loss)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[4:])
    ctx.dtypes = [t.dtype for t in inputs[1:4]]


def _backward(ctx, grad_loss):
    grads = [(g * grad_loss.to(g.dtype)).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
    return (None, *grads, None, None, None)


_loss_with_grads.register_autograd(_backward, setup_context=_setup)


def attach_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias) -> torch.Tensor:
    """The shared autograd glue of every backend: `loss`, differentiable w.r.t. hidden, weight and bias with the
    gradients computed in the forward (of a loss with d loss / d loss = 1)."""
    return _loss_with_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


def _reference(hidden, weight, bias, targets, weights, temperature, disallow_correct, generator, vocab_size, rows):
    m = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    w = weights.to(acc)
    inv_norm = 1.0 / (w.sum() + WEIGHT_EPS)
    consts = [t.detach() for t in (weight, bias)]
    outs = []
    grad_weight = grad_bias = None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        # Chunk by chunk from the generator: on the CPU the same numbers as the unfused op's one [M, V] draw.
        noise = uniform((r1 - r0, vocab_size), hidden.device, generator)
        ce, sampled, correct, gh, gw, gb = _chunk_op(hidden[r0:r1].detach(), *consts, targets[r0:r1],
                                                     weights[r0:r1], noise, inv_norm, temperature,
                                                     disallow_correct, vocab_size)
        outs.append((ce, sampled, correct, gh))
        grad_weight = gw if grad_weight is None else grad_weight + gw
        grad_bias = gb if grad_bias is None else grad_bias + gb
    ce, sampled, correct, grad_hidden = (torch.cat(parts) for parts in zip(*outs))
    loss = weighted_mean(ce, w)  # the unfused reference's formula, term for term
    return attach_grads(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias), sampled, correct


def lm_head_loss_and_sample(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                            weights: torch.Tensor, *, temperature: float = 1.0, disallow_correct: bool = False,
                            generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
                            chunk_size: Optional[int] = None, backend: Optional[str] = None):
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
        chunk_size: rows per chunk (default: as many as fit 2**24 logits). Results do not depend on it.

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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    if not hidden.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"hidden, weight and bias must have one dtype (outside autocast), got {hidden.dtype}, "
                        f"{weight.dtype} and {bias.dtype}")
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), bias.contiguous()
    targets, weights = targets.long().contiguous(), weights.float().contiguous()
    rows = chunk_rows(m, width, chunk_size)
    _, kernel = resolve("lm_head_loss_and_sample", backend, hidden.device, hidden.dtype)
    if kernel is not None:
        return kernel(hidden, weight, bias, targets, weights, draw_seed(hidden.device, generator), temperature,
                      bool(disallow_correct), vocab_size, rows)
    return _reference(hidden, weight, bias, targets, weights, temperature, bool(disallow_correct), generator,
                      vocab_size, rows)
