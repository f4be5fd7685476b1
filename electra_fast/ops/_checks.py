"""Argument checks shared by the public ops: each error names the argument, the expected and the actual value.

They look at shapes, dtypes and Python scalars, and at tensor data only where reading it costs no device sync:
`check_ids` reads the values of CPU tensors in eager mode; on CUDA (and while compiling) id ranges are a documented
precondition of the ops, which `torch.compile(fullgraph=True)` and CUDA graphs need.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from electra_fast.checks import check_choice, check_int, check_number
from electra_fast.options import SAMPLERS  # defined there, with ELECTRA_FAST_SAMPLER; the kernels import it from here

INT_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(x, name: str, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {x.dtype}")
    return x


def check_shape(x: torch.Tensor, name: str, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_same_device(tensors: dict) -> None:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices))
    for n, d in devices.items():
        if d != devices[first]:
            raise ValueError(f"{n} must be on the same device as {first} ({devices[first]}), got {d}")


def check_temperature(temperature) -> float:
    return check_number(temperature, "temperature", low=0, low_open=True)


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    check_tensor(logits, name, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary (dim 1 > 0), got shape {tuple(logits.shape)}")
    return logits


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (so float64 gradchecks stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_sampler(sampler: str) -> str:
    """One of the kernels' samplers, `SAMPLERS`: exact inverse CDF ("cdf", the default) or Gumbel-max ("gumbel")."""
    return check_choice(sampler, "sampler (default: ELECTRA_FAST_SAMPLER)", SAMPLERS)


def check_vocab_size(vocab_size, width: int) -> int:
    """The logical vocabulary V of `[M, W]` logits whose columns >= V are padding: None means V = W."""
    if vocab_size is None:
        return width
    return check_int(vocab_size, "vocab_size", low=1, high=width)


def check_ids(ids: torch.Tensor, name: str, limit: int, what: str) -> None:
    """`ids` values in `[0, limit)` (`what` names the limit). Read only for CPU tensors in eager mode: on CUDA the
    check would cost a host sync per call, so there it is the caller's precondition."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling() or is_fake(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        raise ValueError(f"{name} must lie in [0, {what}={limit}), got values in [{lo}, {hi}]")
