"""`LayerNorm(residual + dropout(x))`: the post-LN residual block of every encoder layer
(docs/contracts.md#dropout_add_layer_norm).

Unfused, it is three launches forward (dropout, add, LayerNorm) and two backward, each moving `[M, N]` tensors;
the Triton kernel (`kernels/dropout_add_layer_norm.py`) does one forward and two backward (the second sums the
per-program weight and bias gradients) and regenerates the dropout mask in the backward from its Philox seed.
The reference is the unfused chain with torch's dropout: it draws its own mask, so reference and kernel agree
exactly only at p = 0 or without training; with dropout the tests recover the kernel's mask (the same seed and
salt on x = 1, residual = 0) and rebuild the reference with it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from electra_fast.checks import check_int
from electra_fast.ops._backend import draw_seed, resolve
from electra_fast.ops._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor


def dropout_add_layer_norm_reference(x, residual, weight, bias, p: float, eps: float, training: bool = True):
    """The unfused chain in the inputs' dtype (LayerNorm statistics in fp32 inside torch's kernel), autocast off:
    CUDA autocast would run a bf16 LayerNorm in fp32."""
    with torch.autocast(x.device.type, enabled=False):  # CUDA autocast would cast a bf16 LayerNorm to fp32
        return F.layer_norm(residual + F.dropout(x, p, training), x.shape[-1:], weight, bias, eps)


def _check_p(p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                           p: float, eps: float, training: bool = True, seed: Optional[torch.Tensor] = None,
                           salt: int = 0, generator: Optional[torch.Generator] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    """`LayerNorm(residual + dropout(x, p))` over the last dim, in the inputs' dtype, differentiable w.r.t. all four
    tensors.

    Args:
        x: `[..., N]` the branch output that dropout applies to (fp32/fp16/bf16; fp64 runs the reference).
        residual: same shape and dtype as x.
        weight, bias: `[N]`, the dtype of x.
        p: dropout probability in [0, 1); `training=False` disables dropout.
        eps: LayerNorm epsilon.
        seed: kernels only: a 1-element int64 device tensor from `_backend.draw_seed`, shared by several calls of
            one step (each with its own `salt`, an int in [0, 2**23)) so that they cost one seed draw; None draws
            one with `generator` (torch's RNG by default) when dropout is active.
        backend: "torch", "triton" or None (see `electra_fast.ops.set_backend`).

    Returns: a tensor like x.
    """
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    check_tensor(residual, "residual", dtypes=(x.dtype,))
    check_shape(residual, "residual", x.shape, "same as x")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(t, name, ndim=1, dtypes=(x.dtype,))
        check_shape(t, name, (n,), "x's last dim")
    check_same_device({"x": x, "residual": residual, "weight": weight, "bias": bias, "seed": seed})
    p = _check_p(p)
    check_int(salt, "salt", low=0, high=2**23 - 1)
    if seed is not None:
        check_tensor(seed, "seed", dtypes=(torch.int64,))
        check_shape(seed, "seed", (1,), "a draw_seed tensor")
    _, kernel = resolve("dropout_add_layer_norm", backend, x.device, x.dtype)
    if kernel is None:
        return dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps, training)
    p = p if training else 0.0
    if p > 0 and seed is None:
        seed = draw_seed(x.device, generator)
    flat = kernel(x.reshape(-1, n).contiguous(), residual.reshape(-1, n).contiguous(), weight.contiguous(),
                  bias.contiguous(), seed if p > 0 else None, salt, p, eps)
    return flat.view(x.shape)
