"""Deprecated alias of ``symattn_kernels.parameter_counts``, its name before 0.1.0 (beside the
kernels' argument structs, "params" did not say that it counts model parameters).

Every name of the new module still reads through this one, and ``python -m
symattn_kernels.params`` still prints the tables, each with a DeprecationWarning that names the
new place. This module goes in 0.2.0.
"""

from __future__ import annotations

import warnings

from . import parameter_counts as _counts


def __getattr__(name: str):
    value = getattr(_counts, name)  # AttributeError, as from the new module, for a name it lacks
    warnings.warn(f"symattn_kernels.params.{name} moved to symattn_kernels.parameter_counts.{name}; "
                  "symattn_kernels.params goes in 0.2.0", DeprecationWarning, stacklevel=2)
    return value


if __name__ == "__main__":
    warnings.warn("python -m symattn_kernels.params is now python -m symattn_kernels.parameter_counts; "
                  "symattn_kernels.params goes in 0.2.0", DeprecationWarning, stacklevel=1)
    _counts.main()
