"""Benchmark harness: `python -m bench` (`make bench`) times the package's backends against
SDPA, flash-attn and FlexAttention on the device present, each number behind a correctness
gate, and writes bench/results/<device>.csv, a PNG per op and a markdown table (printed last).

    python -m bench                                   # the CPU shapes of docs/design.md / sweep (GPU)
    python -m bench --quick --out /tmp/bench          # one small shape: a smoke run, < 1 min
    python -m bench --dtype fp32 --mode fwd --shapes 1x2048x12x64 8x512x12x64c

Modules, each importing only those after it: runner (gate, timing, one row per case), registry
(ops: inputs, references, shapes), providers (implementations, and why one cannot run), shape
(the problem size), timing, environment, report.
"""
