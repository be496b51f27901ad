"""The ``cpu`` backend: the fused C++ kernels of ``csrc/cpu`` (docs/design.md, "Backends").

Same attention functions, arguments and layouts as ``backends.torch``.
Importing this module loads the extension (``symattn_kernels._C``, or its just-in-time build:
``extensions``), which registers the kernel ops
``symattn::attention_fwd_cpu`` and ``symattn::attention_bwd_cpu``; their fake functions are
registered here. The kernels take float32, bfloat16 and float16 (fp32 accumulation; bfloat16
products on AMX tiles or AVX512-BF16 where the CPU has them, see ``kernel_isa``) and are
deterministic whatever the thread count, so ``deterministic`` changes nothing. float64 attention
stays on the ``torch`` backend (``backends.resolve`` routes it there). NaN or Inf stored in a
padded token is read as zero inside the kernels, so the inputs reach them uncopied. The
backward passes, attention's and LAMA's, take their gradient buffers of 1 MiB or more from the
blocks of freed ones (``empty_gradient``).

LAMA (``lowrank_forward`` / ``lowrank_backward``) runs the fused kernels of ``csrc/cpu/lama_kernel.h``
(ops ``symattn::lowrank_fwd_cpu`` / ``lowrank_bwd_cpu``): one pass over each sequence's tokens
in either direction, float64 included, the same instruction sets. Where ``_C`` is not built,
``backends.load`` returns ``cpu_lowrank`` (lean plain PyTorch) instead.
"""

from __future__ import annotations

import os

import torch

from .. import extensions
from .registry import keeps_output_residual

__all__ = ["attention_forward", "attention_backward", "empty_gradient", "gradient_cache_bytes", "kernel_isa",
           "lowrank_forward", "lowrank_backward", "release_gradient_cache"]

ISA_CHOICES = ("default", "avx2", "avx512", "avx512_bf16", "avx512_amx")
# Check builds, not levels (csrc/cpu/isa.h), for tests on any AVX2 CPU: bfloat16 inputs take the
# AVX512_BF16 kernels' data path with vdpbf16ps done as two FMAs, or the AVX512_AMX kernels on an
# emulated tile unit (slow: small shapes only); the other dtypes run the AVX2 kernels.
CHECK_BUILDS = ("avx2_bf16_pairs", "avx2_amx_emulated")
# Every kernel set SYMATTN_CPU_ISA can name.
KERNEL_BUILDS = (*ISA_CHOICES, *CHECK_BUILDS)


def _check_isa_variable() -> None:
    # The kernels read SYMATTN_CPU_ISA once, at their first call; a typo must not silently run
    # the widest kernel set.
    value = os.environ.get("SYMATTN_CPU_ISA", "")
    if value and value.lower() not in KERNEL_BUILDS:
        raise ValueError(f"SYMATTN_CPU_ISA={value!r} is not a kernel set: expected one of {', '.join(ISA_CHOICES)}, "
                         f"or a check build for tests ({', '.join(CHECK_BUILDS)}), or unset for the widest this CPU runs")


_check_isa_variable()
extensions.require("cpu")  # registers the symattn::*_cpu ops before their fake functions below


@torch.library.register_fake("symattn::attention_fwd_cpu")
def _attention_fwd_cpu_fake(q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self,
                            max_seqlen, keep_residual):
    out = q.new_empty((*q.shape[:-1], (q if v is None else v).shape[-1]))
    if cu_seqlens is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, H, S]
    else:
        lse_shape = (q.shape[1], q.shape[0])  # [H, total]
    return out, q.new_empty(lse_shape, dtype=torch.float32), torch.empty_like(out) if keep_residual else q.new_empty(0)


@torch.library.register_fake("symattn::attention_bwd_cpu")
def _attention_bwd_cpu_fake(*args) -> None:
    return None


@torch.library.register_fake("symattn::lowrank_fwd_cpu")
def _lowrank_fwd_cpu_fake(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    batch, tokens, dim = h.shape
    heads = q.shape[-1]
    return h.new_empty((batch, heads, dim)), h.new_empty((batch, heads, tokens))


@torch.library.register_fake("symattn::lowrank_bwd_cpu")
def _lowrank_bwd_cpu_fake(*args) -> None:
    return None


@torch.library.register_fake("symattn::gradient_buffer_cpu")
def _gradient_buffer_cpu_fake(like):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@torch.library.register_fake("symattn::philox4x_cpu")
def _philox4x_cpu_fake(offsets, seed):
    return offsets.new_empty((*offsets.shape, 4))


@torch.library.register_fake("symattn::dropout_keep_cpu")
def _dropout_keep_cpu_fake(seed, dropout_p, first, n):
    return torch.empty(n, dtype=torch.float32)


def kernel_isa() -> str:
    """The kernel set that runs here: "AVX512_AMX" (AVX-512, and bfloat16 products on AMX tiles),
    "AVX512_BF16" (AVX-512, and bfloat16 inputs multiplied as bf16 pairs with vdpbf16ps),
    "AVX512", "AVX2" or "DEFAULT" (bfloat16 widened to fp32 in all three). Both bfloat16 paths
    round P and G to bf16 and accumulate in fp32. The CPU decides; ``ATEN_CPU_CAPABILITY`` or
    ``SYMATTN_CPU_ISA=avx512_bf16|avx512|avx2|default`` (read once, at the first call) lowers it.
    ``SYMATTN_CPU_ISA=avx2_bf16_pairs`` or ``avx2_amx_emulated`` gives that check build
    (``CHECK_BUILDS``) on an AVX2 CPU: the AVX512_BF16 or AVX512_AMX kernels' bfloat16 path there,
    for tests."""
    return torch.ops.symattn.cpu_kernel_isa()


def last_schedule(backward: bool = False) -> torch.Tensor:
    """How this process's latest fused CPU forward (or backward) call spread over its worker
    threads: int64 ``[workers, 3]`` of (tasks dealt, their query rows, tasks taken from other
    workers). A forward task on a pair of row groups counts the rows of both. The deal is fixed
    before the call runs, so the first two columns do not depend on timing; a worker that has run
    its own tasks takes those another has not reached yet (from the end of that worker's list),
    so the third does."""
    return torch.ops.symattn.cpu_last_schedule(backward)


def attention_forward(
    q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen, deterministic
):
    """(out, lse, out_residual): ``backends.torch.attention_forward``'s results and, where
    ``registry.keeps_output_residual``, the output's rounding residual (fp32 output - out, in out's dtype),
    else an empty tensor."""
    del deterministic  # always deterministic
    return torch.ops.symattn.attention_fwd_cpu(
        q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen,
        keeps_output_residual("cpu", q, coef, dropout_p, max_seqlen),
    )


def attention_backward(
    dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, dq, dv, dcoef,
    scale, causal, dropout_p, exclude_self, max_seqlen, deterministic, out_residual=None,
):
    """Gradients into dq, dv, dcoef; ``out_residual`` as ``attention_forward`` kept it, or None
    (``ops`` passes None for the empty one the forward returns where it keeps none)."""
    del deterministic
    torch.ops.symattn.attention_bwd_cpu(
        dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, out_residual, lse, dq, dv, dcoef,
        scale, causal, dropout_p, exclude_self, max_seqlen,
    )


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer for ``like``'s gradient, as ``torch.empty_like``. Contiguous buffers
    of 1 MiB or more come from blocks that earlier gradients of about the same size gave back when
    they were freed (``csrc/cpu/gradient_cache.h``): their pages are mapped already, where a fresh
    block of a few MiB, which the C library often hands out after returning the last one to the
    system, costs a page fault on the first write to each 4 KiB (about 1.7 ms per 8 MiB). The
    cache keeps at most 64 MiB; ``release_gradient_cache`` frees it."""
    if not like.is_contiguous():
        return torch.empty_like(like)
    return torch.ops.symattn.gradient_buffer_cpu(like)


def gradient_cache_bytes() -> int:
    """Bytes of freed gradient buffers that ``empty_gradient`` keeps for reuse now."""
    return torch.ops.symattn.cpu_gradient_cache(False)


def release_gradient_cache() -> None:
    """Frees the blocks that ``empty_gradient`` keeps for reuse (buffers still in use stay)."""
    torch.ops.symattn.cpu_gradient_cache(True)


def lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    """Fused LAMA forward; arguments and results as ``backends.torch.lowrank_forward``."""
    return torch.ops.symattn.lowrank_fwd_cpu(h, context, p, q, u, key_padding_mask, head_norm == "l2",
                                             token_softmax, eps)


def lowrank_backward(
    dpooled, dattn, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, dh, dcontext, dp, dq, du,
    pooled=None, attn=None,
):
    """Fused LAMA gradients, written into dh, dcontext, dp, dq and du (when given); arguments as
    ``backends.torch.lowrank_backward``. pooled and attn are the forward's results (recomputed
    when not given): the token softmax's gradient takes its row term from them."""
    if pooled is None or attn is None:
        pooled, attn = lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps)
    torch.ops.symattn.lowrank_bwd_cpu(dpooled, dattn, h, context, p, q, u, key_padding_mask, pooled, attn,
                                      dh, dcontext, dp, dq, du, head_norm == "l2", token_softmax, eps)
