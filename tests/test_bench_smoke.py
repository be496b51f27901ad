"""`python -m bench --quick` runs end to end: CSV, PNG and the markdown table last."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_csv_png_and_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    csvs, pngs = list(tmp_path.glob("*.csv")), list(tmp_path.glob("*.png"))
    assert csvs and pngs
    rows = list(csv.DictReader(csvs[0].open()))
    by_provider = {row["provider"]: row for row in rows}
    assert by_provider["symattn-torch"]["status"] == "ok"
    assert float(by_provider["symattn-torch"]["median_ms"]) > 0
    assert any(row["status"].startswith("skipped") for row in rows), "unavailable providers must be reported"
    lines = result.stdout.rstrip().splitlines()
    last_row = max(i for i, line in enumerate(lines) if line.startswith("|"))
    assert len(lines) - last_row <= 3, "the table (and its legend) must come last"
    assert any(line.startswith("|") and "symattn-torch" in line for line in lines)
