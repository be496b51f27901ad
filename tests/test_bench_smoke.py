"""`python -m bench --quick` runs end to end for every registered op (shared attention and LAMA):
CSV, PNG and the markdown table last; `bench.cpu_kernels` pairs dropout with no-dropout calls."""

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_csv_png_and_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    csvs, pngs = list(tmp_path.glob("*.csv")), list(tmp_path.glob("*.png"))
    assert csvs and pngs
    rows = list(csv.DictReader(csvs[0].open()))
    by_case = {(row["op"], row["provider"], row["mode"]): row for row in rows}
    measured = [("shared_attention", "symattn-torch"), ("lowrank_context_attention", "symattn-torch"),
                ("lowrank_context_attention", "symattn-cpu")]
    for (op, provider), mode in itertools.product(measured, ("fwd", "fwdbwd")):
        row = by_case[op, provider, mode]
        assert row["status"] == "ok", (op, provider, mode, row["status"])
        assert float(row["median_ms"]) > 0 and float(row["peak_mib"]) >= 0
    assert any(row["status"].startswith("skipped") for row in rows), "unavailable providers must be reported"
    lines = result.stdout.rstrip().splitlines()
    last_row = max(i for i, line in enumerate(lines) if line.startswith("|"))
    assert len(lines) - last_row <= 3, "the table (and its legend) must come last"
    assert any(line.startswith("|") and "symattn-torch" in line for line in lines)


def test_cpu_kernels_dropout_rows_pair_both_calls():
    from symattn_kernels import extensions

    if extensions.state("cpu").how == extensions.ABSENT:
        pytest.skip("the cpu backend is absent here")
    from bench import cpu_kernels

    rows = cpu_kernels.run_dropout(1, 0.01, [(2, 40)])
    assert {(r["dtype"], r["mode"]) for r in rows} == {(d, m) for d in ("float32", "bfloat16")
                                                       for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["nodrop_ms"] > 0 and r["dropout_ms"] > 0 and r["ratio"] > 0
        assert r["check_err"] <= 1e-3
    table = cpu_kernels.format_dropout(rows, cpu_kernels._environment(),
                                       dict(fma_gflops_1thread=150.0, sgemm_gflops_1thread=100.0))
    assert "B=2   S=40    float32   fwd" in table and "target: forward ratio <= 1.3" in table
    assert "% peak" in table and "GF/s exec" in table and "FMA peak 150.0" in table


def test_fma_probe_runs_the_chains_it_counts():
    """bench.fma_peak's register loop computes every chain it is credited with: its sum matches
    the recurrence acc <- acc * x + y in closed form (in double), so no chain was optimised away.
    x and y put the recurrence's fixed point (0.5) away from every chain's start (c * x), so a chain
    left at its start moves the sum by at least 1.1 %; fp32 rounding moves it by about 4e-7."""
    from bench import fma_peak

    lib = fma_peak._fma_library()
    if lib is None:
        pytest.skip("no C compiler here")
    x, y, n, lanes, chains = 0.9999, 0.5e-4, 10_000, lib.fma_lanes(), lib.fma_chains()
    assert lanes in (4, 8, 16) and chains == 12
    # acc_c = x^n * (c * x) + y (1 - x^n) / (1 - x), summed over chains and lanes (x, y as fp32).
    x32, y32 = float(np.float32(x)), float(np.float32(y))
    xn = x32**n
    expected = lanes * sum(xn * c * x32 + y32 * (1 - xn) / (1 - x32) for c in range(chains))
    assert abs(lib.fma_run(n, x, y) - expected) <= 1e-4 * expected
    assert fma_peak.fma_gflops(seconds=0.05) > 0
    text = fma_peak.describe(dict(fma_gflops_1thread=150.0, sgemm_gflops_1thread=120.0))
    assert "FMA peak 150.0" in text and "80 %" in text
    assert fma_peak.peak_per_thread(dict(fma_gflops_1thread=None, sgemm_gflops_1thread=120.0)) == 120.0


def test_attention_flops_follow_the_conventions():
    from bench import cpu_kernels

    full = cpu_kernels.attention_flops(2, 128, 12, 64)
    assert full["conv_fwd"] == full["exec_fwd"] == 4 * 2 * 12 * 128**2 * 64
    assert full["conv_fwdbwd"] == full["exec_fwdbwd"] == 3.5 * full["conv_fwd"]
    half = cpu_kernels.attention_flops(2, 128, 12, 64, mirrored=True)
    assert half["exec_fwd"] == 0.75 * full["exec_fwd"] and half["exec_fwdbwd"] == 2.5 * full["exec_fwd"]
    assert cpu_kernels.mirrored_schedule(513, False) and cpu_kernels.mirrored_schedule(512, False, backward=True)
    assert cpu_kernels.mirrored_schedule(513, True, backward=True) and not cpu_kernels.mirrored_schedule(512, True)
    assert not cpu_kernels.mirrored_schedule(128, True)
    assert not cpu_kernels.mirrored_schedule(128, False, "bfloat16", "AVX512_AMX")


def test_tiled_backward_work_replays_its_tiles():
    """Above 512 tokens the executed backward is the tiled one's: 32 blocks of 128 rows at 4096
    tokens, 5 products on each of the 32 * 33 / 2 tiles of a causal head, 7 on the 32 * 31 / 2
    off-diagonal tiles and 5 on the 32 diagonal ones of another head; a ragged last block counts
    its own rows."""
    from bench import cpu_kernels

    def backward(S, causal):
        flops = cpu_kernels.attention_flops(1, S, 1, 64, causal=causal, mirrored=True)
        return flops["exec_fwdbwd"] - flops["exec_fwd"]

    tile = 2 * 64 * 128**2
    assert backward(4096, True) == 5 * tile * 32 * 33 / 2
    assert backward(4096, False) == tile * (7 * 32 * 31 / 2 + 5 * 32)
    # 600 tokens: blocks of 64 rows, the last of 24; causal tiles with it: 9 of 24 x 64, one 24 x 24.
    assert backward(600, True) == 2 * 64 * 5 * (64**2 * 9 * 10 / 2 + 24 * 64 * 9 + 24**2)


def test_cpu_lama_section_reports_gflops_and_plots(tmp_path):
    from symattn_kernels import extensions

    if extensions.state("cpu").how == extensions.ABSENT:
        pytest.skip("the cpu backend is absent here")
    from bench import cpu_kernels

    report = cpu_kernels.run_lama(1, quick=True, min_run_time=0.01)
    assert {r["mode"] for r in report["lama_rows"]} == {"fwd", "fwdbwd"}
    assert all(r["speedup"] > 0 and r["ours_ms"] > 0 for r in report["lama_rows"])
    text = cpu_kernels.format_lama(report)
    assert "ours GF/s" in text and "% peak" in text
    cpu_kernels.plot_lama(report, tmp_path / "lama.png")
    assert (tmp_path / "lama.png").stat().st_size > 0


def test_cpu_long_section_reports_scaling_and_plots(tmp_path):
    """The long-sequence section of bench.cpu_kernels on one small long head: ratios to the
    fastest peer, the second thread's speed-up for ours and SDPA, GFLOP/s, and the plot."""
    from symattn_kernels import extensions

    if extensions.state("cpu").how == extensions.ABSENT:
        pytest.skip("the cpu backend is absent here")
    import torch

    from bench import cpu_kernels

    report = cpu_kernels.run_long([(1, 600, 1, True, 1, True)], dtypes=(torch.float32,), seconds=0.01)
    rows = report["long_rows"]
    assert {(r["mode"], r["threads"]) for r in rows} == {(m, t) for m in ("fwd", "fwd+bwd") for t in (1, 2)}
    two = [r for r in rows if r["threads"] == 2]
    assert all(r["cpu_2nd_thread"] > 0 and r["sdpa_2nd_thread"] > 0 and r["vs_peer"] > 0 for r in two)
    assert {r["peer"] for r in rows} <= {"sdpa-flash", "sdpa-math"}
    assert report["sgemm_gflops_1thread"] > 0 and report["fma_gflops_1thread"] > 0
    text = cpu_kernels.format_long(report)
    assert "GF/s exec" in text and "600" in text and "% need" in text
    # "% need" is target / x@ceil, in percent, on every fp32 row. Both print rounded (x@ceil to
    # 0.01, % need to 0.1), which a slowed peer can make a large share of either (a loaded host
    # printed x@ceil 309.xx and % need 0.6 against 0.615 from the rounded x@ceil).
    table = [line for line in text.splitlines() if line.startswith("1,600,1")]
    assert len(table) == len(rows)
    for line in table:
        at_ceiling, need = (float(x) for x in line.split()[-2:])
        mode = line.split()[3]
        expected = 100 * cpu_kernels.LONG_TARGETS[mode] / at_ceiling
        assert abs(need - expected) <= 0.05 + expected * 0.005 / (at_ceiling - 0.005) + 1e-9, line
    cpu_kernels.plot_long(report, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_contended_times_each_provider_alone_and_beside_a_busy_core():
    """`bench.contended --quick`: ours and SDPA-flash, each alone and beside a process that keeps
    the last core busy, in child processes with their threads bound one per core."""
    import os

    from symattn_kernels import extensions

    if extensions.state("cpu").how == extensions.ABSENT or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs the cpu backend and two cores")
    from bench import contended

    report = contended.run([(1, 600, 1)], ("fwd",), seconds=0.05, rounds=1)
    assert {r["provider"] for r in report["rows"]} == {"cpu", "sdpa-flash"}
    assert all(r["alone_ms"] > 0 and r["busy_core_ms"] > 0 for r in report["rows"])
    assert "| 1, 600, 1 | fwd | cpu |" in contended.format_report(report)


def test_paired_trees_times_both_trees_in_rounds():
    """`bench.paired_trees` with this tree as base and new: one line per shape and mode, the
    medians of both trees and their per-round ratio."""
    from symattn_kernels import extensions

    if extensions.state("cpu").how == extensions.ABSENT:
        pytest.skip("the cpu backend is absent here")
    result = subprocess.run(
        [sys.executable, "-m", "bench.paired_trees", str(ROOT), str(ROOT), "--rounds", "1", "--seconds", "0.01",
         "--shapes", "1x40x2", "--dtype", "float32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("float32, kernel set ") and "1 thread, 1 interleaved rounds" in lines[0]
    rows = {line.split()[0] + " " + line.split()[1]: [float(x) for x in line.split()[2:]] for line in lines[2:]}
    assert set(rows) == {"1x40x2 fwd", "1x40x2 fwd+bwd"}
    assert all(base > 0 and new > 0 and ratio > 0 for base, new, ratio in rows.values())


def test_time_calls_interleaves_the_callables_in_rounds():
    """Compared callables alternate within a case, so a drifting host slows them alike: with
    three rounds each callable's calls come in three separate runs, not one."""
    import time

    from bench.timing import time_calls

    calls = []

    def timed(name):
        def fn():
            calls.append(name)
            time.sleep(1e-3)
        return fn

    timings = time_calls([timed("a"), timed("b")], "cpu", min_run_time=0.03, rounds=3)
    assert len(timings) == 2 and all(t.p20_ms <= t.median_ms <= t.p80_ms for t in timings)
    runs = [name for name, _ in itertools.groupby(calls)]
    assert runs.count("a") >= 3 and runs.count("b") >= 3, runs
    assert all(t.median_ms >= 1.0 for t in timings)


def test_cpu_peak_memory_runs_the_call_on_one_thread():
    """The profiler records only the calling thread's allocations, so the peak is taken on a
    one-thread call, where no worker thread allocates a workspace it would miss."""
    import torch

    from bench.timing import peak_memory_mib

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        peak = peak_memory_mib(lambda: seen.append(torch.get_num_threads()) or torch.ones(1 << 18), "cpu")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert peak >= 1.0  # the 1 MiB tensor the call allocated
