"""How the compiled kernels reach a process (``symattn_kernels.extensions``): prebuilt, just in
time or absent, and what a user sees in each case.

The failed imports are simulated: in-process by replacing ``importlib.import_module`` for the
extension's name, and in subprocesses (where ``import symattn_kernels`` itself is under test) by a
meta-path finder that makes ``symattn_kernels._C`` fail the way a library built against another
torch does. One slow test compiles the CPU kernels just in time for real.
"""

from __future__ import annotations

import importlib
import os
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import backends, extensions
from symattn_kernels.backends import registry
from symattn_kernels import reference as R

ROOT = Path(__file__).resolve().parent.parent
UNDEFINED = "undefined symbol: _ZN3c1017SymbolFromAnotherTorchEv"

# Prepended to a subprocess's code: symattn_kernels._C exists but fails to load, as it does when
# torch changed after the build.
BREAK_C = f"""
import importlib.abc, importlib.machinery, sys
class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "symattn_kernels._C":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError({UNDEFINED!r})
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Broken())
"""


@pytest.fixture
def fresh(monkeypatch):
    """Forget every probe, so the test's simulated environment is what the package sees."""
    monkeypatch.setattr(extensions, "_STATES", {})
    monkeypatch.setattr(extensions, "_WARNED", set())
    monkeypatch.setattr(registry, "_STATUS_CACHE", {})


def _break_prebuilt(monkeypatch, module="symattn_kernels._C"):
    real = importlib.import_module

    def import_module(name, *args):
        if name == module:
            raise ImportError(UNDEFINED)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=600)


def test_prebuilt_extension_reported_as_such():
    if not extensions.state("cpu").loaded:
        pytest.skip("symattn_kernels._C is not built here")
    assert extensions.state("cpu").how == extensions.PREBUILT
    assert sk.info()["extensions"]["cpu"] == extensions.PREBUILT


def test_broken_prebuilt_without_jit_warns_once_and_falls_back_to_torch(fresh, monkeypatch):
    _break_prebuilt(monkeypatch)
    monkeypatch.setenv("SYMATTN_JIT", "0")
    with pytest.warns(RuntimeWarning) as caught:
        assert extensions.state("cpu").how == extensions.ABSENT
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
        extensions.load("cpu")
    messages = [str(w.message) for w in caught if "symattn_kernels" in str(w.message)]
    assert len(messages) == 1, messages
    assert UNDEFINED in messages[0] and "another torch" in messages[0]
    assert "backend='torch'" in messages[0] and "--no-build-isolation" in messages[0]
    with pytest.raises(ValueError, match="SYMATTN_JIT=0"):
        backends.resolve("cpu", torch.device("cpu"), torch.float32)
    assert sk.info()["extensions"]["cpu"] == extensions.ABSENT


def test_import_never_fails_when_the_extension_does_not_load():
    # The whole path in a fresh interpreter: import, first CPU call, info().
    code = BREAK_C + """
import warnings
warnings.simplefilter("always")
import torch
import symattn_kernels as sk
from symattn_kernels import backends, reference as R
y = torch.randn(2, 9, 2, 8, dtype=torch.float64).float()
out = sk.shared_attention(y)
torch.testing.assert_close(out.double(), R.shared_attention(y.double()), atol=1e-5, rtol=0)
print("backend", backends.resolve("auto", y.device, y.dtype))
print("how", sk.info()["extensions"]["cpu"])
"""
    result = _run(code, SYMATTN_JIT="0")
    assert result.returncode == 0, result.stderr
    assert "backend torch" in result.stdout and "how absent" in result.stdout
    assert result.stderr.count(UNDEFINED) == 1, result.stderr
    assert "ImportError" not in result.stderr and "Traceback" not in result.stderr


def test_broken_prebuilt_with_a_compiler_is_rebuilt_just_in_time(fresh, monkeypatch, capsys, tmp_path):
    _break_prebuilt(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty build folder: a real build
    monkeypatch.delenv("SYMATTN_JIT", raising=False)
    monkeypatch.setattr(extensions, "_jit_blocker", lambda spec: "")
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: calls.append(kw))
    with pytest.warns(RuntimeWarning, match="rebuilding it just in time"):
        current = extensions.state("cpu")
    assert current.how == extensions.JIT and not current.loaded
    assert sk.info()["extensions"]["cpu"] == extensions.JIT and not calls  # info() compiles nothing
    assert extensions.load("cpu").loaded and len(calls) == 1
    extensions.load("cpu")
    assert len(calls) == 1  # once per process
    kw = calls[0]
    shipped = {str(p) for p in (extensions.source_root()).glob("*.cpp")}
    shipped |= {str(p) for p in (extensions.source_root() / "cpu").glob("*.cpp")}
    assert set(kw["sources"]) == shipped and len(shipped) >= 5
    assert kw["name"] == extensions.jit_name("cpu") and not kw["is_python_module"]
    assert torch.__version__.replace(".", "_").replace("+", "_") in kw["name"]
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == 1 and "compiling the fused CPU kernels just in time" in log[0] and log[0].endswith(" s")


def test_a_cached_jit_build_loads_without_saying_it_compiles(fresh, monkeypatch, capsys, tmp_path):
    """Every new process printed "compiling ... just in time" although torch's folder held the
    build already and load() only checked it."""
    _break_prebuilt(monkeypatch)
    monkeypatch.delenv("SYMATTN_JIT", raising=False)
    monkeypatch.setattr(extensions, "_jit_blocker", lambda spec: "")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = extensions.jit_name("cpu")
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"")
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: None)
    with pytest.warns(RuntimeWarning, match="rebuilding it just in time"):
        assert extensions.load("cpu").loaded
    assert "compiling" not in capsys.readouterr().err


def test_failed_jit_build_warns_and_leaves_the_torch_path(fresh, monkeypatch):
    monkeypatch.setattr(extensions, "_try_prebuilt", lambda spec: (False, "symattn_kernels._C is not built"))
    monkeypatch.setattr(extensions, "_jit_blocker", lambda spec: "")

    def fail(**kw):
        raise RuntimeError("Error building extension 'symattn_cpu': c++: fatal error")

    monkeypatch.setattr("torch.utils.cpp_extension.load", fail)
    with pytest.warns(RuntimeWarning, match="just-in-time build of the fused CPU kernels failed.*backend='torch'"):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    assert extensions.state("cpu").how == extensions.ABSENT


def test_no_compiler_warns_once_naming_the_slower_path_and_the_build_command(fresh, monkeypatch):
    monkeypatch.setattr(extensions, "_try_prebuilt", lambda spec: (False, "symattn_kernels._C is not built"))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in sk.info()["backends"]["cpu"]["reason"]
    with pytest.warns(RuntimeWarning) as caught:
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
        extensions.load("cpu")
    (message,) = [str(w.message) for w in caught]
    assert "backend='torch'" in message and "pip install --no-build-isolation" in message
    y = torch.randn(1, 5, 1, 8)
    torch.testing.assert_close(sk.shared_attention(y).double(), R.shared_attention(y.double()), atol=1e-5, rtol=0)


class _Installed:
    def __init__(self, direct_url):
        self.direct_url = direct_url

    def read_text(self, name):
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.mark.parametrize("direct_url,command", [
    (None, "--no-deps symattn_kernels"),
    ({"url": "file:///src/sym%20attn", "dir_info": {}}, "--force-reinstall --no-deps '/src/sym attn'"),
    ({"url": "file:///src/symattn", "dir_info": {"editable": True}}, "--no-build-isolation --no-deps -e /src/symattn"),
    ({"url": "file:///dl/symattn_kernels-0.1.0.tar.gz", "archive_info": {}}, "--no-deps /dl/symattn_kernels-0.1.0.tar.gz"),
    ({"url": "file:///dl/symattn_kernels-0.1.0-py3-none-any.whl", "archive_info": {}}, "--no-deps symattn_kernels"),
    ({"url": "https://example.org/sym.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}},
     "--no-deps git+https://example.org/sym.git@abc123"),
], ids=["index", "folder", "editable", "sdist", "wheel", "git"])
def test_the_build_command_names_the_source_pip_installed_from(monkeypatch, direct_url, command):
    """The warnings named `pip install ... symattn_kernels`, a package index's copy, also for an
    install from a checkout or an archive, where that fails or builds another version."""
    monkeypatch.setattr("importlib.metadata.distribution", lambda name: _Installed(direct_url))
    built = extensions.build_command()
    assert built.startswith("pip install --no-build-isolation") and built.endswith(command), built


def test_jit_switch_and_cuda_needs_a_device(fresh, monkeypatch):
    monkeypatch.setenv("SYMATTN_JIT", "0")
    assert "SYMATTN_JIT=0" in extensions._jit_blocker(extensions._KINDS["cpu"])
    monkeypatch.delenv("SYMATTN_JIT")
    if not torch.cuda.is_available():
        assert extensions._jit_blocker(extensions._KINDS["cuda"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no GPU here: a missing CUDA extension is no news
            assert not extensions.load("cuda").loaded


def test_shipped_sources_cover_every_build_source():
    root = extensions.source_root()
    assert root is not None and (root / "cpu" / "isa.h").is_file() and (root / "cuda" / "binding.cpp").is_file()


@pytest.mark.slow
def test_real_just_in_time_build_runs_the_fused_kernels(tmp_path):
    # Prebuilt _C made unloadable, so the first CPU call compiles the shipped sources. The cache
    # lives in build/ (ignored by git), so later runs of this test only relink nothing.
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or str(ROOT / "build" / "torch_extensions")
    code = BREAK_C + """
import warnings
warnings.simplefilter("ignore")
import torch
import symattn_kernels as sk
from symattn_kernels import backends, reference as R
print("before", sk.info()["extensions"]["cpu"])
y = torch.randn(2, 33, 3, 16)
v = torch.randn(2, 33, 3, 16)
out = sk.symmetric_attention(y, v, causal=True, backend="cpu")
torch.testing.assert_close(out.double(), R.symmetric_attention(y.double(), v.double(), causal=True), atol=1e-5, rtol=0)
print("after", sk.info()["extensions"]["cpu"], sk.info()["versions"]["cpu kernel set"])
print("status", backends.status("cpu").reason)
"""
    name = extensions.jit_name("cpu")
    cached = os.path.exists(os.path.join(cache, name, f"{name}.so"))
    result = _run(code, TORCH_EXTENSIONS_DIR=cache, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before just-in-time" in result.stdout and "after just-in-time" in result.stdout
    assert "just-in-time build" in result.stdout
    # A first build says so; a cached one loads quietly (or says it rebuilt stale sources).
    assert result.stderr.count("compiling the fused CPU kernels just in time") == (0 if cached else 1)
    assert result.stderr.count("rebuilt the fused CPU kernels just in time") <= (1 if cached else 0)


def test_bogus_backend_variable_names_the_variable(monkeypatch):
    monkeypatch.setenv("SYMATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SYMATTN_BACKEND.*'bogus'"):
        sk.shared_attention(torch.randn(1, 4, 1, 8))


def test_bogus_cpu_isa_variable_is_an_error():
    if not extensions.state("cpu").loaded:
        pytest.skip("symattn_kernels._C is not built here")
    code = "import torch, symattn_kernels as sk; sk.shared_attention(torch.randn(1, 4, 1, 8), backend='cpu')"
    result = _run(code, SYMATTN_CPU_ISA="bogus")
    assert result.returncode != 0
    assert "ValueError: SYMATTN_CPU_ISA='bogus'" in result.stderr and "avx512" in result.stderr


def test_info_prints_as_a_table_with_the_cpu_kernel_set():
    report = sk.info()
    text = str(report)
    assert repr(report) == text and text.startswith("symattn_kernels diagnostics")
    assert "cpu kernel set" in text and "cpu extension" in text
    for name in backends.BACKENDS:
        assert f"\n  {name} " in text
    if extensions.state("cpu").loaded:
        assert report["versions"]["cpu kernel set"] in ("AVX512_AMX", "AVX512_BF16", "AVX512", "AVX2", "DEFAULT")


def test_hf_integration_without_transformers_names_the_extra():
    code = "import sys; sys.modules['transformers'] = None\nimport symattn_kernels.integrations.hf"
    result = _run(code)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "symattn_kernels[hf]" in result.stderr
