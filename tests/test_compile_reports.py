"""Static compile checks of SPEC section 6 (no GPU needed): every shipped CUDA C++ kernel builds
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
    # --quick: the configs of the default BERT shapes (head dim 64, shared-weight variants) for
    # sm_80 and sm_90. The full matrix (python -m bench.compile_report) still has spilling
    # configs, listed in the README.
    result = subprocess.run([sys.executable, "-m", "bench.compile_report", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
