"""CUDA C++ backend: the kernels in `csrc/`, built with ninja on first use, registered as torch.library ops.

Select it with `backend="cuda"` on an op, `electra_fast.ops.set_backend("cuda")` or `ELECTRA_FAST_BACKEND=cuda`.

Build. The extension is compiled just in time by `torch.utils.cpp_extension.load` (ninja) the first time a
kernel runs, and cached in torch's extensions directory (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`): the first call of a fresh install waits about a minute or two for nvcc, later
processes load the cached build in well under a second. `pip install` with `ELECTRA_FAST_BUILD_CUDA=1` builds it
ahead of time instead (module `electra_fast._cuda_ext`, tried first). `TORCH_CUDA_ARCH_LIST` is honoured;
otherwise the build targets sm_90 (Hopper), the GPUs present, and compute_80 PTX for newer cards (see
`_cuda_build.py`). `ELECTRA_FAST_CUDA_VERBOSE=1` shows the compiler output.

Availability. `is_available()` must stay cheap, since the backend switch asks it on every op and in its default
order; so it never compiles. It is True when a CUDA device is visible and either the ahead-of-time module
imports or nvcc and ninja are present to build one; `unavailable_reason()` says which of those is missing.
A build that then fails raises a RuntimeError with the compiler's message, and from then on `is_available()`
is False with that message as the reason, so the default backend order moves on to the next backend.

Ops. Each kernel is a `torch.library.custom_op` named `electra_fast::<op>_cuda` with a fake kernel (so
`torch.compile(fullgraph=True)` traces it without building or running anything) and registered autograd.
Random draws use in-kernel Philox keyed by all 64 bits of a seed read from a device tensor: replays of a captured
CUDA graph sample afresh. Sampling is exact inverse-CDF by default (one Philox call per row, see
csrc/inverse_cdf.cuh); `ELECTRA_FAST_SAMPLER=gumbel`, read once at import into `SAMPLER` as for the Triton
kernels, selects per-element Gumbel-max instead, whose samples a test can replay exactly with `gumbel_noise`.
Logits may be padded (`[M, W]`, `vocab_size` real columns): padded columns are never drawn and get zero gradient.
Inputs: fp32/fp16/bf16 logits (fp64 is left to the reference backend), int64 ids and positions, fp32 weights,
labels and masks of any dtype.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from electra_fast import _cuda_build
from electra_fast.ops._checks import SAMPLERS, check_sampler, check_vocab_size  # noqa: F401  (SAMPLERS: API)
from electra_fast.ops.masked_gather import register_gather_autograd
from electra_fast.ops.mlm_loss_and_sample import register_mlm_autograd

__all__ = ["is_available", "unavailable_reason", "extension", "jit_build_directory", "clear_stale_build_lock",
           "gumbel_noise", "mlm_loss_and_sample", "gumbel_sample", "masked_gather", "replace_tokens", "rtd_bce_loss"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAMPLER = os.environ.get("ELECTRA_FAST_SAMPLER", "cdf")

_lock = threading.Lock()
_ext = None  # the loaded extension module
_build_error: Optional[str] = None  # why building or loading it failed, once it has
_probe: Optional[str] = None  # cached answer of the cheap availability probe ("" = available)


def _csrc_dir() -> str:
    """The CUDA sources: `electra_fast/csrc/` when installed, the repository's `csrc/` in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")]
    try:  # any other layout that maps the electra_fast.csrc package somewhere (e.g. an editable install)
        candidates += list(importlib.import_module("electra_fast.csrc").__path__)
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(os.path.join(path, _cuda_build.SOURCES[0])):
            return path
    raise FileNotFoundError(f"the CUDA sources ({_cuda_build.SOURCES[0]} and others) were not found in any of "
                            f"{candidates}")


def _aot_module():
    try:
        return importlib.import_module(_cuda_build.AOT_NAME)
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
        name=_cuda_build.JIT_NAME,
        sources=_cuda_build.source_paths(csrc),
        extra_cflags=_cuda_build.CXX_FLAGS + [f"-DELECTRA_FAST_SOURCES={_cuda_build.sources_digest(csrc)}"],
        extra_cuda_cflags=_cuda_build.NVCC_FLAGS + _cuda_build.arch_flags(local_archs),
        extra_include_paths=[csrc],
        verbose=os.environ.get("ELECTRA_FAST_CUDA_VERBOSE") == "1",
    )


def jit_build_directory() -> str:
    """Where the just-in-time build compiles and caches the extension (torch's extensions directory, created if
    missing)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(_cuda_build.JIT_NAME, False)


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
# torch.library ops. Their bodies call the extension; their fake kernels only describe shapes, so tracing and
# compiling never build or launch anything.


@torch.library.custom_op("electra_fast::mlm_loss_and_sample_cuda", mutates_args=(), device_types="cuda")
def _mlm_op(logits: Tensor, targets: Tensor, weights: Tensor, seed: Tensor, temperature: float,
            disallow_correct: bool, sampler: str, vocab_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, sampled, correct, lse [M], sum(weights) + 1e-6); the last two are saved for the backward."""
    return extension().mlm_forward(logits, targets, weights, seed, temperature, disallow_correct, vocab_size,
                                   sampler == "gumbel")


@_mlm_op.register_fake
def _(logits, targets, weights, seed, temperature, disallow_correct, sampler, vocab_size):
    m = logits.shape[0]
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty((m,), dtype=torch.int64),
            logits.new_empty((m,), dtype=torch.bool), logits.new_empty((m,), dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("electra_fast::mlm_loss_backward_cuda", mutates_args=(), device_types="cuda")
def _mlm_backward_op(grad_loss: Tensor, logits: Tensor, targets: Tensor, weights: Tensor, lse: Tensor,
                     wsum_eps: Tensor, vocab_size: int) -> Tensor:
    return extension().mlm_backward(grad_loss, logits, targets, weights, lse, wsum_eps, vocab_size)


@_mlm_backward_op.register_fake
def _(grad_loss, logits, targets, weights, lse, wsum_eps, vocab_size):
    return torch.empty_like(logits)


register_mlm_autograd(_mlm_op, _mlm_backward_op)


@torch.library.custom_op("electra_fast::gumbel_sample_cuda", mutates_args=(), device_types="cuda")
def _gumbel_op(logits: Tensor, seed: Tensor, temperature: float, disallow: Optional[Tensor], sampler: str,
               vocab_size: int) -> Tensor:
    return extension().gumbel_sample(logits, seed, temperature, disallow, vocab_size, sampler == "gumbel")


@_gumbel_op.register_fake
def _(logits, seed, temperature, disallow, sampler, vocab_size):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.custom_op("electra_fast::masked_gather_cuda", mutates_args=(), device_types="cuda")
def _gather_op(hidden: Tensor, positions: Tensor) -> Tensor:
    return extension().masked_gather(hidden, positions)


@_gather_op.register_fake
def _(hidden, positions):
    return hidden.new_empty((hidden.shape[0], positions.shape[1], hidden.shape[2]))


@torch.library.custom_op("electra_fast::masked_scatter_add_cuda", mutates_args=(), device_types="cuda")
def _scatter_add_op(grad: Tensor, positions: Tensor, seq_len: int) -> Tensor:
    return extension().masked_scatter_add(grad, positions, seq_len)


@_scatter_add_op.register_fake
def _(grad, positions, seq_len):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


register_gather_autograd(_gather_op, _scatter_add_op)


@torch.library.custom_op("electra_fast::replace_tokens_cuda", mutates_args=(), device_types="cuda")
def _replace_op(input_ids: Tensor, positions: Tensor, weights: Tensor, sampled: Tensor) -> tuple[Tensor, Tensor]:
    return extension().replace_tokens(input_ids, positions, weights, sampled)


@_replace_op.register_fake
def _(input_ids, positions, weights, sampled):
    return torch.empty_like(input_ids), torch.empty_like(input_ids, dtype=torch.bool)


@torch.library.custom_op("electra_fast::rtd_bce_loss_cuda", mutates_args=(), device_types="cuda")
def _bce_op(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss, (sigmoid(x) - y) * mask in fp32, 1 / max(count, 1)); the backward scales the second by the third."""
    return extension().rtd_bce_forward(logits, labels, attention_mask)


@_bce_op.register_fake
def _(logits, labels, attention_mask):
    return (logits.new_empty((), dtype=torch.float32), torch.empty_like(logits, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("electra_fast::rtd_bce_backward_cuda", mutates_args=(), device_types="cuda")
def _bce_backward_op(grad_loss: Tensor, grad_unscaled: Tensor, inv_count: Tensor, dtype: torch.dtype) -> Tensor:
    return extension().rtd_bce_backward(grad_loss, grad_unscaled, inv_count, dtype)


@_bce_backward_op.register_fake
def _(grad_loss, grad_unscaled, inv_count, dtype):
    return torch.empty_like(grad_unscaled, dtype=dtype)


def _bce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtype = inputs[0].dtype


def _bce_backward(ctx, grad_loss, *_):
    grad_unscaled, inv_count = ctx.saved_tensors
    return _bce_backward_op(grad_loss.float().contiguous(), grad_unscaled, inv_count, ctx.dtype), None, None


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


# ---------------------------------------------------------------------------------------------------------------
# The kernel-backend contract (called by electra_fast.ops with canonicalised inputs). The checks look at
# metadata only: no host sync, and a wrong device fails here, before anything is built.


def _require_cuda(tensors: dict) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor for the CUDA backend, got device {t.device}")


def _require_logits(logits: Tensor) -> None:
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must have dtype float32/float16/bfloat16 on the CUDA backend, got {logits.dtype} "
                        "(use backend='torch' for float64)")


def mlm_loss_and_sample(logits: Tensor, targets: Tensor, weights: Tensor, seed: Tensor, temperature: float,
                        disallow_correct: bool, vocab_size: Optional[int] = None):
    """Fused MLM loss and sample: `(loss, sampled, correct)`, loss differentiable w.r.t. logits. `logits` `[M, W]`
    holds the vocabulary in its first `vocab_size` columns (None: all W)."""
    sampler = check_sampler(SAMPLER)
    _require_cuda({"logits": logits, "targets": targets, "weights": weights, "seed": seed})
    _require_logits(logits)
    loss, sampled, correct, _, _ = _mlm_op(logits.contiguous(), targets.long().contiguous(),
                                           weights.float().contiguous(), seed, float(temperature),
                                           bool(disallow_correct), sampler,
                                           check_vocab_size(vocab_size, logits.shape[1]))
    return loss, sampled, correct


def gumbel_sample(logits: Tensor, seed: Tensor, temperature: float, disallow: Optional[Tensor] = None,
                  vocab_size: Optional[int] = None) -> Tensor:
    """One draw per row from `softmax(logits[:, :vocab_size] / temperature)`; `disallow[m]` (>= 0) is excluded
    from row m."""
    sampler = check_sampler(SAMPLER)
    _require_cuda({"logits": logits, "seed": seed, "disallow": disallow})
    _require_logits(logits)
    if disallow is not None:
        disallow = disallow.long().contiguous()
    return _gumbel_op(logits.detach().contiguous(), seed, float(temperature), disallow, sampler,
                      check_vocab_size(vocab_size, logits.shape[1]))


def masked_gather(hidden: Tensor, positions: Tensor) -> Tensor:
    """`hidden[b, positions[b, n]]`, differentiable (the backward is a deterministic scatter-add)."""
    _require_cuda({"hidden": hidden, "positions": positions})
    return _gather_op(hidden.contiguous(), positions.long().contiguous())


def replace_tokens(input_ids: Tensor, positions: Tensor, weights: Tensor, sampled: Tensor):
    """`(disc_ids, is_replaced)`: the real slots' samples written into `input_ids`, and where they changed it."""
    _require_cuda({"input_ids": input_ids, "positions": positions, "weights": weights, "sampled": sampled})
    return _replace_op(input_ids.contiguous(), positions.long().contiguous(), weights.float().contiguous(),
                       sampled.reshape(positions.shape).long().contiguous())


def rtd_bce_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean sigmoid BCE over tokens with `attention_mask != 0` (0 when there are none), differentiable."""
    _require_cuda({"logits": logits, "labels": labels, "attention_mask": attention_mask})
    _require_logits(logits)
    return _bce_op(logits.contiguous(), labels.contiguous(), attention_mask.contiguous())[0]


def gumbel_noise(seed: Tensor, m: int, w: int) -> Tensor:
    """The `[m, w]` fp32 Gumbel noise the Gumbel sampler (`SAMPLER == "gumbel"`) adds to `[m, w]` logits under
    `seed` (element (i, j) gets `out[i, j]`). For tests and debugging: `argmax(logits / T + gumbel_noise(seed,
    *logits.shape))` over the real columns is that sampler's draw, so it can be checked exactly."""
    _require_cuda({"seed": seed})
    return extension().gumbel_noise(seed, int(m), int(w))
