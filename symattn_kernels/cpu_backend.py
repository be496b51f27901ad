"""Deprecated alias of ``symattn_kernels.backends.cpu``, where the cpu backend moved in 0.1.0.

Earlier documentation named ``symattn_kernels.cpu_backend.kernel_isa()``; every name of the new
module still reads through this one, with a DeprecationWarning that names its new place. This
module goes in 0.2.0.
"""

from __future__ import annotations

import warnings

from .backends import cpu as _cpu


def __getattr__(name: str):
    value = getattr(_cpu, name)  # AttributeError, as from the new module, for a name it lacks
    warnings.warn(f"symattn_kernels.cpu_backend.{name} moved to symattn_kernels.backends.cpu.{name}; "
                  "symattn_kernels.cpu_backend goes in 0.2.0", DeprecationWarning, stacklevel=2)
    return value
