"""The backends: one module per backend, named after it, and the registry that picks one.

    torch.py        composite PyTorch: runs anywhere, the float64 path, the contract's signatures
    cpu.py          the fused C++ kernels of csrc/cpu, LAMA included (cpu_lowrank.py: LAMA in plain
                    PyTorch, where the extension is not built)
    cuda.py         the CUDA C++ kernels of csrc/cuda
    triton.py       the Triton kernels of symattn_kernels/triton
    registry.py     which backends are usable here and which one ``backend="auto"`` picks

Every backend module exposes ``attention_forward`` / ``attention_backward`` (and, where it has
LAMA, ``lowrank_forward`` / ``lowrank_backward``) with the signatures of ``backends.torch``;
``ops`` calls them through ``load``.
"""

from .registry import (
    BACKENDS,
    AttentionCase,
    BackendStatus,
    LowrankCase,
    load,
    peek,
    resolve,
    status,
    triton_interpreting,
)

__all__ = ["BACKENDS", "AttentionCase", "BackendStatus", "LowrankCase", "load", "peek", "resolve", "status",
           "triton_interpreting"]
