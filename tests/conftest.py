"""Test-wide settings. Importing this module never touches CUDA."""

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
