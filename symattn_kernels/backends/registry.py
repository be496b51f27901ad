"""Which backends exist, whether each is usable here, and which one ``backend="auto"`` picks.

The backend modules sit beside this one (``backends/__init__.py`` lists them); ``load`` imports
them on first use. Nothing here computes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

from .. import compiler_wrappers, extensions

BACKENDS = ("triton", "cuda", "cpu", "torch")

# What "auto" tries, in order, for each device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reason: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class AttentionCase:
    """What a backend's attention limits depend on beyond device and dtype: the head dims of
    ``q`` and ``v`` (``q``'s again in shared mode) and whether the call will need gradients.
    ``resolve(..., case=...)`` routes ``auto`` around a backend that cannot run it."""
    head_dim: int
    head_dim_v: int
    needs_grad: bool = True

    @property
    def sizes(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim_v


@dataclass(frozen=True)
class LowrankCase:
    """The same for LAMA: E (the width of h), m (the number of heads) and whether the call will
    need gradients."""
    dim: int
    heads: int
    needs_grad: bool = True

    @property
    def sizes(self) -> tuple[int, int]:
        return self.dim, self.heads


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_status() -> BackendStatus:
    interpreting = triton_interpreting()
    devices = ("cuda", "cpu") if interpreting else ("cuda",)
    try:
        importlib.import_module("..triton", __package__)  # raises when triton is missing or too old
    except ImportError as err:
        return BackendStatus("triton", False, f"{err} (`pip install 'triton>=3.2'`)", devices)
    features = importlib.import_module("..triton.features", __package__).describe()
    if not interpreting and not torch.cuda.is_available():
        return BackendStatus(
            "triton", False,
            f"no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors); {features}", devices
        )
    note = "interpreter (TRITON_INTERPRET=1): CPU tensors, slow" if interpreting else "CUDA"
    return BackendStatus("triton", True, f"{note}; {features}", devices)


def _extension_status(name: str, device: str, build: bool) -> BackendStatus:
    """The compiled backend ``name``: prebuilt, just in time (compiled here when ``build``) or
    absent (extensions.py)."""
    ext = extensions.load(name) if build else extensions.state(name)
    if ext.how == extensions.ABSENT:
        return BackendStatus(name, False, ext.detail, (device,))
    if device == "cuda" and not torch.cuda.is_available():
        return BackendStatus(name, False, f"{ext.detail}, but no CUDA device is visible", (device,))
    if name == "cpu" and ext.loaded:
        return BackendStatus(name, True, f"{ext.detail}; kernel set {torch.ops.symattn.cpu_kernel_isa()}", (device,))
    return BackendStatus(name, True, ext.detail, (device,))


def _probe(name: str, build: bool = True) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, "composite PyTorch, always available", ("cpu", "cuda"))
    if name == "triton":
        return _triton_status()
    return _extension_status(name, name, build)


_STATUS_CACHE: dict = {}


def status(name: str) -> BackendStatus:
    """Availability of backend ``name``, probed once per interpreter setting. The first probe of
    a compiled backend loads its extension, compiling it just in time where that is the way."""
    if torch.compiler.is_compiling():
        # A constant to the trace: reading the cache would guard on its contents, which the first
        # call then fills, so every fresh process compiled its second call again. The probe
        # imports modules and may compile an extension: it runs at trace time, so that a compiled
        # call may be a process's first call.
        return compiler_wrappers.traced_status(name, triton_interpreting())
    return _cached_status(name, triton_interpreting())


def _cached_status(name: str, interpreting: bool) -> BackendStatus:
    key = (name, interpreting)
    if key not in _STATUS_CACHE:
        _STATUS_CACHE[key] = _probe(name)
    return _STATUS_CACHE[key]


compiler_wrappers.defer("traced_status", lambda: torch.compiler.assume_constant_result(_cached_status))


def peek(name: str) -> BackendStatus:
    """``status(name)`` without compiling anything: what ``info()`` reports."""
    return _STATUS_CACHE.get((name, triton_interpreting())) or _probe(name, build=False)


_CUDA_ARCH: dict = {}


def _cuda_arch(device: torch.device) -> int:
    """80 or 90: the row of the Triton config tables a CUDA device uses (cached per device)."""
    if device not in _CUDA_ARCH:
        _CUDA_ARCH[device] = importlib.import_module("..triton.attention_common", __package__).device_arch(device)
    return _CUDA_ARCH[device]


def _unsupported(name: str, op: str, dtype: torch.dtype, device=None, case=None) -> str:
    """Why backend ``name`` cannot run ``op`` on these inputs ("" when it can)."""
    if dtype == torch.float64 and op not in _FLOAT64_OPS.get(name, ()):
        able = [other for other in BACKENDS if op in _FLOAT64_OPS.get(other, ())]
        return f"float64 inputs run on backend={' or '.join(map(repr, able))} only"
    if (name, op) in _HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        return f"backend={name!r} takes float16 or bfloat16 inputs, got {dtype}; use backend='triton' or 'torch'"
    if op not in _OPS[name]:
        return f"backend={name!r} has no {op} kernel yet; backend='torch' has"
    limits = _BACKWARD_LIMITS.get((name, op))
    if limits and case is not None and case.needs_grad and device is not None and device.type == "cuda":
        return importlib.import_module(limits, __package__).backward_unsupported(*case.sizes, _cuda_arch(device))
    return ""


def _op_status(name: str, op: str) -> BackendStatus:
    """status(name), except that an op the backend runs in plain PyTorch needs no extension."""
    st = status(name)
    if not st.usable and op in _WITHOUT_EXTENSION.get(name, ("", ()))[1]:
        return BackendStatus(name, True, f"{op} in plain PyTorch (its extension is not needed)", st.devices)
    return st


def check_name(backend: str) -> str:
    """``backend`` names a backend or ``"auto"`` (whether it can run here is ``resolve``'s question)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str = "attention",
            case: AttentionCase | LowrankCase | None = None) -> str:
    """Turn the user's ``backend`` argument into a backend that can run ``op`` on these inputs.

    ``auto`` (or ``SYMATTN_BACKEND``) takes the first usable backend of the device's preference
    order that supports the op, dtype and ``case`` (sizes and gradients: ``AttentionCase``,
    ``LowrankCase``); an explicit name that cannot raises ValueError/TypeError naming why.
    """
    if backend == "auto":
        backend = os.environ.get("SYMATTN_BACKEND", "auto") or "auto"
        if backend not in BACKENDS and backend != "auto":
            raise ValueError(f"the environment variable SYMATTN_BACKEND must be one of 'auto', "
                             f"{', '.join(map(repr, BACKENDS))} (or unset); got {backend!r}")
        if backend == "auto":
            order = _AUTO_ORDER.get(device.type, ("torch",))
            return next(
                name for name in order
                if _op_status(name, op).usable and device.type in status(name).devices
                and not _unsupported(name, op, dtype, device, case)
            )
        # The caller asked for auto: an error must say where the backend came from.
        source = f" (backend='auto' read backend={backend!r} from the environment variable SYMATTN_BACKEND)"
    else:
        source = ""
    check_name(backend)
    st = _op_status(backend, op)
    if not st.usable:
        raise ValueError(f"backend={backend!r} is not available here: {st.reason}{source}")
    if device.type not in st.devices:
        raise ValueError(
            f"backend={backend!r} runs on {' or '.join(st.devices)} tensors, but the inputs are on "
            f"{device.type}{source}"
        )
    reason = _unsupported(backend, op, dtype, device, case)
    if reason:
        wrong_dtype = dtype == torch.float64 or (backend, op) in _HALF_ONLY
        raise (TypeError if wrong_dtype else ValueError)(reason + source)
    return backend


def load(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use); where its extension is
    missing, the module of the ops it runs without one (resolve() routes only those there)."""
    if name in _WITHOUT_EXTENSION and not status(name).usable:
        return importlib.import_module(_WITHOUT_EXTENSION[name][0], __package__)
    return importlib.import_module(_MODULES[name], __package__)


# Which ops each backend module implements (as ``<op>_forward`` / ``<op>_backward``). A table,
# not a hasattr on the module, so that resolve() stays traceable by torch.compile.
_OPS = {
    "torch": ("attention", "lowrank"),
    "triton": ("attention", "lowrank"),
    "cpu": ("attention", "lowrank"),
    "cuda": ("attention",),
}

# Modules whose backward_unsupported(size, size, arch) names the shapes a backend's backward
# has no spill-free kernel for (``AttentionCase`` / ``LowrankCase`` give the sizes).
_BACKWARD_LIMITS = {
    ("triton", "attention"): "..triton.attention_bwd",
    ("triton", "lowrank"): "..triton.lowrank",
}

# Heads of up to this many tokens take the CPU kernels' whole-head schedules (csrc/cpu/attention_tiling.h
# kWholeHead; tests/test_cpu_backend.py reads it there).
CPU_WHOLE_HEAD_TOKENS = 512


def keeps_output_residual(backend: str, q: torch.Tensor, coef: Optional[torch.Tensor], dropout_p: float,
                          max_seqlen: int) -> bool:
    """Whether ``backend``'s attention forward keeps the output's rounding residual for its
    backward (``ops.attention_fwd``'s third result): the CPU kernels', with no coefficient, for
    fp16, and for bf16 with dropout. There the backward of heads over 512 tokens (the tiled one)
    takes delta = O . dO from the output, and G = P (dP - delta) magnifies O's rounding in a
    nearly saturated row: fp16 dq came out 94 ulps off (0.03 on the torch backend, 5.9 here at
    S = 600) and, where dropout scales a saturated row's O = v_i / (1 - p) off the bf16 grid, bf16
    dq several times its true size (S = 513, D = 254: 6.6x). (bf16 without dropout rounds P
    itself for its products, which the residual would not undo: its error stays within
    flash-attn's rule.) Heads of up to CPU_WHOLE_HEAD_TOKENS and coefficient heads take delta
    from the fp32 P . dP of the whole row: calls whose heads all fit (max_seqlen, the padded S or
    the varlen bound) keep none, which would cost their forward up to 14 % (bf16, (32, 128)).
    A table fact, so that fake tensors need no extension.

    The bound is read last, and only for the dtypes that may keep a residual: under
    ``torch.compile`` / ``torch.export`` reading it guards on it (a symbolic S then stayed at most
    512 for every fp32 call), and a bound known only when the graph runs (a varlen max_seqlen
    read from the offsets) cannot be read at all. Then the op's fake and its kernel could not
    agree on the residual's shape, so that case raises instead."""
    if backend != "cpu" or coef is not None:
        return False
    if not (q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and dropout_p > 0.0)):
        return False
    if isinstance(max_seqlen, torch.SymInt) and free_unbacked_symbols(max_seqlen):
        if statically_known_true(max_seqlen <= CPU_WHOLE_HEAD_TOKENS):
            return False
        raise ValueError(
            f"backend='cpu' runs {q.dtype} attention{' with dropout' if dropout_p > 0.0 else ''} differently "
            f"for heads over {CPU_WHOLE_HEAD_TOKENS} tokens and must know max_seqlen when the graph is traced: "
            "pass a Python int (an upper bound is enough) instead of one read from cu_seqlens in the graph, "
            "or use backend='torch'"
        )
    return max_seqlen > CPU_WHOLE_HEAD_TOKENS


# Ops that take float16 and bfloat16 inputs only (the CUDA C++ kernels: fp32 is not down-cast), so
# that auto passes them by for fp32 and an explicit choice raises before any work.
_HALF_ONLY = {("cuda", "attention")}

# Ops each backend runs on float64 inputs.
_FLOAT64_OPS = {
    "torch": ("attention", "lowrank"),
    "cpu": ("lowrank",),
}

# Ops a compiled backend implements in plain PyTorch, and the module holding them: they run even
# where the extension is not built.
_WITHOUT_EXTENSION = {
    "cpu": (".cpu_lowrank", ("lowrank",)),
}

_MODULES = {
    "torch": ".torch",
    "triton": ".triton",
    "cpu": ".cpu",
    "cuda": ".cuda",
}
