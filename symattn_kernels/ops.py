"""The ``symattn::*`` custom ops: one op per direction, their fake functions and autograd.

The public functions in ``interface`` validate arguments, pick a backend and call the forward
ops here; the ops only compute, by handing their arguments to the chosen backend module
(``backends.load``). Backward ops write into gradient buffers allocated by the autograd
formula and declare exactly those as mutated, so ``torch.compile(fullgraph=True)`` sees clean
functional graphs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import torch as torch_backend
from .backends.registry import keeps_output_residual
from .backends.torch import accumulate_dtype


def _seed(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed.item())


def _without_autocast(x: Tensor):
    """The ops run in their inputs' dtypes. A custom op has no Autocast kernel, so the caller's
    autocast stays on inside it: the composite backend's fp32 products would run in bf16 / fp16
    (an fp32 result 1e4x less accurate; fp16 scores overflow to inf, a NaN output)."""
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("symattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    v: Optional[Tensor],
    coef: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    seed: Optional[Tensor],
    scale: float,
    causal: bool,
    dropout_p: float,
    exclude_self: bool,
    max_seqlen: int,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, out_residual): the third is what the backward needs beyond out and lse (the CPU
    kernels' output residual, ``backends.registry.keeps_output_residual``), an empty tensor where
    the backend needs nothing more."""
    with _without_autocast(q):
        results = backends.load(backend).attention_forward(
            q, v, coef, key_padding_mask, cu_seqlens, _seed(seed), scale, causal, dropout_p, exclude_self, max_seqlen,
            deterministic,
        )
    return results if len(results) == 3 else (*results, q.new_empty(0))


@attention_fwd.register_fake
def _attention_fwd_fake(q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self,
                        max_seqlen, deterministic, backend):
    out = q.new_empty((*q.shape[:-1], (q if v is None else v).shape[-1]))
    if cu_seqlens is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, H, S]
    else:
        lse_shape = (q.shape[1], q.shape[0])  # [H, total]
    residual = torch.empty_like(out) if keeps_output_residual(backend, q, coef, dropout_p, max_seqlen) else q.new_empty(0)
    return out, q.new_empty(lse_shape, dtype=accumulate_dtype(q.dtype)), residual


# The backward ops fill gradient buffers in place and name them in mutates_args. torch's tracking
# of such mutations (torch.autograd.graph.allow_mutation_on_saved_tensors) reads every mutated
# argument as a tensor and failed on an absent (None) one, so an absent buffer travels as a
# 0-element 1-D stand-in (no gradient buffer is: q, v, h are 3-D or 4-D, coef 2-D or 3-D, a
# context's 1-D gradient has E > 0 elements) and turns back into None inside the op.
def _stand_in(buffer: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if buffer is None else buffer


def _present(buffer: Tensor) -> Optional[Tensor]:
    return None if buffer.dim() == 1 and buffer.numel() == 0 else buffer


@torch.library.custom_op("symattn::attention_bwd", mutates_args=("dq", "dv", "dcoef"))
def attention_bwd(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    v: Optional[Tensor],
    coef: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    seed: Optional[Tensor],
    out: Tensor,
    out_residual: Optional[Tensor],
    lse: Tensor,
    dq: Tensor,
    dv: Tensor,
    dcoef: Tensor,
    scale: float,
    causal: bool,
    dropout_p: float,
    exclude_self: bool,
    max_seqlen: int,
    deterministic: bool,
    backend: str,
) -> None:
    # Only a backend whose forward kept a residual (the CPU kernels) takes one back.
    kept = {} if out_residual is None else {"out_residual": out_residual}
    with _without_autocast(q):
        backends.load(backend).attention_backward(
            dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, _seed(seed), out, lse, dq, _present(dv), _present(dcoef),
            scale, causal, dropout_p, exclude_self, max_seqlen, deterministic, **kept,
        )


@attention_bwd.register_fake
def _attention_bwd_fake(*args) -> None:
    return None


def unit_last_stride(x: Optional[Tensor]) -> Optional[Tensor]:
    # Kernels take any strides as long as the innermost one is 1 (or the last dim has one element,
    # where its stride is never used); copy only when it is not.
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _attention_setup_context(ctx, inputs, output):
    q, v, coef, key_padding_mask, cu_seqlens, seed, *options = inputs
    ctx.save_for_backward(q, v, coef, key_padding_mask, cu_seqlens, seed, *output)
    ctx.mark_non_differentiable(output[2])  # the output residual: the backward's, not the caller's
    ctx.options = options
    ctx.set_materialize_grads(False)


def _second_order(backend: str, op: str, *tensors) -> bool:
    """Whether this backward must itself be differentiable (``create_graph=True`` with a
    gradient that depends on something requiring grad). Only the composite ``torch`` backend is
    differentiable; the fused kernels' backward is not, and a silently detached gradient would
    drop a gradient penalty without a word, so they refuse."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return False
    if backend != "torch":
        raise RuntimeError(
            f"symattn: second-order gradients (create_graph=True) through {op} are not supported by "
            f"backend={backend!r}, whose backward is a fused kernel; call with backend='torch', which "
            "differentiates its composite implementation (modules and converted models: set the environment "
            "variable SYMATTN_BACKEND=torch)"
        )
    return True


def _refuse_batched(op: str, *grads) -> None:
    """The backward ops fill their gradient buffers in place, which vmap cannot batch: say so
    rather than torch's "Batching rule not implemented for symattn::..."."""
    batched = (torch._C._functorch.is_batchedtensor, torch._C._functorch.is_legacy_batchedtensor)
    if any(g is not None and any(is_batched(g) for is_batched in batched) for g in grads):
        raise NotImplementedError(
            f"symattn: batched gradients through {op} (torch.autograd.grad(is_grads_batched=True), "
            "torch.autograd.functional.jacobian(vectorize=True)) are not supported: take one gradient per call"
        )


def _differentiate(forward, inputs, outputs_grads) -> list:
    """Gradients of ``forward()`` (pure torch ops) w.r.t. ``inputs``, with a graph."""
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    with torch.enable_grad(), _without_autocast(inputs[0]):
        outputs = forward()
        pairs = [(o, g) for o, g in zip(outputs, outputs_grads) if g is not None]
        grads = iter(torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
        ))
    return [next(grads) if x is not None and x.requires_grad else None for x in inputs]


def _empty_gradient(backend: str):
    """``torch.empty_like`` for gradient buffers, or the backend's own: the ``cpu`` one hands out
    the blocks of freed gradients again, their pages mapped (csrc/cpu/gradient_cache.h)."""
    return getattr(backends.load(backend), "empty_gradient", torch.empty_like)


def _needs_input_grad(ctx, count: int) -> tuple:
    """The first ``count`` entries of ``ctx.needs_input_grad``, a missing one read as True.

    torch's generated backward (``torch._library.autograd``) shortens the node's tuple in place
    for the call and puts it back after; two backward calls of one graph from two threads
    (``retain_graph=True``, which autograd allows) overlap on that one ctx and can leave it short
    for good. What is left is a correct prefix, and a gradient computed for an input that needs
    none is dropped by autograd."""
    needs = tuple(ctx.needs_input_grad[:count])
    return needs + (True,) * (count - len(needs))


def _attention_backward(ctx, dout, dlse, _dresidual=None):
    q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, residual = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 3)
    if _second_order(ctx.options[-1], "symmetric_attention", q, v, coef, dout, dlse):
        def forward():
            return torch_backend.attention_forward(q, v, coef, key_padding_mask, cu_seqlens, _seed(seed), *ctx.options[:-1])

        grads = _differentiate(forward, (q, v, coef), (dout, dlse))
        return tuple(g if need else None for g, need in zip(grads, needs[:3])) + (None,) * 10
    _refuse_batched("symmetric_attention", dout, dlse)
    if dout is None:
        dout = torch.zeros_like(out)
    empty_gradient = _empty_gradient(ctx.options[-1])
    dq = empty_gradient(q)
    dv = None if v is None else empty_gradient(v)
    dcoef = torch.empty_like(coef) if coef is not None and needs[2] else None
    attention_bwd(
        unit_last_stride(dout), dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out,
        residual if residual.numel() else None, lse, dq, _stand_in(dv, q), _stand_in(dcoef, q), *ctx.options,
    )
    return (dq if needs[0] else None, dv if needs[1] else None, dcoef) + (None,) * 10


torch.library.register_autograd(
    "symattn::attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


@torch.library.custom_op("symattn::lowrank_fwd", mutates_args=())
def lowrank_fwd(
    h: Tensor,
    context: Tensor,
    p: Tensor,
    q: Tensor,
    u: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    head_norm: str,
    token_softmax: bool,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    with _without_autocast(h):
        return backends.load(backend).lowrank_forward(
            h, context, p, q, u, key_padding_mask, _head_norm(head_norm), token_softmax, eps
        )


@lowrank_fwd.register_fake
def _lowrank_fwd_fake(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, backend):
    batch, tokens, dim = h.shape
    heads = p.shape[1]
    return h.new_empty((batch, heads, dim)), h.new_empty((batch, heads, tokens))


def _head_norm(name: str) -> Optional[str]:
    # Custom-op schemas have no Optional[str]; "none" stands for head_norm=None.
    return None if name == "none" else name


@torch.library.custom_op("symattn::lowrank_bwd", mutates_args=("dh", "dcontext", "dp", "dq", "du"))
def lowrank_bwd(
    dpooled: Tensor,
    dattn: Optional[Tensor],
    h: Tensor,
    context: Tensor,
    p: Tensor,
    q: Tensor,
    u: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    dh: Tensor,
    dcontext: Tensor,
    dp: Tensor,
    dq: Tensor,
    du: Tensor,
    pooled: Tensor,
    attn: Tensor,
    head_norm: str,
    token_softmax: bool,
    eps: float,
    backend: str,
) -> None:
    with _without_autocast(h):
        backends.load(backend).lowrank_backward(
            dpooled, dattn, h, context, p, q, u, key_padding_mask, _head_norm(head_norm), token_softmax, eps,
            *map(_present, (dh, dcontext, dp, dq, du)), pooled=pooled, attn=attn,
        )


@lowrank_bwd.register_fake
def _lowrank_bwd_fake(*args) -> None:
    return None


def _lowrank_setup_context(ctx, inputs, output):
    h, context, p, q, u, key_padding_mask, *options = inputs
    # pooled and attn too: with them a backend can take the softmax's row term from the forward
    # (sum_t attn_t dA_t = <dpooled, pooled> + sum_t attn_t dattn_t) instead of a pass over the tokens.
    ctx.save_for_backward(h, context, p, q, u, key_padding_mask, *output)
    ctx.options = options
    ctx.set_materialize_grads(False)


def _lowrank_backward(ctx, dpooled, dattn):
    h, context, p, q, u, key_padding_mask, pooled, attn = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 5)
    if _second_order(ctx.options[-1], "lowrank_context_attention", h, context, p, q, u, dpooled, dattn):
        head_norm, token_softmax, eps = ctx.options[:-1]
        grads = _differentiate(
            lambda: torch_backend.lowrank_forward(h, context, p, q, u, key_padding_mask, _head_norm(head_norm),
                                              token_softmax, eps),
            (h, context, p, q, u), (dpooled, dattn),
        )
        return tuple(g if need else None for g, need in zip(grads, needs[:5])) + (None,) * 5
    _refuse_batched("lowrank_context_attention", dpooled, dattn)
    if dpooled is None:
        dpooled = h.new_zeros((h.shape[0], p.shape[1], h.shape[2]))
    empty_gradient = _empty_gradient(ctx.options[-1])
    buffers = [
        empty_gradient(t) if t is not None and need else None
        for t, need in zip((h, context, p, q, u), needs[:5])
    ]
    lowrank_bwd(unit_last_stride(dpooled), dattn, h, context, p, q, u, key_padding_mask,
                *(_stand_in(b, h) for b in buffers), pooled, attn, *ctx.options)
    return (*buffers, None) + (None,) * 4


torch.library.register_autograd("symattn::lowrank_fwd", _lowrank_backward, setup_context=_lowrank_setup_context)
