"""`python -m bench.workcount`: executed work of the real Triton kernels, counted in the
interpreter, and the H100 roofline time it implies (modelled, not measured).

The Triton interpreter executes every ``tl.dot``, ``tl.load``, ``tl.store``, atomic and
``exp``/``exp2`` of a kernel through one builder object; this module wraps those builder methods
and counts

* matmul FLOPs: 2·M·N·K per ``tl.dot`` of an [M, K] by [K, N] tile, padding included (that is
  what the tensor cores execute);
* global-memory bytes: elements whose mask is true times their size, for loads, stores and
  atomics (bytes requested from memory, as if no cache served them: an upper bound on HBM
  traffic and the quantity the tiling decides);
* exponentials: elements passed to ``exp`` / ``exp2``.

Counts are per sequence and head (B = H = 1, fp16; work scales linearly in B·H), with the
production tile sizes (``--block-m/--block-n``), not the interpreter's small test tiles. The
modelled time is max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s) per direction (H100 SXM dense
bf16/fp16 peak and HBM3 bandwidth); launch overheads and latency are ignored.

FlashAttention-2's row models standard attention (separate Q, K, V) from its published
structure: forward, one program per 128-row query block reading all of K and V; backward, one
program per 128-column key block reading all of Q, dO, lse and delta, adding dQ with fp32
atomics (a read-modify-write per block pair), plus the delta preprocess and the dQ conversion.

LAMA (``lowrank_context_attention``) is counted per sequence (B = 1, fp16) for LAMAClassifier's
call: separate token keys u, a padding mask, head_norm="l2", token softmax, a loss on pooled
only. The Triton kernels are counted as above with the tiles the launcher picks on sm_90; the
host's [E, m]-sized reductions (dQ, dP, dc over the batch) are left out. The torch composite is
counted by an eager model (``EagerTraffic``): one GPU kernel per aten op that reads each tensor
argument once and writes each result once, views free, no caching and no fusion; matmul FLOPs
from the mm/bmm shapes; tanh as one exponential. The
"compulsory" row is the floor any implementation pays: h and u (and dpooled) read once, the
results written once. The FLOP term never binds for LAMA (about m/3 FLOP per byte).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass

H100_FLOPS = 989e12  # dense fp16/bf16 tensor-core peak, H100 SXM
H100_BYTES = 3.35e12  # HBM3 bandwidth, H100 SXM
FP16 = 2
FP32 = 4


@dataclass
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.exps + other.exps)

    def modelled_us(self) -> float:
        return 1e6 * max(self.flops / H100_FLOPS, self.bytes / H100_BYTES)


def _element_bytes(tl_type) -> int:
    scalar = getattr(tl_type, "element_ty", tl_type)
    scalar = getattr(scalar, "element_ty", scalar)  # pointer -> pointee
    return max(1, scalar.primitive_bitwidth // 8)


@contextlib.contextmanager
def counting():
    """Count the work of every kernel the interpreter runs inside the block."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    work = Work()
    originals = {name: getattr(builder, name) for name in (
        "create_dot", "create_masked_load", "create_masked_store", "create_exp", "create_exp2", "create_atomic_rmw",
        "create_atomic_cas")}

    def dot(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        work.flops += 2.0 * m * k * b.data.shape[-1]
        return originals["create_dot"](self, a, b, d, *args)

    def load(self, ptrs, mask, other, *args):
        work.bytes += float(np.count_nonzero(mask.data)) * _element_bytes(ptrs.get_element_ty())
        return originals["create_masked_load"](self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        work.bytes += float(np.count_nonzero(mask.data)) * _element_bytes(ptrs.get_element_ty())
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    def exp(name):
        def counted(self, arg):
            work.exps += float(np.size(arg.data))
            return originals[name](self, arg)
        return counted

    def atomic(name):
        def counted(self, *args):
            ptr, mask = args[1], args[3]  # (op|ptr, ptr|cmp, val, mask, ...): bytes read + written
            live = np.count_nonzero(mask.data) if name == "create_atomic_rmw" else np.size(ptr.data)
            work.bytes += 2.0 * float(live) * _element_bytes(ptr.get_element_ty())
            return originals[name](self, *args)
        return counted

    patches = {
        "create_dot": dot, "create_masked_load": load, "create_masked_store": store,
        "create_exp": exp("create_exp"), "create_exp2": exp("create_exp2"),
        "create_atomic_rmw": atomic("create_atomic_rmw"), "create_atomic_cas": atomic("create_atomic_cas"),
    }
    for name, fn in patches.items():
        setattr(builder, name, fn)
    try:
        yield work
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)


def fa2_forward(seqlen: int, head_dim: int, block_m: int = 128) -> Work:
    n_query_blocks = math.ceil(seqlen / block_m)
    tile_bytes = FP16 * seqlen * head_dim
    return Work(
        flops=4.0 * seqlen * seqlen * head_dim,
        bytes=tile_bytes + n_query_blocks * 2 * tile_bytes + tile_bytes + FP32 * seqlen,  # Q, K+V per block, O, lse
        exps=float(seqlen * seqlen),
    )


def fa2_backward(seqlen: int, head_dim: int, block_n: int = 128) -> Work:
    n_key_blocks = math.ceil(seqlen / block_n)
    tile_bytes = FP16 * seqlen * head_dim
    preprocess = 2 * tile_bytes + FP32 * seqlen  # read O, dO; write delta
    main = (
        2 * tile_bytes  # K, V
        + n_key_blocks * (2 * tile_bytes + 2 * FP32 * seqlen)  # Q, dO, lse, delta per key block
        + n_key_blocks * 2 * FP32 * seqlen * head_dim  # dQ fp32 atomic read-modify-write
        + 2 * tile_bytes  # dK, dV
    )
    convert = FP32 * seqlen * head_dim + tile_bytes  # dQ accumulator -> fp16
    return Work(flops=10.0 * seqlen * seqlen * head_dim, bytes=preprocess + main + convert,
                exps=float(seqlen * seqlen))


def count_kernels(seqlen: int, head_dim: int, shared: bool, deterministic: bool, block_m: int, block_n: int):
    """Work of our forward and backward at one shape (B = H = 1, fp16)."""
    import torch

    from symattn_kernels.triton import attention_bwd, attention_fwd

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seqlen, 1, head_dim, generator=gen).half()
    v = None if shared else torch.randn(1, seqlen, 1, head_dim, generator=gen).half()
    options = dict(coef=None, key_padding_mask=None, cu_seqlens=None, seed=None, scale=head_dim**-0.5, causal=False,
                   dropout_p=0.0, exclude_self=False, max_seqlen=seqlen, deterministic=deterministic)
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    saved = attention_fwd.INTERPRET_FWD_CONFIG, attention_bwd.INTERPRET_BWD_CONFIG
    attention_fwd.INTERPRET_FWD_CONFIG, attention_bwd.INTERPRET_BWD_CONFIG = blocks, blocks
    try:
        with counting() as fwd:
            out, lse = attention_fwd.attention_forward(q, v, **options)
        dq = torch.empty_like(q)
        dv = None if v is None else torch.empty_like(v)
        with counting() as bwd:
            attention_bwd.attention_backward(
                torch.randn_like(out), None, q, v, None, None, None, None, out, lse, dq, dv, None,
                options["scale"], False, 0.0, False, seqlen, deterministic)
    finally:
        attention_fwd.INTERPRET_FWD_CONFIG, attention_bwd.INTERPRET_BWD_CONFIG = saved
    return fwd, bwd


class EagerTraffic:
    """Work of eager PyTorch as one kernel per aten op (module docstring), counted while active."""

    _MATMULS = ("mm", "bmm", "addmm", "addmm_", "baddbmm", "baddbmm_")
    _EXPONENTIALS = ("exp", "exp_", "tanh", "tanh_")
    _FREE = ("empty", "empty_like", "empty_strided", "detach", "lift_fresh")
    _WRITE_ONLY_SELF = ("copy_", "zero_", "fill_")  # in-place ops that do not read self

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter.add(func, args, kwargs or {}, out)
                return out

        self.work = Work()
        self._mode = _Mode()

    def __enter__(self) -> Work:
        self._mode.__enter__()
        return self.work

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    @staticmethod
    def _bytes(t) -> float:
        # Each distinct element once: a broadcast (stride-0) dimension is read once.
        unique = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
        return float(unique * t.element_size())

    def add(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils import _pytree as pytree

        name = func.overloadpacket.__name__
        if func.is_view or name in self._FREE:
            return

        def tensors(tree):
            return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]

        read = tensors(args[1:] if name in self._WRITE_ONLY_SELF else args)
        read += tensors({key: value for key, value in kwargs.items() if key != "out"})
        self.work.bytes += sum(self._bytes(t) for t in read + tensors(out))
        if name in self._MATMULS:
            a, b = args[-2:]
            self.work.flops += 2.0 * a.numel() * b.shape[-1]
        elif name in self._EXPONENTIALS:
            self.work.exps += float(sum(t.numel() for t in tensors(out)))


def lama_inputs(seqlen: int, dim: int, heads: int):
    """One sequence of LAMAClassifier's call in fp16: (h, context, p, q, u, mask, dpooled)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    h, u = (torch.randn(1, seqlen, dim, generator=gen).half() for _ in range(2))
    context = torch.randn(dim, generator=gen).half()
    p, q = ((torch.randn(dim, heads, generator=gen) * dim**-0.5).half() for _ in range(2))
    mask = torch.ones(1, seqlen, dtype=torch.bool)
    return h, context, p, q, u, mask, torch.randn(1, heads, dim, generator=gen).half()


def count_lama(module, seqlen: int, dim: int, heads: int, counter) -> tuple[Work, Work]:
    """Work of a LAMA backend module's forward and backward at one shape, counted by `counter`."""
    import torch

    h, context, p, q, u, mask, dpooled = lama_inputs(seqlen, dim, heads)
    with counter() as fwd:
        module.lowrank_forward(h, context, p, q, u, mask, "l2", True, 1e-12)
    grads = [torch.empty_like(t) for t in (h, context, p, q, u)]
    with counter() as bwd:
        module.lowrank_backward(dpooled, None, h, context, p, q, u, mask, "l2", True, 1e-12, *grads)
    return fwd, bwd


def count_lama_triton(seqlen: int, dim: int, heads: int) -> tuple[Work, Work]:
    """The Triton LAMA kernels with the tiles the launcher picks on sm_90 (not the test tiles)."""
    from symattn_kernels.triton import lowrank

    saved, lowrank.INTERPRET_CONFIG = lowrank.INTERPRET_CONFIG, {}
    try:
        return count_lama(lowrank, seqlen, dim, heads, counting)
    finally:
        lowrank.INTERPRET_CONFIG = saved


def lama_compulsory(seqlen: int, dim: int, heads: int) -> tuple[Work, Work]:
    """Floor of any LAMA implementation (fp16): inputs read once, results written once."""
    tokens = FP16 * seqlen * dim  # one of h, u, dh, du
    factors = FP16 * 3 * dim * heads  # context, p, q (and their gradients)
    token_flops, gate_flops = 4.0 * seqlen * dim * heads, 2.0 * dim * heads  # U Q and attn H; g = P^T c
    fwd = Work(token_flops + gate_flops, 2 * tokens + seqlen + factors + FP16 * heads * (dim + seqlen),
               2.0 * seqlen * heads)
    bwd = Work(2 * (token_flops + gate_flops), 4 * tokens + seqlen + 2 * factors + FP16 * heads * dim,
               2.0 * seqlen * heads)
    return fwd, bwd


LAMA_HEADER = (
    "| LAMA path | T | E | m | fwd MFLOP | bwd MFLOP | fwd kB | bwd kB | fwd kexp | bwd kexp | fwd µs (model) "
    "| fwd+bwd µs (model) | vs composite |\n" + "|---" * 13 + "|"
)


def _lama_row(label, seqlen, dim, heads, fwd: Work, bwd: Work, composite_total: Work) -> str:
    total = fwd + bwd
    cells = [label, str(seqlen), str(dim), str(heads), f"{fwd.flops / 1e6:.1f}", f"{bwd.flops / 1e6:.1f}",
             f"{fwd.bytes / 1e3:.0f}", f"{bwd.bytes / 1e3:.0f}", f"{fwd.exps / 1e3:.1f}", f"{bwd.exps / 1e3:.1f}",
             f"{fwd.modelled_us():.3f}", f"{total.modelled_us():.3f}",
             f"{total.modelled_us() / composite_total.modelled_us():.2f}"]
    return "| " + " | ".join(cells) + " |"


def lama_report(seqlens, dim: int, heads: int) -> str:
    """The LAMA table: the Triton kernels, the torch composite and the floor, per sequence length."""
    from symattn_kernels.backends import torch as torch_backend

    lines = []
    for seqlen in seqlens:
        composite_work = count_lama(torch_backend, seqlen, dim, heads, EagerTraffic)
        rows = [("triton kernels (MODELLED)", count_lama_triton(seqlen, dim, heads)),
                ("torch composite, eager (MODELLED)", composite_work),
                ("compulsory", lama_compulsory(seqlen, dim, heads))]
        lines += [_lama_row(label, seqlen, dim, heads, *work, composite_work[0] + composite_work[1])
                  for label, work in rows]
    return "\n".join([LAMA_HEADER, *lines])


def _row(label, seqlen, head_dim, fwd: Work, bwd: Work, fa_fwd: Work, fa_bwd: Work) -> str:
    total, fa_total = fwd + bwd, fa_fwd + fa_bwd
    cells = [
        label, str(seqlen), str(head_dim),
        f"{fwd.flops / 1e6:.1f}", f"{bwd.flops / 1e6:.1f}", f"{bwd.flops / (10 * seqlen**2 * head_dim):.2f}",
        f"{fwd.bytes / 1e3:.0f}", f"{bwd.bytes / 1e3:.0f}", f"{fwd.exps / 1e3:.0f}", f"{bwd.exps / 1e3:.0f}",
        f"{fwd.modelled_us():.3f}", f"{total.modelled_us():.3f}",
        f"{fa_fwd.modelled_us():.3f}", f"{fa_total.modelled_us():.3f}",
        f"{total.modelled_us() / fa_total.modelled_us():.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| kernel path | S | D | fwd MFLOP | bwd MFLOP | bwd / 10·S²·D | fwd kB | bwd kB | fwd kexp | bwd kexp "
    "| fwd µs (model) | fwd+bwd µs (model) | FA2 fwd µs (model) | FA2 fwd+bwd µs (model) | vs FA2 |\n"
    + "|---" * 15 + "|"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workcount", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--ops", nargs="+", choices=["attention", "lama"], default=["attention", "lama"])
    parser.add_argument("--lama-seqlens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--lama-dim", type=int, default=256, help="E (default: the benchmark's 256)")
    parser.add_argument("--lama-heads", type=int, default=8, help="m (default 8)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is imported: re-run this module with it.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bench.workcount", *(argv or sys.argv[1:])])
    from symattn_kernels import backends

    if not backends.status("triton").usable:
        print(f"triton backend unusable: {backends.status('triton').reason}", file=sys.stderr)
        return 1
    if "attention" in args.ops:
        attention_report(args)
    if "lama" in args.ops:
        print(f"\nLAMA, executed work per sequence (B = 1, fp16, E = {args.lama_dim}, m = {args.lama_heads}); "
              "times are H100 roofline models (MODELLED), not measurements.\n")
        print(lama_report(args.lama_seqlens, args.lama_dim, args.lama_heads))
    return 0


def attention_report(args) -> None:
    """The attention tables: our kernels' counts against FlashAttention-2's model."""
    from tqdm import tqdm

    paths = [("shared (v = y)", True, True), ("separate v", False, True),
             ("shared, symmetric bwd (deterministic=False)", True, False)]
    lines, counted = [], {}
    cases = [(s, d, p) for s in args.seqlens for d in args.head_dims for p in paths]
    for seqlen, head_dim, (label, shared, deterministic) in tqdm(cases, desc="workcount", file=sys.stderr):
        fwd, bwd = count_kernels(seqlen, head_dim, shared, deterministic, args.block_m, args.block_n)
        counted[seqlen, head_dim, label] = fwd, bwd
        lines.append(_row(label, seqlen, head_dim, fwd, bwd, fa2_forward(seqlen, head_dim),
                          fa2_backward(seqlen, head_dim)))
    ratios = []
    for seqlen in args.seqlens:
        for head_dim in args.head_dims:
            (sf, sb), (vf, vb) = counted[seqlen, head_dim, paths[0][0]], counted[seqlen, head_dim, paths[1][0]]
            ratios.append(f"| {seqlen} | {head_dim} | {sf.bytes / vf.bytes:.2f} | {sb.bytes / vb.bytes:.2f} "
                          f"| {(sf.bytes + sb.bytes) / (vf.bytes + vb.bytes):.2f} |")
    print(f"Executed work per sequence and head (B = H = 1, fp16, tiles {args.block_m}x{args.block_n}); "
          "times are H100 roofline models, not measurements.\n")
    print(HEADER)
    print("\n".join(lines))
    print("\nGlobal-memory bytes, shared mode / separate-v mode (same kernels, same tiles):\n")
    print("| S | D | fwd | bwd | fwd+bwd |\n|---|---|---|---|---|")
    print("\n".join(ratios))


if __name__ == "__main__":
    sys.exit(main())
