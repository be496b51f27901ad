"""How each compiled extension reaches this process: prebuilt, just in time, or absent.

``symattn_kernels._C`` (the fused CPU kernels) and ``_C_cuda`` (the CUDA kernels) are built by
``pip install --no-build-isolation`` against the torch installed at that moment. Where the
prebuilt module is missing (a plain ``pip install``, whose isolated build sees no torch) or does
not load (built against another torch: "undefined symbol"), the first use of its backend compiles
the same sources, which ship inside the package (``symattn_kernels/csrc``), with
``torch.utils.cpp_extension.load``: ninja, cached in torch's extensions folder
(``TORCH_EXTENSIONS_DIR``) under a name holding the torch version, so once per torch version.
``SYMATTN_JIT=0`` turns that off. Without a compiler the backend is absent, and one warning names
the slower path taken and the command that builds the kernels. Nothing here raises: a broken
extension costs speed, never ``import symattn_kernels``.

``state(kind)`` answers without compiling (``info()`` uses it); ``load(kind)`` also compiles when
that is the way (the backends use it on first use); ``require(kind)`` is ``load`` for the backend
modules, which cannot run without their ops.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

PREBUILT, JIT, ABSENT = "prebuilt", "just-in-time", "absent"

_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps"


def build_command() -> str:
    """The pip command that rebuilds this install with its kernels: from the source pip installed
    it from where pip recorded one (PEP 610's direct_url.json: a folder, a source archive, a
    version-control URL), else by name from the package index."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        recorded = json.loads(distribution("symattn_kernels").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError, OSError):
        recorded = {}
    url = recorded.get("url", "") if isinstance(recorded, dict) else ""
    if url and "vcs_info" in recorded:
        vcs = recorded["vcs_info"]
        commit = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return f"{_REBUILD} {shlex.quote(vcs.get('vcs', 'git') + '+' + url + commit)}"
    if url.startswith("file://") and not url.endswith(".whl"):  # a wheel holds no sources to build
        path = shlex.quote(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if recorded.get("dir_info", {}).get("editable"):
            return f"pip install --no-build-isolation --no-deps -e {path}"
        return f"{_REBUILD} {path}"
    return f"{_REBUILD} symattn_kernels"


@dataclass(frozen=True)
class _Spec:
    kind: str  # the backend it serves: "cpu" or "cuda"
    module: str  # the prebuilt module
    label: str  # for messages
    sources: tuple[str, ...]  # globs under csrc/
    fallback: str  # the slower path a missing extension leaves


_KINDS = {
    "cpu": _Spec("cpu", "symattn_kernels._C", "fused CPU kernels", ("*.cpp", "cpu/*.cpp"),
                 "backend='torch' (composite PyTorch, slower) for CPU attention"),
    "cuda": _Spec("cuda", "symattn_kernels._C_cuda", "CUDA C++ kernels", ("cuda/*.cpp", "cuda/*.cu"),
                  "backend='triton' or 'torch' for CUDA attention"),
}


@dataclass(frozen=True)
class ExtensionState:
    """``how``: PREBUILT, JIT or ABSENT; ``loaded``: its ops are registered in this process;
    ``detail``: one line for ``info()`` (where it came from, or why it is absent and how to get it)."""
    how: str
    loaded: bool
    detail: str


_STATES: dict[str, ExtensionState] = {}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"symattn_kernels: {message}", RuntimeWarning, stacklevel=4)


def source_root() -> Path | None:
    """The csrc/ tree: package data of an installed wheel, else the checkout's (editable installs)."""
    here = Path(__file__).resolve().parent
    for root in (here / "csrc", here.parent / "csrc"):
        if (root / "symattn.cpp").is_file():
            return root
    return None


def _sources(spec: _Spec, root: Path) -> list[str]:
    return sorted(str(p) for pattern in spec.sources for p in root.glob(pattern))


def jit_name(kind: str) -> str:
    """The cache entry's name: one per torch version, so a new torch never loads an old build."""
    return re.sub(r"\W", "_", f"symattn_{kind}_torch{torch.__version__}")


def _put_ninja_on_path() -> None:
    # torch looks for a `ninja` executable on PATH; the ninja wheel (a dependency) installs one
    # into the environment's bin folder, which is not on PATH when the venv is not activated.
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", "")
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")])


def _jit_blocker(spec: _Spec) -> str:
    """Why a just-in-time build cannot happen here ("" when it can)."""
    if os.environ.get("SYMATTN_JIT", "1") == "0":
        return "SYMATTN_JIT=0 turns the just-in-time build off"
    root = source_root()
    if root is None or not _sources(spec, root):
        return "its sources are not shipped with this installation"
    from torch.utils import cpp_extension

    if not shutil.which(os.environ.get("CXX", "c++")):
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (`pip install ninja`)"
    if spec.kind == "cuda":
        if not torch.version.cuda:
            return f"torch {torch.__version__} is a CPU build"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return ""


def _try_prebuilt(spec: _Spec) -> tuple[bool, str]:
    """(loaded, why not): import the prebuilt module; a failing import (built against another
    torch) warns once and reports why."""
    if importlib.util.find_spec(spec.module) is None:
        return False, f"{spec.module} is not built"
    try:
        importlib.import_module(spec.module)
    except (ImportError, OSError) as err:
        return False, f"{spec.module} does not load ({err}); it was built against another torch than {torch.__version__}"
    return True, ""


def _describe_absent(spec: _Spec, why: str, blocker: str) -> str:
    first = "a CUDA build of torch and the CUDA toolkit" if spec.kind == "cuda" else "torch and a C++ compiler"
    return (f"{why}, and no just-in-time build: {blocker}. Runs {spec.fallback}; to build the kernels, with "
            f"{first} installed: `{build_command()}` (or `pip install --no-build-isolation .` in a source checkout)")


def state(kind: str) -> ExtensionState:
    """Which way the extension of backend ``kind`` reaches this process, without compiling."""
    if kind in _STATES:
        return _STATES[kind]
    spec = _KINDS[kind]
    loaded, why = _try_prebuilt(spec)
    if loaded:
        _STATES[kind] = ExtensionState(PREBUILT, True, f"prebuilt extension {spec.module}")
        return _STATES[kind]
    blocker = _jit_blocker(spec)
    if "does not load" in why:
        then = "rebuilding it just in time on first use" if not blocker else f"falling back to {spec.fallback}"
        _warn_once(kind, f"{why}; {then}. Reinstall to rebuild it: `{build_command()}`")
    if blocker:
        _STATES[kind] = ExtensionState(ABSENT, False, _describe_absent(spec, why, blocker))
    else:
        _STATES[kind] = ExtensionState(JIT, False, f"just-in-time: {why}; compiled from the shipped sources on "
                                       "first use (once per torch version, cached in torch's extensions folder)")
    return _STATES[kind]


def _compile(spec: _Spec) -> None:
    from torch.utils import cpp_extension

    name = jit_name(spec.kind)
    flags = ["-O3", "-fopenmp"]
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    # torch's folder for the build; where it holds the library already, load() only checks it is
    # current, and every later process would otherwise say it is compiling.
    cached = os.path.exists(os.path.join(cache, name, f"{name}.so"))
    if not cached:
        sys.stderr.write(f"symattn_kernels: compiling the {spec.label} just in time, once per torch version "
                         f"({name} under {cache}) ...")
        sys.stderr.flush()
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=name, sources=_sources(spec, source_root()), extra_cflags=flags, extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"], is_python_module=False, verbose=False,
        )
    finally:
        took = time.perf_counter() - start
        if not cached:
            sys.stderr.write(f" {took:.0f} s\n")
        elif took > 2.0:  # the cached build was stale (other sources): rebuilt
            sys.stderr.write(f"symattn_kernels: rebuilt the {spec.label} just in time ({name} under {cache}), "
                             f"{took:.0f} s\n")


def load(kind: str) -> ExtensionState:
    """``state(kind)``, with a just-in-time build done now where that is the way. An absent
    extension (no compiler, or a failed build) warns once, naming the fallback and the command
    that builds the kernels (for CUDA only where a device would use them)."""
    current = state(kind)
    if current.how == ABSENT and (kind == "cpu" or torch.cuda.is_available()):
        _warn_once(kind, current.detail)
    if current.how != JIT or current.loaded:
        return current
    spec = _KINDS[kind]
    try:
        _compile(spec)
    except Exception as err:  # a compiler error must cost speed only, never the caller's run
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        _warn_once(f"{kind}:build", f"the just-in-time build of the {spec.label} failed ({last}); using {spec.fallback}. "
                         f"Build them with `{build_command()}`")
        _STATES[kind] = ExtensionState(ABSENT, False, f"the just-in-time build failed ({last}); runs {spec.fallback}")
    else:
        _STATES[kind] = ExtensionState(JIT, True, f"just-in-time build {jit_name(kind)} (torch extensions folder)")
    return _STATES[kind]


def require(kind: str) -> None:
    """Load the extension of backend ``kind`` or raise ImportError saying why it is absent."""
    current = load(kind)
    if not current.loaded:
        raise ImportError(current.detail)
