"""`make gpu-check`'s plumbing, rehearsed without a GPU: the dry run reaches every step, writes
its files and ends with the summary; capped steps are interrupted, then killed."""

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("bench", reason="bench/ is in the source checkout, not the sdist")
from bench import gpu_check, runner  # noqa: E402
from bench.registry import REGISTRY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FILES = {"versions.txt", "install.log", "pytest-gpu.log", "junit-gpu.xml", "bench.log", "cpu.csv",
                  "summary.md"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    return result, out


def test_dry_run_passes_and_writes_its_files(dry_run):
    result, out = dry_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    files = {path.name for path in out.iterdir()}
    assert files == EXPECTED_FILES
    assert len(files) <= gpu_check.MAX_FILES and all((out / name).stat().st_size > 0 for name in files)


def test_dry_run_reaches_every_step_and_reports_cuda_steps_skipped(dry_run):
    result, out = dry_run
    summary = (out / "summary.md").read_text()
    statuses = {line.split("|")[1].strip(): line.split("|")[2].strip()
                for line in summary.splitlines() if line.startswith("| ") and line.count("|") == 6}
    assert statuses == {"step": "status", "versions": "pass", "install": "skipped", "tests": "skipped",
                        "warm": "skipped", "bench": "dry"}
    assert "DRY RUN" in summary
    # The summary is printed last: the output's tail carries it whole.
    assert result.stdout.rstrip().endswith(summary.rstrip())


def test_dry_run_collects_the_gpu_suite_and_skips_it(dry_run):
    _, out = dry_run
    counts = gpu_check.junit_counts(out / "junit-gpu.xml")
    assert counts["tests"] > 50 and counts["skipped"] == counts["tests"]
    reasons = {element.get("message") for element in ET.parse(out / "junit-gpu.xml").iter("skipped")}
    assert reasons == {"needs a CUDA device"}


def test_dry_run_bench_measures_and_reports_missing_providers(dry_run):
    _, out = dry_run
    rows = gpu_check.read_rows(out / "cpu.csv")
    assert any(row["provider"] == "sdpa-flash" and row["status"] == "ok" for row in rows)
    summary = (out / "summary.md").read_text()
    missing = summary.split("Providers that did not run:")[1]
    for provider in ("flash_attn_func", "symattn-triton-sepv", "flex_attention"):
        assert f"- {provider} " in missing
    assert " sdpa-flash |" in summary.split("Benchmark")[1]  # a column of the bench table


def test_capped_step_gets_sigint_then_is_killed(tmp_path):
    log = tmp_path / "step.log"
    child = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('wrote partial results',"
             " flush=True)\n    time.sleep(60)\n")
    start = time.monotonic()
    # SIGINT comes at 0.8 of the cap: time enough for the child to start on a loaded machine.
    code, seconds = gpu_check.run_capped([sys.executable, "-c", child], log, cap_s=8)
    assert code is None and seconds < 8 + 2 and time.monotonic() - start < 8 + 2
    text = log.read_text()
    assert "wrote partial results" in text and "timed out" in text


def test_step_inside_its_cap_keeps_its_exit_code(tmp_path):
    code, _ = gpu_check.run_capped([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "step.log", cap_s=30)
    assert code == 3


def test_compile_summary_counts_distinct_kernel_variants(tmp_path):
    log = tmp_path / "compiles.tsv"
    log.write_text("_symattn_fwd_kernel\tkey-a\n_symattn_fwd_kernel\tkey-a\n_symattn_fwd_kernel\tkey-b\n"
                   "_symattn_bwd_kernel\tkey-c\n")
    assert gpu_check.compile_summary(log) == ("3 distinct (4 in all workers): _symattn_fwd_kernel 2, "
                                              "_symattn_bwd_kernel 1")
    assert gpu_check.compile_summary(tmp_path / "absent.tsv") == "none recorded"


def test_bench_table_compares_our_best_with_the_fastest_peer():
    def row(provider, ms, status="ok"):
        return {"provider": provider, "mode": "fwd", "D": "64", "causal": "False", "S": "128", "B": "128",
                "H": "32", "status": status, "median_ms": str(ms), "tflops": str(1.0 / ms)}

    rows = [row("symattn-triton", 2.0), row("symattn-triton-sepv", 4.0), row("sdpa-flash", 3.0),
            row("sdpa-cudnn", 2.5), row("flex_attention", 1.0, "error: RuntimeError: x")]
    table = gpu_check.bench_table(rows)
    assert table[0].split("|")[6:9] == [" triton ", " triton-sepv ", " sdpa-flash "]
    assert table[-1].endswith("| 1.25× |")  # 2.5 ms (cuDNN) over 2.0 ms (ours)


def test_interrupted_benchmark_keeps_the_finished_shapes(monkeypatch):
    calls = []

    def run_shape(plan, op, providers, shape, dtype_name, context, progress):
        calls.append(shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [{"shape": shape}]

    monkeypatch.setattr(runner, "_run_shape", run_shape)
    op = REGISTRY["shared_attention"]
    plan = runner.Plan(ops=[(op, op.shape_sets["spec"], ["fp32"])], modes=["fwd"], device="cpu", min_run_time=0.01)
    rows, _, interrupted = runner.run(plan)
    assert interrupted and rows == [{"shape": op.shape_sets["spec"][0]}]


def test_a_failed_step_is_summarised_by_its_last_error(tmp_path):
    log = tmp_path / "install.log"
    log.write_text("$ pip install -e .\n  OSError: CUDA_HOME is not set\nhint: See above for details.\n\n"
                   "[exit 1 after 7.7 s, cap 120 s]\n")
    assert gpu_check._last_error(log) == "OSError: CUDA_HOME is not set"
    log.write_text("$ python -m bench --device cuda\n--device cuda: no CUDA device is visible to torch\n\n[exit 1]\n")
    assert gpu_check._last_error(log) == "--device cuda: no CUDA device is visible to torch"


def test_warm_tasks_compile_each_variant_of_the_sweep_once():
    sweep = REGISTRY["shared_attention"].shape_sets["gpu-check"]
    tasks = gpu_check._warm_tasks()
    ours = [(name, shape) for name, shape in tasks if name in gpu_check.WARM_PROVIDERS]
    variants = {(s.H, s.D, s.causal) for s in sweep}
    assert sorted((name, (s.H, s.D, s.causal)) for name, s in ours) == sorted(
        (name, v) for name in gpu_check.WARM_PROVIDERS for v in variants)
    assert {s.S for _, s in ours} == {min(s.S for s in sweep)}  # the autotuner keeps every candidate there
    assert [shape for name, shape in tasks if name == "flex_attention"] == sweep  # compiled per shape
