"""Implementations the harness times: the package's backends and the baselines it must beat
(SDPA's backends, flash-attn, FlexAttention), each listed on every device with the reason
when it cannot run there, so the report shows what was left out and why.

A provider's `bind(inputs, shape)` does the per-shape setup (imports, block masks, compiled
wrappers) and returns a zero-argument callable producing the output (attention: in BSHD layout;
LAMA: pooled). The
runner times exactly that callable (and the backward of its output in fwd+bwd mode).
Nothing CUDA-specific is imported at module import: flash-attn and FlexAttention load lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.shape import Shape

Bind = Callable[[dict, Shape], Callable[[], torch.Tensor]]

SYMATTN_BACKENDS = ("triton", "cuda", "cpu", "torch")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Provider:
    """One implementation; `bind` is None when it cannot run here and `reason` says why.
    `dtypes` restricts the dtypes it supports (None: all)."""

    name: str
    bind: Bind | None
    reason: str = ""
    dtypes: tuple[torch.dtype, ...] | None = None


def shared_attention_providers(device: str) -> list[Provider]:
    """Every provider for `shared_attention`, usable or not, ours first."""
    return [*_symattn_providers(device), *_sdpa_providers(device),
            *_flash_attn_providers(device), _flex_attention_provider(device)]


def lowrank_providers(device: str) -> list[Provider]:
    """Every provider for `lowrank_context_attention`: the package's backends (usable only where
    they implement LAMA for this device) and the naive eager PyTorch a model runs without them."""
    providers = []
    for name in SYMATTN_BACKENDS:
        reason = _lowrank_unusable(name, device)
        providers.append(Provider(f"symattn-{name}", None if reason else functools.partial(_bind_lowrank, name),
                                  reason))
    return providers + [Provider("eager-reference", functools.partial(_bind_lowrank, None))]


def _lowrank_unusable(backend: str, device: str) -> str:
    """Why `backend` cannot run LAMA on `device` tensors ("" when it can), in resolve()'s words."""
    try:
        from symattn_kernels import backends

        backends.resolve(backend, torch.device(device), torch.float32, op="lowrank")
    except Exception as exc:  # ValueError from resolve, or a broken package
        return f"{type(exc).__name__}: {exc}"
    return ""


def _bind_lowrank(backend: str | None, inputs: dict, shape: Shape) -> Callable[[], torch.Tensor]:
    """pooled of one LAMA call: backend None is symattn_kernels.reference (autograd, eager)."""
    import symattn_kernels
    from symattn_kernels import reference

    h, context, p, q, u = (inputs[name] for name in ("h", "context", "p", "q", "u"))
    mask = inputs["key_padding_mask"]
    if backend is None:
        return lambda: reference.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask)[0]
    return lambda: symattn_kernels.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask,
                                                             backend=backend)[0]


def _symattn_providers(device: str) -> list[Provider]:
    try:
        import symattn_kernels
        backends = symattn_kernels.info()["backends"]
    except Exception as exc:  # a broken package must still leave the baselines measurable
        reason = f"import symattn_kernels failed: {type(exc).__name__}: {exc}"
        return [Provider(f"symattn-{name}", None, reason) for name in SYMATTN_BACKENDS]
    providers = []
    for name in SYMATTN_BACKENDS:
        status = backends.get(name) or {"usable": False, "reason": "not listed by symattn_kernels.info()"}
        devices = status.get("devices", [])
        if not status.get("usable"):
            providers.append(Provider(f"symattn-{name}", None, status.get("reason", "not usable")))
        elif device not in devices:
            providers.append(Provider(f"symattn-{name}", None, f"runs on {devices}, this run is on {device}"))
        else:
            providers.append(Provider(f"symattn-{name}", functools.partial(_bind_symattn, name)))
        if name in SEPARATE_V_BACKENDS:
            separate = providers[-1]
            providers.append(Provider(f"{separate.name}-sepv", separate.bind and functools.partial(
                _bind_symattn, name, separate_v=True), separate.reason))
    return providers


# Backends also timed with y passed again as separate values (symmetric attention's kernel
# path): what shared mode saves over it is the one-tensor read.
SEPARATE_V_BACKENDS = ("triton",)


def _bind_symattn(backend: str, inputs: dict, shape: Shape, separate_v: bool = False) -> Callable[[], torch.Tensor]:
    import symattn_kernels

    y = inputs["y"]
    if separate_v:
        return lambda: symattn_kernels.symmetric_attention(y, y, causal=shape.causal, backend=backend)
    return lambda: symattn_kernels.shared_attention(y, causal=shape.causal, backend=backend)


_SDPA_BACKENDS = {
    "sdpa-flash": (SDPBackend.FLASH_ATTENTION, ("cpu", "cuda")),
    "sdpa-math": (SDPBackend.MATH, ("cpu",)),
    "sdpa-efficient": (SDPBackend.EFFICIENT_ATTENTION, ("cuda",)),
    "sdpa-cudnn": (SDPBackend.CUDNN_ATTENTION, ("cuda",)),
}


def _sdpa_providers(device: str) -> list[Provider]:
    providers = []
    for name, (backend, devices) in _SDPA_BACKENDS.items():
        if device in devices:
            providers.append(Provider(name, functools.partial(_bind_sdpa, backend)))
        elif name == "sdpa-math":
            # It materialises the S×S scores: at the 16k-token sweep that is a memory test, not
            # a baseline. It still computes the fp32 reference of the correctness gate.
            providers.append(Provider(name, None, "CPU baseline only (materialises the scores)"))
        else:
            providers.append(Provider(name, None, f"SDPA {backend.name} runs on CUDA only"))
    return providers


def _bind_sdpa(backend: SDPBackend, inputs: dict, shape: Shape) -> Callable[[], torch.Tensor]:
    y = inputs["y"]

    def run() -> torch.Tensor:
        # Timed: the sdpa_kernel context (microseconds) and transpose views in and out; no
        # .contiguous() copy, since the package's kernels read BSHD directly.
        q = y.transpose(1, 2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, q, q, is_causal=shape.causal).transpose(1, 2)

    return run


def _flash_attn_providers(device: str) -> list[Provider]:
    names = ("flash_attn_func", "flash_attn_qkvpacked")
    if device != "cuda":
        return [Provider(name, None, "flash-attn runs on CUDA only") for name in names]
    try:
        import flash_attn  # noqa: F401  (import check only; binds import the functions)
    except Exception as exc:  # ImportError, or a wheel built for another torch / CUDA
        reason = f"flash_attn not importable: {type(exc).__name__}: {exc}"
        return [Provider(name, None, reason) for name in names]
    return [Provider("flash_attn_func", _bind_flash_attn_func, dtypes=HALF_DTYPES),
            Provider("flash_attn_qkvpacked", _bind_flash_attn_qkvpacked, dtypes=HALF_DTYPES)]


def _bind_flash_attn_func(inputs: dict, shape: Shape) -> Callable[[], torch.Tensor]:
    from flash_attn import flash_attn_func

    y = inputs["y"]
    return lambda: flash_attn_func(y, y, y, causal=shape.causal)


def _bind_flash_attn_qkvpacked(inputs: dict, shape: Shape) -> Callable[[], torch.Tensor]:
    from flash_attn import flash_attn_qkvpacked_func

    y = inputs["y"]

    def run() -> torch.Tensor:
        # Timed: a stride-0 expand packs y as (B, S, 3, H, D) without copying; its backward
        # sums the packed dqkv into dy, which is this baseline's real cost.
        return flash_attn_qkvpacked_func(y.unsqueeze(2).expand(-1, -1, 3, -1, -1), causal=shape.causal)

    return run


def _flex_attention_provider(device: str) -> Provider:
    if device != "cuda":
        return Provider("flex_attention", None, "timed on CUDA only (on CPU it is a compile-time test)")
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:
        return Provider("flex_attention", None, f"FlexAttention not importable: {type(exc).__name__}: {exc}")
    return Provider("flex_attention", _bind_flex_attention)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # One compile per shape, dtype and grad mode: far more than dynamo's default recompile
    # limits, past which it would silently fall back to the slow eager path.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 1024)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


def _bind_flex_attention(inputs: dict, shape: Shape) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask

    y = inputs["y"]
    flex_attention = _compiled_flex_attention()
    # The block mask is per-shape setup, built once, as a model would.
    block_mask = (create_block_mask(_causal, None, None, shape.S, shape.S, device=y.device)
                  if shape.causal else None)

    def run() -> torch.Tensor:
        q = y.transpose(1, 2)
        return flex_attention(q, q, q, block_mask=block_mask).transpose(1, 2)

    return run
