"""A measured fp32 multiply-add ceiling for this CPU, to set kernel GFLOP/s against.

    python -m bench.fma_peak [--size N] [--seconds T]

One thread runs ``torch.mm`` on square fp32 matrices small enough to stay in a core's L2
(default 256: three 256 KiB operands), so the figure is the core's arithmetic limit as the
vendor BLAS reaches it, not a memory bandwidth. The report multiplies it by the thread count
for an all-core ceiling; clock boosts with fewer busy cores make that an upper estimate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="matrix side (default 256: L2-resident)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timed seconds in all")
    args = parser.parse_args(argv)
    rate = sgemm_gflops(args.size, args.seconds)
    print(f"fp32 sgemm {args.size}^3, one thread: {rate:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
