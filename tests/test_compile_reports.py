"""Static compile checks of docs/design.md, "How each backend is verified" (no GPU needed): every shipped CUDA C++ kernel builds
for sm_80 and sm_90a without spills."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_without_spills():
    result = subprocess.run([sys.executable, "-m", "bench.cuda_compile_report"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.slow
def test_triton_bert_configs_compile_without_spills_and_use_hgmma():
    # --quick: the configs of the default BERT shapes (head dim 64, shared-weight variants) and of
    # LAMA's benchmark call (E = 256, m = 8) for sm_80 and sm_90.
    result = subprocess.run([sys.executable, "-m", "bench.compile_report", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.slow
def test_triton_attention_configs_compile_without_spills_and_use_hgmma():
    # Every attention kernel, variant and config the launchers can pick, sm_80 and sm_90; the
    # sm_90 backward of head dims above 128 is listed unsupported (backend="auto" routes it to torch).
    result = subprocess.run([sys.executable, "-m", "bench.compile_report", "--kernels", "fwd", "bwd"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "spills" not in result.stdout


def test_attention_report_rows_are_the_launchers_shipped_set():
    """The report compiles what the launchers pick: the forward's pruned autotune configs with
    their SPLIT_D, each backward launch of bwd_plan, and lists as unsupported exactly the cases
    backward_unsupported refuses."""
    from bench import compile_report
    from symattn_kernels.triton.attention_bwd import backward_unsupported, bwd_plan
    from symattn_kernels.triton.attention_fwd import fwd_configs_for, fwd_split_d

    jobs = compile_report.jobs()
    for job in jobs:
        fl = compile_report.FLAG_SETS[job.flags]
        if job.kernel == "fwd":
            assert (job.block_m, job.block_n, job.num_warps, job.num_stages) in fwd_configs_for(
                1 << 16, job.head_dim, job.head_dim_v, fl["HAS_DROPOUT"], fl["COEF_MODE"], fl["SHARED_V"])
            assert job.split_d == fwd_split_d(job.head_dim_v, fl["HAS_DROPOUT"], job.arch)
        elif "unsupported" in job.result:
            assert backward_unsupported(job.head_dim, job.head_dim_v, job.arch)
        elif job.kernel in ("bwd", "bwd-q", "bwd-k"):
            fuse, config, splits = bwd_plan(job.head_dim, job.head_dim_v, fl["SHARED_V"], fl["COEF_MODE"],
                                            fl["HAS_DROPOUT"], job.arch)
            assert (job.block_m, job.block_n, job.num_warps, job.num_stages) == config
            assert job.split_d == splits[("bwd", "bwd-q", "bwd-k").index(job.kernel) - (0 if fuse else 1)]
            assert fuse == (job.kernel == "bwd")
    unsupported = {(job.arch, job.head_dim) for job in jobs if "unsupported" in job.result}
    assert unsupported == {(90, 256)}


@pytest.mark.slow
def test_triton_lama_configs_compile_without_spills():
    # Every LAMA kernel, variant and size of the report on sm_80 and sm_90; the sm_80 backward
    # from E = 512 or m = 32 on is listed unsupported (backend="auto" routes it elsewhere).
    result = subprocess.run([sys.executable, "-m", "bench.compile_report", "--kernels", "lama"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("| lama-") == 56
    assert result.stdout.count("unsupported: h has E") == 6


def test_lama_report_rows_use_the_launcher_config():
    from bench import compile_report
    from symattn_kernels.triton.lowrank import NORMALISE_BLOCK_T, backward_unsupported, lama_config

    quick = compile_report.lama_jobs(quick=True)
    assert {job.kernel for job in quick} == {"lama-fwd", "lama-norm", "lama-bwd"}
    assert {job.arch for job in quick} == set(compile_report.ARCHS)
    for job in compile_report.lama_jobs():
        if "unsupported" in job.result:
            assert job.kernel == "lama-bwd" and backward_unsupported(job.head_dim, job.head_dim_v, job.arch)
            continue
        if job.kernel == "lama-norm":
            assert job.block_m == NORMALISE_BLOCK_T
            continue
        config = lama_config(job.head_dim, job.head_dim_v, 1 << 16, job.kernel.removeprefix("lama-"))
        assert (job.block_m, job.head_dim, job.head_dim_v, job.num_warps) == (
            config["BLOCK_T"], config["BLOCK_E"], config["BLOCK_M"], config["num_warps"])
