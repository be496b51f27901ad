"""Which ops the harness times: each op's input builder, fp32 reference, FLOP count, shape sets
and providers, declared once. The runner loops over this registry; adding an op (LAMA, ...)
means registering one more `OpSpec`, nothing in the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import providers
from bench.shape import Shape


@dataclass(frozen=True)
class OpSpec:
    """Everything the runner needs to benchmark one op.

    make_inputs(shape, dtype, device) -> ({name: tensor}, grad_out): every tensor that requires
    grad is a leaf whose gradient fwd+bwd mode checks; grad_out is the fixed cotangent that
    mode backpropagates. reference(inputs, shape, grad_out, dtype) computes the output (and,
    when grad_out is given, the input gradients) in `dtype`, by default fp32: that result
    gates every provider, and the same one in the benchmark dtype sets the tolerance.
    flops(shape, mode) follows flash-attn's convention. providers(device) lists
    every provider, usable or not, with the reason when not. shape_sets names lists of shapes;
    default_shape_sets and dtypes pick among them per device type ("cpu" / "cuda").
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, str], tuple[dict[str, torch.Tensor], torch.Tensor]]
    reference: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    flops: Callable[[Shape, str], float]
    providers: Callable[[str], list[providers.Provider]]
    shape_sets: dict[str, list[Shape]]
    default_shape_sets: dict[str, list[str]]
    dtypes: dict[str, list[str]]
    quick_shape: Shape
    baseline: str


REGISTRY: dict[str, OpSpec] = {}


def register(op: OpSpec) -> None:
    REGISTRY[op.name] = op


def attention_flops(shape: Shape, mode: str) -> float:
    """flash-attn's count: 4·B·H·S²·D forward, backward 2.5× forward, causal halves both."""
    forward = 4.0 * shape.B * shape.H * shape.S * shape.S * shape.D
    total = forward * (3.5 if mode == "fwdbwd" else 1.0)
    return total / 2 if shape.causal else total


def shared_attention_inputs(shape: Shape, dtype: torch.dtype, device: str):
    y = torch.randn(shape.B, shape.S, shape.H, shape.D, dtype=dtype, device=device)
    return {"y": y.requires_grad_()}, torch.randn_like(y)


# Score elements materialised per reference chunk; 2**28 fp32 = 1 GiB, so the math reference
# of the 16k-token GPU sweep fits in memory.
_REFERENCE_CHUNK_ELEMENTS = 2**28


def shared_attention_reference(inputs, shape: Shape, grad_out=None, dtype=torch.float32):
    """SDPA math backend in `dtype` on (y, y, y), chunked over batch and heads (independent)."""
    y = inputs["y"].detach().to(dtype)
    out = torch.empty_like(y)
    grad = torch.empty_like(y) if grad_out is not None else None
    scores_per_head = shape.S * shape.S
    heads = max(1, min(shape.H, _REFERENCE_CHUNK_ELEMENTS // scores_per_head))
    batches = max(1, _REFERENCE_CHUNK_ELEMENTS // (heads * scores_per_head)) if heads == shape.H else 1
    for b0 in range(0, shape.B, batches):
        for h0 in range(0, shape.H, heads):
            index = (slice(b0, b0 + batches), slice(None), slice(h0, h0 + heads))
            chunk = y[index].clone().requires_grad_(grad is not None)
            q = chunk.transpose(1, 2)
            with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(grad is not None):
                o = F.scaled_dot_product_attention(q, q, q, is_causal=shape.causal)
            out[index] = o.transpose(1, 2).detach()
            if grad is not None:
                o.backward(grad_out[index].to(dtype).transpose(1, 2))
                grad[index] = chunk.grad
    return out, ({"y": grad} if grad is not None else {})


_BERT_HEADS = dict(H=12, D=64)


def _flash_attn_sweep() -> list[Shape]:
    """flash-attn's standard sweep: 16k tokens, hidden 2048, head dims 64 and 128."""
    return [
        Shape(B=16384 // S, S=S, H=2048 // D, D=D, causal=causal)
        for causal in (False, True)
        for D in (64, 128)
        for S in (512, 1024, 2048, 4096, 8192, 16384)
    ]


def _gpu_check_sweep() -> list[Shape]:
    """The one-shot GPU check's short sweep: 16k tokens, hidden 2048, BERT lengths first."""
    return [
        Shape(B=16384 // S, S=S, H=2048 // D, D=D, causal=causal)
        for D in (64, 128)
        for causal in (False, True)
        for S in (128, 512, 2048, 8192)
    ]


register(OpSpec(
    name="shared_attention",
    make_inputs=shared_attention_inputs,
    reference=shared_attention_reference,
    flops=attention_flops,
    providers=providers.shared_attention_providers,
    shape_sets={
        # docs/design.md, "Performance targets", CPU: BERT-base heads at B·S = 4096, plus one long sequence.
        "spec": [Shape(B=32, S=128, **_BERT_HEADS), Shape(B=8, S=512, **_BERT_HEADS),
                 Shape(B=1, S=2048, **_BERT_HEADS)],
        "bert": [Shape(B=4096 // S, S=S, **_BERT_HEADS) for S in (128, 256, 512)],
        "sweep": _flash_attn_sweep(),
        "gpu-check": _gpu_check_sweep(),
    },
    default_shape_sets={"cpu": ["spec"], "cuda": ["bert", "sweep"]},
    dtypes={"cpu": ["fp32", "bf16"], "cuda": ["fp16", "bf16"]},
    quick_shape=Shape(B=2, S=128, **_BERT_HEADS),
    baseline="sdpa-flash",
))


# LAMA (lowrank_context_attention) reuses Shape with S = tokens T, H = heads m, D = model size E.
def lowrank_flops(shape: Shape, mode: str) -> float:
    """Matmul FLOPs of LAMA with separate token keys u: forward 4·B·T·E·m (Q^T u and attn·h);
    backward 2x forward (dattn = dpooled·h^T, dh, du and dQ)."""
    forward = 4.0 * shape.B * shape.S * shape.D * shape.H
    return forward * (3.0 if mode == "fwdbwd" else 1.0)


def lowrank_inputs(shape: Shape, dtype: torch.dtype, device: str):
    """LAMAClassifier's call: token states h, token keys u = tanh(MLP(h)), a learned context and
    factors scaled so that tanh is not saturated, and ragged lengths in [T/2, T]."""
    B, T, m, E = shape.B, shape.S, shape.H, shape.D
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), device=device)
    inputs = {
        "h": torch.randn(B, T, E, dtype=dtype, device=device),
        "u": torch.tanh(torch.randn(B, T, E, device=device)).to(dtype),
        "context": torch.randn(E, dtype=dtype, device=device),
        "p": (torch.randn(E, m, device=device) * E**-0.5).to(dtype),
        "q": (torch.randn(E, m, device=device) * E**-0.5).to(dtype),
    }
    for leaf in inputs.values():
        leaf.requires_grad_()
    inputs["key_padding_mask"] = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return inputs, torch.randn(B, m, E, dtype=dtype, device=device)


_LOWRANK_LEAVES = ("h", "context", "p", "q", "u")


def lowrank_reference(inputs, shape: Shape, grad_out=None, dtype=torch.float32):
    """symattn_kernels.reference in `dtype` (autograd for the gradients); the output is pooled."""
    from symattn_kernels import reference

    leaves = [inputs[name].detach().to(dtype).requires_grad_(grad_out is not None) for name in _LOWRANK_LEAVES]
    h, context, p, q, u = leaves
    with torch.set_grad_enabled(grad_out is not None):
        pooled, _ = reference.lowrank_context_attention(h, context, p, q, u=u,
                                                        key_padding_mask=inputs["key_padding_mask"])
    if grad_out is None:
        return pooled.detach(), {}
    grads = torch.autograd.grad(pooled, leaves, grad_out.to(dtype))
    return pooled.detach(), dict(zip(_LOWRANK_LEAVES, grads))


_LAMA_E = 256

register(OpSpec(
    name="lowrank_context_attention",
    make_inputs=lowrank_inputs,
    reference=lowrank_reference,
    flops=lowrank_flops,
    providers=providers.lowrank_providers,
    shape_sets={
        # A LAMAClassifier batch (BiGRU states of E = 256) at sentence lengths, and one long document.
        "spec": [Shape(B=32, S=128, H=4, D=_LAMA_E), Shape(B=32, S=256, H=8, D=_LAMA_E),
                 Shape(B=4, S=4096, H=8, D=_LAMA_E)],
        "large": [Shape(B=256, S=512, H=8, D=512), Shape(B=64, S=4096, H=8, D=512)],
    },
    default_shape_sets={"cpu": ["spec"], "cuda": ["spec", "large"]},
    dtypes={"cpu": ["fp32", "bf16"], "cuda": ["fp16", "bf16"]},
    quick_shape=Shape(B=4, S=64, H=4, D=64),
    baseline="symattn-torch",
))
