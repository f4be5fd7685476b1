"""Backend switch: which implementation of an op runs.

Three backends: "torch" (the PyTorch reference; the CPU path and the test oracle), "triton"
(`electra_fast.kernels`) and "cuda" (`electra_fast.cuda`, CUDA C++ from `csrc/`, built with ninja).
Choice, first match wins: the op's `backend=` argument, `set_backend()`, the `ELECTRA_FAST_BACKEND`
environment variable, then the default: for CUDA tensors the first available of `DEFAULT_ORDER[op]`,
for CPU tensors "torch". A backend asked for explicitly that cannot run raises (a globally forced one runs
the reference for ops it has no kernel for); the default falls back silently. Triton runs on CPU tensors only under `TRITON_INTERPRET=1`, and only when asked for.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
# Per-op preference on CUDA tensors; benchmarks/RESULTS.md is where a change of order must be justified.
DEFAULT_ORDER = {
    "mask_tokens": ("triton", "torch"),
    "masked_gather": ("triton", "cuda", "torch"),
    "mlm_loss_and_sample": ("triton", "cuda", "torch"),
    "gumbel_sample": ("triton", "cuda", "torch"),
    "replace_tokens": ("triton", "cuda", "torch"),
    "rtd_bce_loss": ("triton", "cuda", "torch"),
    "rtd_head_loss": ("triton", "cuda", "torch"),
    "lm_head_loss_and_sample": ("triton", "torch"),
    "dropout_add_layer_norm": ("triton", "torch"),
    "varlen_plan": ("triton", "torch"),
}
# The Triton kernels are one module per op: `electra_fast.kernels` itself has no `__init__` (kernels/_common.py says
# why), so the module that holds an op's entry is named here.
_TRITON_MODULES = {"mlm_loss_and_sample": "mlm_loss_sample", "lm_head_loss_and_sample": "lm_head",
                   "rtd_bce_loss": "rtd_bce", "rtd_head_loss": "rtd_head"}


def _module_name(backend: str, op: str) -> str:
    if backend == "triton":
        return "electra_fast.kernels." + _TRITON_MODULES.get(op, op)
    return "electra_fast.cuda"


_forced: Optional[str] = None


def _check_name(name: str, arg: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op (None restores the per-device default)."""
    global _forced
    _forced = None if name is None else _check_name(name, "backend")


def get_backend() -> Optional[str]:
    """The backend forced by `set_backend` or `ELECTRA_FAST_BACKEND`, or None for the default."""
    if _forced is not None:
        return _forced
    env = os.environ.get("ELECTRA_FAST_BACKEND")
    return _check_name(env, "ELECTRA_FAST_BACKEND") if env else None


def _module(backend: str, op: str):
    try:
        return importlib.import_module(_module_name(backend, op))
    except ImportError:  # ModuleNotFoundError too: no Triton, or no Triton kernel for this op
        return None


def _why_unavailable(backend: str, op: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device`, else the reason."""
    if backend == "torch":
        return None
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got device {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors; got device {device}"
    mod = _module(backend, op)
    if mod is None:
        return f"{_module_name(backend, op)} could not be imported"
    if backend == "cuda" and not mod.is_available():
        return mod.unavailable_reason()
    if not hasattr(mod, op):
        return f"the {backend} backend has no kernel for {op}"
    return None


# Dynamo cannot trace importlib or the probes; the answer is constant for a process and these arguments, so
# torch.compile folds it. It returns a string (a constant dynamo can hold): the backend, or "!" + why not.
@torch.compiler.assume_constant_result
def _choose(op: str, asked: Optional[str], forced: Optional[str], device: torch.device, f64: bool) -> str:
    name = asked if asked is not None else forced
    if name is not None:
        why = _why_unavailable(name, op, device)
        if why is None:
            return name
        mod = _module(name, op)
        if asked is None and mod is not None and not hasattr(mod, op):
            return "torch"  # a globally forced backend covers the ops it has; the rest run the reference
        return f"!backend {name!r} cannot run {op}: {why}"
    if device.type != "cuda" or f64:
        return "torch"  # fp64 too: the kernels compute in fp32
    return next(b for b in DEFAULT_ORDER[op] if _why_unavailable(b, op, device) is None)


def resolve(op: str, backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None):
    """Return (backend name, kernel function or None for the torch reference)."""
    if backend is not None:
        _check_name(backend, "backend")
    name = _choose(op, backend, get_backend(), device, dtype == torch.float64)
    if name.startswith("!"):
        raise RuntimeError(name[1:])
    return name, (None if name == "torch" else getattr(sys.modules[_module_name(name, op)], op))


def available_backends(device="cuda", op: str = "mlm_loss_and_sample") -> list:
    """Backends that can run `op` on `device` here."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, op, device) is None]


def uniform(shape, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 U[0, 1) draws of `shape` (the references' sampling noise). `generator=` goes to `torch.rand` only when
    one is given: that overload takes no symbolic sizes, which torch.compile uses once it sees a second batch shape
    (a compiled model called with another batch size failed to trace)."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float32)
    return torch.rand(shape, device=device, dtype=torch.float32, generator=generator)


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Philox seed as a 1-element int64 device tensor, drawn with torch's RNG.

    Kernels read it from memory rather than taking a Python int, so results follow
    `torch.manual_seed`/`generator=` and each replay of a captured CUDA graph draws a fresh seed.
    63 random bits, all of which key Philox (Triton's `tl.randint` splits the int64 into the two 32-bit key
    words): with 31 bits, 1M steps would have ~233 pairs of steps sharing one random stream.
    """
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64, generator=generator)
