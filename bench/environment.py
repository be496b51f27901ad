"""What every result row records about where it was measured: device name (and GPU clocks),
library versions and the git revision. Every probe degrades to "unknown" instead of failing."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def usable_cores() -> int:
    """The cores this process may run on (taskset / cgroup affinity), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        clocks = _gpu_clocks()
        return f"{name} ({clocks})" if clocks else name
    return f"{_cpu_model()} ({os.cpu_count()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _gpu_clocks() -> str:
    """Current and maximum SM clock and memory clock, from nvidia-smi if it is there."""
    query = "clocks.sm,clocks.max.sm,clocks.mem"
    try:
        command = ["nvidia-smi", "-i", _nvidia_smi_id(), f"--query-gpu={query}", "--format=csv,noheader"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        sm, sm_max, mem = (part.strip() for part in out.split(","))
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""
    return f"SM {sm} of max {sm_max}, memory {mem}"


def _nvidia_smi_id() -> str:
    """The PCI address of torch's current GPU: torch's index differs from nvidia-smi's under
    CUDA_VISIBLE_DEVICES."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return str(torch.cuda.current_device())


def versions() -> dict[str, str]:
    try:
        import symattn_kernels
        symattn = getattr(symattn_kernels, "__version__", "unknown")
    except Exception as exc:  # reported per provider too; here only the version column
        symattn = f"import failed: {type(exc).__name__}"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _distribution_version("triton"),
        "flash_attn": _distribution_version("flash-attn"),
        "symattn_kernels": symattn,
    }


def _distribution_version(name: str) -> str:
    """Read from package metadata, so a CUDA-only package is never imported just for this."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def git_commit() -> str:
    """The checkout's short revision; in a copy of the tree without .git (a machine the tree was
    copied to), ``SYMATTN_GIT_COMMIT`` names it."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SYMATTN_GIT_COMMIT") or "unknown"
