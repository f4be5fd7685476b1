"""Backend switch: which implementation of an op runs.

Three backends: "torch" (the PyTorch reference; the CPU path and the test oracle), "triton"
(`electra_fast.kernels.<op>`) and "cuda" (`electra_fast.csrc.<op>`, launchers of the CUDA C++ in `csrc/`, built
with ninja). Each backend holds one module per op, named after the op, whose function of that name is the op's
kernel entry; a backend without a module for an op has no kernel for it.
Choice, first match wins: the op's `backend=` argument, `set_backend()`, the `ELECTRA_FAST_BACKEND`
environment variable (`electra_fast.options.env_backend`), then the default: for CUDA tensors the first available
of `DEFAULT_ORDER[op]`, for CPU tensors "torch". A backend covers the ops it has a module for: asked for or forced,
it runs the reference for the others, so one `KernelOptions(backend="cuda")` serves a whole step. A backend asked
for that has the op but cannot run it here (wrong device, no toolchain) raises with the reason; the default falls
back silently. Triton runs on CPU tensors only under `TRITON_INTERPRET=1`, and only when asked for.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from electra_fast.checks import check_choice
from electra_fast.options import BACKENDS, env_backend

# Per-op preference on CUDA tensors; benchmarks/RESULTS.md is where a change of order must be justified.
DEFAULT_ORDER = {
    "mask_tokens": ("triton", "torch"),
    "masked_gather": ("triton", "cuda", "torch"),
    "mlm_loss_and_sample": ("triton", "cuda", "torch"),
    "gumbel_sample": ("triton", "cuda", "torch"),
    "replace_tokens": ("triton", "cuda", "torch"),
    "rtd_bce_loss": ("triton", "cuda", "torch"),
    "rtd_head_loss": ("triton", "torch"),
    "lm_head_loss_and_sample": ("triton", "torch"),
    "dropout_add_layer_norm": ("triton", "torch"),
    "varlen_plan": ("triton", "torch"),
}


def _module_name(backend: str, op: str) -> str:
    """The module of `backend` that holds `op`'s kernel entry (`electra_fast.kernels` and `electra_fast.csrc` have no
    `__init__`: kernels/_common.py says why)."""
    if backend == "triton":
        return "electra_fast.kernels." + op
    return "electra_fast.csrc." + op


_forced: Optional[str] = None


def _check_name(name: str, arg: str) -> str:
    return check_choice(name, arg, BACKENDS)


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op (None restores the per-device default)."""
    global _forced
    _forced = None if name is None else _check_name(name, "backend")


def get_backend() -> Optional[str]:
    """The backend forced by `set_backend` or `ELECTRA_FAST_BACKEND`, or None for the default."""
    if _forced is not None:
        return _forced
    return env_backend()


def _has_module(backend: str, op: str) -> bool:
    """Whether `backend` has a module for `op` at all (it may still fail to import, e.g. without Triton)."""
    try:
        return importlib.util.find_spec(_module_name(backend, op)) is not None
    except ImportError:
        return False


def _module(backend: str, op: str):
    try:
        return importlib.import_module(_module_name(backend, op))
    except ImportError:  # ModuleNotFoundError too: no Triton, or no kernel module for this op
        return None


def _why_unavailable(backend: str, op: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device`, else the reason."""
    if backend == "torch":
        return None
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got device {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors; got device {device}"
    if not _has_module(backend, op):
        return f"the {backend} backend has no kernel for {op}"
    mod = _module(backend, op)
    if mod is None:
        return f"{_module_name(backend, op)} could not be imported"
    if backend == "cuda" and not mod.is_available():  # every CUDA launcher module exposes the extension's probe
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
        if not _has_module(name, op):
            return "torch"  # a backend covers the ops it has; the rest run the reference
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
