#!/usr/bin/env bash
# `make dist-check` (part of `make test`, so of CI): the release path a user takes, end to end.
#
#   1. build the sdist (`python -m build --sdist`, against this venv's setuptools);
#   2. it holds every git-tracked file under csrc/ (a file added later cannot be forgotten), the
#      README, LICENSE and pyproject, and no build artefact;
#   3. build a wheel from that sdist, not from the tree, against this venv's torch; the wheel
#      carries the compiled symattn_kernels._C and the sources the just-in-time build needs;
#   4. install the wheel into a fresh venv (no symattn_kernels but the wheel's; torch, numpy,
#      pytest and hypothesis are borrowed from this venv through a .pth file rather than
#      reinstalled, which would double the run time);
#   5. from a directory outside the checkout: `python -m symattn_kernels.info` shows the cpu
#      backend usable through the prebuilt extension, and a smoke subset of the tests, taken from
#      the sdist, passes against the installed package.
# Prints PASS/FAIL per step and the time each took; exits 1 if any failed.
# Optional: CUDA_SDIST=1 also hands the sdist to scripts/check_cuda_build.sh (`make check-cuda-sdist`).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${DIST_CHECK_DIR:-/tmp/symattn-distcheck-$$}
export MAX_JOBS=${MAX_JOBS:-2}
START=$(date +%s)

declare -a RESULTS=()
FAILED=0
STEP_START=$START
record() {  # record NAME STATUS [DETAIL]
    local now; now=$(date +%s)
    RESULTS+=("$(printf '%-4s %-10s %4ss  %s' "$2" "$1" "$(( now - STEP_START ))" "${3:-}")")
    STEP_START=$now
    [ "$2" = FAIL ] && FAILED=1
    echo "== $2: $1 ${3:-}"
}
summary() {
    echo
    echo "dist-check summary ($(( $(date +%s) - START )) s in all; work folder $WORK)"
    printf '  %s\n' "${RESULTS[@]}"
    [ "$FAILED" = 0 ] && echo "PASS" || echo "FAIL"
    [ "$FAILED" = 0 ] && [ -z "${DIST_CHECK_DIR:-}" ] && rm -rf "$WORK"
    exit "$FAILED"
}

rm -rf "$WORK" && mkdir -p "$WORK"/{dist,wheel,outside}
cd "$WORK"  # never the checkout: its build/ folder would shadow the `build` package
for need in build wheel; do "$PY" -m pip show -q "$need" > /dev/null 2>&1 || "$PY" -m pip install -q "$need"; done

# ---- 1. sdist ----------------------------------------------------------------------------------
if ! "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" > "$WORK/sdist.log" 2>&1; then
    tail -20 "$WORK/sdist.log"
    record sdist FAIL "python -m build --sdist failed; see $WORK/sdist.log"
    summary
fi
SDIST=$(ls "$WORK"/dist/*.tar.gz)
record sdist PASS "$(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) kB)"

# ---- 2. contents -------------------------------------------------------------------------------
LISTING=$(tar tzf "$SDIST" | sed 's|^[^/]*/||')
missing=""
while read -r f; do
    grep -qxF "$f" <<< "$LISTING" || missing="$missing $f"
done < <(git -C "$ROOT" ls-files csrc; printf '%s\n' README.md LICENSE pyproject.toml setup.py MANIFEST.in)
artefacts=$(grep -E '\.(so|o|pyc)$|__pycache__|^build/|\.egg-info/.*\.so' <<< "$LISTING" | tr '\n' ' ')
tracked=$(git -C "$ROOT" ls-files csrc | wc -l)
if [ -n "$missing" ] || [ -n "$artefacts" ]; then
    record contents FAIL "missing:${missing:- none}; build artefacts: ${artefacts:-none}"
    summary
fi
record contents PASS "all $tracked tracked files of csrc/, README, LICENSE, pyproject; no artefacts"

# ---- 3. wheel from the sdist -------------------------------------------------------------------
if ! "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" "$SDIST" > "$WORK/wheel.log" 2>&1; then
    grep -E "error|Error" "$WORK/wheel.log" | head -20
    record wheel FAIL "pip wheel of the sdist failed; see $WORK/wheel.log"
    summary
fi
WHEEL=$(ls "$WORK"/wheel/*.whl)
WHEEL_FILES=$("$PY" -m zipfile -l "$WHEEL")
for want in 'symattn_kernels/_C\.[^ ]*\.so' 'symattn_kernels/csrc/cpu/isa\.h' 'symattn_kernels/csrc/cuda/binding\.cpp'; do
    if ! grep -qE "$want" <<< "$WHEEL_FILES"; then
        record wheel FAIL "$(basename "$WHEEL") lacks $want"
        summary
    fi
done
record wheel PASS "$(basename "$WHEEL") with _C and the shipped csrc/ (MAX_JOBS=$MAX_JOBS)"

# ---- 4. fresh venv -----------------------------------------------------------------------------
VENV="$WORK/venv"
BASE=$("$PY" -c "import sys; print(sys.base_prefix)")/bin/python3
"$BASE" -m venv --without-pip "$VENV"
VSITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$VSITE/borrowed-dependencies.pth"
if ! "$PY" -m pip --python "$VENV/bin/python" install -q --no-deps "$WHEEL" > "$WORK/install.log" 2>&1; then
    tail -20 "$WORK/install.log"
    record install FAIL "pip install of the wheel failed"
    summary
fi
record install PASS "into $VENV"

# ---- 5. the installed package, from outside the checkout ---------------------------------------
OUT="$WORK/outside"
tar xzf "$SDIST" -C "$OUT" --strip-components=1 --wildcards '*/tests/*' '*/pyproject.toml'
cd "$OUT"
where=$("$VENV/bin/python" -c "import symattn_kernels; print(symattn_kernels.__file__)")
case "$where" in
    "$VENV"/*) ;;
    *) record import FAIL "symattn_kernels imported from $where, not the fresh venv"; summary ;;
esac
info=$("$VENV/bin/python" -m symattn_kernels.info 2>&1)
echo "$info"
if grep -qE "^\s+cpu extension\s+prebuilt" <<< "$info" && grep -qE "^\s+cpu\s+yes\s+cpu\s+prebuilt extension" <<< "$info"; then
    record info PASS "cpu backend usable through the prebuilt extension ($(grep -oE 'kernel set [A-Z0-9_]+' <<< "$info" | head -1))"
else
    record info FAIL "python -m symattn_kernels.info does not show the cpu backend through the prebuilt extension"
fi
SMOKE="test_extensions or philox_bit_equal or opcheck_kernel_ops or auto_picks_cpu or (matches_reference_fp32 and shared and full and none and not noself)"
if "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_cpu_backend.py -k "$SMOKE" \
        tests/test_extensions.py -m "not slow" 2>&1 | tail -3 | tee "$WORK/smoke.log" | grep -qE "passed" \
        && ! grep -qE "failed|error" "$WORK/smoke.log"; then
    record smoke PASS "$(tail -1 "$WORK/smoke.log" | sed 's/=//g')"
else
    record smoke FAIL "$(tail -1 "$WORK/smoke.log")"
fi

# ---- optional: the CUDA build from the same sdist ----------------------------------------------
if [ "${CUDA_SDIST:-0}" = 1 ]; then
    if CUDA_CHECK_SOURCE="$SDIST" bash "$ROOT/scripts/check_cuda_build.sh"; then
        record cuda-sdist PASS "scripts/check_cuda_build.sh on the sdist"
    else
        record cuda-sdist FAIL "scripts/check_cuda_build.sh on the sdist"
    fi
fi
summary
