"""Build script: pure Python, plus the csrc/ extensions when they can be built here.

* CPU extension ``symattn_kernels._C``: built when csrc/ has C++ sources and torch is
  importable at build time (``pip install --no-build-isolation .``, or ``make``).
* CUDA extension ``symattn_kernels._C_cuda``: built when csrc/cuda has sources and nvcc plus a
  CUDA build of torch are present, or when ``SYMATTN_BUILD_CUDA=1`` forces it (a visible GPU is
  never the criterion). ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0a"
  (A100, and H100/H200 with their arch-specific instructions). The toolkit root is
  ``CUDA_HOME`` / ``CUDA_PATH`` if set, else found from ``nvcc`` or /usr/local/cuda (torch's own
  guess, the parent of nvcc's folder, is wrong when nvcc is a wrapper such as /usr/local/bin/nvcc).
* The sources of both, all of csrc/, also ship inside the package as ``symattn_kernels/csrc``
  (package data): where no extension was built (an isolated build has no torch), the first use
  of a backend compiles them just in time (symattn_kernels/extensions.py).
* ``SYMATTN_BUILD_CPP=0`` skips all extensions. Builds use ninja; ``MAX_JOBS`` limits its jobs.
  The C++ standard is the one torch's BuildExtension picks (torch >= 2.13 headers need C++20).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cuda_home():
    """The CUDA toolkit root (holding bin/nvcc and include/cuda_runtime.h), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    guesses = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))] if nvcc else []
    for root in guesses + ["/usr/local/cuda"]:
        if all(os.path.isfile(os.path.join(root, f)) for f in ("bin/nvcc", "include/cuda_runtime.h")):
            return root
    return None


def _extensions():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    if os.environ.get("SYMATTN_BUILD_CPP", "1") == "0" or not (cpu_sources or cuda_sources):
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # torch.utils.cpp_extension reads it on import
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
        want_cuda = "1" if cuda_home and torch.version.cuda else "0"
        if torch.version.cuda and shutil.which("nvcc") and not cuda_home:
            print("symattn_kernels: nvcc found but no CUDA toolkit root; set CUDA_HOME to build _C_cuda")
    if want_cuda == "1" and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cuda_flags = dict(flags, nvcc=["-O3", "--use_fast_math", "-lineinfo"])
        extensions.append(CUDAExtension("symattn_kernels._C_cuda", cuda_sources, extra_compile_args=cuda_flags))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


# csrc/ stays at the top of the checkout and is mapped into the package as data, so the wheel
# carries the sources the just-in-time build compiles.
_SOURCE_DATA = ["*.cpp", "*/*.cpp", "*/*.h", "*/*.cu", "*/*.cuh"]

ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["symattn_kernels*"]) + ["symattn_kernels.csrc"],
    package_dir={"symattn_kernels.csrc": "csrc"},
    package_data={"symattn_kernels.csrc": _SOURCE_DATA},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
