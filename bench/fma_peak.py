"""Measured fp32 ceilings of this CPU, to set kernel GFLOP/s against.

    python -m bench.fma_peak [--size N] [--seconds T]

Two one-thread probes. The **FMA peak**: independent chains of fp32 fused multiply-adds on
registers of the widest vector the compiler targets for this CPU (``-march=native``), built once
per process with the C compiler that builds the extension; nothing touches memory, so it is the
core's arithmetic limit, the denominator of every "% peak". The **sgemm rate**: ``torch.mm`` on
square fp32 matrices small enough to stay in a core's L2 (default 256), the limit as the vendor
BLAS reaches it on real operands. The reports multiply either by the thread count for an all-core
figure; clock boosts with fewer busy cores make that an upper estimate.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

# Twelve chains hide the FMA latency (4 cycles on two ports needs eight) and, with the two
# operands, fit AVX2's sixteen registers as well as AVX-512's 32. x and y are arguments, not
# constants: with them compiled in, GCC proved that chain 1 (starting at x, and x * x + y rounds
# back to x in fp32) never changes and dropped its FMA, so the loop ran 11 of the 12 FMAs it was
# credited with and the probe read 12/11 of the true rate (127.7 instead of 117 GFLOP/s on Zen 4).
FMA_X, FMA_Y = 0.999999, 1e-6
_FMA_SOURCE = r"""
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
#elif defined(__AVX__)
typedef float vf __attribute__((vector_size(32)));
#else
typedef float vf __attribute__((vector_size(16)));
#endif
#define CHAINS 12
int fma_lanes(void) { return (int)(sizeof(vf) / sizeof(float)); }
int fma_chains(void) { return CHAINS; }
float fma_run(long iterations, float x0, float y0) {
  vf acc[CHAINS], x, y;
  for (int l = 0; l < (int)(sizeof(vf) / sizeof(float)); ++l) { x[l] = x0; y[l] = y0; }
  for (int c = 0; c < CHAINS; ++c) acc[c] = x * (float)c;
  for (long k = 0; k < iterations; ++k) {
#pragma GCC unroll 12
    for (int c = 0; c < CHAINS; ++c) acc[c] = acc[c] * x + y;
  }
  float sum = 0.f;
  for (int c = 0; c < CHAINS; ++c)
    for (int l = 0; l < (int)(sizeof(vf) / sizeof(float)); ++l) sum += acc[c][l];
  return sum;
}
"""


@functools.lru_cache(maxsize=None)
def _fma_library():
    """The probe built and loaded once per process, or None without a C compiler."""
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return None
    folder = tempfile.mkdtemp(prefix="symattn-fma-")
    atexit.register(shutil.rmtree, folder, True)
    source, library = os.path.join(folder, "fma.c"), os.path.join(folder, "fma.so")
    with open(source, "w") as fh:
        fh.write(_FMA_SOURCE)
    # -ffp-contract=fast: each a * x + y is one fused instruction; -O3 keeps the chains in registers.
    built = subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC",
                            source, "-o", library], capture_output=True, text=True)
    if built.returncode != 0:
        return None
    lib = ctypes.CDLL(library)
    lib.fma_run.argtypes, lib.fma_run.restype = [ctypes.c_long, ctypes.c_float, ctypes.c_float], ctypes.c_float
    return lib


def fma_gflops(seconds: float = 0.3, samples: int = 5) -> float | None:
    """Median GFLOP/s of one thread's register-only fp32 FMA chains (2 FLOPs per lane per FMA),
    or None where no C compiler is at hand. Called from one Python thread: ctypes releases the
    GIL, and the OS keeps the call on one core."""
    lib = _fma_library()
    if lib is None:
        return None
    flops_per_iteration = 2.0 * lib.fma_lanes() * lib.fma_chains()
    lib.fma_run(1000, FMA_X, FMA_Y)
    iterations = 100_000
    start = time.perf_counter()
    lib.fma_run(iterations, FMA_X, FMA_Y)
    iterations = max(1000, int(iterations * seconds / samples / max(time.perf_counter() - start, 1e-7)))
    rates = []
    for _ in range(samples):
        start = time.perf_counter()
        lib.fma_run(iterations, FMA_X, FMA_Y)
        rates.append(flops_per_iteration * iterations / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def sgemm_gflops(size: int = 256, seconds: float = 0.3, samples: int = 5) -> float:
    """Median GFLOP/s (2 n^3 per call) of one-thread fp32 ``torch.mm`` at n = size."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b, out=c)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        reps = max(1, int(seconds / samples / max(time.perf_counter() - start, 1e-7)))
        rates = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            rates.append(2.0 * size**3 * reps / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(rates)


def ceilings() -> dict:
    """Both probes, as the reports store them (GFLOP/s of one thread; fma is None without a C compiler)."""
    return dict(fma_gflops_1thread=fma_gflops(), sgemm_gflops_1thread=sgemm_gflops())


def peak_per_thread(report: dict) -> float:
    """The one-thread fp32 peak of a report: the FMA probe's, else (older reports, no compiler) sgemm's."""
    return report.get("fma_gflops_1thread") or report["sgemm_gflops_1thread"]


def describe(report: dict) -> str:
    """The ceilings of a report in words, for the tables' legends."""
    sgemm = report["sgemm_gflops_1thread"]
    fma = report.get("fma_gflops_1thread")
    if not fma:
        return f"measured one-thread fp32 sgemm {sgemm:.1f} GFLOP/s (no FMA probe: no C compiler)"
    return (f"measured one-thread fp32 FMA peak {fma:.1f} GFLOP/s (register FMA chains); torch.mm 256^3 "
            f"{sgemm:.1f} ({100 * sgemm / fma:.0f} % of it)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="sgemm matrix side (default 256: L2-resident)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timed seconds per probe")
    args = parser.parse_args(argv)
    fma = fma_gflops(args.seconds)
    sgemm = sgemm_gflops(args.size, args.seconds)
    print(f"fp32 FMA peak, one thread: {fma:.1f} GFLOP/s" if fma else "fp32 FMA peak: no C compiler to build the probe")
    print(f"fp32 sgemm {args.size}^3, one thread: {sgemm:.1f} GFLOP/s"
          + (f" ({100 * sgemm / fma:.0f} % of the FMA peak)" if fma else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
