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
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is imported: re-run this module with it.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bench.workcount", *(argv or sys.argv[1:])])
    from tqdm import tqdm

    from symattn_kernels import backends

    paths = [("shared (v = y)", True, True), ("separate v", False, True),
             ("shared, symmetric bwd (deterministic=False)", True, False)]
    if not backends.status("triton").usable:
        print(f"triton backend unusable: {backends.status('triton').reason}", file=sys.stderr)
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
