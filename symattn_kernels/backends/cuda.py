"""The ``cuda`` backend: the hand-written CUDA C++ kernels of ``csrc/cuda`` (docs/design.md, "Backends").

Same attention functions, arguments and layouts as ``backends.torch``.
Importing this module loads the extension (``symattn_kernels._C_cuda``, or its just-in-time
build: ``extensions``), which registers the kernel ops
``symattn::attention_fwd_cuda`` and ``symattn::attention_bwd_cuda``; their fake functions are
registered here. The kernels take float16 and bfloat16 (fp32 accumulation, head dims up to 256)
and use no atomics, so ``deterministic`` changes nothing. float32 inputs are rejected with a
TypeError (use backend="triton" or "torch"); they are not silently down-cast.
"""

from __future__ import annotations

import torch

from .. import extensions

extensions.require("cuda")  # registers the symattn::*_cuda ops before their fake functions below

__all__ = ["attention_forward", "attention_backward"]

_DTYPES = (torch.float16, torch.bfloat16)


@torch.library.register_fake("symattn::attention_fwd_cuda")
def _attention_fwd_cuda_fake(q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self,
                             max_seqlen):
    out = q.new_empty((*q.shape[:-1], (q if v is None else v).shape[-1]))
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if cu_seqlens is None else (q.shape[1], q.shape[0])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.register_fake("symattn::attention_bwd_cuda")
def _attention_bwd_cuda_fake(*args) -> None:
    return None


def _check_dtype(q) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"backend='cuda' takes float16 or bfloat16 q, got {q.dtype}; use backend='triton' or 'torch' for float32"
        )


def attention_forward(
    q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen, deterministic
):
    del deterministic  # always deterministic
    _check_dtype(q)
    return torch.ops.symattn.attention_fwd_cuda(
        q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen
    )


def attention_backward(
    dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, dq, dv, dcoef,
    scale, causal, dropout_p, exclude_self, max_seqlen, deterministic,
):
    del deterministic
    _check_dtype(q)
    torch.ops.symattn.attention_bwd_cuda(
        dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, dq, dv, dcoef,
        scale, causal, dropout_p, exclude_self, max_seqlen,
    )
