"""Argument checks shared by the public functions: each raises TypeError or ValueError naming
the argument and what was expected, before anything reaches a custom op or a kernel."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import compiler_wrappers

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def tensor(name: str, x, *, dims: Sequence[str], dtypes=FLOAT_DTYPES) -> Tensor:
    """Check that ``x`` is a tensor with ``len(dims)`` dimensions and an allowed dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{', '.join(dims)}], got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != len(dims):
        raise ValueError(f"{name} must have shape [{', '.join(dims)}] ({len(dims)} dims), got {tuple(x.shape)}")
    return x


def same_device(name: str, x: Optional[Tensor], ref_name: str, ref: Tensor) -> None:
    if x is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put both on one device")


def shape(name: str, x: Tensor, expected: tuple, labels: str, sizes_from: str = "") -> None:
    """``sizes_from`` says where ``expected`` came from, since that argument may be the odd one out."""
    if tuple(x.shape) != tuple(expected):
        origin = f" (sizes from {sizes_from})" if sizes_from else ""
        raise ValueError(f"{name} must have shape [{labels}] = {tuple(expected)}{origin}, got {tuple(x.shape)}")


def head_dim(name: str, dim: int) -> None:
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} has head dim {dim}; supported head dims are 1..{MAX_HEAD_DIM}")


def token_mask(name: str, mask: Optional[Tensor], expected: tuple, labels: str, ref: Tensor) -> Optional[Tensor]:
    """``mask`` checked as a bool ``[labels]`` mask (True = real token) and returned; an integer
    mask (a tokenizer's int64 ``attention_mask``) is read as ``mask != 0`` first, as the modules
    and Hugging Face read it."""
    if isinstance(mask, Tensor) and not (mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool):
        mask = mask != 0
    bool_mask(name, mask, expected, labels, ref)
    return mask


def bool_mask(name: str, mask: Optional[Tensor], expected: tuple, labels: str, ref: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape [{labels}] (True = real token), got {got}")
    shape(name, mask, expected, labels)
    same_device(name, mask, "the inputs", ref)


def coef(x: Optional[Tensor], num_heads: int, dim: int, ref: Tensor) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"coef must be a floating-point tensor of shape [H, D] or [H, D, D], got {got}")
    if tuple(x.shape) not in ((num_heads, dim), (num_heads, dim, dim)):
        raise ValueError(
            f"coef must have shape [H, D] = {(num_heads, dim)} (diagonal) or [H, D, D] = {(num_heads, dim, dim)} "
            f"(full), got {tuple(x.shape)}"
        )
    same_device("coef", x, "q", ref)


def positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def not_vmapped(name: str, x: Tensor, read_for: str, instead: str) -> None:
    """Refuse a tensor that torch.func.vmap batches where its values pick the kernels' arguments
    (read by value: torch's own .item() error inside vmap names none of this)."""
    if torch._C._functorch.is_batchedtensor(x):
        raise ValueError(f"{name} is read by value to {read_for} and cannot be vmapped: vmap over q / v with {instead}")


def choice(name: str, value, allowed: tuple):
    """One of a few named options (``head_norm``...)."""
    if value not in allowed:
        raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    """A bool option; ``"False"`` or a tensor must not pass for one by truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def options(scale: Optional[float], dropout_p: float, head_dim_q: int, dtype: torch.dtype = torch.float32) -> float:
    """Check scale and dropout_p; return the scale to use. ``dtype`` is the inputs' dtype: the
    scale (times log2(e), as the kernels fold it into exp2) must be finite in the dtype the
    scores are computed in (float32, or float64 for float64 inputs)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        return head_dim_q**-0.5
    # A SymFloat is what torch.compile makes of a scale that changes between calls: the checks
    # below are comparisons, which trace (math.isfinite does not).
    if not isinstance(scale, (int, float, torch.SymFloat)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    value = _as_float(scale)
    if not -math.inf < value < math.inf:  # also False for NaN
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if abs(value) * _LOG2E > torch.finfo(compute).max:
        raise ValueError(f"scale = {scale!r} overflows {str(compute).replace('torch.', '')}, the dtype the scores "
                         f"are computed in; it must be at most {torch.finfo(compute).max / _LOG2E:.3g} in magnitude")
    return value


def _as_float(x) -> float:
    try:
        return float(x)
    except OverflowError:  # an int beyond float's range
        return math.inf


_LOG2E = 1.4426950408889634  # log2(e): the kernels compute exp(x) as exp2(x * log2(e))


def values(v: Optional[Tensor], q: Tensor, leading: tuple, labels: Sequence[str]) -> None:
    """Check v against q: same leading dims (batch/seqlen/heads), dtype and device."""
    if v is None:
        return
    tensor("v", v, dims=(*labels, "Dv"))
    if tuple(v.shape[:-1]) != leading:
        names = ", ".join(labels)
        raise ValueError(f"v must have shape [{names}, Dv] with [{names}] = {leading} as in q, got {tuple(v.shape)}")
    if v.dtype != q.dtype:
        raise TypeError(f"v has dtype {v.dtype} but q has {q.dtype}; they must match")
    same_device("v", v, "q", q)
    head_dim("v", v.shape[-1])


def _refuse_traced_forward_mode(function: str) -> None:
    raise NotImplementedError(
        f"{function} has no forward-mode derivative (torch.func.jvp / jacfwd, torch.autograd.forward_ad), "
        "compiled or not: differentiate in reverse mode, with backward() or torch.autograd.grad"
    )


# Runs outside the trace: an exception raised in traced code makes dynamo rerun the call eagerly,
# where the inputs no longer show their tangents.
compiler_wrappers.defer("refuse_traced_forward_mode", lambda: torch.compiler.disable(_refuse_traced_forward_mode))


def reverse_mode_only(function: str, *tensors: Optional[Tensor]) -> None:
    """Refuse the differentiation modes the ops do not have. Their derivatives are reverse-mode
    rules for torch.autograd (``backward()``, ``torch.autograd.grad``, checkpointing, compile):
    under forward mode (dual tensors of ``torch.autograd.forward_ad``, ``torch.func.jvp`` /
    ``jacfwd``) a custom op's outputs would silently carry zero tangents, and ``torch.func.grad`` /
    ``vjp`` / ``jacrev`` cannot run the rule (an internal error). ``torch.func.vmap`` of the
    forward works and passes."""
    if torch.compiler.is_compiling():
        # Traced calls differentiate in reverse mode through the compiled graph's autograd. Dual
        # tensors and functorch's stack are not visible while tracing, but the forward-mode level
        # that forward_ad.dual_level and torch.func.jvp open is.
        if forward_ad._current_level >= 0:
            compiler_wrappers.refuse_traced_forward_mode(function)
        return
    transforms = {layer.key() for layer in torch._C._functorch.get_interpreter_stack() or ()}
    if torch._C._functorch.TransformType.Jvp in transforms or _dual(tensors):
        raise NotImplementedError(
            f"{function} has no forward-mode derivative (torch.func.jvp / jacfwd, torch.autograd.forward_ad): "
            "differentiate in reverse mode, with backward() or torch.autograd.grad"
        )
    if torch._C._functorch.TransformType.Grad in transforms:
        raise NotImplementedError(
            f"{function} differentiates through torch.autograd only, not torch.func.grad / vjp / jacrev: "
            "use backward() or torch.autograd.grad (torch.func.vmap of the forward works)"
        )


def _dual(tensors) -> bool:
    """Whether an input carries a tangent of an open torch.autograd.forward_ad level."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
