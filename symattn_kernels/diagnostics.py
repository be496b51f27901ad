"""Diagnostics: versions and, for every backend, whether it is usable here and why not.

``python -m symattn_kernels.info`` prints the table.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import backends, extensions


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Info(dict):
    """The dict ``info()`` returns; printed (``print(sk.info())``) or shown in a REPL it is the
    table of ``python -m symattn_kernels.info``."""

    def __repr__(self) -> str:
        return format_info(self)

    __str__ = __repr__


def _cpu_kernel_set() -> str:
    ext = extensions.state("cpu")
    if not ext.loaded:
        return "chosen at the first call" if ext.how == extensions.JIT else "-"
    return torch.ops.symattn.cpu_kernel_isa()


def info() -> Info:
    """Versions and backend availability: ``{"versions": {...}, "extensions": {...},
    "backends": {name: {...}}}``. Builds nothing: a just-in-time extension shows as such until
    its first use compiles it.

    ``extensions`` maps ``cpu`` / ``cuda`` to how their compiled kernels reach this process:
    "prebuilt", "just-in-time" or "absent" (``symattn_kernels.extensions``). Each backend entry
    has ``usable`` (bool), ``reason`` (what it runs on, or why it cannot run here and how to get
    it) and ``devices`` (the tensor device types it accepts).
    """
    versions = {
        "symattn_kernels": _version("symattn_kernels") or "source tree (not installed)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda (torch build)": torch.version.cuda,
        "cuda device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "transformers": _version("transformers"),
        "flash_attn": _version("flash_attn"),
        "cpu kernel set": _cpu_kernel_set(),
    }
    built = {kind: extensions.state(kind).how for kind in ("cpu", "cuda")}
    table = {}
    for name in backends.BACKENDS:
        st = backends.peek(name)
        table[name] = {"usable": st.usable, "reason": st.reason, "devices": list(st.devices)}
    return Info(versions=versions, extensions=built, backends=table)


def format_info(report: dict) -> str:
    lines = ["symattn_kernels diagnostics", ""]
    lines += [f"  {key:<20} {value if value is not None else '-'}" for key, value in report["versions"].items()]
    lines += [f"  {kind + ' extension':<20} {how}" for kind, how in report.get("extensions", {}).items()]
    lines += ["", f"  {'backend':<8} {'usable':<7} {'devices':<10} notes"]
    for name, entry in report["backends"].items():
        usable = "yes" if entry["usable"] else "no"
        lines.append(f"  {name:<8} {usable:<7} {','.join(entry['devices']):<10} {entry['reason']}")
    return "\n".join(lines)
