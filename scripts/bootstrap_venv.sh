#!/usr/bin/env bash
# Create (first use) or update the project's virtual environment for `make test` / `make bench`.
# A torch the system Python already has (say a CUDA build) is reused through
# --system-site-packages, never replaced; otherwise torch==2.13.0 is installed (the CPU
# build from the local wheel cache on the project's machines).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "bootstrap: reusing the system torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
fi
"$VENV/bin/pip" install -q "triton>=3.2" numpy ninja "pytest>=8" "hypothesis>=6" "matplotlib>=3.7" "tqdm>=4.60" \
    "transformers>=5,<6"
"$VENV/bin/pip" install -q "onnxscript>=0.5" "onnxruntime>=1.20"
