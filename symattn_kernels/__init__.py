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
