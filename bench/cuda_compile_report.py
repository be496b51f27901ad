"""Static compile check of csrc/cuda: `nvcc -cubin` for sm_80 and sm_90a with `-Xptxas -v`.

Compiles each torch-free kernel translation unit (csrc/cuda/*.cu), parses registers, static
shared memory and spill stores / loads per kernel from ptxas, adds the dynamic shared memory
of each kernel configuration (computed by a small host program built with nvcc from the same
headers: no GPU needed), prints a markdown table and exits 1 on any spill, on dynamic shared
memory above the per-block limit of the architecture, or on a compile error.

    python -m bench.cuda_compile_report
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm_80", "sm_90a")
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # opt-in dynamic shared memory per block

SMEM_PROGRAM = r"""
#include <cstdio>
#include "attention_fwd_kernel.cuh"
#include "attention_bwd_kernel.cuh"
using namespace symattn::dev;
template <typename T, int HD, bool S> void row(const char* t) {
  std::printf("attention_fwd_kernel %s %d %d %d\n", t, HD, (int)S, FwdSmem<T, HD, S>::kBytes);
  std::printf("attention_bwd_kernel %s %d %d %d\n", t, HD, (int)S, BwdSmem<T, HD, S>::kBytes);
}
template <typename T> void all(const char* t) {
  row<T, 32, true>(t); row<T, 64, true>(t); row<T, 128, true>(t); row<T, 256, true>(t);
  row<T, 32, false>(t); row<T, 64, false>(t); row<T, 128, false>(t); row<T, 256, false>(t);
}
int main() { all<__half>("__half"); all<__nv_bfloat16>("__nv_bfloat16"); return 0; }
"""


def _compile(nvcc: str, src: str, arch: str) -> tuple[str, str, int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v",
               "-I", CUDA_DIR, src, "-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    return src, arch, res.returncode, res.stderr + res.stdout


def _parse(log: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "regs": 0, "smem": 0, "spill_st": 0, "spill_ld": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def _demangle(names: list[str]) -> dict:
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _key(pretty: str):
    m = re.search(r"(attention_\w+_kernel)<([\w:]+), (\d+), (true|false)>", pretty)
    if not m:
        return None
    return m.group(1), m.group(2), int(m.group(3)), int(m.group(4) == "true")


def _dynamic_smem(nvcc: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "smem.cu"), os.path.join(tmp, "smem")
        with open(src, "w") as f:
            f.write(SMEM_PROGRAM)
        res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-I", CUDA_DIR, src, "-o", exe],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return {}
        out = subprocess.run([exe], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        name, t, hd, shared, nbytes = line.split()
        table[(name, t, int(hd), int(shared))] = int(nbytes)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_compile_report", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 clean, 1 a spill, shared memory over the limit or a "
                                            "compile error, 2 no nvcc.")
    parser.parse_args(argv)
    start = time.perf_counter()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: cannot compile csrc/cuda")
        return 2
    sources = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    jobs = [(s, a) for s in sources for a in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: _compile(nvcc, *job), jobs))
        dyn = _dynamic_smem(nvcc)
    failed = False
    print("| file | arch | kernel | regs | static smem B | dynamic smem B | spill st/ld B |")
    print("|---|---|---|---:|---:|---:|---:|")
    kernels = 0
    for src, arch, rc, log in results:
        if rc != 0:
            failed = True
            print(f"| {os.path.basename(src)} | {arch} | COMPILE ERROR | | | | |")
            print(log, file=sys.stderr)
            continue
        rows = _parse(log)
        kernels += len(rows)
        names = _demangle([r["mangled"] for r in rows])
        for r in rows:
            pretty = names[r["mangled"]]
            key = _key(pretty)
            short = pretty.split("(")[0].replace("symattn::dev::", "")
            dynamic = dyn.get(key, 0) if key else 0
            spill = r["spill_st"] + r["spill_ld"]
            flag = ""
            if spill:
                failed, flag = True, " **SPILL**"
            if dynamic > SMEM_LIMIT[arch]:
                failed, flag = True, flag + " **SMEM>limit**"
            print(f"| {os.path.basename(src)} | {arch} | `{short}`{flag} | {r['regs']} | {r['smem']} | {dynamic} | "
                  f"{r['spill_st']}/{r['spill_ld']} |")
    print(f"\n{kernels} kernel builds ({len(sources)} files x {len(ARCHS)} architectures), "
          f"{'failures above' if failed else 'zero spill bytes'}; wall time {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
