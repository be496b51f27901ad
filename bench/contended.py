"""All-thread CPU attention while another process keeps one core busy: ours against SDPA-flash.

    python -m bench.contended [--quick] [--seconds T] [--json PATH]

A server's cores are rarely all free. Each provider (fused ``cpu`` backend, SDPA-flash on
``(y, y, y)``) is timed at one thread per core, in a child process whose OpenMP threads are bound
one to a core (``GOMP_CPU_AFFINITY``, so the scheduler cannot hide the effect by moving a
thread), first alone and then beside a busy process bound to the last core, which then gives
each of them about half of it. A kernel whose threads run a fixed share each waits for the
slowed one (about 2x slower); one whose threads take over what a slowed thread has not reached
loses only that core's missing half (n / (n - 1/2) of its time alone: 1.33x on 2 cores). The
table gives each provider's median alone, beside the busy core, and the slow-down; fp32,
shared weights, D = 64. Linux only (CPU affinity).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(1, 4096, 1), (1, 2048, 12), (8, 512, 12)]
PROVIDERS = ("cpu", "sdpa-flash")
MODES = ("fwd", "fwd+bwd")


def _child(B: int, S: int, H: int, provider: str, mode: str, seconds: float, threads: int) -> float:
    """Median ms of one provider's calls at `threads` threads (run in the child, whose OpenMP
    runtime has bound its first thread to one core: its own affinity no longer counts them)."""
    import torch

    from bench.cpu_kernels import _fwd_bwd, _long_providers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    y = torch.randn(B, S, H, 64)
    fn = _long_providers(y, False)[provider]
    call = _fwd_bwd(fn, y) if mode == "fwd+bwd" else (lambda: fn(y))
    call()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _busy_core(cpu: int) -> subprocess.Popen:
    """A process that spins on `cpu` until killed, or until this process is gone."""
    code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nparent = os.getppid()\n"
            "while os.getppid() == parent:\n    for _ in range(100000): pass")
    return subprocess.Popen([sys.executable, "-c", code])


def _timed(case: tuple, cpus: list[int], seconds: float, busy: bool) -> float:
    B, S, H, provider, mode = case
    env = dict(os.environ, GOMP_CPU_AFFINITY=" ".join(map(str, cpus)))
    hog = _busy_core(cpus[-1]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-m", "bench.contended", "--child", *map(str, case), str(seconds),
                              str(len(cpus))],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return float(out.stdout.strip().splitlines()[-1])


def run(shapes=SHAPES, modes=MODES, seconds: float = 2.0, rounds: int = 2) -> dict:
    """Per case, each provider alone and beside a busy core, in `rounds` interleaved rounds."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench.contended needs at least two cores")
    rows = []
    for B, S, H in shapes:
        for mode in modes:
            times = {(p, busy): [] for p in PROVIDERS for busy in (False, True)}
            for r in range(rounds):
                for p in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:
                    for busy in (False, True) if r % 2 == 0 else (True, False):
                        times[p, busy].append(_timed((B, S, H, p, mode), cpus, seconds, busy))
            for p in PROVIDERS:
                alone, beside = statistics.median(times[p, False]), statistics.median(times[p, True])
                rows.append(dict(B=B, S=S, H=H, mode=mode, provider=p, threads=len(cpus), alone_ms=alone,
                                 busy_core_ms=beside, slowdown=beside / alone))
    return dict(cores=len(cpus), rounds=rounds, rows=rows)


def format_report(report: dict) -> str:
    lines = [f"{report['cores']} threads bound one per core; busy process on the last core; "
             f"medians over {report['rounds']} interleaved rounds; fp32, D = 64",
             "", "| B, S, H | mode | provider | alone ms | one core busy ms | slow-down |", "|---|---|---|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['B']}, {row['S']}, {row['H']} | {row['mode']} | {row['provider']} | "
                     f"{row['alone_ms']:.1f} | {row['busy_core_ms']:.1f} | {row['slowdown']:.2f}x |")
    ideal = report["cores"] / (report["cores"] - 0.5)
    lines.append(f"\nA fixed share per thread: about 2x; taking over a slowed thread's work: {ideal:.2f}x.")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        B, S, H, provider, mode, seconds, threads = sys.argv[2:9]
        print(_child(int(B), int(S), int(H), provider, mode, float(seconds), int(threads)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first shape, forward only, short timings")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per provider and condition")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    if args.quick:
        report = run(SHAPES[:1], MODES[:1], seconds=0.3, rounds=1)
    else:
        report = run(seconds=args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
