"""The CUDA C++ backend's extension: where `csrc/` is, how it is built and loaded, and whether it can be.

This folder is `electra_fast.csrc`, the "cuda" backend of `electra_fast.ops`: the CUDA C++ sources, and one launcher
module per op, named after the op (`mlm_loss_and_sample.py`, `gumbel_sample.py`, `masked_gather.py`,
`replace_tokens.py`, `rtd_bce_loss.py`), each registering its `torch.library` ops (`electra_fast::<op>_cuda`, with
fake kernels, so `torch.compile(fullgraph=True)` traces them without building or running anything, and autograd)
and the backend entry named after the op. Every launcher imports this module first and re-exports `is_available()`
and `unavailable_reason()`, which the backend switch asks of the op's module. Select the backend with
`backend="cuda"` on an op, `electra_fast.ops.set_backend("cuda")` or `ELECTRA_FAST_BACKEND=cuda`.

Build. The extension is compiled just in time by `torch.utils.cpp_extension.load` (ninja) the first time a
kernel runs, and cached in torch's extensions directory (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`): the first call of a fresh install waits about a minute or two for nvcc, later
processes load the cached build in well under a second. `pip install` with `ELECTRA_FAST_BUILD_CUDA=1` builds it
ahead of time instead (module `electra_fast._cuda_ext`, tried first). `TORCH_CUDA_ARCH_LIST` is honoured;
otherwise the build targets sm_90 (Hopper), the GPUs present, and compute_80 PTX for newer cards (see
`_build.py`). `ELECTRA_FAST_CUDA_VERBOSE=1` shows the compiler output.

Availability. `is_available()` must stay cheap, since the backend switch asks it on every op and in its default
order; so it never compiles. It is True when a CUDA device is visible and either the ahead-of-time module
imports or nvcc and ninja are present to build one; `unavailable_reason()` says which of those is missing.
A build that then fails raises a RuntimeError with the compiler's message, and from then on `is_available()`
is False with that message as the reason, so the default backend order moves on to the next backend.

Inputs: fp32/fp16/bf16 logits (fp64 is left to the reference backend), int64 ids and positions, fp32 weights,
labels and masks of any dtype. Random draws use in-kernel Philox keyed by all 64 bits of a seed read from a device
tensor: replays of a captured CUDA graph sample afresh.
"""
from __future__ import annotations

# Why `csrc/` has no `__init__.py` and refuses any other name: see kernels/_common.py. Under another name (the
# checkout's `csrc` folder on sys.path) a launcher would register every op a second time.
if not __name__.startswith("electra_fast."):
    raise ImportError(f"the CUDA launchers import only as electra_fast.csrc, not as {__name__.rpartition('.')[0]!r}")

import importlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from . import _build

__all__ = ["is_available", "unavailable_reason", "extension", "jit_build_directory", "clear_stale_build_lock",
           "require_cuda", "require_logits"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_ext = None  # the loaded extension module
_build_error: Optional[str] = None  # why building or loading it failed, once it has
_probe: Optional[str] = None  # cached answer of the cheap availability probe ("" = available)


def _csrc_dir() -> str:
    """The CUDA sources: this module's folder (`electra_fast/csrc/` when installed, the checkout's `csrc/`)."""
    return os.path.dirname(os.path.abspath(__file__))


def _aot_module():
    try:
        return importlib.import_module(_build.AOT_NAME)
    except ImportError:
        return None


def _probe_toolchain() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if _aot_module() is not None:
        return ""
    from torch.utils import cpp_extension  # imported here: it pulls in setuptools

    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return ("nvcc was not found (CUDA_HOME is {}): install the CUDA toolkit and set CUDA_HOME or put nvcc on "
                "PATH, or install with ELECTRA_FAST_BUILD_CUDA=1 to build the kernels ahead of time".format(home))
    if not cpp_extension.is_ninja_available():
        return "ninja was not found: pip install ninja (it builds the CUDA kernels on first use)"
    return ""


# Evaluated once at trace time under torch.compile (the probe imports modules and runs `ninja --version`, which
# dynamo cannot trace), and a plain call in eager mode.
@torch.compiler.assume_constant_result
def unavailable_reason() -> str:
    """Why the CUDA backend cannot run here, or "" when it can. Never compiles anything."""
    global _probe
    if _build_error is not None:
        return f"building the CUDA extension failed: {_build_error}"
    if _ext is not None:
        return ""
    if _probe is None:
        _probe = _probe_toolchain()
    return _probe


def is_available() -> bool:
    """True when a CUDA device is visible and the extension is built or can be (nvcc and ninja present)."""
    return unavailable_reason() == ""


def _jit_build():
    from torch.utils.cpp_extension import load

    csrc = _csrc_dir()
    local_archs = []
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        local_archs = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                              for i in range(torch.cuda.device_count())})
    return load(
        name=_build.JIT_NAME,
        sources=_build.source_paths(csrc),
        extra_cflags=_build.CXX_FLAGS + [f"-DELECTRA_FAST_SOURCES={_build.sources_digest(csrc)}"],
        extra_cuda_cflags=_build.NVCC_FLAGS + _build.arch_flags(local_archs),
        extra_include_paths=[csrc],
        verbose=os.environ.get("ELECTRA_FAST_CUDA_VERBOSE") == "1",
    )


def jit_build_directory() -> str:
    """Where the just-in-time build compiles and caches the extension (torch's extensions directory, created if
    missing)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(_build.JIT_NAME, False)


def clear_stale_build_lock(build_dir: Optional[str] = None) -> Optional[str]:
    """Remove the lock file of a just-in-time build that was killed half-way, so the next build does not wait on it.

    torch's `load` creates `<build dir>/lock` exclusively, keeps it open while it builds and deletes it when done;
    every other process that wants the extension waits, with no time limit, for that file to go. A build killed
    with SIGKILL never deletes it, so every later build hangs. The file is removed only when no live process still
    holds it open (the builder) or runs inside the build directory (ninja and nvcc run there), as read from
    /proc; where /proc cannot be read (not Linux) nothing is removed. Processes of other users, whose /proc
    entries cannot be read, are not counted: they cannot write this user's cache anyway.
    Returns the path removed, or None."""
    if build_dir is None:
        try:
            build_dir = jit_build_directory()
        except (AttributeError, ImportError, OSError):  # a torch without that (private) helper: leave the file be
            return None
    lock = os.path.join(build_dir, "lock")
    if not os.path.exists(lock) or not os.path.isdir("/proc"):
        return None
    lock_real, dir_real = os.path.realpath(lock), os.path.realpath(build_dir)
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        base = os.path.join("/proc", pid)
        try:
            cwd = os.path.realpath(os.readlink(os.path.join(base, "cwd")))
            fds = os.listdir(os.path.join(base, "fd"))
        except OSError:  # gone meanwhile, or another user's
            continue
        if cwd == dir_real or cwd.startswith(dir_real + os.sep):
            return None
        for fd in fds:
            try:
                if os.path.realpath(os.readlink(os.path.join(base, "fd", fd))) == lock_real:
                    return None
            except OSError:  # that descriptor was closed meanwhile
                continue
    try:
        os.remove(lock)
    except FileNotFoundError:  # a build finished meanwhile
        return None
    return lock


def extension():
    """The compiled extension module: the ahead-of-time build if installed, else built (once) with ninja."""
    global _ext, _build_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            reason = unavailable_reason()
            if reason:
                raise RuntimeError(f"the electra_fast CUDA backend is unavailable: {reason}")
            module = _aot_module()
            if module is None:
                try:
                    module = _jit_build()
                except Exception as exc:  # compiler or loader errors: keep the message, stop advertising the backend
                    _build_error = f"{type(exc).__name__}: {exc}"
                    raise RuntimeError(f"building the electra_fast CUDA extension failed: {_build_error}\n"
                                       "Set ELECTRA_FAST_CUDA_VERBOSE=1 for the full compiler output, or use "
                                       "backend='triton' / 'torch'.") from exc
            _ext = module
    return _ext


# ---------------------------------------------------------------------------------------------------------------
# Checks of the launchers' entries (called by electra_fast.ops with canonicalised inputs). They look at metadata
# only: no host sync, and a wrong device fails here, before anything is built.


def require_cuda(tensors: dict) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor for the CUDA backend, got device {t.device}")


def require_logits(logits: Tensor) -> None:
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must have dtype float32/float16/bfloat16 on the CUDA backend, got {logits.dtype} "
                        "(use backend='torch' for float64)")
