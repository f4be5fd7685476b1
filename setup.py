"""Packaging: `kernels/` installs as `electra_fast.kernels`, `csrc/` as `electra_fast.csrc` (its launcher modules,
with the CUDA sources as package data).

Nothing is compiled at install time unless ELECTRA_FAST_BUILD_CUDA=1 asks for the CUDA extension
ahead of time; otherwise it is built just in time with ninja on first use (see csrc/_extension.py).
"""
import os

from setuptools import find_packages, setup

packages = find_packages(include=["electra_fast", "electra_fast.*"]) + ["electra_fast.kernels", "electra_fast.csrc"]
package_dir = {"electra_fast.kernels": "kernels", "electra_fast.csrc": "csrc"}
package_data = {"electra_fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]}
ext_modules, cmdclass = [], {}


def _cuda_extension():
    """The CUDA extension `electra_fast._cuda_ext`, with the sources and flags the just-in-time build uses."""
    import importlib.util

    from torch.utils.cpp_extension import CUDAExtension

    # Loaded by path: csrc/_build.py needs only the standard library, the package need not import.
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(here, "csrc", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return CUDAExtension(
        name=build.AOT_NAME,
        sources=build.source_paths("csrc"),  # relative to this file, as setuptools wants
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS + build.arch_flags()},
    )


if os.environ.get("ELECTRA_FAST_BUILD_CUDA", "0") == "1":
    # Needs torch with CUDA and nvcc at build time: `ELECTRA_FAST_BUILD_CUDA=1 pip install --no-build-isolation .`
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [_cuda_extension()]
    cmdclass = {"build_ext": BuildExtension}

setup(packages=packages, package_dir=package_dir, package_data=package_data,
      ext_modules=ext_modules, cmdclass=cmdclass)
