"""Benchmark harness: `python -m bench` times the package's backends against SDPA,
flash-attn and FlexAttention on the device present, behind a correctness gate.

Modules: registry (ops, inputs, references, shapes), providers (implementations and why one
cannot run), runner (gate, timing, one row per case), timing, environment, report.
"""
