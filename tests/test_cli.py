"""Every command line of the package and the benchmarks answers --help with its usage, and does
nothing else (no report, no training, no compile)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    found = []
    for folder in ("symattn_kernels", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


COMMANDS = _commands()


def test_every_command_is_found():
    assert {"bench", "bench.cuda_compile_report", "symattn_kernels.info", "symattn_kernels.parameter_counts",
            "symattn_kernels.params"} <= set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_exits(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout[:500]
    assert "|---" not in result.stdout  # no markdown table: the command did not run
