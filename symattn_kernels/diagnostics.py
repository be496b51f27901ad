"""Diagnostics: versions and, for every backend, whether it is usable here and why not.

``python -m symattn_kernels.info`` prints the table.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import backends


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions and backend availability: ``{"versions": {...}, "backends": {name: {...}}}``.

    Each backend entry has ``usable`` (bool), ``reason`` (what it runs on, or why it cannot run
    here and how to get it) and ``devices`` (the tensor device types it accepts).
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
    }
    table = {}
    for name in backends.BACKENDS:
        st = backends.status(name)
        table[name] = {"usable": st.usable, "reason": st.reason, "devices": list(st.devices)}
    return {"versions": versions, "backends": table}


def format_info(report: dict) -> str:
    lines = ["symattn_kernels diagnostics", ""]
    lines += [f"  {key:<20} {value if value is not None else '-'}" for key, value in report["versions"].items()]
    lines += ["", f"  {'backend':<8} {'usable':<7} {'devices':<10} notes"]
    for name, entry in report["backends"].items():
        usable = "yes" if entry["usable"] else "no"
        lines.append(f"  {name:<8} {usable:<7} {','.join(entry['devices']):<10} {entry['reason']}")
    return "\n".join(lines)
