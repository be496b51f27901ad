"""Test-wide settings. Importing this module never touches CUDA."""

import hashlib
import os
import pathlib
import tempfile

import pytest
import torch


def _compile_cache_per_source():
    """torch's on-disk compile caches do not key a compiled graph on the Python autograd formula
    behind a custom op: a graph compiled before a change to the backward's arguments in
    symattn_kernels/ops.py was replayed after it (the compiled test then failed). So tests compile
    into a cache of their own per version of the package's Python sources (warm across runs of
    the same code), unless TORCHINDUCTOR_CACHE_DIR is set."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    package = pathlib.Path(__file__).resolve().parents[1] / "symattn_kernels"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_symattn_{digest.hexdigest()[:16]}"
    )


_compile_cache_per_source()


@pytest.fixture(autouse=True)
def _nan_filled_empty():
    # torch.empty (and empty_like) return NaN-filled memory under these flags, so an output a
    # kernel forgets to write fails loudly instead of passing on leftover zeros.
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    _count_triton_compiles(os.environ.get("SYMATTN_TRITON_COMPILE_LOG"))


def _count_triton_compiles(log_path):
    """With SYMATTN_TRITON_COMPILE_LOG set, append one line per Triton JIT compilation (kernel
    name, tab, cache key) to that file, from every process (pytest-xdist workers too): the GPU
    check counts the distinct kernel variants the suite compiles, its main cost on a fresh
    machine. Needs Triton's jit_post_compile_hook (Triton 3.4+); imports no CUDA."""
    if not log_path:
        return
    try:
        from triton import knobs
    except ImportError:
        return
    previous = knobs.runtime.jit_post_compile_hook

    def record(*, key, fn, **kwargs):
        with open(log_path, "a") as log:
            log.write(f"{fn.name}\t{key}".replace("\n", " ") + "\n")
        return previous(key=key, fn=fn, **kwargs) if previous else None

    knobs.runtime.jit_post_compile_hook = record
