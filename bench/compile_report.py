"""Static compile report of the Triton attention kernels, without a GPU (docs/design.md, "How each backend is verified").

`python -m bench.compile_report` compiles every shipped kernel config (the forward's autotune
configs after its shape pruning, the backward's blocks and warps/stages) for a set of kernel
variants, for sm_80 and sm_90, with ``triton.compile(ASTSource(...), target=GPUTarget(...))``.
For each it reads registers, shared memory, stack and local bytes from Triton's bundled
``cuobjdump --dump-resource-usage`` (ptxas puts spilled registers in the stack frame, so
STACK:0 LOCAL:0 means no spill) and on sm_90 whether the SASS uses HGMMA. It prints one markdown
row per compile and exits non-zero when any compile fails, spills, needs more shared memory than
the architecture offers, or lacks HGMMA on sm_90.

The configs come from the launchers' own tables (``fwd_configs_for``, ``fwd_split_d``,
``bwd_plan``, ``sym_bwd_config``), so the report checks exactly what the launchers can pick
(backward rows: ``bwd`` one launch for all roles, ``bwd-q`` / ``bwd-k`` the query then key
launch; a block ``/2`` is SPLIT_D = 2 column groups); a variant the launcher refuses with
ValueError (``backend="auto"`` routes it to the torch backend) is listed as unsupported, not as
a failure. ``--quick`` compiles only the default BERT shapes (head dim 64, the shared-weight
variants) for CI; ``--only REGEX`` keeps the rows whose label matches (e.g. ``'bwd-k sm_90'``).
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
# training (diagonal coefficient, dropout, padding; a key stride of 8, so one Philox call per 8
# keys), and every flag at once (pairwise attention with a full coefficient and separate values,
# varlen, dropout with any key stride, hence one Philox call per element, exclude_self).
HEAD_DIMS = ((32, 32), (64, 64), (128, 128), (256, 256), (64, 128))
_BASE = dict(SHARED_V=True, COEF_MODE=0, IS_CAUSAL=True, HAS_KPM=False, IS_VARLEN=False, HAS_DROPOUT=False,
             DROPOUT_GROUPED=False, EXCLUDE_SELF=False)
FLAG_SETS = {
    "shared": _BASE,
    "shared-train": dict(_BASE, COEF_MODE=1, IS_CAUSAL=False, HAS_KPM=True, HAS_DROPOUT=True, DROPOUT_GROUPED=True),
    "all-flags": dict(SHARED_V=False, COEF_MODE=2, IS_CAUSAL=True, HAS_KPM=True, IS_VARLEN=True, HAS_DROPOUT=True,
                      DROPOUT_GROUPED=False, EXCLUDE_SELF=True),
}
# ROLES of each attention backward launch (symattn_kernels.triton.attention_bwd.BWD_*).
_BWD_ROLES = {"bwd": 0, "bwd-q": 1, "bwd-k": 2}
# Integer arguments the launchers make 1 (contiguous padding masks, lse's adjacent tokens; a
# named-tuple field as "argument.field"): Triton's JIT specializes an integer argument equal to 1
# into a constant, so the report does the same.
UNIT_ARGS = ("kpm_strides.token", "lse_strides.token", "stride_kpms")
_PTR_TYPES = {"Coef": "*fp32", "Kpm": "*u8", "CuSeqlens": "*i32", "Lse": "*fp32", "Delta": "*fp32",
              "DCoefPartial": "*fp32", "DLse": "*fp32", "Work": "*fp32", "L": "*fp32", "DQPart": "*fp32",
              "DGate": "*fp32"}
# Integer arguments that are not multiples of 16: the padding mask's batch stride (any length)
# and LAMA's factor row strides (m heads).
_UNALIGNED_STRIDES = ("kpm_strides.batch", "stride_kpmb", "stride_pe", "stride_qe")

# LAMA (symattn_kernels/triton/lowrank.py): forward, its attn normalisation (no tl.dot, so no
# HGMMA expected) and backward, for LAMAClassifier's call (separate token keys, padding, head
# norm, token softmax; pooled-only loss), the shared-keys call, and every other flag.
_LAMA_KERNELS = {"lama-fwd": "_lama_fwd_kernel", "lama-norm": "_lama_fwd_normalise", "lama-bwd": "_lama_bwd_kernel"}
NO_DOT_KERNELS = ("lama-norm",)
LAMA_FLAG_SETS = {
    "classifier": dict(SHARED_U=False, HAS_KPM=True, HEAD_NORM=True, TOKEN_SOFTMAX=True, HAS_DATTN=False,
                       WRITE_DH=True, WRITE_DU=True, WRITE_DQ=True),
    "shared-u": dict(SHARED_U=True, HAS_KPM=False, HEAD_NORM=True, TOKEN_SOFTMAX=True, HAS_DATTN=False,
                     WRITE_DH=True, WRITE_DU=False, WRITE_DQ=True),
    "raw-all": dict(SHARED_U=False, HAS_KPM=True, HEAD_NORM=False, TOKEN_SOFTMAX=False, HAS_DATTN=True,
                    WRITE_DH=True, WRITE_DU=True, WRITE_DQ=True),
}
# (E, m): the benchmark's E = 256 with 4 to 8 heads, narrow and wide states, and many heads.
LAMA_DIMS = ((64, 8), (256, 8), (512, 8), (256, 32))
QUICK_LAMA_DIMS = ((256, 8),)
QUICK_LAMA_FLAG_SETS = ("classifier",)


@dataclass
class Job:
    kernel: str  # fwd | bwd | bwd-q | bwd-k | bwd-sym | lama-*
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
    split_d: int = 1  # output-column groups of the attention kernels (program_id(2))

    @property
    def block(self) -> str:
        return f"{self.block_m}x{self.block_n}" + (f" /{self.split_d}" if self.split_d > 1 else "")

    @property
    def label(self) -> str:
        return (f"{self.kernel} sm_{self.arch} {self.dtype} {self.flags} D{self.head_dim}/{self.head_dim_v} "
                f"{self.block} w{self.num_warps} s{self.num_stages}")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# --quick: the default BERT shapes (head dim 64, shared weights; inference and training).
QUICK_HEAD_DIMS = ((64, 64),)
QUICK_FLAG_SETS = ("shared", "shared-train")


def jobs(dtypes=("bf16",), quick: bool = False) -> list[Job]:
    """Every (kernel, arch, variant, config the launcher can pick) to compile."""
    from symattn_kernels.triton.attention_common import padded_head_dim
    from symattn_kernels.triton.attention_bwd import bwd_plan, sym_bwd_config
    from symattn_kernels.triton.attention_fwd import fwd_configs_for, fwd_split_d

    out = []
    head_dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    flag_sets = {k: v for k, v in FLAG_SETS.items() if not quick or k in QUICK_FLAG_SETS}
    for arch, dtype, (flags, fl), (d, dv) in itertools.product(ARCHS, dtypes, flag_sets.items(), head_dims):
        if fl["SHARED_V"] and d != dv:
            continue
        d_pad, dv_pad = padded_head_dim(d), padded_head_dim(dv)
        for block_m, block_n, warps, stages in fwd_configs_for(1 << 16, d_pad, dv_pad, fl["HAS_DROPOUT"],
                                                               fl["COEF_MODE"], fl["SHARED_V"]):
            out.append(Job("fwd", arch, dtype, flags, d_pad, dv_pad, block_m, block_n, warps, stages,
                           split_d=fwd_split_d(dv_pad, fl["HAS_DROPOUT"], arch)))
        try:
            fuse, config, splits = bwd_plan(d_pad, dv_pad, fl["SHARED_V"], fl["COEF_MODE"], fl["HAS_DROPOUT"], arch)
            for kernel, split_d in zip(("bwd",) if fuse else ("bwd-q", "bwd-k"), splits):  # one or two launches
                out.append(Job(kernel, arch, dtype, flags, d_pad, dv_pad, *config, split_d=split_d))
        except ValueError as exc:  # the launcher refuses it: backend="auto" uses the torch backend
            out.append(Job("bwd", arch, dtype, flags, d_pad, dv_pad, 0, 0, 0, 0, {"unsupported": str(exc)}))
        sym = sym_bwd_config(d_pad, dv_pad, arch, fl["HAS_DROPOUT"])
        if fl["COEF_MODE"] != 2 and sym is not None:  # deterministic=False, non-causal
            out.append(Job("bwd-sym", arch, dtype, flags, d_pad, dv_pad, *sym))
    return out


def lama_jobs(dtypes=("bf16",), quick: bool = False) -> list[Job]:
    """Every LAMA kernel, arch and variant with the launcher's config (lama_config) for long
    sequences. Rows reuse Job's fields: head_dim / head_dim_v = BLOCK_E / BLOCK_M and
    block_m x block_n = BLOCK_T x BLOCK_E."""
    from symattn_kernels.triton.lowrank import NORMALISE_BLOCK_T, backward_unsupported, lama_config

    out = []
    dims = QUICK_LAMA_DIMS if quick else LAMA_DIMS
    flag_sets = QUICK_LAMA_FLAG_SETS if quick else tuple(LAMA_FLAG_SETS)
    for arch, dtype, flags, (dim, heads), kernel in itertools.product(ARCHS, dtypes, flag_sets, dims, _LAMA_KERNELS):
        if kernel == "lama-norm" and flags != flag_sets[0]:
            continue  # it has no flags
        cfg = lama_config(dim, heads, 1 << 16, "bwd" if kernel == "lama-bwd" else "fwd")
        reason = backward_unsupported(dim, heads, arch) if kernel == "lama-bwd" else ""
        if reason:  # the launcher refuses it: backend="auto" uses another backend
            out.append(Job(kernel, arch, dtype, flags, cfg["BLOCK_E"], cfg["BLOCK_M"], 0, 0, 0, 0,
                           {"unsupported": reason}))
            continue
        if kernel == "lama-norm":  # launched with its own block and Triton's default warps and stages
            cfg.update(BLOCK_T=NORMALISE_BLOCK_T, num_warps=4, num_stages=3)
        out.append(Job(kernel, arch, dtype, flags, cfg["BLOCK_E"], cfg["BLOCK_M"], cfg["BLOCK_T"], cfg["BLOCK_E"],
                       cfg["num_warps"], cfg["num_stages"]))
    return out


def _lama_kernel(job: Job):
    """(kernel function, constexprs) of a LAMA job."""
    from symattn_kernels.triton import lowrank

    # The launcher's precision for half inputs (their values are exact in tf32).
    constexprs = dict(LAMA_FLAG_SETS[job.flags], DOT_PRECISION="tf32", BLOCK_E=job.head_dim,
                      BLOCK_M=job.head_dim_v, BLOCK_T=job.block_m)
    return getattr(lowrank, _LAMA_KERNELS[job.kernel]), constexprs


def compile_job(job: Job) -> Job:
    from symattn_kernels.triton.attention_bwd import _symattn_bwd_kernel, _symattn_bwd_sym_kernel, bwd_groups_dropout
    from symattn_kernels.triton.attention_fwd import _symattn_fwd_kernel, fwd_reuse_diag
    from symattn_kernels.triton.features import warp_specialize_for

    if "unsupported" in job.result:
        return job
    if job.kernel in _LAMA_KERNELS:
        return _compile(job, *_lama_kernel(job))
    fn = _symattn_bwd_sym_kernel if job.kernel == "bwd-sym" else (
        _symattn_fwd_kernel if job.kernel == "fwd" else _symattn_bwd_kernel)
    # BH_OFFSET 0: every launch of a call of at most 65535 sequences x heads (grid_row_chunks).
    constexprs = dict(FLAG_SETS[job.flags], HEAD_DIM=job.head_dim, HEAD_DIM_V=job.head_dim_v, DOT_PRECISION="tf32",
                      BLOCK_M=job.block_m, BLOCK_N=job.block_n, SPLIT_D=job.split_d, BH_OFFSET=0)
    if job.kernel == "fwd":  # as attention_forward sets them for this arch
        constexprs["REUSE_DIAG"] = job.split_d == 1 and fwd_reuse_diag(constexprs["SHARED_V"], job.head_dim, job.arch,
                                                                       constexprs["HAS_KPM"])
        constexprs["WARP_SPECIALIZE"] = warp_specialize_for(job.arch)
    if job.kernel in _BWD_ROLES:
        constexprs["NEED_DCOEF"] = constexprs["COEF_MODE"] == 1  # a full dM is reduced on the host
        constexprs["ROLES"] = _BWD_ROLES[job.kernel]
        constexprs["DROPOUT_GROUPED"] &= bwd_groups_dropout(job.head_dim, job.head_dim_v, job.arch)
    elif job.kernel == "bwd-sym":  # non-causal only
        constexprs["NEED_DCOEF"] = constexprs["COEF_MODE"] != 0
        del constexprs["IS_CAUSAL"]
    return _compile(job, fn, constexprs)


# Named-tuple arguments of the attention kernels (symattn_kernels.triton.attention_common) other
# than TokenStrides, which every other ``*_strides`` argument is.
_TUPLE_ARGS = {"coef_strides": "CoefStrides", "kpm_strides": "MaskStrides", "dropout": "Dropout"}


def _scalar_type(name: str, is_stride: bool):
    """(signature type, attributes or None) of a scalar argument or named-tuple field, as Triton's
    JIT specializes what the launchers pass: 1 becomes a constant, row strides are multiples of
    16 elements for the report's head dims, the seed may exceed 32 bits."""
    if name in UNIT_ARGS:
        return "constexpr", None
    if name in ("scale", "eps") or name.endswith("inv_keep"):
        return "fp32", None
    if name.endswith("seed"):
        return "i64", None
    return "i32", ([["tt.divisibility", 16]] if is_stride and name not in _UNALIGNED_STRIDES else None)


def _compile(job: Job, fn, constexprs: dict) -> Job:
    """Compile fn for the job's arch and record registers, shared memory, spills and HGMMA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from symattn_kernels.triton import attention_common

    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():  # tensor pointers; the runtime sees 16-byte aligned allocations
            signature[name] = _PTR_TYPES.get(name, "*" + job.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _TUPLE_ARGS or name.endswith("_strides"):  # a named tuple: typed field by field
            bundle = _TUPLE_ARGS.get(name, "TokenStrides")
            fields = getattr(attention_common, bundle)._fields
            types = []
            for j, field in enumerate(fields):
                kind, attr = _scalar_type(f"{name}.{field}", name.endswith("_strides"))
                types.append(kind)
                if kind == "constexpr":
                    constexprs[(i, j)] = 1
                elif attr:
                    attrs[(i, j)] = attr
            signature[name] = getattr(attention_common, bundle)(*types)
        else:
            signature[name], attr = _scalar_type(name, name.startswith("stride"))
            if signature[name] == "constexpr":
                constexprs[name] = 1
            elif attr:
                attrs[(i,)] = attr
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
    if "unsupported" in r:
        return []
    if "error" in r:
        return [r["error"]]
    found = []
    if r.get("stack") or r.get("local"):
        found.append(f"spills: stack {r.get('stack')} / local {r.get('local')} bytes")
    if r.get("shared", 0) > SMEM_LIMIT[job.arch]:
        found.append(f"{r['shared']} bytes shared memory > {SMEM_LIMIT[job.arch]}")
    if job.arch == 90 and not r.get("hgmma") and job.kernel not in NO_DOT_KERNELS:
        found.append("no HGMMA in sm_90 SASS")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--kernels", nargs="+", default=["fwd", "bwd", "lama"], choices=["fwd", "bwd", "lama"])
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compiles")
    parser.add_argument("--quick", action="store_true", help="only the default BERT shapes (CI)")
    parser.add_argument("--only", metavar="REGEX", default=None,
                        help="only the compiles whose label matches, e.g. 'bwd sm_90 .* all-flags D128'")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    start = time.time()
    todo = [j for j in jobs(tuple(args.dtypes), args.quick) + lama_jobs(tuple(args.dtypes), args.quick)
            if j.kernel.split("-")[0] in args.kernels]
    if args.only:
        todo = [j for j in todo if re.search(args.only, j.label)]
    # Longest compiles first (backward, wide heads), so that the pool's last jobs are short.
    order = sorted(range(len(todo)), key=lambda i: (todo[i].kernel == "fwd", -todo[i].head_dim))
    print(f"# Triton static compile report (triton {triton.__version__}, {len(todo)} compiles)\n")
    print("| kernel | arch | dtype | variant | D/Dv | block | warps | stages | regs | smem | stack/local | HGMMA | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = unsupported = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip(order, pool.map(compile_job, [todo[i] for i in order])))
    for job in (done[i] for i in range(len(todo))):
        found = problems(job)
        failed += bool(found)
        r = job.result
        if "unsupported" in r:
            unsupported += 1
            print(f"| {job.kernel} | sm_{job.arch} | {job.dtype} | {job.flags} | {job.head_dim}/{job.head_dim_v} "
                  f"| - | - | - | - | - | - | - | unsupported: {r['unsupported']} |")
            continue
        print(f"| {job.kernel} | sm_{job.arch} | {job.dtype} | {job.flags} | {job.head_dim}/{job.head_dim_v} "
              f"| {job.block} | {job.num_warps} | {job.num_stages} | {r.get('reg', '-')} "
              f"| {r.get('shared', '-')} | {r.get('stack', '-')}/{r.get('local', '-')} | {r.get('hgmma', '-')} "
              f"| {'; '.join(found) or 'ok'} |", flush=True)
    if any(job.kernel in _LAMA_KERNELS for job in todo):
        print("\nlama-* rows: D/Dv = BLOCK_E/BLOCK_M (model size E and heads m, padded), block = BLOCK_T x BLOCK_E.")
    print(f"\n{len(todo) - failed - unsupported} of {len(todo) - unsupported} compiles clean, {unsupported} variants "
          f"unsupported (torch backend); {time.time() - start:.0f} s on {args.jobs} processes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
