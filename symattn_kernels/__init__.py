"""Fused kernels for attention whose roles share weights: shared-weight, symmetric, pairwise
symmetric and low-rank context (LAMA) attention. See README.md."""

from . import reference
from .diagnostics import info
from .interface import (
    lowrank_context_attention,
    shared_attention,
    symmetric_attention,
    symmetric_attention_varlen,
)

__version__ = "0.1.0"

__all__ = [
    "symmetric_attention",
    "shared_attention",
    "symmetric_attention_varlen",
    "lowrank_context_attention",
    "reference",
    "info",
]


def __getattr__(name):
    # onnx_translation_table loads on first use: it needs onnxscript, an optional dependency (so
    # it stays out of __all__, where a star import would load it).
    if name == "onnx_translation_table":
        from .integrations.onnx import onnx_translation_table

        return onnx_translation_table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
