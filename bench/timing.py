"""Timing and peak memory of zero-argument callables, on CPU or CUDA.

CPU: `torch.utils.benchmark.Timer.blocked_autorange` with torch threads = cores; median and
20th/80th percentiles of the per-call times of its blocks. Callables compared with each other
are timed in interleaved rounds (`time_calls`). CUDA: `triton.testing.do_bench` quantiles. Peak
memory is measured on a separate call so the profiler never touches a timing (on CPU a
one-thread call, see `_cpu_peak_memory`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils import benchmark

from bench.environment import usable_cores

MIB = 2.0**20
# p20/p80 need a handful of samples; slow calls would otherwise give two or three.
MIN_CPU_SAMPLES = 7


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_call(fn: Callable[[], object], device: str, min_run_time: float) -> Timing:
    if device == "cuda":
        return _time_cuda(fn)
    return _time_cpu(fn, min_run_time)


def time_calls(fns: Sequence[Callable[[], object]], device: str, min_run_time: float,
               rounds: int = 1) -> list[Timing]:
    """Times callables that are compared with each other. On CPU, in `rounds` rounds that each
    time every callable for min_run_time / rounds seconds, each round starting one callable
    later, and pools each callable's per-call times over the rounds: where the host's speed
    drifts during a case (a shared or virtual machine), the drift then lands on every callable
    alike instead of on whichever ran through the slow stretch. CUDA: each callable once."""
    if device == "cuda" or rounds <= 1:
        return [time_call(fn, device, min_run_time) for fn in fns]
    one_call = [_first_call_seconds(fn) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            floor = math.ceil(MIN_CPU_SAMPLES / rounds) * one_call[i]
            samples[i] += _blocked_times(fns[i], max(min_run_time / rounds, floor))
    return [_timing(times) for times in samples]


def _time_cpu(fn: Callable[[], object], min_run_time: float) -> Timing:
    one_call = _first_call_seconds(fn)
    return _timing(_blocked_times(fn, max(min_run_time, MIN_CPU_SAMPLES * one_call)))


def _first_call_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _blocked_times(fn: Callable[[], object], min_run_time: float) -> list[float]:
    """Per-call seconds of the blocks of one blocked_autorange, torch threads = cores."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=usable_cores())
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def _timing(times_s: list[float]) -> Timing:
    p20, p50, p80 = np.percentile(np.asarray(times_s) * 1e3, [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80))


def _time_cuda(fn: Callable[[], object]) -> Timing:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated during one call, above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    return _cpu_peak_memory(fn) / MIB


def _cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Replays the profiler's allocation (+) and free (−) events in time order; the running
    sum's maximum is the peak. It sees allocations inside fused kernels too (workspaces), which
    a dispatch-level tracker would miss, but only the calling thread's: a worker thread's own
    workspace never shows. So the call runs on one thread, where every allocation is the
    calling thread's: the peak of a one-thread call, exact for every provider alike (each
    further thread adds what its worker allocates for itself)."""
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _kineto_log_filtered(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events() if event.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


_KINETO_LOG_LINE = re.compile(rb"^(USDT|INFO|WARNING):[^\n]*\.cpp:\d+\][^\n]*\n?", re.MULTILINE)


@contextlib.contextmanager
def _kineto_log_filtered():
    """Kineto writes start/stop log lines straight to fd 2 whatever its log level; they would
    break the progress bar. Anything else written meanwhile is passed through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            rest = _KINETO_LOG_LINE.sub(b"", captured.read())
            if rest:
                sys.stderr.buffer.write(rest)
                sys.stderr.flush()
