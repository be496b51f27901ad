"""Hostile-input behaviour every backend shares: varlen cost and dropout independent of the
``max_seqlen`` bound, second-order gradients correct or refused, every valid layout, NaN
propagated but never leaked out of padding, empty sizes, and clear errors from the modules."""

from __future__ import annotations

import resource

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import backends
from symattn_kernels.backends import cpu as cpu_backend
from symattn_kernels import reference as R
from symattn_kernels.lama import LowRankContextAttention
from symattn_kernels.modules import SharedWeightSelfAttention, StandardSelfAttention, SymmetricSelfAttention
from tests.attention_checks import F64, assert_close, pytest_on_kernel_build

BACKENDS = [name for name in ("torch", "cpu") if backends.status(name).usable]
TOL = {torch.float32: 2e-5, F64: 1e-10}


def _dtype(backend):
    return F64 if backend == "torch" else torch.float32


# Varlen: the bound is only a bound.

@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_loose_bound_costs_nothing(backend):
    q = torch.randn(7, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = sk.symmetric_attention_varlen(q, None, cu, 100_000, backend=backend)
    out.sum().backward()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB for 7 tokens"
    ref = R.symmetric_attention_varlen(q.detach().double(), None, cu, 7)
    assert_close(out, ref, atol=1e-5, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_cost_follows_real_lengths(backend):
    # One long sequence among many short ones: padding every sequence to the longest would
    # take 200 * 2048^2 * 4 bytes of scores (3 GiB); the real work is about 2048^2.
    lengths = [2048] + [1] * 199
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 1, 8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = sk.symmetric_attention_varlen(q, None, cu, 2048, backend=backend)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 400, f"peak memory grew by {grown_mib:.0f} MiB"
    assert_close(out[2048:], q[2048:], atol=1e-6, name="length-1 sequences attend to themselves")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_dropout_mask_ignores_the_bound(backend):
    q = torch.randn(9, 2, 8, dtype=_dtype(backend))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    outs = []
    for bound in (5, 9, 64):
        torch.manual_seed(3)
        outs.append(sk.symmetric_attention_varlen(q, None, cu, bound, dropout_p=0.3, backend=backend))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    ref = R.symmetric_attention_varlen(q.double(), None, cu, 5, dropout_p=0.3, dropout_seed=seed)
    assert_close(outs[0], ref, atol=TOL[q.dtype], name="dropout out")


# Second-order gradients.

def _gradient_penalty(backend, dtype, varlen=False):
    torch.manual_seed(0)
    q = torch.randn(2, 5, 2, 4, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 5, 2, 3, dtype=dtype, requires_grad=True)
    coef = torch.randn(2, 4, dtype=dtype, requires_grad=True)

    def penalty(fn):
        if varlen:
            cu = torch.tensor([0, 4, 10], dtype=torch.int32)
            out = fn.symmetric_attention_varlen(q.flatten(0, 1), v.flatten(0, 1), cu, 6, coef=coef,
                                                causal=True, **({} if fn is R else {"backend": backend}))
        else:
            mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
            out = fn.symmetric_attention(q, v, coef=coef, key_padding_mask=mask,
                                         **({} if fn is R else {"backend": backend}))
        grads = torch.autograd.grad((out * out.detach().roll(1, 0)).sum(), (q, v, coef), create_graph=True)
        loss = sum((g * g).sum() for g in grads)
        return torch.autograd.grad(loss, (q, v, coef))

    return penalty(sk), penalty(R)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_torch_backend_double_backward_matches_autograd(varlen):
    got, expected = _gradient_penalty("torch", F64, varlen)
    for name, a, b in zip(("q", "v", "coef"), got, expected):
        assert_close(a, b, atol=1e-9, name=f"second-order d{name}")


def test_torch_backend_gradgradcheck():
    q = torch.randn(1, 4, 1, 3, dtype=F64, requires_grad=True)
    v = torch.randn(1, 4, 1, 2, dtype=F64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: sk.symmetric_attention(a, b, causal=True, backend="torch"), (q, v))
    h = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    ctx, p, qq = (torch.randn(*s, dtype=F64, requires_grad=True) for s in ((4,), (4, 2), (4, 2)))
    torch.autograd.gradgradcheck(
        lambda *a: sk.lowrank_context_attention(*a, backend="torch"), (h, ctx, p, qq)
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernel_backends_refuse_double_backward(backend):
    with pytest.raises(RuntimeError, match="second-order gradients.*backend='torch'"):
        _gradient_penalty(backend, torch.float32)
    h = torch.randn(2, 3, 4, requires_grad=True)
    pooled, _ = sk.lowrank_context_attention(h, torch.randn(4), torch.randn(4, 2), torch.randn(4, 2), backend=backend)
    (g,) = torch.autograd.grad(pooled.sum(), h, create_graph=False)  # first order still fine
    assert g.grad_fn is None
    pooled, _ = sk.lowrank_context_attention(h, torch.randn(4), torch.randn(4, 2), torch.randn(4, 2), backend=backend)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(pooled.sum(), h, create_graph=True)


# Differentiation modes the ops' reverse-mode autograd rules do not cover: refused, not zero tangents
# (forward mode) or torch-internal errors (torch.func.grad, batched gradients).

def _attention_and_lama(backend):
    dtype = _dtype(backend)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 2, 8, dtype=dtype, generator=gen)
    h, ctx, p = (torch.randn(*s, dtype=dtype, generator=gen) for s in ((2, 5, 4), (4,), (4, 2)))
    return [
        ("symmetric_attention / shared_attention", q, lambda t: sk.shared_attention(t, backend=backend)),
        ("lowrank_context_attention", h, lambda t: sk.lowrank_context_attention(t, ctx, p, p, backend=backend)[0]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_and_func_grad_are_refused(backend):
    import torch.autograd.forward_ad as fwAD

    for name, x, f in _attention_and_lama(backend):
        for call in (lambda: torch.func.jvp(f, (x,), (torch.ones_like(x),)), lambda: torch.func.jacfwd(f)(x)):
            with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
                call()
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
                f(fwAD.make_dual(x, torch.ones_like(x)))
            assert torch.equal(f(x), f(x.clone())), "a plain input inside a dual level runs"
        for call in (lambda: torch.func.grad(lambda t: f(t).sum())(x), lambda: torch.func.vjp(f, x)):
            with pytest.raises(NotImplementedError, match="not torch.func.grad / vjp / jacrev"):
                call()
        # vmap of the forward is supported: each slice as its own call.
        batch = torch.stack([x, 2 * x])
        assert_close(torch.func.vmap(f)(batch), torch.stack([f(x), f(2 * x)]), atol=TOL[x.dtype], name=f"{name} vmap")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gradients_are_refused_and_the_jacobian_loop_works(backend):
    for name, x, f in _attention_and_lama(backend):
        x = x.detach().requires_grad_()
        out = f(x)
        op = name.split(" ")[0]
        with pytest.raises(NotImplementedError, match=f"batched gradients through {op}"):
            torch.autograd.grad(out, x, torch.randn(3, *out.shape, dtype=out.dtype), is_grads_batched=True)
        with pytest.raises(NotImplementedError, match="batched gradients"):
            torch.autograd.functional.jacobian(f, x, vectorize=True)
        jac = torch.autograd.functional.jacobian(f, x)  # one backward per output element
        (row,) = torch.autograd.grad(f(x).flatten()[3], x)
        assert torch.equal(jac.flatten(0, out.dim() - 1)[3], row), f"{name} jacobian row"


# torch.autograd.graph.allow_mutation_on_saved_tensors: inputs changed in place after the forward
# (the context keeps the originals it saved) still get the unchanged inputs' gradients, also where
# a gradient buffer is absent (no v, no coefficient, no u), whose None torch's mutation tracking
# failed on (it reads every argument the backward op fills in place as a tensor).
def _attention_and_lama_inputs(dtype, seed):
    """(generator, (q, v, coef), (h, context, p)): small inputs of an attention and a LAMA call."""
    gen = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(2, 7, 2, 8, dtype=dtype, generator=gen) for _ in range(2))
    coef = torch.rand(2, 8, dtype=dtype, generator=gen) + 0.5
    lama = tuple(torch.randn(*s, dtype=dtype, generator=gen) for s in ((2, 5, 4), (4,), (4, 2)))
    return gen, (q, v, coef), lama


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_mutated_under_allow_mutation_on_saved_tensors(backend):
    dtype = _dtype(backend)
    gen, (q, v, coef), (h, ctx, p) = _attention_and_lama_inputs(dtype, 0)
    calls = {
        "shared": ((q,), lambda t, **kw: sk.shared_attention(*t, **kw), R.shared_attention),
        "v, coef": ((q, v, coef), lambda t, **kw: sk.symmetric_attention(t[0], t[1], coef=t[2], **kw),
                    lambda t0, t1, t2: R.symmetric_attention(t0, t1, coef=t2)),
        "lama": ((h, ctx, p), lambda t, **kw: sk.lowrank_context_attention(t[0], t[1], t[2], t[2], **kw)[0],
                 lambda t0, t1, t2: R.lowrank_context_attention(t0, t1, t2, t2)[0]),
    }
    for name, (inputs, f, ref) in calls.items():
        leaves = [x.clone().requires_grad_() for x in inputs]
        exact = [x.to(F64).requires_grad_() for x in inputs]
        out_ref = ref(*exact)
        grad_out = torch.randn(out_ref.shape, dtype=F64, generator=gen)
        expected = torch.autograd.grad(out_ref, exact, grad_out)
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            changed = [x * 1 for x in leaves]
            out = f(changed, backend=backend)
            for x in changed:
                x.add_(1.0)
            got = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        for k, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, atol=TOL[dtype], name=f"{name} gradient {k}")


# Two backward calls of one graph from two threads (retain_graph=True) share the node's ctx,
# whose needs_input_grad torch's generated backward shortens in place for each call and puts back
# after: overlapping calls left it short for good, and the next backward raised IndexError
# (attention) or passed its gradient buffers to the wrong arguments (LAMA). Shortened by hand
# here, as the race leaves it: gradients are still right, also of inputs needing none.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("left", [0, 1, 2])
def test_backward_after_a_concurrent_backward_shortened_needs_input_grad(backend, left):
    gen, attention, lama = _attention_and_lama_inputs(_dtype(backend), 1)
    calls = {
        "v, coef": (attention, lambda t: sk.symmetric_attention(t[0], t[1], coef=t[2], backend=backend)),
        "lama": (lama, lambda t: sk.lowrank_context_attention(t[0], t[1], t[2], t[2], backend=backend)[0]),
    }
    for name, (inputs, f) in calls.items():
        leaves = [x.clone().requires_grad_(k != 1) for k, x in enumerate(inputs)]  # the second needs none
        grad_out = torch.randn(f(inputs).shape, dtype=inputs[0].dtype, generator=gen)
        expected = torch.autograd.grad(f(leaves), [x for x in leaves if x.requires_grad], grad_out)
        out = f(leaves)
        out.grad_fn.needs_input_grad = out.grad_fn.needs_input_grad[:left + 1]  # + 1: the generated one drops one
        got = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out)
        for k, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"{name} gradient {k}"


# Layouts.

LAYOUTS = {
    "D=1": lambda: (torch.randn(2, 5, 2, 1), None),
    "Dv=1": lambda: (torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 1)),
    "transposed-size-1-last": lambda: (torch.randn(2, 5, 1, 2).transpose(2, 3), None),
    "transposed-v": lambda: (torch.randn(2, 5, 2, 4), torch.randn(2, 5, 1, 2).transpose(2, 3)),
    "B=0": lambda: (torch.randn(0, 5, 2, 4), None),
    "S=0": lambda: (torch.randn(2, 0, 2, 4), None),
    "H=0": lambda: (torch.randn(2, 5, 0, 4), None),
    "S=0-transposed": lambda: (torch.randn(2, 2, 0, 4).transpose(1, 2), torch.randn(2, 0, 2, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_valid_layout(backend, layout):
    q, v = LAYOUTS[layout]()
    q.requires_grad_()
    if v is not None:
        v.requires_grad_()
    out, lse = sk.symmetric_attention(q, v, causal=True, return_lse=True, backend=backend)
    ref_out, ref_lse = R.symmetric_attention(q.detach().double(), None if v is None else v.detach().double(),
                                             causal=True, return_lse=True)
    assert_close(out, ref_out, atol=1e-5, name="out")
    assert_close(lse, ref_lse, atol=1e-5, name="lse")
    grads = torch.autograd.grad(out.sum(), [t for t in (q, v) if t is not None])
    for g, t in zip(grads, (q, v)):
        assert g.shape == t.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coef_mode", ["diag", "full"])
@pytest.mark.parametrize("shape", [(0, 5, 2, 4), (2, 0, 2, 4), (2, 5, 0, 4)], ids=["B=0", "S=0", "H=0"])
def test_empty_sizes_give_a_zero_coefficient_gradient(backend, coef_mode, shape):
    """The CPU backward sized its per-head dcoef partials as coef.numel() / H, a division by zero
    (SIGFPE, the process killed) at H = 0; padded and varlen calls alike."""
    heads, dim = shape[2], shape[3]
    coef = torch.rand(heads, dim) if coef_mode == "diag" else torch.rand(heads, dim, dim)
    q = torch.randn(shape, requires_grad=True)
    coef.requires_grad_()
    out = sk.symmetric_attention(q, None, coef=coef, backend=backend)
    dq, dcoef = torch.autograd.grad(out.sum(), [q, coef])
    assert out.shape == shape and dq.shape == shape
    assert_close(dcoef, torch.zeros_like(coef), atol=0, name="dcoef of no scores")
    packed = torch.randn(shape[0] * shape[1], heads, dim, requires_grad=True)
    cu = torch.tensor([shape[1] * b for b in range(shape[0] + 1)] if shape[0] else [0, 0], dtype=torch.int32)
    out = sk.symmetric_attention_varlen(packed, None, cu, max(shape[1], 1), coef=coef, backend=backend)
    (dcoef,) = torch.autograd.grad(out.sum(), [coef])
    assert_close(dcoef, torch.zeros_like(coef), atol=0, name="varlen dcoef of no scores")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_varlen_and_lama(backend):
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    q = torch.randn(0, 2, 4, requires_grad=True)
    out, lse = sk.symmetric_attention_varlen(q, None, cu, 1, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
    h = torch.randn(2, 0, 4, requires_grad=True)
    context = torch.randn(4, requires_grad=True)
    pooled, attn = sk.lowrank_context_attention(h, context, torch.randn(4, 3), torch.randn(4, 3), backend=backend)
    assert_close(pooled, torch.zeros(2, 3, 4), atol=0, name="pooled of no tokens")
    assert attn.shape == (2, 3, 0)
    (dcontext,) = torch.autograd.grad(pooled.sum(), context)
    assert_close(dcontext, torch.zeros(4), atol=0, name="dcontext")


# NaN: propagated like the reference, never leaked out of padding.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["context", "p"])
def test_lama_nan_normaliser_propagates(backend, where):
    h = torch.randn(2, 6, 4)
    args = dict(context=torch.randn(4), p=torch.randn(4, 3))
    args[where][0] = float("nan")
    pooled, attn = sk.lowrank_context_attention(h, args["context"], args["p"], torch.randn(4, 3), backend=backend)
    ref_pooled, ref_attn = R.lowrank_context_attention(h, args["context"], args["p"], torch.randn(4, 3))
    assert torch.isnan(ref_attn).any()
    assert torch.equal(torch.isnan(attn), torch.isnan(ref_attn))
    assert torch.equal(torch.isnan(pooled), torch.isnan(ref_pooled))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e10], ids=["nan", "inf", "huge"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
@pytest.mark.parametrize("padded", [1, 4], ids=["one-padded", "most-padded"])
def test_padded_garbage_never_reaches_real_rows(backend, poison, shared, padded):
    torch.manual_seed(0)
    B, S, H, D = 2, 6, 2, 4
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, S - padded:] = False
    clean_q, clean_v = torch.randn(B, S, H, D), torch.randn(B, S, H, 3)
    q, v = clean_q.clone(), clean_v.clone()
    q[1, S - 1] = poison
    v[1, S - 1] = poison
    q.requires_grad_()
    v = None if shared else v.requires_grad_()
    out = sk.symmetric_attention(q, v, key_padding_mask=mask, backend=backend)
    expected = R.symmetric_attention(clean_q.double(), None if shared else clean_v.double(), key_padding_mask=mask)
    assert_close(out[mask], expected[mask], atol=1e-5, name="real rows")
    grads = torch.autograd.grad((out * mask[..., None, None]).sum(), [t for t in (q, v) if t is not None])
    for g in grads:
        assert torch.isfinite(g[mask]).all(), "padding garbage reached the gradients of real tokens"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,causal,coef", [(5, False, None), (300, False, "diag"), (700, False, None),
                                           (700, True, None), (700, False, "full")])
def test_huge_scores_keep_their_softmax(backend, S, causal, coef):
    """Scores near 1e10 are finite in fp32: each row's softmax is one-hot on its own token (unit
    vectors), at every length and schedule (whole head, mirrored, tiled, causal). The kernels' row
    shift must stay exact there (a shift rounded on its own overflowed 2^y: NaN or -inf lse)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, S, 2, 8), dim=-1).requires_grad_()
    v = torch.randn(2, S, 2, 4, requires_grad=True)
    coef = {None: None, "diag": torch.ones(2, 8), "full": torch.eye(8).expand(2, 8, 8)}[coef]
    out, lse = sk.symmetric_attention(q, v, coef=coef, scale=1e10, causal=causal, return_lse=True, backend=backend)
    ref_out, ref_lse = R.symmetric_attention(q.double(), v.double(), coef=None if coef is None else coef.double(),
                                             scale=1e10, causal=causal, return_lse=True)
    assert_close(out, ref_out, atol=1e-6, name="out")
    assert_close(lse, ref_lse, atol=0, rtol=1e-6, name="lse")
    dq, dv = torch.autograd.grad(out.sum(), [q, v])
    assert torch.isfinite(dq).all() and torch.isfinite(dv).all()
    # One-hot rows: dv is each token's own output gradient.
    assert_close(dv, torch.ones_like(dv), atol=1e-6, name="dv")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,causal,padded", [(300, False, False), (300, False, True), (300, True, False),
                                             (513, False, False), (700, False, True), (700, True, False)])
@pytest.mark.parametrize("coef_mode", ["diag", "full"])
def test_large_scores_with_a_coefficient_keep_their_gradients(backend, S, causal, padded, coef_mode):
    """Scores of about 1e5 (scale 1e4), an ulp of which is 0.008: the backward's probabilities
    exp(s - lse) need its scores equal to the forward's to the bit. With a diagonal M,
    (y_i c) . y_j and (y_j c) . y_i round differently, and a kernel that read score tiles both
    ways in one pass and not in the other gave dv off by a percent of a token's weight. Rows
    whose two largest scores lie within 20 are left out of the loss: their softmax is not
    one-hot, and any fp32 rounding moves it."""
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, S, 2, 16, generator=gen), torch.randn(2, S, 2, 4, generator=gen)
    c = torch.rand(2, 16, generator=gen) + 0.5
    c[:, ::5] *= -1
    coef = c if coef_mode == "diag" else torch.diag_embed(c) + 0.05 * torch.randn(2, 16, 16, generator=gen)
    mask = (torch.arange(S)[None, :] < torch.tensor([[S], [S // 4]])) if padded else None
    y = q.double().transpose(1, 2)
    scores = 1e4 * ((y * coef.double()[:, None]) if coef.dim() == 2 else y @ coef.double()) @ y.transpose(-1, -2)
    allowed = R.attention_mask(2, S, causal=causal, key_padding_mask=mask)
    top2 = scores.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).values
    decisive = ((top2[..., 0] - top2[..., 1]) > 20).transpose(1, 2)  # [B, S, H]
    if mask is not None:
        decisive &= mask[..., None]
    assert decisive.float().mean() > 0.5
    results = {}
    for name, fn, dtype in (("ours", lambda *a, **k: sk.symmetric_attention(*a, **k, backend=backend), torch.float32),
                            ("ref64", R.symmetric_attention, F64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, v, coef)]
        out = fn(leaves[0], leaves[1], coef=leaves[2], scale=1e4, causal=causal, key_padding_mask=mask)
        results[name] = [out.detach()] + list(torch.autograd.grad((out * decisive[..., None]).sum(), leaves[1]))
    assert_close(results["ours"][0][decisive], results["ref64"][0][decisive], atol=1e-5, name="out of decisive rows")
    assert_close(results["ours"][1], results["ref64"][1], atol=1e-4, name="dv at scale 1e4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,causal", [(600, False), (1100, False), (600, True)])
@pytest.mark.parametrize("value_dim", [None, 4, 160])
def test_saturated_rows_give_no_query_gradient(backend, S, causal, value_dim):
    """No coefficient, heads over 512 tokens (the tiled backward, which takes delta = O . dO from
    the saved output rather than from the row's P . dP), scores of about 1e5: a one-hot row's
    G = P (dP - delta) is 0 only if delta equals its dP entry to the bit; an ulp between them,
    times the scale of 1e4, gave dq off by 0.15 where the reference's is below 1e-7. Dv = 160
    sums dP in two blocks of k. Rows whose two largest scores lie within 20 are left out."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, S, 2, 16, generator=gen)
    v = None if value_dim is None else torch.randn(1, S, 2, value_dim, generator=gen)
    y = q.double().transpose(1, 2)
    scores = 1e4 * y @ y.transpose(-1, -2)
    allowed = R.attention_mask(1, S, causal=causal)
    top2 = scores.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).values
    decisive = ((top2[..., 0] - top2[..., 1]) > 20).transpose(1, 2)  # [B, S, H]
    assert decisive.float().mean() > 0.5
    grads = {}
    for name, fn, dtype in (("ours", lambda *a, **k: sk.symmetric_attention(*a, **k, backend=backend), torch.float32),
                            ("ref64", R.symmetric_attention, F64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, v) if t is not None]
        out = fn(*leaves, scale=1e4, causal=causal)
        grads[name] = torch.autograd.grad((out * decisive[..., None]).sum(), leaves)
    for name, ours, ref in zip(("dq", "dv"), grads["ours"], grads["ref64"]):
        assert_close(ours, ref, atol=1e-4, name=f"{name} at scale 1e4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [160, 224])
@pytest.mark.parametrize("coef_mode", [None, "diag", "full"])
@pytest.mark.parametrize("value_dim", [None, 32])
def test_saturated_rows_of_deep_heads_over_512_tokens(backend, head_dim, coef_mode, value_dim):
    """Heads over 512 tokens whose scores sum D > 128 in two blocks of k, every row one-hot (scores
    of about 1000 on the diagonal, 70 off it): the backward's recomputed scores must equal the
    forward's to the bit, or exp(s - lse) is not 1 and an ulp of 1000, times the scale, reaches
    dq (0.12 against 4.9 with an identity coefficient) and dv (1.2e-4 where it is exactly dO).
    The CPU micro-kernel's accumulate step was contracted to an FMA in some tile shapes and not
    others, so a score on a ragged tile rounded differently in the two directions."""
    gen = torch.Generator().manual_seed(5)
    S, scale = 600, 1000 / head_dim
    q = torch.randn(1, S, 1, head_dim, generator=gen, dtype=F64)
    v = None if value_dim is None else torch.randn(1, S, 1, value_dim, generator=gen, dtype=F64)
    dout = torch.randn(1, S, 1, value_dim or head_dim, generator=gen, dtype=F64)
    coef = {None: None, "diag": torch.ones(1, head_dim, dtype=F64), "full": torch.eye(head_dim, dtype=F64)[None]}[coef_mode]
    grads = {}
    for name, fn, dtype in (("ours", lambda *a, **k: sk.symmetric_attention(*a, **k, backend=backend), torch.float32),
                            ("ref64", R.symmetric_attention, F64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, v, coef) if t is not None]
        out = fn(leaves[0], None if v is None else leaves[1], coef=None if coef is None else leaves[-1], scale=scale)
        grads[name] = torch.autograd.grad((out * dout.to(dtype)).sum(), leaves)
    for name, ours, ref in zip(("dq", "dv" if v is not None else "dcoef", "dcoef"), grads["ours"], grads["ref64"]):
        assert_close(ours, ref, atol=1e-5, rtol=1e-5, name=f"{name}, D = {head_dim}, coef {coef_mode}")


# The saturated rows of heads over 512 tokens on every kernel build: whether the backward's scores
# and delta equal the forward's to the bit depends on how a build fuses its multiply-adds (the
# portable build's at::vec::fmadd is a product and then a sum).
@pytest.mark.slow
@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is absent here")
@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_saturated_rows_on_every_instruction_set_build(isa):
    pytest_on_kernel_build(isa, ["tests/test_reliability.py", "-k",
                                 "(deep_heads or saturated_rows_give or empty_sizes) and cpu"], timeout=600)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is absent here")
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [513, 700])
def test_bf16_dropout_over_512_tokens_keeps_dq_of_saturated_rows(S, half):
    """The token itself takes nearly all of its row (q = k, D = 254). The tiled backward of heads
    over 512 tokens took delta = O . dO from the bf16 output, which dropout's 1 / (1 - p) moves
    off the bf16 grid: that rounding went whole into G_ii, and dq came out 2.7-6.6x the bf16
    composite's error (several times dq itself). The forward now keeps the output's rounding
    residual, and delta adds residual . dO."""
    gen = torch.Generator().manual_seed(0)
    q0, v0 = torch.randn(1, S, 1, 254, generator=gen, dtype=F64), torch.randn(1, S, 1, 24, generator=gen, dtype=F64)
    dout = torch.randn(1, S, 1, 24, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what the kernels draw after manual_seed(5)
    dq = {}
    for name, dtype in (("ref64", F64), ("ref_bf16", half), ("cpu", half)):
        q, v = q0.to(dtype).requires_grad_(), v0.to(dtype).requires_grad_()
        if name == "cpu":
            torch.manual_seed(5)
            out = sk.symmetric_attention(q, v, causal=True, dropout_p=0.17, backend="cpu")
        else:
            out = R.symmetric_attention(q, v, causal=True, dropout_p=0.17, dropout_seed=seed)
        dq[name] = torch.autograd.grad((out * dout.to(dtype)).sum(), q)[0].double()
    ours, composite = ((dq[k] - dq["ref64"]).abs().max().item() for k in ("cpu", "ref_bf16"))
    assert ours <= 0.5 * composite, (ours, composite)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is absent here")
@pytest.mark.parametrize("seed,q_scale,v_scale", [(0, 6, 3000), (0, 3, 100), (1, 10, 3000)])
def test_fp16_tiled_backward_takes_delta_from_the_unrounded_output(seed, q_scale, v_scale):
    """One head of 600 tokens (the tiled backward), no dropout. Its delta = O . dO came from the
    fp16-rounded output, which G = P (dP - delta) magnifies in nearly saturated rows: dq was 5.9
    off where the torch backend (rowsum(P dP) in fp32) is 0.03 off."""
    gen = torch.Generator().manual_seed(seed)
    q0 = (torch.randn(1, 600, 1, 32, generator=gen, dtype=F64) * q_scale).half().double()
    v0 = (torch.randn(1, 600, 1, 32, generator=gen, dtype=F64) * v_scale).half().double()
    dout = torch.randn(1, 600, 1, 32, generator=gen, dtype=F64).half()
    dq = {}
    for backend, dtype in (("ref64", F64), ("torch", torch.float16), ("cpu", torch.float16)):
        q, v = q0.to(dtype).requires_grad_(), v0.to(dtype).requires_grad_()
        out = R.symmetric_attention(q, v) if backend == "ref64" else sk.symmetric_attention(q, v, backend=backend)
        dq[backend] = torch.autograd.grad(out, q, dout.to(dtype))[0].double()
    ours, composite = ((dq[k] - dq["ref64"]).abs().max().item() for k in ("cpu", "torch"))
    assert ours <= 2 * composite + 1e-3 * dq["ref64"].abs().max().item(), (ours, composite)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [6, 600])
def test_padded_token_of_huge_values_keeps_its_row_finite(backend, S):
    """A padded token of 1e30 (finite) scores about 1e60 against itself, +inf in fp32: that key
    is masked, never added to the padding's -inf (NaN), and its own row attends to the real
    keys as in the fp64 reference."""
    torch.manual_seed(0)
    q = torch.randn(2, S, 2, 8)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, S - 2:] = False
    q[1, S - 1] = 1e30
    out = sk.symmetric_attention(q, key_padding_mask=mask, backend=backend)
    assert torch.isfinite(out).all()
    assert_close(out, R.symmetric_attention(q.double(), key_padding_mask=mask), atol=1e-5, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lama_padded_garbage_never_reaches_real_rows(backend):
    h, u = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    factors = torch.randn(4), torch.randn(4, 3), torch.randn(4, 3)
    expected = R.lowrank_context_attention(h, *factors, u=u, key_padding_mask=mask)
    h[1, 3], u[1, 4] = float("nan"), float("inf")
    pooled, attn = sk.lowrank_context_attention(h, *factors, u=u, key_padding_mask=mask, backend=backend)
    assert_close(pooled, expected[0], atol=1e-5, name="pooled")
    assert_close(attn, expected[1], atol=1e-6, name="attn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_real_token_propagates(backend):
    q = torch.randn(1, 4, 1, 8)
    q[0, 2] = float("nan")
    q[0, 0] = float("inf")
    out, lse = sk.symmetric_attention(q, causal=True, backend=backend, return_lse=True)
    ref_out, ref_lse = R.symmetric_attention(q.double(), causal=True, return_lse=True)
    # Every row sees token 0 (an Inf score: NaN, not a confident number); rows 2 and 3 see token 2.
    assert torch.isnan(ref_out).all() and torch.isnan(out).all()
    assert not torch.isfinite(lse).any() and not torch.isfinite(ref_lse).any()


# Bad options and module arguments.

@pytest.mark.parametrize("option", ["causal", "exclude_self", "return_lse", "deterministic"])
def test_non_bool_flags_are_refused(option):
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        sk.symmetric_attention(torch.randn(1, 3, 1, 4), **{option: "False"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, F64])
def test_overflowing_scale_is_refused(dtype):
    big = 1.5e308 if dtype == F64 else 3e38
    with pytest.raises(ValueError, match="scale .* overflows"):
        sk.symmetric_attention(torch.randn(1, 3, 1, 4, dtype=dtype), scale=big, backend="torch")


@pytest.mark.parametrize("module", [SymmetricSelfAttention, SharedWeightSelfAttention, StandardSelfAttention])
def test_module_arguments(module):
    for heads in (0, -2):
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            module(8, heads)
    with pytest.raises(TypeError, match="causal must be a bool"):
        module(8, 2, causal="False")
    layer = module(8, 2)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[B, S, hidden_size\]"):
        layer(torch.randn(5, 8))


def test_lama_module_arguments():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        LowRankContextAttention(4, 0)
    with pytest.raises(TypeError, match="token_softmax must be a bool"):
        LowRankContextAttention(4, 2, token_softmax="no")
