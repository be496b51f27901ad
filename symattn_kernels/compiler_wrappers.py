"""``torch.compiler`` wrappers (``disable``, ``assume_constant_result``) built when a traced call
first reaches them, not at ``import symattn_kernels``: building one imports torch._dynamo, which
would add about 1.5 s to the start of every process that never compiles anything.

A module registers a wrapper with ``defer(name, build)`` and its traced code calls it as
``compiler_wrappers.<name>(...)``. Until then the name is missing from this module's namespace,
so reading it runs the module's ``__getattr__`` (PEP 562), which builds the wrapper once. Dynamo
resolves a module attribute that is missing from the module's ``__dict__`` by calling ``getattr``
for real, not by tracing it, so the wrapper is built outside the trace and the trace meets a
finished one: tracing the ``torch.compiler.disable(...)`` call itself would break the graph at
that call, and ``fullgraph=True`` would then report a skipped torch function instead of the
wrapper's reason. ``tests/test_traced_calls.py`` checks both that the package imports without
torch._dynamo and that the reasons reach a full-graph compile."""

from __future__ import annotations

import threading
from typing import Any, Callable

_BUILDERS: dict[str, Callable[[], Any]] = {}
_LOCK = threading.Lock()


def defer(name: str, build: Callable[[], Any]) -> None:
    """Make ``compiler_wrappers.<name>`` the result of ``build()``, called at the first read."""
    if name in _BUILDERS:
        raise ValueError(f"a compiler wrapper named {name!r} is registered already")
    _BUILDERS[name] = build


def __getattr__(name: str) -> Any:
    build = _BUILDERS.get(name)
    if build is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _LOCK:
        if name not in globals():
            globals()[name] = build()
    return globals()[name]
