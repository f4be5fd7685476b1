"""Building blocks of the encoder layer that keep autocast from multiplying launches and bytes.

Under bf16 autocast, every `nn.Linear` casts its fp32 weight and bias on each call (two launches forward, two for
their gradients backward) and CUDA's autocast runs LayerNorm in fp32 (a cast of its input before the next Linear,
an fp32 residual stream saved for backward). Here, instead:
- `autocast_parameters` casts all of a layer's parameters to the autocast dtype in one multi-tensor launch
  (`_foreach_copy_`) and their gradients back in one. The values are those autocast's per-op casts give (round to
  nearest), the master weights stay fp32, their gradients arrive in fp32; Linear and LayerNorm then see bf16
  tensors, which autocast leaves alone. Per layer, not per model, so FSDP's per-layer unsharding still holds.
- `residual_layer_norm`, the block's `LN(residual + dropout(x))`, runs LayerNorm on bf16 input and weights with
  fp32 statistics (what the CUDA and CPU kernels do for bf16) and returns bf16: the residual stream and the
  tensors saved for backward are bf16, half the bytes. On CUDA it is one fused Triton launch forward and two
  backward (`electra_fast.ops.dropout_add_layer_norm`) instead of five, and every call of one encoder forward
  shares one seed draw (`dropout_seed`, one `salt` per call). On the CPU it is the unfused chain and no seed is
  drawn, so torch's RNG stream and the CPU outputs are those of the plain ops.
Without autocast (fp32 training, the transformers comparisons) `autocast_parameters` does nothing, and on the CPU
`residual_layer_norm` is the plain ops, bit for bit (on CUDA the fused kernel, fp32 in and out).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from electra_fast.ops import dropout_add_layer_norm
from electra_fast.ops._backend import draw_seed, resolve


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear with `dtype` parameters computes in under the current autocast state on `device_type`."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _CastAll(torch.autograd.Function):
    """Tensors -> copies in `dtype` (one multi-tensor launch); gradients back to each input's dtype (one more)."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.dtypes = [t.dtype for t in tensors]
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        out = [torch.empty_like(g, dtype=d) for g, d in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


def autocast_parameters(params: Sequence[torch.Tensor], device_type: str) -> Sequence[torch.Tensor]:
    """`params` in the autocast dtype when autocast is on for `device_type` and they are fp32; else `params`."""
    dtype = compute_dtype(device_type, params[0].dtype)
    if dtype == params[0].dtype:
        return params
    return _CastAll.apply(dtype, *params)


def dropout_seed(x: torch.Tensor, p: float, training: bool, backend: Optional[str] = None) -> Optional[torch.Tensor]:
    """One Philox seed for the `residual_layer_norm` calls of a forward that runs on `x`'s device and dtype (and
    `backend`), or None where they draw nothing: no dropout, or the reference path (which uses torch's dropout)."""
    if not training or p == 0:
        return None
    dtype = compute_dtype(x.device.type, x.dtype)
    if resolve("dropout_add_layer_norm", backend, x.device, dtype)[1] is None:
        return None
    return draw_seed(x.device)


def residual_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float,
                        eps: float, training: bool, seed: Optional[torch.Tensor] = None, salt: int = 0,
                        backend: Optional[str] = None) -> torch.Tensor:
    """`layer_norm(residual + dropout(x, p), weight, bias, eps)` in x's dtype, fused on CUDA; `seed` and a `salt`
    distinct per call from `dropout_seed` (None: the call draws its own seed if it needs one); `backend`: the op's
    (`ops.dropout_add_layer_norm`; None: its default)."""
    return dropout_add_layer_norm(x, residual, weight, bias, p=p, eps=eps, training=training, seed=seed, salt=salt,
                                  backend=backend)
