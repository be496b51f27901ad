"""Names that moved when the backends got their own folder still resolve where they were
documented, with a DeprecationWarning naming the new place."""

import pytest

from symattn_kernels.backends import cpu


def test_cpu_backend_kernel_isa_warns_and_is_the_moved_function():
    from symattn_kernels import cpu_backend

    with pytest.warns(DeprecationWarning, match=r"symattn_kernels\.backends\.cpu\.kernel_isa"):
        moved = cpu_backend.kernel_isa
    assert moved is cpu.kernel_isa


def test_cpu_backend_from_import_warns():
    with pytest.warns(DeprecationWarning, match="goes in 0.2.0"):
        from symattn_kernels.cpu_backend import kernel_isa
    assert kernel_isa is cpu.kernel_isa


def test_cpu_backend_unknown_name_is_an_attribute_error():
    from symattn_kernels import cpu_backend

    with pytest.raises(AttributeError, match="no_such_name"):
        cpu_backend.no_such_name
