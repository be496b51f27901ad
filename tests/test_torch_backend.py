"""The public API on the composite ``torch`` backend against the fp64 reference: every mode,
mask and option, outputs, lse and every gradient; dropout determinism; custom-op checks."""

import itertools

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import ops
from symattn_kernels import reference as R

from .attention_checks import (
    COEF_MODES, F64, GRID, GRID_IDS, assert_close, assert_flash_rule, make_inputs, padding_mask, reference, run,
)


def torch_backend(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="torch", **kw)


@pytest.mark.parametrize("coef_mode,shared,causal,padding,exclude_self", GRID, ids=GRID_IDS)
def test_matches_reference_fp64(coef_mode, shared, causal, padding, exclude_self):
    q, v, coef = make_inputs(coef_mode=coef_mode, shared=shared)
    kw = dict(causal=causal, key_padding_mask=padding_mask(2, 9, padding), exclude_self=exclude_self)
    got, want = run(torch_backend, q, v, coef, **kw), run(reference, q, v, coef, **kw)
    for name, a, b in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], got, want):
        assert not a.isnan().any(), f"{name} has NaN"
        assert_close(a, b, atol=1e-9, rtol=1e-9, name=name)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("coef_mode", COEF_MODES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_low_precision_follows_flash_rule(dtype, atol, coef_mode, shared):
    q64, v64, c64 = make_inputs(S=33, D=16, Dv=24, coef_mode=coef_mode, shared=shared)
    lowp = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q64, v64, c64)]
    kw = dict(causal=True, key_padding_mask=padding_mask(2, 33, "partial"))
    ref64 = run(reference, q64, v64, c64, **kw)
    ref_lowp = run(reference, *lowp, **kw)
    got = run(torch_backend, *lowp, **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, r64, rl in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], got, ref64, ref_lowp):
        assert_flash_rule(name, a, r64, rl, atol)


def test_gradcheck_through_public_api():
    q, v, coef = make_inputs(B=1, S=5, H=2, D=4, Dv=3, coef_mode="full", shared=False)
    mask = torch.tensor([[True, True, True, False, True]])

    def fn(q, v, coef):
        return sk.symmetric_attention(q, v, coef=coef, causal=True, key_padding_mask=mask, backend="torch")

    assert torch.autograd.gradcheck(fn, (q, v, coef))


def test_noncontiguous_inputs():
    base = torch.randn(2, 7, 3, 2, 10, dtype=F64)
    q = base[..., 0, :8].requires_grad_()  # strided view, last stride 1
    v = torch.randn(2, 7, 6, 3, dtype=F64).transpose(-1, -2).requires_grad_()  # last stride 3: copied
    assert q.stride(-1) == 1 and v.stride(-1) != 1
    got = run(torch_backend, q, v, None)
    want = run(reference, q, v, None)
    for name, a, b in zip(["out", "lse", "dq", "dv"], got, want):
        assert_close(a, b, atol=1e-9, name=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_varlen_matches_reference(causal, shared):
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 5, 16, 16, 23], dtype=torch.int32)
    q = torch.randn(23, 2, 8, dtype=F64, requires_grad=True)
    v = None if shared else torch.randn(23, 2, 3, dtype=F64, requires_grad=True)
    coef = torch.randn(2, 8, dtype=F64, requires_grad=True)
    kw = dict(causal=causal, exclude_self=True, dropout_p=0.2)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(5)
    out, lse = sk.symmetric_attention_varlen(q, v, cu, 11, coef=coef, return_lse=True, backend="torch", **kw)
    ref, ref_lse = R.symmetric_attention_varlen(q, v, cu, 11, coef=coef, return_lse=True, dropout_seed=seed, **kw)
    assert_close(out, ref, atol=1e-9, name="out")
    assert_close(lse, ref_lse, atol=1e-9, name="lse")
    dout = torch.randn_like(out)
    leaves = [t for t in (q, v, coef) if t is not None]
    for name, a, b in zip(["dq", "dv/dcoef", "dcoef"], torch.autograd.grad(out, leaves, dout),
                          torch.autograd.grad(ref, leaves, dout)):
        assert_close(a, b, atol=1e-9, name=name)


def test_dropout_reproducible_and_matches_reference_mask():
    q, v, coef = make_inputs(S=16, shared=False, coef_mode="diag")
    kw = dict(dropout_p=0.3, causal=True)
    torch.manual_seed(11)
    first = run(torch_backend, q, v, coef, **kw)
    torch.manual_seed(11)
    second = run(torch_backend, q, v, coef, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(12)
    assert not torch.equal(run(torch_backend, q, v, coef, **kw)[0], first[0])
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    want = run(reference, q, v, coef, dropout_seed=seed, **kw)
    for name, a, b in zip(["out", "lse", "dq", "dv", "dcoef"], first, want):
        assert_close(a, b, atol=1e-9, name=name)


def test_dropout_zero_is_exact():
    q, v, _ = make_inputs(shared=False)
    assert torch.equal(torch_backend(q, v, dropout_p=0.0), torch_backend(q, v))


def test_only_needed_gradients_are_computed():
    q, v, coef = make_inputs(shared=False, coef_mode="full")
    coef.requires_grad_(False)
    out = torch_backend(q, v, coef=coef)
    dq, dv = torch.autograd.grad(out.sum(), (q, v))
    assert coef.grad is None and dq.shape == q.shape and dv.shape == v.shape


def _op_samples():
    q, v, coef = make_inputs(B=1, S=5, H=2, D=4, Dv=3, coef_mode="full", shared=False, dtype=torch.float32)
    mask = torch.tensor([[True, True, False, True, True]])
    seed = torch.tensor(7, dtype=torch.int64)
    common = dict(cu_seqlens=None, max_seqlen=5, deterministic=True, backend="torch")
    yield (q, None, None, None, None, None, 0.5, False, 0.0, False), common
    yield (q, v, coef, mask, None, seed, 0.5, True, 0.2, True), common
    yq = torch.randn(9, 2, 4, requires_grad=True)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    yield (yq, None, coef[..., 0].detach().requires_grad_(), None, cu, None, 0.5, True, 0.0, False), dict(
        common, cu_seqlens=cu, max_seqlen=6)


@pytest.mark.parametrize("case", range(3))
def test_opcheck_attention_fwd(case):
    args, kw = list(_op_samples())[case]
    q, v, coef, mask, cu, seed, scale, causal, p, noself = args
    torch.library.opcheck(
        ops.attention_fwd, (q, v, coef, mask, kw["cu_seqlens"], seed, scale, causal, p, noself, kw["max_seqlen"],
                            kw["deterministic"], kw["backend"]),
    )


def test_opcheck_attention_bwd():
    q, v, coef = make_inputs(B=1, S=5, H=2, D=4, Dv=3, coef_mode="diag", shared=False, dtype=torch.float32)
    args = (q.detach(), v.detach(), coef.detach(), None, None, None, 0.5, True, 0.0, False, 5, True, "torch")
    out, lse, residual = ops.attention_fwd(*args)
    assert residual.numel() == 0  # only the CPU kernels keep one
    dq, dv, dcoef = torch.empty_like(q), torch.empty_like(v), torch.empty_like(coef)
    torch.library.opcheck(
        ops.attention_bwd,
        (torch.randn_like(out), None, *args[:6], out, None, lse, dq, dv, dcoef, *args[6:]),
    )


@pytest.mark.parametrize("masked", [True, False])
def test_opcheck_lowrank(masked):
    """Unmasked, attn came out with the transposed features' strides, not the fake's [B, m, T]."""
    h = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, False] * 2 + [True]]) if masked else None
    args = (h, torch.randn(2, 6, requires_grad=True), torch.randn(6, 3, requires_grad=True),
            torch.randn(6, 3, requires_grad=True), None, mask, "l2", True, 1e-12, "torch")
    torch.library.opcheck(ops.lowrank_fwd, args)
    assert ops.lowrank_fwd(*args)[1].is_contiguous()


@pytest.mark.parametrize("shape", [(2, 7, 1, 8), (2, 1, 3, 8), (2, 7, 3, 8)], ids=["H1", "S1", "general"])
def test_outputs_are_not_views(shape):
    """out and lse are tensors of their own, as on the other backends: editing one in place
    is allowed, and the backward then refuses with autograd's version-counter error."""
    q = torch.randn(shape, requires_grad=True)
    out, lse = sk.shared_attention(q, return_lse=True, backend="torch")
    assert out._base is None and lse._base is None
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    q, v, coef = make_inputs(B=2, S=12, H=2, D=8, Dv=8, coef_mode="diag", shared=False, dtype=torch.float32)
    mask = padding_mask(2, 12, "partial")

    def step(q, v, coef):
        out = sk.symmetric_attention(q, v, coef=coef, causal=True, key_padding_mask=mask, backend="torch")
        shared = sk.shared_attention(q, key_padding_mask=mask, backend="torch")
        return (out.square().sum() + shared.sum()) / 3

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    eager_loss = step(q, v, coef)
    eager_grads = torch.autograd.grad(eager_loss, (q, v, coef))
    loss = compiled(q, v, coef)
    grads = torch.autograd.grad(loss, (q, v, coef))
    assert_close(loss, eager_loss, atol=1e-5, name="loss")
    for name, a, b in zip(["dq", "dv", "dcoef"], grads, eager_grads):
        assert_close(a, b, atol=1e-5, name=name)


LAMA_GRID = list(itertools.product(["l2", None], [True, False], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize(
    "head_norm,token_softmax,padded,with_u,per_sequence",
    LAMA_GRID,
    ids=[f"{n}-{'softmax' if s else 'raw'}-{'pad' if p else 'nopad'}-{'u' if u else 'h'}-{'ctxB' if c else 'ctx'}"
         for n, s, p, u, c in LAMA_GRID],
)
def test_lowrank_matches_reference_fp64(head_norm, token_softmax, padded, with_u, per_sequence):
    gen = torch.Generator().manual_seed(3)
    B, T, E, m = 3, 7, 6, 4

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_()

    h, u = leaf(B, T, E), leaf(B, T, E) if with_u else None
    context = leaf(B, E) if per_sequence else leaf(E)
    p, q = leaf(E, m), leaf(E, m)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 3:] = False
        mask[2] = False
    kw = dict(u=u, key_padding_mask=mask, head_norm=head_norm, token_softmax=token_softmax)
    got = sk.lowrank_context_attention(h, context, p, q, backend="torch", **kw)
    want = R.lowrank_context_attention(h, context, p, q, **kw)
    leaves = [t for t in (h, context, p, q, u) if t is not None]
    cot = [torch.randn(t.shape, generator=gen, dtype=F64) for t in got]
    grads = torch.autograd.grad(got, leaves, cot)
    ref_grads = torch.autograd.grad(want, leaves, cot)
    for name, a, b in zip(["pooled", "attn", "dh", "dcontext", "dp", "dq", "du"], [*got, *grads],
                          [*want, *ref_grads]):
        assert_close(a, b, atol=1e-9, rtol=1e-9, name=name)


def test_lowrank_gradcheck_public_api():
    gen = torch.Generator().manual_seed(4)
    args = [torch.randn(*s, generator=gen, dtype=F64).requires_grad_() for s in ((2, 4, 5), (5,), (5, 3), (5, 3))]
    mask = torch.tensor([[True, True, False, True], [True] * 4])
    assert torch.autograd.gradcheck(
        lambda h, c, p, q: sk.lowrank_context_attention(h, c, p, q, key_padding_mask=mask, backend="torch"), args
    )
