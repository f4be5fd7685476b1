"""How the CUDA extension in `csrc/` is built: its sources and flags, one definition for both build paths.

`csrc/_extension.py` builds it just in time with `torch.utils.cpp_extension.load` (ninja); `setup.py` builds
it ahead of time when `ELECTRA_FAST_BUILD_CUDA=1`. This file imports only the standard library, so setup.py
can load it by path before the package (or a CUDA build of torch) is importable; for that reason it also runs
under a name other than `electra_fast.csrc._build` (it registers nothing, unlike the launchers).
Each `.cu` file is named after the op whose kernels it holds; `mlm_loss_and_sample.cu` also holds the Gumbel-sample
kernel (the same row kernel with the loss switched off).
"""
from __future__ import annotations

import hashlib
import os

JIT_NAME = "electra_fast_cuda"  # torch's extension cache: ~/.cache/torch_extensions/<python-torch>/electra_fast_cuda
AOT_NAME = "electra_fast._cuda_ext"  # the module setup.py builds
SOURCES = ("bindings.cpp", "mlm_loss_and_sample.cu", "masked_gather.cu", "replace_tokens.cu", "rtd_bce_loss.cu")
HEADERS = ("launch.cuh", "common.cuh", "philox.cuh", "inverse_cdf.cuh")

CXX_FLAGS = ["-O3"]
# No --use_fast_math: it would make every expf/logf approximate and flush denormals; the kernels choose the
# fast intrinsics themselves where the accuracy allows (see csrc/philox.cuh, csrc/mlm_loss_and_sample.cu).
# -lineinfo maps SASS to source lines for profilers (ncu) and costs nothing at run time.
NVCC_FLAGS = ["-O3", "-lineinfo"]

# Without TORCH_CUDA_ARCH_LIST: native code for Hopper (sm_90, the target) and for the GPUs present at a
# just-in-time build, plus compute_80 PTX that the driver compiles for any newer GPU, so a build also runs on
# Ampere, Ada or Blackwell cards it was not aimed at.
DEFAULT_ARCHS = ("9.0",)
PORTABLE_PTX = "8.0"


def _arch_key(arch: str):
    return tuple(int(part) for part in arch.split("."))


def arch_flags(local_archs=()) -> list:
    """nvcc `-gencode` flags; none when `TORCH_CUDA_ARCH_LIST` is set, as torch then derives them from it.

    `local_archs`: compute capabilities of the GPUs present, e.g. ["8.6"] (the just-in-time build adds them).
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs = sorted(set(DEFAULT_ARCHS) | set(local_archs), key=_arch_key)
    flags = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in archs]
    ptx = PORTABLE_PTX.replace(".", "")
    return flags + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


def source_paths(csrc_dir: str) -> list:
    return [os.path.join(csrc_dir, name) for name in SOURCES]


def sources_digest(csrc_dir: str) -> str:
    """A hash of every source and header. torch's JIT cache rebuilds when the sources or flags change but does
    not look at headers; passing this as a define makes a header edit rebuild too."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(csrc_dir, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]
