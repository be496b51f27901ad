#!/usr/bin/env bash
# Opt-in check (`make check-cuda-build`) that csrc/cuda builds as a real torch CUDAExtension,
# links, loads and registers its ops, on a machine without a GPU. Not part of `make test` or CI:
# the CUDA build of torch it installs takes several GB.
#
#   1. a throwaway venv ($CUDA_CHECK_VENV) with a CUDA build of torch ($CUDA_CHECK_TORCH);
#      torch's CUDA major version must match nvcc's (torch.utils.cpp_extension refuses otherwise);
#   2. the source tree copied to $CUDA_CHECK_DIR (never built in place), or the sdist named by
#      $CUDA_CHECK_SOURCE unpacked there (`make check-cuda-sdist`), and installed there with
#      SYMATTN_BUILD_CUDA=1 (both symattn_kernels._C and symattn_kernels._C_cuda);
#   3. `ldd -r` of both libraries against torch's and the nvidia wheels' libraries: every library
#      found, and no undefined symbol but the Python C API (the interpreter provides it);
#   4. one cubin per .cu file and architecture of TORCH_CUDA_ARCH_LIST (cuobjdump --list-elf);
#   5. import: symattn::attention_{fwd,bwd}_cuda have a CUDA kernel, their fake functions give
#      the right shapes on fake CUDA tensors, and `python -m symattn_kernels.info` runs;
#   6. a few CPU-backend tests, so the CUDA part does not break the CPU build.
# Prints PASS/FAIL per check and exits 1 if any failed. Build log: $CUDA_CHECK_DIR/build.log.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CUDA_CHECK_VENV:-/tmp/symattn-cudatorch}
WORK=${CUDA_CHECK_DIR:-/tmp/symattn-cudabuild}
TORCH_SPEC=${CUDA_CHECK_TORCH:-torch==2.14.1}
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
export MAX_JOBS=${MAX_JOBS:-2}

declare -a RESULTS=()
FAILED=0
record() {  # record NAME STATUS [DETAIL]
    RESULTS+=("$(printf '%-4s %-22s %s' "$2" "$1" "${3:-}")")
    [ "$2" = FAIL ] && FAILED=1
    echo "== $2: $1 ${3:-}"
}
summary() {
    echo
    echo "check_cuda_build summary"
    printf '  %s\n' "${RESULTS[@]}"
    [ "$FAILED" = 0 ] && echo "PASS" || echo "FAIL"
    exit "$FAILED"
}

# ---- 1. venv with a CUDA torch -----------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || { record venv FAIL "cannot create $VENV"; summary; }
fi
if ! "$VENV/bin/python" -c "import torch, ninja, numpy, pytest, setuptools, wheel" 2>/dev/null; then
    echo "installing $TORCH_SPEC (a CUDA build: several GB) into $VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy ninja setuptools wheel "pytest>=8" \
        || { record venv FAIL "pip install $TORCH_SPEC failed"; summary; }
fi
PY="$VENV/bin/python"
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)
if [ -z "$TORCH_CUDA" ]; then
    record venv FAIL "torch $TORCH_VERSION in $VENV is a CPU build; set CUDA_CHECK_TORCH to a CUDA build"
    summary
fi
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && NVCC="$CUDA_HOME/bin/nvcc"
NVCC_CUDA=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
if [ -z "$NVCC_CUDA" ]; then
    record toolkit FAIL "nvcc not found (put it on PATH or set CUDA_HOME)"
    summary
fi
if [ "${TORCH_CUDA%%.*}" != "${NVCC_CUDA%%.*}" ]; then
    record toolkit FAIL "torch $TORCH_VERSION is built with CUDA $TORCH_CUDA but nvcc is $NVCC_CUDA (majors must match)"
    summary
fi
record toolkit PASS "torch $TORCH_VERSION (CUDA $TORCH_CUDA), nvcc $NVCC_CUDA"

# ---- 2. build in a copy of the tree ------------------------------------------------------------
rm -rf "$WORK" && mkdir -p "$WORK"
if [ -n "${CUDA_CHECK_SOURCE:-}" ]; then
    # A release: exactly what the sdist holds, nothing from the checkout.
    tar -C "$WORK" --strip-components=1 -xzf "$CUDA_CHECK_SOURCE" || { record source FAIL "cannot unpack $CUDA_CHECK_SOURCE"; summary; }
    record source PASS "unpacked $(basename "$CUDA_CHECK_SOURCE")"
else
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./bench/results -cf - . \
        | tar -C "$WORK" -xf -
fi
cd "$WORK"
start=$(date +%s)
SYMATTN_BUILD_CUDA=1 nice "$PY" -m pip install -v --no-build-isolation --no-deps -e . > build.log 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
SO_CPU=$(ls symattn_kernels/_C.*.so 2>/dev/null | head -1)
SO_CUDA=$(ls symattn_kernels/_C_cuda.*.so 2>/dev/null | head -1)
if [ "$rc" != 0 ] || [ -z "$SO_CPU" ] || [ -z "$SO_CUDA" ]; then
    grep -E "error|FAILED" build.log | grep -v Wunknown-pragmas | head -20
    record build FAIL "pip install exit $rc after ${elapsed}s; see $WORK/build.log"
    summary
fi
record build PASS "${elapsed}s with MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# ---- 3. ldd -r ---------------------------------------------------------------------------------
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
LIBS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib; do [ -d "$d" ] && LIBS="$LIBS:$d"; done
for so in "$SO_CPU" "$SO_CUDA"; do
    out=$(LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd -r "$so" 2>&1)
    missing=$(grep -c "not found" <<< "$out")
    undefined=$(grep "undefined symbol" <<< "$out" | awk '{print $3}')
    foreign=$(grep -vE '^_?Py' <<< "$undefined" | grep -c . )
    name=ldd-r:$(basename "${so%%.*}")
    if [ "$missing" != 0 ] || [ "$foreign" != 0 ]; then
        grep -E "not found" <<< "$out"; grep -vE '^_?Py' <<< "$undefined" | head -20
        record "$name" FAIL "$missing libraries not found, $foreign undefined non-Python symbols"
    else
        record "$name" PASS "all libraries found; undefined only: $(echo $undefined | tr -d '\n')"
    fi
done

# ---- 4. cubins for every architecture ----------------------------------------------------------
CUOBJDUMP=$(command -v cuobjdump || ls "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" \
            "$SITE/triton/backends/nvidia/bin/cuobjdump" 2>/dev/null | head -1)
if [ -n "$CUOBJDUMP" ]; then
    elves=$("$CUOBJDUMP" --list-elf "$SO_CUDA" 2>&1)
    missing=""
    for cu in csrc/cuda/*.cu; do
        for arch in $(tr ';' ' ' <<< "$TORCH_CUDA_ARCH_LIST"); do
            sm="sm_$(tr -d . <<< "${arch%%+*}")"
            grep -q "$(basename "${cu%.cu}").$sm" <<< "$elves" || missing="$missing $(basename "$cu"):$sm"
        done
    done
    if [ -z "$missing" ]; then
        record cubins PASS "$(grep -c 'ELF file' <<< "$elves") cubins ($(grep -o 'sm_[0-9a-z]*' <<< "$elves" | sort -u | tr '\n' ' '))"
    else
        record cubins FAIL "missing:$missing"
    fi
else
    record cubins SKIP "no cuobjdump found"
fi

# ---- 5. load, dispatch, fake functions, info ---------------------------------------------------
if "$PY" - <<'EOF'
import sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import symattn_kernels
from symattn_kernels.backends import cuda  # noqa: F401  (loads _C_cuda)

print(f"symattn_kernels from {symattn_kernels.__file__}, torch {torch.__version__}")
ok = True
for op in ("symattn::attention_fwd_cuda", "symattn::attention_bwd_cuda"):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    lines = [line for line in torch._C._dispatch_dump(op).splitlines() if line.startswith(("CUDA:", "Meta:"))]
    print(f"{op}: CUDA kernel {'yes' if has else 'NO'}")
    for line in lines:
        print("    " + line.split(" :: ")[0])
    ok &= has
with FakeTensorMode():
    q = torch.empty(2, 33, 3, 64, dtype=torch.float16, device="cuda")
    out, lse = torch.ops.symattn.attention_fwd_cuda(q, None, None, None, None, None, 0.125, True, 0.0, False, 33)
    fake_ok = tuple(out.shape) == (2, 33, 3, 64) and tuple(lse.shape) == (2, 3, 33) and lse.dtype == torch.float32
print(f"fake attention_fwd_cuda on fake CUDA tensors: {'ok' if fake_ok else 'WRONG'} {tuple(out.shape)} {tuple(lse.shape)}")
sys.exit(0 if ok and fake_ok else 1)
EOF
then
    record dispatch PASS "attention_{fwd,bwd}_cuda: CUDA kernel registered, fake functions ok"
else
    record dispatch FAIL "see the output above"
fi
info=$("$PY" -m symattn_kernels.info 2>&1)
echo "$info" | grep -v "No CUDA runtime is found"
backend_line=$(grep -E "^\s+cuda\s+(yes|no)\s" <<< "$info" | sed 's/^ *//' | tr -s ' ')
if grep -qE "^cuda (yes|no) cuda prebuilt extension symattn_kernels._C_cuda" <<< "$backend_line"; then
    record info PASS "backend line: $backend_line"
else
    record info FAIL "symattn_kernels.info does not report the cuda backend as built"
fi

# ---- 6. the CPU build still works --------------------------------------------------------------
CPU_TESTS="philox_bit_equal or dropout_mask_bit_equal or opcheck_kernel_ops or auto_picks_cpu"
CPU_TESTS="$CPU_TESTS or (matches_reference_fp32 and shared and full and none and not noself)"
if nice "$PY" -m pytest -q -p no:cacheprovider tests/test_cpu_backend.py -k "$CPU_TESTS" 2>&1 | tail -3; then
    record cpu-tests PASS "tests/test_cpu_backend.py subset"
else
    record cpu-tests FAIL "tests/test_cpu_backend.py subset"
fi

summary
