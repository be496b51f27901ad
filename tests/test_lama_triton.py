"""Triton LAMA kernels under the interpreter (TRITON_INTERPRET=1), against the fp64 reference.

Run in its own process, since the variable must be set before triton is imported:

    TRITON_INTERPRET=1 pytest -m interpret tests/test_lama_triton.py

Pass rule (flash-attn, tests/attention_checks.assert_flash_rule): max error against the fp64 reference is
at most 2x the error of the reference run in the kernel's dtype, plus a floor of ATOL times the
reference's magnitude; for pooled, attn and every gradient. bf16 is not tested: the
interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584). The cases and the check are shared with
the ``cpu`` backend's tests (tests/test_lama_cpu.py): ``check_case`` takes the backend module.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import reference
from tests.attention_checks import assert_flash_rule, max_error

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (own process)"),
]

if os.environ.get("TRITON_INTERPRET") == "1":
    from symattn_kernels.triton import lowrank as triton_lowrank
    from symattn_kernels.triton.lowrank import lowrank_backward, lowrank_forward

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ATOL = {F64: 1e-12, F32: 1e-5, F16: 1e-3, BF16: 1e-2}
NAMES = ("pooled", "attn", "dh", "dcontext", "dp", "dq", "du")


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen: int
    dim: int
    heads: int
    head_norm: str = "l2"  # "l2" | "none"
    token_softmax: bool = True
    padded: bool = False  # random padding; with batch > 1 sequence 1 is fully padded
    with_u: bool = False
    per_sequence: bool = False  # context [B, E] instead of [E]
    dtype: torch.dtype = F32

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"T{self.seqlen}", f"E{self.dim}", f"m{self.heads}", self.head_norm,
                 "softmax" if self.token_softmax else "raw"]
        parts += [name for name, on in (("pad", self.padded), ("u", self.with_u), ("ctxB", self.per_sequence)) if on]
        return "-".join(parts + [str(self.dtype).removeprefix("torch.")])


# Every head_norm x token_softmax x padding x u x context combination once, with the sizes
# (B, T, E, m) cycling through B in {1, 3}, T in {1, 7, 40}, E, m in {1, 4, 8}.
_SIZES = [(1, 1, 4, 1), (3, 7, 8, 4), (3, 40, 1, 8), (1, 40, 8, 8), (3, 1, 4, 4), (3, 7, 1, 1), (1, 7, 8, 4),
          (3, 40, 4, 1)]
_FLAGS = list(itertools.product(["l2", "none"], [True, False], [False, True], [False, True], [False, True]))
CASES = [
    Case(*_SIZES[i % len(_SIZES)], head_norm=n, token_softmax=s, padded=pad, with_u=u, per_sequence=c)
    for i, (n, s, pad, u, c) in enumerate(_FLAGS)
]
CASES += [
    Case(3, 40, 8, 4, padded=True, with_u=True, dtype=F16),
    Case(3, 7, 4, 8, "none", False, padded=True, per_sequence=True, dtype=F16),
    Case(1, 40, 40, 3, padded=False, dtype=F16),
]


def make_inputs(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(case.dtype)

    B, T, E, m = case.batch, case.seqlen, case.dim, case.heads
    h = randn(B, T, E)
    u = randn(B, T, E) if case.with_u else None
    context = randn(B, E) if case.per_sequence else randn(E)
    p, q = randn(E, m), randn(E, m)
    mask = None
    if case.padded:
        mask = torch.rand(B, T, generator=gen) > 0.3
        mask[:, 0] = True
        if B > 1:
            mask[1] = False  # a fully padded sequence: pooled 0, attn 0, zero gradients
    return h, context, p, q, u, mask


def run_kernels(backend, case, h, context, p, q, u, mask, dpooled, dattn):
    """Forward and backward of a backend module's lowrank_forward / lowrank_backward."""
    head_norm = None if case.head_norm == "none" else case.head_norm
    pooled, attn = backend.lowrank_forward(h, context, p, q, u, mask, head_norm, case.token_softmax, 1e-12)
    grads = [None if t is None else torch.full_like(t, float("nan")) for t in (h, context, p, q, u)]
    backend.lowrank_backward(dpooled.to(h.dtype), dattn.to(h.dtype), h, context, p, q, u, mask, head_norm,
                             case.token_softmax, 1e-12, *grads)
    return [pooled, attn, *grads]


def run_reference(case, h, context, p, q, u, mask, dpooled, dattn, dtype):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (h, context, p, q, u)]
    hr, cr, pr, qr, ur = leaves
    pooled, attn = reference.lowrank_context_attention(
        hr, cr, pr, qr, u=ur, key_padding_mask=mask, head_norm=None if case.head_norm == "none" else "l2",
        token_softmax=case.token_softmax,
    )
    loss = (pooled.to(F64) * dpooled).sum() + (attn.to(F64) * dattn).sum()
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [pooled.detach(), attn.detach(), *(None if t is None else next(grads) for t in leaves)]


def noisiest_reference(case, ref64, h, context, p, q, u, mask, dpooled, dattn, orders: int = 3):
    """The reference in the case's dtype, per output the least accurate of a few head orders.

    Heads are interchangeable (permuting the columns of p and q permutes pooled, attn, dp and dq
    and leaves the rest unchanged), but each order sums over heads differently. Where a head norm
    nearly vanishes, du sums terms ~1e5 times larger than itself, and one order's rounding can be
    far luckier than another's: the worst of several orders is the reference's rounding noise."""
    gen = torch.Generator().manual_seed(3)
    worst = run_reference(case, h, context, p, q, u, mask, dpooled, dattn, case.dtype)
    for _ in range(orders - 1):
        perm = torch.randperm(case.heads, generator=gen)
        back = torch.argsort(perm)
        got = run_reference(case, h, context, p[:, perm], q[:, perm], u, mask, dpooled[:, perm], dattn[:, perm],
                            case.dtype)
        got = [got[0][:, back], got[1][:, back], got[2], got[3], got[4][:, back], got[5][:, back], got[6]]
        worst = [w if w is None or max_error(w, r) >= max_error(g, r) else g for w, g, r in zip(worst, got, ref64)]
    return worst


def check_case(case: Case, backend):
    """Pooled, attn and every gradient of backend module ``backend`` against the fp64 reference."""
    h, context, p, q, u, mask = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    dpooled = torch.randn(case.batch, case.heads, case.dim, generator=gen, dtype=F64)
    dattn = torch.randn(case.batch, case.heads, case.seqlen, generator=gen, dtype=F64)
    got = run_kernels(backend, case, h, context, p, q, u, mask, dpooled, dattn)
    ref64 = run_reference(case, h, context, p, q, u, mask, dpooled, dattn, F64)
    ref_lo = noisiest_reference(case, ref64, h, context, p, q, u, mask, dpooled, dattn)
    for name, actual, r64, rlo in zip(NAMES, got, ref64, ref_lo):
        if r64 is None:
            assert actual is None, name
            continue
        assert actual.dtype == case.dtype, f"{name}: dtype {actual.dtype}"
        assert actual.is_contiguous(), name
        assert not torch.isnan(actual).any(), f"{case.id} {name}: NaN in kernel output"
        magnitude = max(1.0, r64.abs().max().item())
        assert_flash_rule(f"{case.id} {name}", actual, r64, rlo, ATOL[case.dtype] * magnitude)
    if case.padded and case.batch > 1:
        pooled, attn, dh = got[0], got[1], got[2]
        assert torch.all(pooled[1] == 0) and torch.all(attn[1] == 0) and torch.all(dh[1] == 0)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_backward_matches_reference(case):
    check_case(case, triton_lowrank)


def test_only_requested_gradients_are_written():
    case = Case(3, 7, 8, 4, padded=True, with_u=True)
    h, context, p, q, u, mask = make_inputs(case)
    dq = torch.full_like(q, float("nan"))
    lowrank_backward(torch.randn(3, 4, 8), None, h, context, p, q, u, mask, "l2", True, 1e-12,
                     None, None, None, dq, None)
    assert not torch.isnan(dq).any()


def test_noncontiguous_inputs():
    case = Case(3, 7, 8, 4, padded=True, with_u=True, per_sequence=True)
    h, context, p, q, u, mask = make_inputs(case)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)  # strided batch, unit last stride
    q_t = q.t().contiguous().t()  # last stride != 1: copied by the launcher
    got = lowrank_forward(h_t, context, p, q_t, u, mask, "l2", True, 1e-12)
    want = lowrank_forward(h, context, p, q, u, mask, "l2", True, 1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_u", [False, True], ids=["u=h", "u"])
def test_public_api_backend_triton(with_u):
    gen = torch.Generator().manual_seed(5)
    B, T, E, m = 3, 9, 6, 4

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    h, context, p, q = leaf(B, T, E), leaf(E), leaf(E, m), leaf(E, m)
    u = leaf(B, T, E) if with_u else None
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2] = False
    leaves = [t for t in (h, context, p, q, u) if t is not None]
    got = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask, backend="triton")
    want = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask, backend="torch")
    cot = [torch.randn(t.shape, generator=gen) for t in got]
    for a, b in zip(torch.autograd.grad(got, leaves, cot) + got, torch.autograd.grad(want, leaves, cot) + want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # Only pooled used: the attn cotangent is None in the backward op.
    (gh,) = torch.autograd.grad(
        sk.lowrank_context_attention(h, context, p, q, u=u, backend="triton")[0].sum(), [h])
    (wh,) = torch.autograd.grad(sk.lowrank_context_attention(h, context, p, q, u=u, backend="torch")[0].sum(), [h])
    torch.testing.assert_close(gh, wh, atol=2e-5, rtol=1e-4)


def test_workcount_lama_counts_are_consistent():
    # bench.workcount's LAMA rows: the fused kernels never move less than the compulsory traffic
    # nor more than the eager composite, and execute at least the 12·T·E·m matmul FLOPs.
    from bench import workcount
    from symattn_kernels.backends import torch as torch_backend

    seqlen, dim, heads = 40, 32, 4
    triton_fwd, triton_bwd = workcount.count_lama_triton(seqlen, dim, heads)
    eager_fwd, eager_bwd = workcount.count_lama(torch_backend, seqlen, dim, heads, workcount.EagerTraffic)
    floor_fwd, floor_bwd = workcount.lama_compulsory(seqlen, dim, heads)
    for fused, eager, floor in ((triton_fwd, eager_fwd, floor_fwd), (triton_bwd, eager_bwd, floor_bwd)):
        assert floor.bytes <= fused.bytes < eager.bytes
        assert fused.flops >= floor.flops and eager.flops >= floor.flops
        assert fused.exps > 0 and eager.exps > 0
    assert eager_fwd.flops == floor_fwd.flops  # the composite runs exactly the two matmuls


def test_auto_routes_lama_without_a_triton_backward(monkeypatch):
    """On sm_80 the LAMA backward has no spill-free kernel from E = 512 or m = 32 on: ``auto``
    skips Triton for exactly those training calls, an explicit backend="triton" names why."""
    from symattn_kernels import backends
    from symattn_kernels.backends import registry

    cuda, case = torch.device("cuda"), backends.LowrankCase
    monkeypatch.setattr(registry, "_cuda_arch", lambda device: 80)
    assert backends.resolve("auto", cuda, torch.bfloat16, op="lowrank", case=case(512, 8)) == "torch"
    assert backends.resolve("auto", cuda, torch.bfloat16, op="lowrank", case=case(256, 32)) == "torch"
    assert backends.resolve("auto", cuda, torch.bfloat16, op="lowrank", case=case(256, 16)) == "triton"
    assert backends.resolve("auto", cuda, torch.bfloat16, op="lowrank", case=case(512, 8, False)) == "triton"
    with pytest.raises(ValueError, match=r"h has E = 256 and p has m = 32 heads: .*sm_80.*backend='torch'"):
        backends.resolve("triton", cuda, torch.bfloat16, op="lowrank", case=case(256, 32))
    monkeypatch.setattr(registry, "_cuda_arch", lambda device: 90)
    assert backends.resolve("auto", cuda, torch.bfloat16, op="lowrank", case=case(512, 32)) == "triton"


def test_lama_launcher_refuses_an_unshipped_backward_before_any_work(monkeypatch):
    monkeypatch.setattr(triton_lowrank, "is_interpret", lambda: False)
    monkeypatch.setattr(triton_lowrank, "device_arch", lambda device: 80)
    h = torch.randn(1, 5, 512)
    p, q = torch.randn(512, 4), torch.randn(512, 4)
    dh = torch.full_like(h, float("nan"))
    with pytest.raises(ValueError, match="h has E = 512"):
        lowrank_backward(torch.ones(1, 4, 512), None, h, h.mean(1), p, q, None, None, "l2", True, 1e-12,
                         dh, None, None, None, None)
    assert torch.isnan(dh).all()
