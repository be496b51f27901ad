"""Writes the rows out: a CSV (one row per measurement), a PNG per op (grouped bars of median
time per shape and provider, one panel per mode and dtype) and a markdown table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ["op", "provider", "device", "dtype", "B", "S", "H", "D", "causal", "mode",
           "median_ms", "p20_ms", "p80_ms", "speedup", "vs_fastest_peer", "tflops", "peak_mib", "max_err", "status",
           "torch", "cuda", "triton", "flash_attn", "symattn_kernels", "commit", "timestamp"]


# Past this many bars per panel (the GPU sweep) value labels overlap into noise.
MAX_LABELLED_BARS = 48


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _shape_label(row: dict) -> str:
    return f"B{row['B']} S{row['S']} H{row['H']} D{row['D']}" + (" causal" if row["causal"] else "")


def plot(rows: list[dict], path_for_op) -> list[Path]:
    """One PNG per op with measured rows; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in dict.fromkeys(row["op"] for row in rows):
        ok = [row for row in rows if row["op"] == op and row["status"] == "ok"]
        panels = list(dict.fromkeys((row["mode"], row["dtype"]) for row in ok))
        if not panels:
            continue
        shapes = list(dict.fromkeys(_shape_label(row) for row in ok))
        providers = list(dict.fromkeys(row["provider"] for row in ok))
        width = 0.8 / len(providers)
        bars_per_panel = len(shapes) * len(providers)
        width_in = min(32.0, max(6.0, 0.35 * bars_per_panel + 2))
        fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(width_in, 3.2 * len(panels)))
        for ax, (mode, dtype) in zip(axes[:, 0], panels):
            panel = [r for r in ok if r["mode"] == mode and r["dtype"] == dtype]
            for i, provider in enumerate(providers):
                mine = {_shape_label(r): r for r in panel if r["provider"] == provider}
                xs = [j + (i - (len(providers) - 1) / 2) * width for j, s in enumerate(shapes) if s in mine]
                bars = [mine[s] for s in shapes if s in mine]
                medians = [r["median_ms"] for r in bars]
                spread = [[r["median_ms"] - r["p20_ms"] for r in bars],
                          [r["p80_ms"] - r["median_ms"] for r in bars]]
                drawn = ax.bar(xs, medians, width, yerr=spread, capsize=2, label=provider)
                if bars_per_panel <= MAX_LABELLED_BARS:
                    ax.bar_label(drawn, fmt="%.3g", fontsize=6)
            ax.set_title(f"{op}  {mode}  {dtype}", fontsize=10)
            ax.set_ylabel("median ms, p20–p80 (log)", fontsize=8)
            ax.set_yscale("log")
            # Log bars need a common floor, else their heights compare against an arbitrary one.
            ax.set_ylim(bottom=10 ** math.floor(math.log10(min(r["median_ms"] for r in panel))))
            ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = path_for_op(op)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def unavailable_summary(unavailable: dict[tuple[str, str], str]) -> str:
    return "\n".join(f"skipped provider {provider} ({op}): {reason}"
                     for (op, provider), reason in unavailable.items())


def markdown_table(rows: list[dict], unavailable: dict[tuple[str, str], str],
                   baselines: dict[str, str]) -> str:
    """Rows of providers that can run here (the others are listed once by unavailable_summary)."""
    header = ["op", "mode", "dtype", "shape", "provider", "median ms", "p20–p80 ms",
              "speed-up", "vs fastest peer", "TFLOP/s", "peak MiB", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if (row["op"], row["provider"]) in unavailable:
            continue
        measured = row["status"] == "ok"
        cells = [row["op"], row["mode"], row["dtype"], _shape_label(row), row["provider"],
                 f"{row['median_ms']:.3f}" if measured else "–",
                 f"{row['p20_ms']:.3f}–{row['p80_ms']:.3f}" if measured else "–",
                 f"{row['speedup']:.2f}×" if "speedup" in row else "–",
                 f"{row['vs_fastest_peer']:.2f}×" if "vs_fastest_peer" in row else "–",
                 f"{row['tflops']:.2f}" if measured else "–",
                 f"{row['peak_mib']:.1f}" if measured else "–",
                 row["status"].replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ", ".join(f"{op}: baseline {name}" for op, name in baselines.items())
    lines.append("")
    lines.append(f"speed-up = baseline median / provider median, same run and case ({notes}); "
                 "vs fastest peer = the fastest other library's median / provider median; "
                 "sdpa-* and flash_attn_* are called with (y, y, y).")
    return "\n".join(lines)
