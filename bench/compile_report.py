"""Static compile report of the Triton attention kernels, without a GPU (SPEC section 6.2).

`python -m bench.compile_report` compiles every shipped kernel config (the forward's autotune
configs after its shape pruning, the backward's blocks and warps/stages) for a set of kernel
variants, for sm_80 and sm_90, with ``triton.compile(ASTSource(...), target=GPUTarget(...))``.
For each it reads registers, shared memory, stack and local bytes from Triton's bundled
``cuobjdump --dump-resource-usage`` (ptxas puts spilled registers in the stack frame, so
STACK:0 LOCAL:0 means no spill) and on sm_90 whether the SASS uses HGMMA. It prints one markdown
row per compile and exits non-zero when any compile fails, spills, needs more shared memory than
the architecture offers, or lacks HGMMA on sm_90.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCHS = (80, 90)
# Largest dynamic shared memory one block may opt in to (CUDA programming guide, compute
# capabilities table): 163 KiB on sm_80, 227 KiB on sm_90.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Variants compiled for every shipped config: the shared-weight inference path, shared-weight
# training (diagonal coefficient, dropout, padding), and every flag at once (pairwise attention
# with a full coefficient and separate values, varlen, dropout, exclude_self).
HEAD_DIMS = ((32, 32), (64, 64), (128, 128), (256, 256), (64, 128))
_BASE = dict(SHARED_V=True, COEF_MODE=0, IS_CAUSAL=True, HAS_KPM=False, IS_VARLEN=False, HAS_DROPOUT=False,
             EXCLUDE_SELF=False)
FLAG_SETS = {
    "shared": _BASE,
    "shared-train": dict(_BASE, COEF_MODE=1, IS_CAUSAL=False, HAS_KPM=True, HAS_DROPOUT=True),
    "all-flags": dict(SHARED_V=False, COEF_MODE=2, IS_CAUSAL=True, HAS_KPM=True, IS_VARLEN=True, HAS_DROPOUT=True,
                      EXCLUDE_SELF=True),
}
_PTR_TYPES = {"Coef": "*fp32", "Kpm": "*u8", "CuSeqlens": "*i32", "Lse": "*fp32", "Delta": "*fp32",
              "DCoefPartial": "*fp32", "DLse": "*fp32"}


@dataclass
class Job:
    kernel: str  # fwd | bwd
    arch: int
    dtype: str  # fp16 | bf16
    flags: str
    head_dim: int
    head_dim_v: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return (f"{self.kernel} sm_{self.arch} {self.dtype} {self.flags} D{self.head_dim}/{self.head_dim_v} "
                f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def jobs(dtypes=("bf16",)) -> list[Job]:
    """Every (kernel, arch, variant, shipped config) to compile."""
    from symattn_kernels.triton._utils import padded_head_dim
    from symattn_kernels.triton.attention_bwd import bwd_config, bwd_fuse_roles
    from symattn_kernels.triton.attention_fwd import fwd_configs_for

    out = []
    for arch, dtype, (flags, fl), (d, dv) in itertools.product(ARCHS, dtypes, FLAG_SETS.items(), HEAD_DIMS):
        if fl["SHARED_V"] and d != dv:
            continue
        d_pad, dv_pad = padded_head_dim(d), padded_head_dim(dv)
        for block_m, block_n, warps, stages in fwd_configs_for(1 << 16, d_pad, dv_pad, fl["HAS_DROPOUT"]):
            out.append(Job("fwd", arch, dtype, flags, d_pad, dv_pad, block_m, block_n, warps, stages))
        fuse = bwd_fuse_roles(d_pad, dv_pad, fl["SHARED_V"], fl["COEF_MODE"], fl["HAS_DROPOUT"])
        out.append(Job("bwd", arch, dtype, flags, d_pad, dv_pad, *bwd_config(d_pad, dv_pad, fuse)))
    return out


def compile_job(job: Job) -> Job:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from symattn_kernels.triton.attention_bwd import _symattn_bwd_kernel, bwd_fuse_roles
    from symattn_kernels.triton.attention_fwd import _symattn_fwd_kernel

    fn = _symattn_fwd_kernel if job.kernel == "fwd" else _symattn_bwd_kernel
    constexprs = dict(FLAG_SETS[job.flags], HEAD_DIM=job.head_dim, HEAD_DIM_V=job.head_dim_v, DOT_PRECISION="tf32",
                      BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    if job.kernel == "bwd":
        constexprs["NEED_DCOEF"] = constexprs["COEF_MODE"] != 0
        constexprs["FUSE_ROLES"] = bwd_fuse_roles(job.head_dim, job.head_dim_v, constexprs["SHARED_V"],
                                                  constexprs["COEF_MODE"], constexprs["HAS_DROPOUT"])
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():  # tensor pointers; the runtime sees 16-byte aligned allocations
            signature[name] = _PTR_TYPES.get(name, "*" + job.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "inv_keep"):
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        else:
            signature[name] = "i32"
            if name.startswith("stride") and name not in ("stride_kpms", "stride_kpmb", "stride_cd", "stride_ce"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.time()
    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", job.arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages},
        )
    except Exception as exc:  # a failed compile is a finding of the report, not a crash
        job.result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        return job
    job.result["compile_s"] = round(time.time() - start, 1)
    job.result["shared"] = kernel.metadata.shared
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        ptx = os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True)
        for key in ("REG", "STACK", "LOCAL"):
            m = re.search(rf"\b{key}:(\d+)", usage.stdout)
            job.result[key.lower()] = int(m.group(1)) if m else None
        if job.arch == 90:
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True)
            job.result["hgmma"] = sass.stdout.count("HGMMA")
    return job


def problems(job: Job) -> list[str]:
    r = job.result
    if "error" in r:
        return [r["error"]]
    found = []
    if r.get("stack") or r.get("local"):
        found.append(f"spills: stack {r.get('stack')} / local {r.get('local')} bytes")
    if r.get("shared", 0) > SMEM_LIMIT[job.arch]:
        found.append(f"{r['shared']} bytes shared memory > {SMEM_LIMIT[job.arch]}")
    if job.arch == 90 and not r.get("hgmma"):
        found.append("no HGMMA in sm_90 SASS")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--kernels", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    todo = [j for j in jobs(tuple(args.dtypes)) if j.kernel in args.kernels]
    print(f"# Triton static compile report (triton {triton.__version__}, {len(todo)} compiles)\n")
    print("| kernel | arch | dtype | variant | D/Dv | block | warps | stages | regs | smem | stack/local | HGMMA | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for job in pool.map(compile_job, todo):
            found = problems(job)
            failed += bool(found)
            r = job.result
            print(f"| {job.kernel} | sm_{job.arch} | {job.dtype} | {job.flags} | {job.head_dim}/{job.head_dim_v} "
                  f"| {job.block_m}x{job.block_n} | {job.num_warps} | {job.num_stages} | {r.get('reg', '-')} "
                  f"| {r.get('shared', '-')} | {r.get('stack', '-')}/{r.get('local', '-')} | {r.get('hgmma', '-')} "
                  f"| {'; '.join(found) or 'ok'} |", flush=True)
    print(f"\n{len(todo) - failed} of {len(todo)} compiles clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
