"""Comparison helpers (flash-attn's error rule, mismatch messages that show where) and the
attention inputs, option grid and gradient runner the backend tests share."""

from __future__ import annotations

import itertools

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
