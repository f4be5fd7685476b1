"""Packaging: `kernels/` installs as `electra_fast.kernels`, `csrc/` ships as `electra_fast.csrc` data.

Nothing is compiled at install time unless ELECTRA_FAST_BUILD_CUDA=1 asks for the CUDA extension
ahead of time; otherwise it is built just in time with ninja on first use (see electra_fast/cuda.py).
"""
import os

from setuptools import setup

packages = ["electra_fast", "electra_fast.ops", "electra_fast.kernels", "electra_fast.csrc"]
package_dir = {"electra_fast.kernels": "kernels", "electra_fast.csrc": "csrc"}
package_data = {"electra_fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]}
ext_modules, cmdclass = [], {}

if os.environ.get("ELECTRA_FAST_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    from electra_fast_build import cuda_extension_kwargs  # noqa: E402  (csrc build flags, one place)

    ext_modules = [CUDAExtension(**cuda_extension_kwargs())]
    cmdclass = {"build_ext": BuildExtension}

setup(packages=packages, package_dir=package_dir, package_data=package_data,
      ext_modules=ext_modules, cmdclass=cmdclass)
