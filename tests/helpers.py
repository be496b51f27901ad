"""Comparison helpers: flash-attn's error rule and mismatch messages that show where."""

from __future__ import annotations

import torch


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
