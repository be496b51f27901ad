"""Names that moved (the backends into their own folder, ``params`` to ``parameter_counts``)
still resolve where they were documented, with a DeprecationWarning naming the new place."""

import pytest

# Without the extension (an sdist's tests, SYMATTN_JIT=0) the cpu backend does not import.
cpu = pytest.importorskip("symattn_kernels.backends.cpu", exc_type=ImportError)


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


def test_params_alias_warns_and_is_the_renamed_module():
    from symattn_kernels import parameter_counts, params

    with pytest.warns(DeprecationWarning, match=r"symattn_kernels\.parameter_counts\.count_parameters"):
        moved = params.count_parameters
    assert moved is parameter_counts.count_parameters


def test_params_command_warns_and_still_prints_usage():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-W", "default", "-m", "symattn_kernels.params", "--help"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python -m symattn_kernels.parameter_counts" in result.stdout
    assert "DeprecationWarning" in result.stderr and "parameter_counts" in result.stderr
