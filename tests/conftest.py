"""Test-wide settings. Importing this module never touches CUDA."""

import os

import pytest
import torch


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
