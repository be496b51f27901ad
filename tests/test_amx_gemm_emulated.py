"""The AMX tile products (``csrc/cpu/amx_gemm.h``) on an emulated tile unit, so that they are
checked on every x86-64 machine, not only where the CPU has AMX (``test_cpu_bf16_paths.py`` runs
the real build there): whole and ragged sizes, k below a tile, odd and long k, each kind of alpha
(1, a power of two below 1, other), accumulating or not, kTransA and causal bands, against an fp64
reference, with C left untouched outside its [m, n] block and no tile load or store outside the
caller's buffers (AddressSanitizer); alpha = 1/8 bit-equal to an eighth of alpha = 1; and the tile
configuration loaded once per AmxTileScope and never left loaded outside one
(``tests/cpp/amx_gemm_emulated.cpp`` holds the checks)."""

import os
import platform
import shutil
import subprocess

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE = os.path.join(_ROOT, "tests", "cpp", "amx_gemm_emulated.cpp")


def _build(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("needs g++ on x86-64 (amx_gemm.h includes immintrin.h)")
    from torch.utils.cpp_extension import include_paths

    binary = str(tmp_path / "amx_gemm_emulated")
    base = ["g++", "-std=c++17", "-O2", "-ffp-contract=off", *[f"-I{p}" for p in include_paths()], _SOURCE, "-o", binary]
    result = subprocess.run([*base[:1], "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", *base[1:]],
                            capture_output=True, text=True)
    if result.returncode != 0 and "asan" in (result.stderr + result.stdout).lower():
        result = subprocess.run(base, capture_output=True, text=True)  # no sanitizer runtime here
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


def test_amx_gemm_on_emulated_tiles(tmp_path):
    binary = _build(tmp_path)
    result = subprocess.run([binary], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, "\n".join(lines[-20:]) + result.stderr[-4000:]
    assert lines and lines[-1].endswith(" 0 failed"), lines[-1:]
