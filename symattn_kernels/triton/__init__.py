"""Triton kernels of symattn_kernels: fused attention forward and backward.

Importing this package only checks the Triton version; it touches no GPU. The kernels live in
``attention_fwd`` (``attention_forward``) and ``attention_bwd`` (``attention_backward``);
``features`` detects what the installed Triton offers beyond the minimum version.
"""

import triton

# tl.dot(input_precision=...), early return in kernels, int64 Philox offsets and the
# interpreter's CPU-tensor support are what the kernels rely on; all are in Triton 3.2+.
MIN_TRITON_VERSION = (3, 2)


def _version_tuple(version: str) -> tuple:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _version_tuple(triton.__version__) < MIN_TRITON_VERSION:
    raise ImportError(
        f"symattn_kernels.triton needs triton >= {'.'.join(map(str, MIN_TRITON_VERSION))}, "
        f"found {triton.__version__}"
    )
