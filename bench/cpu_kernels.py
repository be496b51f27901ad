"""Focused CPU benchmark of the fused ``cpu`` backend (docs/design.md, "Performance targets").

    python -m bench.cpu_kernels [--quick] [--json PATH]
    python -m bench.cpu_kernels --dtypes [--rounds N] [--json PATH]
    python -m bench.cpu_kernels --dropout [--rounds N] [--json PATH]
    python -m bench.cpu_kernels --lama [--rounds N] [--quick] [--plot PNG] [--json PATH]
    python -m bench.cpu_kernels --long [--quick] [--plot PNG] [--json PATH]

Side by side in one process, torch threads = cores, medians of
``torch.utils.benchmark.Timer.blocked_autorange`` (via ``bench.timing``):

* ``shared_attention(y)`` against ``scaled_dot_product_attention(y, y, y)`` (flash CPU backend)
  and the composite ``torch`` backend, forward and forward+backward (``autograd.grad`` of y,
  so SDPA computes and sums three gradients), fp32 and bf16, H=12, D=64 at (B, S) = (32, 128),
  (8, 512), (1, 2048); peak memory of forward+backward from the profiler's allocation events;
* ``symmetric_attention(q, v, coef=diag)`` forward against ``SDPA(q * c, q, v)``.

``--dtypes`` times only the ``cpu`` backend in fp32, bf16 and fp16 at (B, S) = (32, 128) and
(8, 512), forward and forward+backward, in interleaved rounds (each round one
``blocked_autorange`` median per dtype, back to back), and reports the median over rounds and
the median of the per-round ratios to fp32: paired ratios stay meaningful when other work
loads the machine. The target (docs/design.md) is bf16 / fp32 <= 1 where the kernels run bf16 operands
(``kernel_isa()`` is ``"AVX512_BF16"`` or ``"AVX512_AMX"``); elsewhere bf16 is widened to fp32 and the ratio is only
reported.

``--dropout`` (also the last table of the default run) times ``shared_attention(y)`` of the
``cpu`` backend with ``dropout_p = 0.1`` next to the same call without dropout, fp32 and bf16 at
the ``--dtypes`` shapes, forward and forward+backward, in interleaved rounds as ``--dtypes``
(each round times the two calls back to back) and reports the median of the per-round ratios;
the target is a forward ratio of at most 1.3. Its correctness check compares the dropout output
and gradient with the ``torch`` backend under the same seed (the same mask).

``--lama`` times LAMA (``lowrank_context_attention``) at the registry's CPU shapes (B, T, m, E) =
(32, 128, 4, 256), (32, 256, 8, 256), (4, 4096, 8, 256), fp32 and bf16, forward and
forward+backward: the fused ``cpu`` kernels against the eager reference (autograd through
``symattn_kernels.reference``) and the ``torch`` composite, in interleaved rounds like
``--dtypes``; each row gives the median per provider, the median per-round ratio of the faster
peer to ours (target >= 1.5), the peak memory of one call (ours <= the eager reference's) and
our GFLOP/s; ``--plot`` draws the ratios.

Every attention row reports effective GFLOP/s twice, by flash-attn's count (4·B·H·S²·D forward,
×3.5 with the backward) and by the products the kernels execute (the mirrored half-score
schedule runs 1.5 forward and 3.5 backward of the 2 of each), and the executed rate as a share
of the measured fp32 peak (``bench.fma_peak``: one thread's register FMA chains × threads; the
one-thread sgemm rate is reported beside it).

``--long`` times heads of 2k-16k tokens at B = 1 (the shapes in ``LONG_SHAPES``, causal too)
against the fastest CPU peer at 1 and at 2 threads (or all cores) in interleaved rounds: the
speed-up of the second thread for ours and for SDPA, ours / peer, and effective GFLOP/s by
flash-attn's count and by the work the kernels execute, beside the measured fp32 FMA peak
(``bench.fma_peak``); ``--plot`` draws the thread scaling.

Every timed shape first passes a correctness check (attention: against SDPA in fp32; LAMA: the
``python -m bench`` gate against the fp32 reference). The report starts with the load average:
the numbers are only comparable on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import symattn_kernels as sk
from bench.environment import usable_cores
from bench.fma_peak import ceilings, describe, peak_per_thread
from bench.timing import peak_memory_mib, time_call

HEADS, HEAD_DIM = 12, 64
SHAPES = [(32, 128), (8, 512), (1, 2048)]
DTYPE_SHAPES = [(32, 128), (8, 512)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {"fwd": 1.3, "fwd+bwd": 1.6, "diag fwd": 1.15, "peak memory": 0.6}
DROPOUT_P = 0.1
DROPOUT_FWD_TARGET = 1.3  # dropout / no-dropout forward time


def _sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _providers() -> dict:
    """Forward callables on y [B, S, H, D]."""
    return {
        "cpu": lambda t: sk.shared_attention(t, backend="cpu"),
        "sdpa-flash": lambda t: _sdpa(t, t, t),
        "torch": lambda t: sk.shared_attention(t, backend="torch"),
    }


def _fwd_bwd(fn, y: torch.Tensor):
    leaf = y.detach().requires_grad_()
    grad_out = torch.randn_like(y)

    def run():
        (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_out)
        return grad

    return run


def _check(y: torch.Tensor) -> float:
    """Max |cpu - sdpa| of the fp32 forward and of the gradient; raises when not close."""
    y32 = y.float()
    out = sk.shared_attention(y32, backend="cpu")
    ref = _sdpa(y32, y32, y32)
    grad_out = torch.randn_like(y32)
    leaves = [y32.clone().requires_grad_() for _ in range(2)]
    g_cpu = torch.autograd.grad(sk.shared_attention(leaves[0], backend="cpu"), leaves[0], grad_out)[0]
    g_ref = torch.autograd.grad(_sdpa(leaves[1], leaves[1], leaves[1]), leaves[1], grad_out)[0]
    err = max((out - ref).abs().max().item(), (g_cpu - g_ref).abs().max().item())
    if err > 1e-3:
        raise AssertionError(f"cpu backend disagrees with SDPA by {err:.3g}: no timings without a passing check")
    return err


def run(quick: bool) -> dict:
    min_run_time = 0.3 if quick else 1.0
    torch.manual_seed(0)
    rows = []
    for batch, seqlen in SHAPES[:1] if quick else SHAPES:
        y32 = torch.randn(batch, seqlen, HEADS, HEAD_DIM)
        err = _check(y32)
        for dtype in (torch.float32, torch.bfloat16):
            y = y32.to(dtype)
            for name, fn in _providers().items():
                fwd = time_call(lambda: fn(y), "cpu", min_run_time)
                step = _fwd_bwd(fn, y)
                both = time_call(step, "cpu", min_run_time)
                peak = peak_memory_mib(step, "cpu")
                rows.append(dict(op="shared_attention", B=batch, S=seqlen, dtype=str(dtype).replace("torch.", ""),
                                 provider=name, fwd_ms=fwd.median_ms, fwd_p20=fwd.p20_ms, fwd_p80=fwd.p80_ms,
                                 fwdbwd_ms=both.median_ms, fwdbwd_p20=both.p20_ms, fwdbwd_p80=both.p80_ms,
                                 peak_mib=peak, check_err=err))
        # Pairwise diagonal coefficient with a separate value: SDPA needs q * c materialised.
        q, v = y32, torch.randn_like(y32)
        coef = torch.rand(HEADS, HEAD_DIM) + 0.5
        ours = time_call(lambda: sk.symmetric_attention(q, v, coef=coef, backend="cpu"), "cpu", min_run_time)
        base = time_call(lambda: _sdpa(q * coef, q, v), "cpu", min_run_time)
        diff = (sk.symmetric_attention(q, v, coef=coef, backend="cpu") - _sdpa(q * coef, q, v)).abs().max().item()
        rows.append(dict(op="symmetric_attention(coef=diag)", B=batch, S=seqlen, dtype="float32", provider="cpu",
                         fwd_ms=ours.median_ms, baseline_ms=base.median_ms, check_err=diff))
    return dict(environment=_environment(), **ceilings(), rows=rows)


def _interleaved(calls: dict, rounds: int, min_run_time: float) -> dict:
    """Per call, its median time (ms) in each round; a round times every call once, back to back,
    each round starting one call later (so no call always follows the same one)."""
    times = {key: [] for key in calls}
    keys = list(calls)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(time_call(calls[key], "cpu", min_run_time).median_ms)
    return times


def run_dtypes(rounds: int, min_run_time: float = 0.2) -> dict:
    """fp32 / bf16 / fp16 of the cpu backend, interleaved rounds (see the module docstring)."""
    torch.manual_seed(0)
    rows = []
    for batch, seqlen in DTYPE_SHAPES:
        y32 = torch.randn(batch, seqlen, HEADS, HEAD_DIM)
        err = _check(y32)
        calls = {}
        for name, dtype in DTYPES.items():
            y = y32.to(dtype)
            fn = _providers()["cpu"]
            calls[name, "fwd"] = lambda fn=fn, y=y: fn(y)
            calls[name, "fwd+bwd"] = _fwd_bwd(fn, y)
        times = _interleaved(calls, rounds, min_run_time)
        for (name, mode), samples in times.items():
            base = times["float32", mode]
            rows.append(dict(B=batch, S=seqlen, dtype=name, mode=mode, median_ms=statistics.median(samples),
                             min_ms=min(samples), ratio_to_fp32=statistics.median(a / b for a, b in zip(samples, base)),
                             rounds=rounds, check_err=err))
    return dict(environment=_environment(), **ceilings(), dtype_rows=rows)


def _check_dropout(y: torch.Tensor) -> float:
    """Max |cpu - torch backend| of the fp32 dropout forward and gradient under one seed (one
    mask); raises when not close."""
    results = []
    for backend in ("cpu", "torch"):
        leaf = y.float().clone().requires_grad_()
        torch.manual_seed(5)
        out = sk.shared_attention(leaf, dropout_p=DROPOUT_P, backend=backend)
        results.append((out, torch.autograd.grad(out, leaf, torch.ones_like(out))[0]))
    err = max((a - b).abs().max().item() for a, b in zip(*results))
    if err > 1e-3:
        raise AssertionError(f"cpu dropout disagrees with the torch backend by {err:.3g}: no timings")
    return err


def run_dropout(rounds: int, min_run_time: float = 0.2, shapes=DTYPE_SHAPES) -> list:
    """Dropout against no dropout on the cpu backend, paired per round (see the module docstring)."""
    torch.manual_seed(0)
    rows = []
    for batch, seqlen in shapes:
        y32 = torch.randn(batch, seqlen, HEADS, HEAD_DIM)
        err = _check_dropout(y32)
        calls = {}
        for name in ("float32", "bfloat16"):
            y = y32.to(DTYPES[name])
            for p in (0.0, DROPOUT_P):
                def fn(t, p=p):
                    return sk.shared_attention(t, dropout_p=p, backend="cpu")
                calls[name, "fwd", p] = lambda fn=fn, y=y: fn(y)
                calls[name, "fwd+bwd", p] = _fwd_bwd(fn, y)
        times = _interleaved(calls, rounds, min_run_time)
        for name in ("float32", "bfloat16"):
            for mode in ("fwd", "fwd+bwd"):
                base, drop = times[name, mode, 0.0], times[name, mode, DROPOUT_P]
                rows.append(dict(B=batch, S=seqlen, dtype=name, mode=mode, nodrop_ms=statistics.median(base),
                                 dropout_ms=statistics.median(drop),
                                 ratio=statistics.median(d / b for d, b in zip(drop, base)), rounds=rounds,
                                 dropout_p=DROPOUT_P, check_err=err))
    return rows


def format_dropout(rows: list, env: dict, probes: dict) -> str:
    """The dropout table; probes as ``bench.fma_peak.ceilings`` returns them."""
    peak = _peak(env, probes)
    lines = [f"CPU kernels, dropout_p={DROPOUT_P} against none: torch {env['torch']}, {env['torch_threads']} "
             f"threads on {env['cores']} cores, kernels {env['kernel_isa']}, load average "
             f"{', '.join(f'{x:.2f}' for x in env['load_average'])}", "",
             f"{'shape':<14} {'dtype':<9} {'mode':<8} {'no-drop ms':>10} {'dropout ms':>10} {'ratio':>6} "
             f"{'GF/s conv':>13} {'GF/s exec':>13} {'% peak':>6}"]
    for r in rows:
        flops = _row_flops(dict(r, provider="cpu"), env)
        key = "fwd" if r["mode"] == "fwd" else "fwdbwd"
        conv = [_gflops(flops[f"conv_{key}"], r[ms]) for ms in ("nodrop_ms", "dropout_ms")]
        done = [_gflops(flops[f"exec_{key}"], r[ms]) for ms in ("nodrop_ms", "dropout_ms")]
        lines.append(f"B={r['B']:<3} S={r['S']:<5} {r['dtype']:<9} {r['mode']:<8} {r['nodrop_ms']:10.2f} "
                     f"{r['dropout_ms']:10.2f} {r['ratio']:6.2f} {conv[0]:6.1f}/{conv[1]:6.1f} "
                     f"{done[0]:6.1f}/{done[1]:6.1f} {_percent_of_ceiling(r['dtype'], done[1], peak)}")
    rounds = rows[0]["rounds"] if rows else 0
    lines += ["", f"median over {rounds} interleaved rounds; ratio = median of the per-round dropout / no-dropout "
              f"times; target: forward ratio <= {DROPOUT_FWD_TARGET}; GF/s no-drop/dropout, % peak of the "
              "dropout call; " + _gflops_legend(probes)]
    return "\n".join(lines)


def format_dtypes(report: dict) -> str:
    env = report["environment"]
    lines = [f"CPU kernels by dtype: torch {env['torch']}, {env['torch_threads']} threads on {env['cores']} cores, "
             f"kernels {env['kernel_isa']}, load average {', '.join(f'{x:.2f}' for x in env['load_average'])}", "",
             f"{'shape':<14} {'mode':<8} {'dtype':<9} {'median ms':>10} {'min ms':>8} {'/ fp32':>7} "
             f"{'GF/s conv':>9} {'GF/s exec':>9} {'% peak':>6}"]  # no peer here: no x@ceil
    peak = _peak(env, report)
    for r in sorted(report["dtype_rows"], key=lambda r: (r["B"], r["S"], r["mode"])):
        flops = _row_flops(dict(r, provider="cpu"), env)
        key = "fwd" if r["mode"] == "fwd" else "fwdbwd"
        conv, done = _gflops(flops[f"conv_{key}"], r["median_ms"]), _gflops(flops[f"exec_{key}"], r["median_ms"])
        lines.append(f"B={r['B']:<3} S={r['S']:<5} {r['mode']:<8} {r['dtype']:<9} {r['median_ms']:10.2f} "
                     f"{r['min_ms']:8.2f} {r['ratio_to_fp32']:7.3f} {conv:9.1f} {done:9.1f} "
                     f"{_percent_of_ceiling(r['dtype'], done, peak)}")
    rounds = report["dtype_rows"][0]["rounds"] if report["dtype_rows"] else 0
    lines += ["", f"median over {rounds} interleaved rounds; / fp32 = median of the per-round ratios; "
              + _gflops_legend(report),
              _bf16_target_line(env)]
    return "\n".join(lines)


def _bf16_target_line(env: dict) -> str:
    if env["kernel_isa"] in ("AVX512_BF16", "AVX512_AMX"):
        return f"target: bf16 / fp32 <= 1.0 (bf16 operands here, kernels {env['kernel_isa']})"
    return f"no AVX512-BF16 here (kernels {env['kernel_isa']}): bf16 is widened to fp32, ratio reported only"


def _row_flops(row: dict, env: dict) -> dict:
    """attention_flops of a shared_attention row at H = 12, D = 64: the executed work is ours for
    the cpu provider (mirrored where its schedule is) and the full products for the peers."""
    if row["provider"] != "cpu":
        return attention_flops(row["B"], row["S"], HEADS, HEAD_DIM)
    return schedule_flops(row["B"], row["S"], HEADS, HEAD_DIM, False, row["dtype"], env["kernel_isa"])


def _gflops_cells(flops: dict, fwd_ms: float, fwdbwd_ms: float, peak: float, dtype: str) -> str:
    """"conv/exec" GF/s of the forward and of forward+backward, and forward+backward's executed
    GF/s as a percentage of the all-thread fp32 FMA peak."""
    cells = []
    for key, ms in (("fwd", fwd_ms), ("fwdbwd", fwdbwd_ms)):
        cells.append(f"{_gflops(flops[f'conv_{key}'], ms):6.1f}/{_gflops(flops[f'exec_{key}'], ms):6.1f}")
    return f"{cells[0]:>13} {cells[1]:>13} {_percent_of_ceiling(dtype, _gflops(flops['exec_fwdbwd'], fwdbwd_ms), peak)}"


def _ratio_at_ceiling(flops: dict, peer: dict, peak: float) -> str:
    """"fwd/fwd+bwd" ratios over the peer that our executed products would reach at the all-thread
    fp32 FMA peak: where one is below a target, no kernel doing this work meets it against this peer."""
    return "/".join(f"{peer[f'{mode}_ms'] / (flops[f'exec_{key}'] / peak / 1e6):.2f}"
                    for mode, key in (("fwd", "fwd"), ("fwdbwd", "fwdbwd")))


def _percent_of_ceiling(dtype: str, gflops: float, ceiling: float) -> str:
    """GF/s as a percentage of the fp32 FMA peak, for fp32 rows only: bf16 products run on other
    units (AVX512-BF16 pairs, AMX tiles) whose ceiling this probe does not measure."""
    return f"{100 * gflops / ceiling:6.1f}" if dtype in ("float32", "fp32") else f"{'-':>6}"


def _gflops_legend(report: dict) -> str:
    return ("GF/s conv = 4 B H S^2 D (x3.5 with backward) / time, GF/s exec = the products the kernels run "
            f"(the half-score schedule: 1.5 forward, 3.5 backward per 2 S^2 D) / time; % peak = GF/s exec / "
            f"(FMA peak x threads); {describe(report)}")


# LAMA: the fused cpu kernels against the two paths a user has without them.
LAMA_PROVIDERS = {"symattn-cpu": "ours", "eager-reference": "eager", "symattn-torch": "composite"}
LAMA_TARGETS = {"speed-up": 1.5, "peak memory": 1.0}


def run_lama(rounds: int, quick: bool = False, min_run_time: float = 0.2) -> dict:
    """LAMA rows: per shape, dtype and mode, interleaved rounds of the three providers (see the
    module docstring); a mismatch against the reference leaves the row untimed."""
    import statistics

    from bench import runner
    from bench.providers import lowrank_providers
    from bench.registry import REGISTRY

    op = REGISTRY["lowrank_context_attention"]
    providers = [p for p in lowrank_providers("cpu") if p.name in LAMA_PROVIDERS]
    missing = [p.name for p in providers if p.bind is None]
    if missing:
        raise SystemExit(f"LAMA providers unavailable: {missing}")
    shapes = [op.quick_shape] if quick else op.shape_sets["spec"]
    rows = []
    for shape in shapes:
        for dtype_name in op.dtypes["cpu"][: 1 if quick else None]:
            torch.manual_seed(0)
            inputs, grad_out = op.make_inputs(shape, runner.DTYPES[dtype_name], "cpu")
            reference = runner._reference(op, shape, dtype_name, inputs, grad_out)
            for mode in runner.MODES:
                steps, peaks, errors = {}, {}, {}
                for provider in providers:
                    step = runner.bind_step(provider, shape, mode, inputs, grad_out)
                    errors[provider.name], failure = runner._check(step, mode, inputs, reference)
                    if failure:
                        raise AssertionError(f"LAMA {provider.name} {shape.label} {dtype_name} {mode}: {failure}")
                    for leaf in inputs.values():
                        leaf.grad = None
                    peaks[provider.name] = peak_memory_mib(step, "cpu")
                    steps[provider.name] = step
                times = _interleaved(steps, rounds, min_run_time)
                ours = times["symattn-cpu"]
                peer = [min(e, c) for e, c in zip(times["eager-reference"], times["symattn-torch"])]
                rows.append(dict(B=shape.B, T=shape.S, m=shape.H, E=shape.D, dtype=dtype_name, mode=mode,
                                 rounds=rounds, **{f"{LAMA_PROVIDERS[n]}_ms": statistics.median(t)
                                                   for n, t in times.items()},
                                 **{f"{LAMA_PROVIDERS[n]}_mib": peaks[n] for n in peaks},
                                 speedup=statistics.median(p / o for p, o in zip(peer, ours)),
                                 max_err=max(errors.values())))
    return dict(environment=_environment(), **ceilings(), lama_rows=rows)


def format_lama(report: dict) -> str:
    env = report["environment"]
    lines = [f"LAMA on CPU: torch {env['torch']}, {env['torch_threads']} threads on {env['cores']} cores, "
             f"kernels {env['kernel_isa']}, load average {', '.join(f'{x:.2f}' for x in env['load_average'])}", "",
             f"{'B':>3} {'T':>5} {'m':>2} {'E':>4} {'dtype':<5} {'mode':<7} {'ours ms':>8} {'eager ms':>9} "
             f"{'compos. ms':>10} {'x peer':>7} {'ours MiB':>9} {'eager MiB':>10} {'compos. MiB':>11} "
             f"{'ours GF/s':>9} {'% peak':>6}"]
    peak = _peak(env, report)
    for r in report["lama_rows"]:
        rate = _gflops(lama_flops(r), r["ours_ms"])
        lines.append(f"{r['B']:>3} {r['T']:>5} {r['m']:>2} {r['E']:>4} {r['dtype']:<5} {r['mode']:<7} "
                     f"{r['ours_ms']:8.3f} {r['eager_ms']:9.3f} {r['composite_ms']:10.3f} {r['speedup']:7.2f} "
                     f"{r['ours_mib']:9.1f} {r['eager_mib']:10.1f} {r['composite_mib']:11.1f} "
                     f"{rate:9.1f} {_percent_of_ceiling(r['dtype'], rate, peak)}")
    rounds = report["lama_rows"][0]["rounds"] if report["lama_rows"] else 0
    lines += ["", f"ms: median over {rounds} interleaved rounds; x peer = median per-round ratio of the faster of "
              "eager and composite to ours; MiB: peak of one call; GF/s = the matmul work 4 B T E m forward (x3 "
              f"with backward) / time; % peak of the FMA peak x threads; {describe(report)}",
              f"targets: x peer >= {LAMA_TARGETS['speed-up']}, ours MiB <= eager MiB"]
    return "\n".join(lines)


def lama_flops(row: dict) -> float:
    """bench.registry's LAMA count for a row: 4 B T E m forward, 3x that with the backward."""
    from bench.registry import lowrank_flops
    from bench.shape import Shape

    return lowrank_flops(Shape(B=row["B"], S=row["T"], H=row["m"], D=row["E"]), row["mode"])


def plot_lama(report: dict, path) -> None:
    """Ours over the faster peer per LAMA shape: fp32 and bf16, forward and forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["lama_rows"]
    shapes = sorted({(r["B"], r["T"], r["m"], r["E"]) for r in rows}, key=lambda s: (s[1], s[0]))
    series = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for k, (dtype, mode) in enumerate(series):
        values = [next((r["speedup"] for r in rows if (r["B"], r["T"], r["m"], r["E"]) == shape
                        and (r["dtype"], r["mode"]) == (dtype, mode)), 0.0) for shape in shapes]
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(shapes))], values, width,
               label=f"{dtype} {'fwd+bwd' if mode == 'fwdbwd' else mode}")
    ax.axhline(LAMA_TARGETS["speed-up"], color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), [f"B{b} T{t} m{m} E{e}" for b, t, m, e in shapes])
    ax.set_ylabel("faster peer's time / ours")
    load = report["environment"]["load_average"][0]
    ax.set_title(f"LAMA on CPU: fused kernels vs the faster of eager reference and composite (load {load:.1f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict:
    from symattn_kernels.backends import cpu as cpu_backend

    return dict(load_average=os.getloadavg(), cores=usable_cores(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                kernel_isa=cpu_backend.kernel_isa(), python=platform.python_version(), machine=platform.machine())


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"CPU kernels: torch {env['torch']}, {env['torch_threads']} threads on {env['cores']} cores, "
             f"kernels {env['kernel_isa']}, load average {', '.join(f'{x:.2f}' for x in env['load_average'])}", ""]
    lines.append(f"{'shape':<14} {'dtype':<9} {'provider':<11} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9}"
                 f" {'fwd x':>6} {'f+b x':>6} {'mem x':>6} {'fwd GF/s':>13} {'f+b GF/s':>13} {'% peak':>6}"
                 f" {'x@ceil':>11}")
    peak = _peak(env, report)
    rows = [r for r in report["rows"] if r["op"] == "shared_attention"]
    for r in rows:
        sdpa = next(x for x in rows if (x["B"], x["S"], x["dtype"]) == (r["B"], r["S"], r["dtype"])
                    and x["provider"] == "sdpa-flash")
        lines.append(f"B={r['B']:<3} S={r['S']:<5} {r['dtype']:<9} {r['provider']:<11} {r['fwd_ms']:8.2f} "
                     f"{r['fwdbwd_ms']:11.2f} {r['peak_mib']:9.1f} {sdpa['fwd_ms'] / r['fwd_ms']:6.2f} "
                     f"{sdpa['fwdbwd_ms'] / r['fwdbwd_ms']:6.2f} {r['peak_mib'] / sdpa['peak_mib']:6.2f} "
                     + _gflops_cells(_row_flops(r, env), r["fwd_ms"], r["fwdbwd_ms"], peak, r["dtype"])
                     + (f" {_ratio_at_ceiling(_row_flops(r, env), sdpa, peak):>11}"
                        if r["provider"] == "cpu" and r["dtype"] == "float32" else ""))
    lines += ["", "speedup x = SDPA time / provider time; mem x = provider peak / SDPA peak; " + _gflops_legend(report)
              + "; x@ceil = fwd/fwd+bwd x SDPA-flash if ours ran its executed products at the FMA peak "
              "(an upper bound for any kernel doing this work)", ""]
    for r in report["rows"]:
        if r["op"] != "shared_attention":
            flops = schedule_flops(r["B"], r["S"], HEADS, HEAD_DIM, False)
            lines.append(f"{r['op']} B={r['B']} S={r['S']}: cpu {r['fwd_ms']:.2f} ms, SDPA(q*c, q, v) "
                         f"{r['baseline_ms']:.2f} ms, x{r['baseline_ms'] / r['fwd_ms']:.2f}; cpu "
                         f"{_gflops(flops['conv_fwd'], r['fwd_ms']):.1f} GF/s conv, "
                         f"{_gflops(flops['exec_fwd'], r['fwd_ms']):.1f} exec "
                         f"({100 * _gflops(flops['exec_fwd'], r['fwd_ms']) / peak:.0f} % peak)")
    lines.append(f"targets (fp32): {', '.join(f'{k} {v}x' for k, v in TARGETS.items())}")
    cpu_rows = {(r["B"], r["S"], r["dtype"]): r for r in rows if r["provider"] == "cpu"}
    for (batch, seqlen, dtype), r in cpu_rows.items():
        base = cpu_rows.get((batch, seqlen, "float32"))
        if dtype == "bfloat16" and base is not None:
            lines.append(f"cpu bf16 / fp32 B={batch} S={seqlen}: fwd {r['fwd_ms'] / base['fwd_ms']:.2f}, "
                         f"fwd+bwd {r['fwdbwd_ms'] / base['fwdbwd_ms']:.2f}")
    lines.append(_bf16_target_line(env))
    return "\n".join(lines)



# Long sequences and thread scaling: heads of 2k-16k tokens at B = 1, ours against the fastest
# CPU peer, each timed at 1 and at 2 threads in interleaved rounds, so that the speed-up of the
# second thread and the ratio to the peer are paired per round (both survive a loaded machine
# better than absolute times), with effective GFLOP/s against the measured fp32 FMA peak.

# (B, S, H, causal, rounds, one_thread): the largest shapes take seconds per call, so fewer rounds
# (and the 12-head 16k shape only at all threads); bf16 up to LONG_HALF_MAX_S tokens. About four
# minutes on two idle cores.
LONG_SHAPES = [
    (1, 4096, 1, False, 3, True), (1, 4096, 2, False, 3, True), (1, 4096, 3, False, 3, True),
    (1, 2048, 12, False, 2, True), (1, 2048, 12, True, 2, True),
    (1, 4096, 12, False, 1, True), (1, 4096, 12, True, 1, True),
    (1, 16384, 2, False, 1, True), (1, 16384, 12, False, 1, False),
]
LONG_QUICK = [(1, 4096, 1, False, 1, True)]
LONG_HALF_MAX_S = 4096
LONG_TARGETS = {"2nd thread": 1.8, "fwd": 1.9, "fwd+bwd": 2.0}
# SDPA's math kernel materialises [B, H, S, S] scores and their gradients; above this many
# score elements it is a memory test, not a peer.
MATH_MAX_SCORES = 64 * 2**20
# Query rows per forward block and micro-tile width of the long-head kernels (csrc/cpu): the
# causal work they execute past the diagonal.
_CAUSAL_OVERSHOOT = 64


def _long_providers(y: torch.Tensor, causal: bool) -> dict:
    def sdpa(backend):
        def call(t):
            with sdpa_kernel(backend):
                q = t.transpose(1, 2)
                return F.scaled_dot_product_attention(q, q, q, is_causal=causal).transpose(1, 2)
        return call

    providers = {"cpu": lambda t: sk.shared_attention(t, causal=causal, backend="cpu"),
                 "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    B, S, H, _ = y.shape
    if B * H * S * S <= MATH_MAX_SCORES:
        providers["sdpa-math"] = sdpa(SDPBackend.MATH)
    return providers


def _median_call_ms(fn, threads: int, seconds: float) -> float:
    import statistics
    import time

    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn()  # warm-up, never a sample: a process's first call of a shape fills caches and pools
    one = time.perf_counter() - start
    samples = []
    for _ in range(max(1, min(7, int(seconds / max(one, 1e-6))))):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def mirrored_schedule(S: int, causal: bool, dtype: str = "float32", kernel_isa: str = "",
                      backward: bool = False) -> bool:
    """Whether the fused kernels run the mirrored half-score work for a head of S tokens without
    a coefficient (with or without dropout): the backward of heads over 512 tokens always (each score tile
    serves both of its blocks, causal heads too); otherwise non-causal heads, except bf16 on AMX
    tiles."""
    if backward and S > 512:
        return True
    return not causal and not (dtype == "bfloat16" and kernel_isa == "AVX512_AMX")


def tiled_backward_block(S: int) -> int:
    """Rows per block of the tiled backward of a head of S tokens (csrc/cpu: kPairTile, or
    kPairTileMin below kPairBlocks * kPairTile tokens)."""
    return 128 if S >= 16 * 128 else 64


def tiled_backward_products(S: int, causal: bool) -> float:
    """Multiply-adds per head-dimension element that the tiled backward of one head of S tokens
    (S > 512) executes, replaying its tiles: every block pair I >= J once, a rows x cols tile
    costing 7 products off the diagonal (both roles: scores, dP both ways, Z and dV for both
    blocks) and 5 on it, and 5 for every tile of a causal head (rows J see no key of I; its
    diagonal tiles are multiplied whole)."""
    T = tiled_backward_block(S)
    sizes = [min(T, S - start) for start in range(0, S, T)]
    total = 0
    for i, rows in enumerate(sizes):
        for j, cols in enumerate(sizes[:i + 1]):
            total += (5 if causal or i == j else 7) * rows * cols
    return float(total)


def attention_flops(B: int, S: int, H: int, D: int, causal: bool = False, mirrored: bool = False,
                    mirrored_backward: Optional[bool] = None) -> dict:
    """Forward and forward+backward FLOPs: flash-attn's convention (4 B H S^2 D forward, 2.5x that
    backward, halved for causal) and the products the fused kernels execute (two per score
    forward, five backward; the mirrored schedule 1.5 forward and 3.5 backward, ``mirrored`` and
    ``mirrored_backward``, which defaults to ``mirrored``; causal rows see their keys plus the
    micro-tile past the diagonal). The mirrored backward of heads over 512 tokens is the tiled
    one, counted by replaying its tiles (``tiled_backward_products``)."""
    if mirrored_backward is None:
        mirrored_backward = mirrored
    conv_fwd = 4.0 * B * H * S * S * D / (2 if causal else 1)
    keys = (S * (S + 1) / 2 + S * _CAUSAL_OVERSHOOT / 2) if causal else float(S * S)
    fwd = 2.0 * B * H * D * keys * (1.5 if mirrored else 2.0)
    if mirrored_backward and S > 512:
        bwd = 2.0 * B * H * D * tiled_backward_products(S, causal)
    else:
        bwd = 2.0 * B * H * D * keys * (3.5 if mirrored_backward else 5.0)
    return dict(conv_fwd=conv_fwd, conv_fwdbwd=3.5 * conv_fwd, exec_fwd=fwd, exec_fwdbwd=fwd + bwd)


def schedule_flops(B: int, S: int, H: int, D: int, causal: bool, dtype: str = "float32", kernel_isa: str = "") -> dict:
    """attention_flops of heads as the fused kernels schedule them (mirrored_schedule)."""
    return attention_flops(B, S, H, D, causal, mirrored_schedule(S, causal, dtype, kernel_isa),
                           mirrored_schedule(S, causal, dtype, kernel_isa, backward=True))


def _gflops(flops: float, ms: float) -> float:
    return flops / ms / 1e6


def _peak(env: dict, report: dict) -> float:
    """The all-thread fp32 peak of a report: the one-thread FMA peak times the threads."""
    return peak_per_thread(report) * env["torch_threads"]


def _check_long(y: torch.Tensor, causal: bool) -> float:
    """fp32 forward and gradient of one head against SDPA-flash; raises when not close."""
    head = y[:, :, :1].float().contiguous()
    leaves = [head.clone().requires_grad_() for _ in range(2)]
    calls = _long_providers(head, causal)
    outs = [calls["cpu"](leaves[0]), calls["sdpa-flash"](leaves[1])]
    grad_out = torch.randn_like(head)
    grads = [torch.autograd.grad(o, leaf, grad_out)[0] for o, leaf in zip(outs, leaves)]
    err = max((outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item())
    if err > 1e-3:
        raise AssertionError(f"cpu backend disagrees with SDPA by {err:.3g}: no timings without a passing check")
    return err


def run_long(shapes=LONG_SHAPES, dtypes=(torch.float32, torch.bfloat16), threads: int = 2,
             seconds: float = 0.3) -> dict:
    """Times every shape of `shapes` as described above; rows carry per-round medians."""
    import statistics

    torch.manual_seed(0)
    probes = ceilings()
    rows = []
    for B, S, H, causal, rounds, one_thread in shapes:
        y32 = torch.randn(B, S, H, HEAD_DIM)
        err = _check_long(y32, causal)
        counts = (1, threads) if one_thread and threads > 1 else (threads,)
        for dtype in dtypes:
            if dtype != torch.float32 and S > LONG_HALF_MAX_S:
                continue
            y = y32.to(dtype)
            calls = {}
            for name, fn in _long_providers(y, causal).items():
                calls[name, "fwd"] = lambda fn=fn: fn(y)
                calls[name, "fwd+bwd"] = _fwd_bwd(fn, y)
            times = {(n, m, t): [] for (n, m) in calls for t in counts}
            for r in range(rounds):
                for t in counts if r % 2 == 0 else counts[::-1]:
                    for (name, mode), call in calls.items():
                        times[name, mode, t].append(_median_call_ms(call, t, seconds))
            torch.set_num_threads(threads)
            peak_mib = peak_memory_mib(calls["cpu", "fwd+bwd"], "cpu") if S <= 4096 else float("nan")
            peers = sorted({n for (n, _, _) in times} - {"cpu"})
            for mode in ("fwd", "fwd+bwd"):
                for t in counts:
                    ours = times["cpu", mode, t]
                    best = [min(times[p, mode, t][r] for p in peers) for r in range(rounds)]
                    fastest = min(peers, key=lambda p: statistics.median(times[p, mode, t]))
                    row = dict(B=B, S=S, H=H, causal=causal, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               threads=t, rounds=rounds, cpu_ms=statistics.median(ours),
                               peer=fastest, peer_ms=statistics.median(times[fastest, mode, t]),
                               vs_peer=statistics.median(b / o for b, o in zip(best, ours)),
                               peers={p: statistics.median(times[p, mode, t]) for p in peers},
                               check_err=err, peak_mib=peak_mib if mode == "fwd+bwd" else None)
                    if t != counts[0]:
                        row["cpu_2nd_thread"] = statistics.median(
                            a / b for a, b in zip(times["cpu", mode, counts[0]], ours))
                        row["sdpa_2nd_thread"] = statistics.median(
                            a / b for a, b in zip(times["sdpa-flash", mode, counts[0]], times["sdpa-flash", mode, t]))
                    rows.append(row)
    return dict(environment=_environment(), **probes, long_rows=rows)


def format_long(report: dict) -> str:
    env, peak = report["environment"], peak_per_thread(report)
    lines = [f"CPU long sequences: torch {env['torch']}, kernels {env['kernel_isa']}, {env['cores']} cores, "
             f"load average {', '.join(f'{x:.2f}' for x in env['load_average'])}",
             f"{describe(report)}", "",
             f"{'B,S,H':<12} {'causal':<6} {'dtype':<9} {'mode':<8} {'thr':>3} {'ours ms':>9} {'peer':<11} "
             f"{'peer ms':>9} {'x peer':>6} {'2nd thr ours':>12} {'2nd thr sdpa':>12} "
             f"{'GF/s conv':>9} {'GF/s exec':>9} {'% peak':>6} {'x@ceil':>6} {'% need':>6}"]
    for r in report["long_rows"]:
        flops = schedule_flops(r["B"], r["S"], r["H"], HEAD_DIM, r["causal"], r["dtype"], env["kernel_isa"])
        key = "fwd" if r["mode"] == "fwd" else "fwdbwd"
        conv = flops[f"conv_{key}"] / r["cpu_ms"] / 1e6
        done = flops[f"exec_{key}"] / r["cpu_ms"] / 1e6
        scaling = (f"{r['cpu_2nd_thread']:12.2f} {r['sdpa_2nd_thread']:12.2f}" if "cpu_2nd_thread" in r
                   else f"{'':>12} {'':>12}")
        # The ratio ours would reach running its executed products at the fp32 FMA peak: where it is
        # below a target, no kernel doing this work can meet that target against this peer.
        # And the share of that peak its products would need to meet this row's target: beside
        # "% peak", how far the target is; above the rate the micro-kernel reaches on its own (see
        # the README), only less work would meet it against this peer.
        if r["dtype"] == "float32":
            ratio = r["peer_ms"] * peak * r["threads"] * 1e6 / flops[f"exec_{key}"]
            at_ceiling = f"{ratio:6.2f} {100 * LONG_TARGETS[r['mode']] / ratio:6.1f}"
        else:
            at_ceiling = f"{'-':>6} {'-':>6}"
        lines.append(f"{r['B']},{r['S']},{r['H']:<5} {str(r['causal']):<6} {r['dtype']:<9} {r['mode']:<8} "
                     f"{r['threads']:3d} {r['cpu_ms']:9.1f} {r['peer']:<11} {r['peer_ms']:9.1f} "
                     f"{r['vs_peer']:6.2f} {scaling} {conv:9.1f} {done:9.1f} "
                     f"{_percent_of_ceiling(r['dtype'], done, peak * r['threads'])} {at_ceiling}")
    lines += ["", "x peer = median over rounds of (fastest peer's time / ours), same thread count; 2nd thr = "
              "time at 1 thread / time at 2 threads, paired per round; GF/s conv = 4 B H S^2 D (x3.5 with "
              "backward, halved for causal) / time, GF/s exec = the products the kernels run / time; "
              "% peak = GF/s exec / (FMA peak x threads); x@ceil = x peer if ours ran its executed "
              "products at the FMA peak and nothing else (an upper bound for any kernel doing this work); "
              "% need = target / x@ceil: the % of that peak at which our executed products alone would just "
              "meet the row's target against this run's peer (fwd or fwd+bwd target at any thread count)",
              f"targets (fp32, 2 threads): {', '.join(f'{k} >= {v}x' for k, v in LONG_TARGETS.items())}"]
    return "\n".join(lines)


def plot_long(report: dict, path) -> None:
    """Speed-up of the second thread per shape, ours and SDPA-flash, forward and forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["long_rows"] if "cpu_2nd_thread" in r]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        labels = sorted({(r["S"], r["H"], r["causal"]) for r in mine})
        width = 0.2
        for k, (who, mode) in enumerate([("cpu", "fwd"), ("cpu", "fwd+bwd"), ("sdpa", "fwd"), ("sdpa", "fwd+bwd")]):
            values = [next(r[f"{who}_2nd_thread"] for r in mine if (r["S"], r["H"], r["causal"]) == label
                           and r["mode"] == mode) for label in labels]
            ax.bar([i + (k - 1.5) * width for i in range(len(labels))], values, width,
                   label=f"{'ours' if who == 'cpu' else 'SDPA-flash'} {mode}")
        ax.axhline(LONG_TARGETS["2nd thread"], color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(labels)), [f"S{s} H{h}{' c' if c else ''}" for s, h, c in labels], rotation=30)
        ax.set_ylabel("time at 1 thread / time at 2 threads")
        ax.set_title(f"{dtype}: speed-up of the second thread")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first shape only, short timings")
    parser.add_argument("--dtypes", action="store_true", help="fp32 vs bf16 vs fp16 of the cpu backend only")
    parser.add_argument("--dropout", action="store_true", help="dropout against no dropout of the cpu backend only")
    parser.add_argument("--lama", action="store_true", help="LAMA: fused cpu vs eager reference vs torch composite")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --dtypes, --dropout and --lama")
    parser.add_argument("--long", action="store_true",
                        help="long sequences at 1 and 2 threads against the fastest peer, with a scaling plot")
    parser.add_argument("--plot", help="with --long: write the thread-scaling PNG here; with --lama: the speed-up PNG")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args(argv)
    if sk.info()["backends"]["cpu"]["usable"] is False:
        print(f"cpu backend unavailable: {sk.info()['backends']['cpu']['reason']}", file=sys.stderr)
        return 1
    torch.set_num_threads(usable_cores())
    if args.lama:
        report = run_lama(args.rounds, args.quick)
        print(format_lama(report))
        if args.plot:
            plot_lama(report, args.plot)
    elif args.long:
        report = run_long(LONG_QUICK if args.quick else LONG_SHAPES, threads=max(2, torch.get_num_threads()))
        print(format_long(report))
        if args.plot:
            plot_long(report, args.plot)
    elif args.dtypes:
        report = run_dtypes(args.rounds)
        print(format_dtypes(report))
    elif args.dropout:
        report = dict(environment=_environment(), **ceilings(),
                      dropout_rows=run_dropout(args.rounds))
        print(format_dropout(report["dropout_rows"], report["environment"], report))
    else:
        report = run(args.quick)
        print(format_report(report))
        report["dropout_rows"] = (run_dropout(1, 0.1, DTYPE_SHAPES[:1]) if args.quick else run_dropout(3))
        print()
        print(format_dropout(report["dropout_rows"], _environment(), report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
