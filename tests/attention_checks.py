"""Comparison helpers (flash-attn's error rule, mismatch messages that show where) and the
attention inputs, option grid and gradient runner the backend tests share."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from symattn_kernels import reference as R

F64 = torch.float64


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    shown = ", ".join(
        f"{tuple(i.tolist())}: {actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}" for i in idx
    )
    return f"{int(bad.sum())} of {bad.numel()} elements differ; first: {shown}"


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "tensor") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, NaN/inf positions equal."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_special = (torch.isnan(actual) & torch.isnan(expected)) | (
        torch.isinf(actual) & (actual == expected)
    )
    diff = (actual - expected).abs()
    bad = ~same_special & ~(diff <= atol + rtol * expected.abs())
    assert not bad.any(), f"{name}: {describe_mismatch(actual, expected, bad)}"


def max_error(actual, reference) -> float:
    """Max |actual - reference| over finite reference entries (lse of empty rows is -inf)."""
    actual = actual.detach().to(torch.float64)
    reference = reference.detach().to(torch.float64)
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(actual)), "non-finite entries differ from the reference"
    return (actual - reference)[finite].abs().max().item() if finite.any() else 0.0


def assert_flash_rule(name: str, actual, ref64, ref_same_dtype, atol: float) -> None:
    """flash-attn's rule: error vs the fp64 reference <= 2x the error of the reference run in the
    kernel's own dtype, plus atol for rounding noise."""
    err = max_error(actual, ref64)
    bound = 2 * max_error(ref_same_dtype, ref64) + atol
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


# Shared inputs of the backend tests: fp64 leaves, every coefficient mode and mask kind.
COEF_MODES = [None, "diag", "full"]


def make_inputs(B=2, S=9, H=3, D=8, Dv=5, coef_mode=None, shared=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=gen, dtype=F64).to(dtype).requires_grad_()
    v = None if shared else torch.randn(B, S, H, Dv, generator=gen, dtype=F64).to(dtype).requires_grad_()
    coef = {
        None: None,
        "diag": torch.rand(H, D, generator=gen, dtype=F64) + 0.5,
        "full": torch.randn(H, D, D, generator=gen, dtype=F64) / D**0.5 + torch.eye(D, dtype=F64),
    }[coef_mode]
    coef = None if coef is None else coef.to(dtype).requires_grad_()
    return q, v, coef


def padding_mask(B, S, kind):
    if kind == "none":
        return None
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, S // 2:] = False
    if kind == "with-empty-row":
        mask[-1] = False
    return mask


def run(fn, q, v, coef, grad_seed=1, **kw):
    """Output, lse and gradients of q, v, coef for random output and lse cotangents."""
    out, lse = fn(q, v, coef=coef, return_lse=True, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=gen, dtype=F64).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (out * dout).sum() + (lse.where(finite, 0) * dlse).sum()
    leaves = [t for t in (q, v, coef) if t is not None]
    return [out, lse, *torch.autograd.grad(loss, leaves)]


def reference(q, v, **kw):
    return R.symmetric_attention(q, v, **kw)


# Every mode x value mode x causal x padding kind x exclude_self, with readable ids.
GRID = list(itertools.product(COEF_MODES, [True, False], [False, True], ["none", "partial", "with-empty-row"],
                              [False, True]))
GRID_IDS = [f"coef={c}-{'shared' if s else 'v'}-{'causal' if ca else 'full'}-pad={p}-{'noself' if e else 'self'}"
            for c, s, ca, p, e in GRID]


def with_threads(threads, fn):
    """fn() with torch's intra-op thread count set to threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def peak_allocated_bytes(fn, threads=2) -> int:
    """Peak of the CPU memory fn() allocates beyond what it started with (the profiler's allocation
    events in time order), run with torch's intra-op thread count set to threads."""
    from torch.profiler import ProfilerActivity, profile

    def profiled():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return prof

    prof = with_threads(threads, profiled)
    running = peak = 0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def mirrored_groups(S, batch_heads):
    """(groups, rows per group) of a head of S > 512 tokens on the CPU kernels' mirrored forward:
    whole 128-row query blocks, as many groups (up to 8) as make about 32 group-pair tasks in a
    call of batch_heads heads."""
    blocks = -(-S // 128)
    groups = 1
    while groups < min(8, blocks) and groups * (groups + 1) // 2 * batch_heads < 32:
        groups += 1
    per_group = -(-S // groups)
    rows = -(-per_group // 128) * 128
    return -(-S // rows), rows


def kernel_dropout_seed(seed_state):
    """The dropout seed a kernel call draws after torch.manual_seed(seed_state)."""
    torch.manual_seed(seed_state)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def run_on_instruction_set(isa: str, script: str, timeout: float = 600, args: tuple = ()) -> str:
    """stdout of ``python -c script *args``, run from the repository root with the fused CPU kernels
    set to ``isa`` (one of ``backends.cpu.KERNEL_BUILDS``: the check builds need AVX2; a process
    reads it once, at its first call). Skips where this CPU does not run that set; fails on a
    non-zero exit."""
    from symattn_kernels.backends import cpu

    def level(name):
        return cpu.ISA_CHOICES.index("avx2" if name in cpu.CHECK_BUILDS else name)

    widest = cpu.kernel_isa().lower()
    if level(isa) > level(widest):
        pytest.skip(f"this CPU runs {widest} kernels at most")
    # ATEN_CPU_CAPABILITY lowers ATen's (and so our) choice; SYMATTN_CPU_ISA caps ours alone.
    switch = "ATEN_CPU_CAPABILITY" if isa in ("default", "avx2") else "SYMATTN_CPU_ISA"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script, *args], env={**os.environ, switch: isa}, cwd=root,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def pytest_on_kernel_build(isa, args, timeout):
    """Runs pytest with args under the fused CPU kernel set isa (``run_on_instruction_set``) and
    fails with its output when a test there fails."""
    script = ("import sys, pytest\nfrom symattn_kernels.backends import cpu\nprint(cpu.kernel_isa(), flush=True)\n"
              f"sys.exit(pytest.main({['-q', '-p', 'no:cacheprovider', *args]!r}))\n")
    out = run_on_instruction_set(isa, script, timeout)
    assert out.split()[0] == isa.upper()
