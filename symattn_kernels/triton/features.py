"""Triton features newer than ``MIN_TRITON_VERSION``, detected once from the installed Triton, and
when the launchers use them; every use has the plain path as its fallback, and the interpreter
(``TRITON_INTERPRET=1``) always takes the plain path.

* ``warp_specialize`` on ``tl.range`` (Triton 3.4+): automatic warp specialisation of the
  forward's key loop (``WARP_SPECIALIZE``). Measured with Triton 3.9 (static compiles, no GPU):
  on sm_90 its Hopper pass leaves this loop unpartitioned with pointer loads and aborts
  (``NVGPUWarpSpecialization``, TaskIdPropagation assertion) on several variants, with TMA loads
  too; on sm_100 it compiles but partitions nothing and one variant spills 8 bytes. So it is off
  unless ``SYMATTN_WARP_SPECIALIZE=1`` asks for it on sm_100 and later.
* ``tl.make_tensor_descriptor`` (device-side TMA, Triton 3.4+) and
  ``triton.tools.tensor_descriptor.TensorDescriptor`` (host-side): detected and reported, not used
  by the kernels: TMA needs 16-byte aligned row strides (head dim 40 or 59 in a packed projection
  has none), so a pointer path stays, and without warp specialisation descriptor loads of the key
  tiles (tried on sm_90: they compile, spill-free) replace what cp.async pipelining already does.
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import triton
import triton.language as tl

from . import _version_tuple
from .attention_common import is_interpret

# (major, minor) of the installed Triton: config tables that differ between releases key on it.
TRITON_VERSION = _version_tuple(triton.__version__)


def _has_keyword(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


HAS_WARP_SPECIALIZE = _has_keyword(tl.range, "warp_specialize")
HAS_TENSOR_DESCRIPTOR = hasattr(tl, "make_tensor_descriptor")
HAS_HOST_TENSOR_DESCRIPTOR = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None

# Smallest compute capability (major * 10) at which the forward's key loop may be warp-specialised.
WARP_SPECIALIZE_MIN_ARCH = 100


def warp_specialize_for(arch: int) -> bool:
    """WARP_SPECIALIZE of the forward on sm_``arch``: only when asked for with
    ``SYMATTN_WARP_SPECIALIZE=1``, on a target and Triton that have it (module docstring), and
    for compiled kernels."""
    return (os.environ.get("SYMATTN_WARP_SPECIALIZE") == "1" and HAS_WARP_SPECIALIZE
            and arch >= WARP_SPECIALIZE_MIN_ARCH and not is_interpret())


def describe() -> str:
    """One line for ``symattn_kernels.info``: what was detected and what the kernels use."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    use = "on" if warp_specialize_for(WARP_SPECIALIZE_MIN_ARCH) else "off"
    return (f"triton {triton.__version__}: tl.range(warp_specialize) {yes(HAS_WARP_SPECIALIZE)} "
            f"(forward key loop: {use}, SYMATTN_WARP_SPECIALIZE=1 on sm_{WARP_SPECIALIZE_MIN_ARCH}+), "
            f"tensor descriptors {yes(HAS_TENSOR_DESCRIPTOR)} device / {yes(HAS_HOST_TENSOR_DESCRIPTOR)} host "
            "(not used)")
