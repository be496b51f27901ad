"""Build script: pure Python, plus the csrc/ extensions when they can be built here.

* CPU extension ``symattn_kernels._C``: built when csrc/ has C++ sources and torch is
  importable at build time (``pip install --no-build-isolation .``, or ``make``).
* CUDA extension ``symattn_kernels._C_cuda``: built when csrc/cuda has sources and nvcc plus a
  CUDA build of torch are present, or when ``SYMATTN_BUILD_CUDA=1`` forces it (a visible GPU is
  never the criterion). ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0".
* ``SYMATTN_BUILD_CPP=0`` skips all extensions. Builds use ninja; ``MAX_JOBS`` limits its jobs.
  The C++ standard is the one torch's BuildExtension picks (torch >= 2.13 headers need C++20).
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extensions():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    if os.environ.get("SYMATTN_BUILD_CPP", "1") == "0" or not (cpu_sources or cuda_sources):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("symattn_kernels: torch is not importable at build time; installing pure Python")
        return [], {}
    flags = {"cxx": ["-O3", "-fopenmp"]}
    extensions = []
    if cpu_sources:
        extensions.append(CppExtension("symattn_kernels._C", cpu_sources, extra_compile_args=flags,
                                       extra_link_args=["-fopenmp"]))
    want_cuda = os.environ.get("SYMATTN_BUILD_CUDA")
    if want_cuda is None:
        want_cuda = "1" if shutil.which("nvcc") and torch.version.cuda else "0"
    if want_cuda == "1" and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_flags = dict(flags, nvcc=["-O3", "--use_fast_math", "-lineinfo"])
        extensions.append(CUDAExtension("symattn_kernels._C_cuda", cuda_sources, extra_compile_args=cuda_flags))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
