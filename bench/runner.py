"""Loops over the registry: for every op, shape, dtype, mode and provider, a correctness gate
against the op's fp32 reference, then timing and peak memory. Every case yields exactly one
row, whatever happened to it (ok, skipped, mismatch, error), so nothing drops out silently.
"""

from __future__ import annotations

import datetime
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from bench import environment, timing
from bench.providers import Provider
from bench.registry import OpSpec
from bench.shape import Shape

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")
# Errors are max |result - fp32 reference| / max(1, max |reference|). flash-attn's rule
# (docs/design.md, "How each backend is verified"): a result passes within 2x the error of the same reference computed in the
# benchmark dtype, plus this floor for rounding noise and a different summation order.
ERROR_FLOOR = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}


@dataclass(frozen=True)
class Plan:
    """What to run: per op, its shapes and dtype names; the same modes for all."""

    ops: list[tuple[OpSpec, list[Shape], list[str]]]
    modes: list[str]
    device: str
    min_run_time: float
    only_providers: list[str] | None = None
    rounds: int = 1  # interleaved timing rounds per case (timing.time_calls)

    def providers(self, op: OpSpec) -> list[Provider]:
        providers = op.providers(self.device)
        if self.only_providers is None:
            return providers
        return [p if p.name in self.only_providers or p.bind is None
                else Provider(p.name, None, "not selected (--providers)") for p in providers]


def run(plan: Plan) -> tuple[list[dict], dict[tuple[str, str], str], bool]:
    """Returns the rows, per (op, provider) that cannot run at all here the reason, and whether
    a KeyboardInterrupt (SIGINT, e.g. from a time cap) ended the run early: the rows of the
    shapes finished before it are kept, so a capped run still reports what it measured."""
    context = {"device": environment.device_name(plan.device), **environment.versions(),
               "commit": environment.git_commit()}
    providers = {op.name: plan.providers(op) for op, _, _ in plan.ops}
    unavailable = {(op, p.name): p.reason for op, ps in providers.items() for p in ps if p.bind is None}
    total = len(plan.modes) * sum(len(shapes) * len(dtypes) * len(providers[op.name])
                                  for op, shapes, dtypes in plan.ops)
    rows: list[dict] = []
    with tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True) as progress:
        try:
            for op, shapes, dtypes in plan.ops:
                for shape in shapes:
                    for dtype_name in dtypes:
                        rows += _run_shape(plan, op, providers[op.name], shape, dtype_name, context, progress)
        except KeyboardInterrupt:
            return rows, unavailable, True
    return rows, unavailable, False


def _run_shape(plan, op, providers, shape, dtype_name, context, progress) -> list[dict]:
    torch.manual_seed(0)
    inputs, grad_out = op.make_inputs(shape, DTYPES[dtype_name], plan.device)
    reference = _reference(op, shape, dtype_name, inputs, grad_out if "fwdbwd" in plan.modes else None)
    rows = []
    for mode in plan.modes:
        case_rows, steps = [], {}
        for provider in providers:
            progress.set_description(f"{op.name} {mode} {dtype_name} {shape.label} {provider.name}")
            row = {"op": op.name, "provider": provider.name, "device": context["device"],
                   "dtype": dtype_name, "B": shape.B, "S": shape.S, "H": shape.H, "D": shape.D,
                   "causal": shape.causal, "mode": mode}
            result, step = _gate(plan, provider, shape, dtype_name, mode, inputs, grad_out, reference)
            row.update(result)
            if step is not None:
                steps[len(case_rows)] = step
            case_rows.append(row)
        progress.set_description(f"{op.name} {mode} {dtype_name} {shape.label} timing")
        _measure(plan, op, shape, mode, inputs, steps, case_rows)
        progress.update(len(case_rows))
        for row in case_rows:
            row.update({key: value for key, value in context.items() if key != "device"})
            row["timestamp"] = datetime.datetime.now().isoformat(timespec="seconds")
        _add_speedups(case_rows, op.baseline)
        rows += case_rows
    return rows


def _gate(plan, provider, shape, dtype_name, mode, inputs, grad_out, reference) -> tuple[dict, Callable | None]:
    """The provider's row fields so far and its timed step, or, where it cannot be timed (not
    available, dtype not supported, a result outside tolerance, an error), the status and None."""
    if provider.bind is None:
        return {"status": f"skipped: {provider.reason}"}, None
    if provider.dtypes is not None and DTYPES[dtype_name] not in provider.dtypes:
        return {"status": f"skipped: {dtype_name} not supported"}, None
    try:
        step = bind_step(provider, shape, mode, inputs, grad_out)
        error, failure = _check(step, mode, inputs, reference)
    except Exception as exc:  # one failing provider or shape must not end the run
        return _error(plan, exc), None
    if failure:
        return {"max_err": error, "status": f"mismatch: {failure}"}, None
    return {"max_err": error}, step


def _measure(plan, op, shape, mode, inputs, steps: dict[int, Callable], case_rows: list[dict]) -> None:
    """Times the case's checked steps side by side (interleaved rounds), then each one's peak
    memory; fills in their rows."""
    try:
        timings = dict(zip(steps, timing.time_calls(list(steps.values()), plan.device, plan.min_run_time,
                                                    plan.rounds)))
    except Exception:  # find which step fails: time each alone, so the others still get a time
        timings = {}
    flops = op.flops(shape, mode)
    for k, step in steps.items():
        try:
            measured = timings.get(k) or timing.time_call(step, plan.device, plan.min_run_time)
            for leaf in inputs.values():
                leaf.grad = None  # so the peak counts the new gradient, not a swap with the old one
            peak = timing.peak_memory_mib(step, plan.device)
        except Exception as exc:
            case_rows[k].update(_error(plan, exc))
            continue
        case_rows[k].update({"median_ms": measured.median_ms, "p20_ms": measured.p20_ms,
                             "p80_ms": measured.p80_ms,
                             "tflops": flops / (measured.median_ms * 1e-3) / 1e12, "peak_mib": peak,
                             "status": "ok"})


def _error(plan, exc: Exception) -> dict:
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return {"status": f"error: {type(exc).__name__}: {message}"}


def bind_step(provider, shape, mode, inputs, grad_out) -> Callable[[], object]:
    """The timed callable. fwd: forward on detached inputs (no autograd state saved). fwd+bwd:
    clear the leaves' grads (so no accumulation add is timed), forward, backward with the
    fixed grad_out."""
    if mode == "fwd":
        return provider.bind({name: t.detach() for name, t in inputs.items()}, shape)
    forward = provider.bind(inputs, shape)
    leaves = [t for t in inputs.values() if t.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad_out)
        return out

    return step


def _reference(op, shape, dtype_name, inputs, grad_out) -> dict[str, tuple[torch.Tensor, float]]:
    """{"out" / "grad <input>": (fp32 reference, tolerance)}."""
    exact = _named(*op.reference(inputs, shape, grad_out))
    if DTYPES[dtype_name] == torch.float32:
        return {name: (ref, ERROR_FLOOR[dtype_name]) for name, ref in exact.items()}
    rounded = _named(*op.reference(inputs, shape, grad_out, DTYPES[dtype_name]))
    return {name: (ref, 2 * _relative_error(rounded[name], ref) + ERROR_FLOOR[dtype_name])
            for name, ref in exact.items()}


def _named(out: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"out": out.float(), **{f"grad {name}": grad.float() for name, grad in grads.items()}}


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got is None or got.shape != ref.shape:
        shape = None if got is None else tuple(got.shape)
        raise ValueError(f"result of shape {shape}, expected {tuple(ref.shape)}")
    return (got.detach().float() - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _check(step, mode, inputs, reference) -> tuple[float, str]:
    """Runs the step once; returns the largest error over the output (and in fwd+bwd every
    input gradient) and, if one exceeds its tolerance, what failed. NaN fails."""
    results = {"out": step()}
    if mode == "fwdbwd":
        results.update({name: inputs[name.removeprefix("grad ")].grad
                        for name in reference if name != "out"})
    errors = {name: _relative_error(got, reference[name][0]) for name, got in results.items()}
    failures = [f"{name} max err {err:.2e} > tol {reference[name][1]:.1e}"
                for name, err in errors.items() if not err <= reference[name][1]]
    worst = float("nan") if any(math.isnan(e) for e in errors.values()) else max(errors.values())
    return worst, "; ".join(failures)


def _add_speedups(case_rows: list[dict], baseline: str) -> None:
    """speedup = baseline median / provider median, and vs_fastest_peer = the fastest other
    library's median / provider median (SDPA-math is faster than SDPA-flash in some CPU bf16
    backwards), both from this run and this case."""
    base = next((r for r in case_rows if r["provider"] == baseline and r["status"] == "ok"), None)
    peers = [r["median_ms"] for r in case_rows if r["status"] == "ok" and not r["provider"].startswith("symattn")]
    for row in case_rows:
        if base is not None and row["status"] == "ok":
            row["speedup"] = base["median_ms"] / row["median_ms"]
        if peers and row["status"] == "ok":
            row["vs_fastest_peer"] = min(peers) / row["median_ms"]
