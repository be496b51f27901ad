"""GPU backends against the fp64 reference and SDPA (`pytest -m gpu`; skipped without CUDA).

Nothing here touches CUDA at import time. On a fresh machine compiling the Triton kernels, not
running them, takes most of this suite's time, so the forward's config is pinned (one compile per
kernel variant, not one per autotune candidate) and the grids are laid out by compiled variant:
a variant is one set of constexprs (head dims, coefficient mode, shared values, causal, dtype)
times the integer specialisation of the sizes (multiple of 16 or not), and the sequence lengths
of one test share it. Counted by hand from this layout: about 40 variants for the option grid,
60 for the flash-attn grid and 50 for LAMA; `make gpu-check` reports the number of distinct
compilations the suite really triggers (conftest records them).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import symattn_kernels as sk
from symattn_kernels import backends
from symattn_kernels import reference as R

from .attention_checks import assert_flash_rule

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _pinned_triton_configs(monkeypatch):
    monkeypatch.setenv("SYMATTN_TRITON_AUTOTUNE", "0")


def _usable(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    status = backends.status(name)
    if not status.usable:
        pytest.skip(f"backend {name!r} unusable: {status.reason}")


def _leaves(dtype, *shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).cuda().to(dtype).requires_grad_() for s in shapes]


def _run(fn, q, v, coef, **kw):
    out, lse = fn(q, v, coef=coef, return_lse=True, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).cuda()
    wrt = [t for t in (q, v, coef) if t is not None]
    return [out, lse, *torch.autograd.grad(out, wrt, dout.to(out.dtype))]


# Every (dtype, coefficient, values) combination once, each on one of three ragged shapes in
# turn (shifted by one for bf16): every coefficient mode and values mode meets every shape,
# without the cross product of compiled variants.
_OPTION_SHAPES = [(113, 64), (1025, 128), (512, 40)]


def _option_cases():
    cases = []
    combos = itertools.product([(torch.float16, "fp16"), (torch.bfloat16, "bf16")], [None, "diag", "full"],
                               [True, False])
    for i, ((dtype, dtype_id), coef_mode, shared) in enumerate(combos):
        seqlen, head_dim = _OPTION_SHAPES[(i + i // 6) % len(_OPTION_SHAPES)]
        name = f"{dtype_id}-{coef_mode or 'none'}-{'shared' if shared else 'v'}-S{seqlen}-D{head_dim}"
        cases.append(pytest.param(dtype, coef_mode, shared, seqlen, head_dim, id=name))
    return cases


OPTION_CASES = _option_cases()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,coef_mode,shared,seqlen,head_dim", OPTION_CASES)
def test_backend_matches_reference(backend, dtype, coef_mode, shared, seqlen, head_dim):
    _usable(backend)
    q, v, diag, full = _leaves(dtype, (2, seqlen, 4, head_dim), (2, seqlen, 4, 72), (4, head_dim),
                               (4, head_dim, head_dim))
    coef = {None: None, "diag": diag, "full": full}[coef_mode]
    v = None if shared else v
    mask = torch.ones(2, seqlen, dtype=torch.bool, device="cuda")
    mask[1, seqlen // 3:] = False
    kw = dict(causal=True, key_padding_mask=mask)
    got = _run(lambda *a, **k: sk.symmetric_attention(*a, backend=backend, **k), q, v, coef, **kw)
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in (q, v, coef)]
    ref64 = _run(R.symmetric_attention, *as64, **kw)
    ref_lowp = _run(R.symmetric_attention, q, v, coef, **kw)
    for name, a, r64, rl in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], got, ref64, ref_lowp):
        assert_flash_rule(name, a, r64, rl, 1e-3 if dtype == torch.float16 else 1e-2)


# flash-attn's test grid (tests/test_flash_attn.py) for self-attention: its head dims from 32 to
# 256 with the ragged 59 and 111, and its sequence lengths, shared weights in bf16.
FLASH_HEAD_DIMS = [32, 59, 64, 111, 128, 256]
FLASH_SEQLENS = [113, 203, 1023, 2048]


def _backward_unsupported(backend, head_dim):
    """Why the backend refuses gradients at this head dim on this GPU ("" when it takes them)."""
    if backend != "triton":
        return ""
    from symattn_kernels.triton.attention_common import device_arch
    from symattn_kernels.triton.attention_bwd import backward_unsupported

    return backward_unsupported(head_dim, head_dim, device_arch(torch.device("cuda")))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", FLASH_HEAD_DIMS, ids=[f"D{d}" for d in FLASH_HEAD_DIMS])
def test_flash_attn_grid(backend, causal, head_dim):
    """out, lse and dy against the fp64 reference with flash-attn's rule, at each of flash-attn's
    sequence lengths; where the backend has no backward for the head dim (Triton on sm_90 above
    128), the forward is checked and a gradient call must raise ValueError naming the head dim."""
    _usable(backend)
    refused = _backward_unsupported(backend, head_dim)
    for seqlen in FLASH_SEQLENS:
        (y,) = _leaves(torch.bfloat16, (2, seqlen, 4, head_dim))
        mask = torch.ones(2, seqlen, dtype=torch.bool, device="cuda")
        mask[1, seqlen // 2:] = False
        kw = dict(causal=causal, key_padding_mask=mask)
        y64 = y.detach().double().requires_grad_()
        if refused:
            with pytest.raises(ValueError, match="head dim"):
                sk.symmetric_attention(y, None, backend=backend, **kw)
            y, y64 = y.detach(), y64.detach()
            got = list(sk.symmetric_attention(y, None, return_lse=True, backend=backend, **kw))
            ref64 = list(R.symmetric_attention(y64, None, return_lse=True, **kw))
            ref_lowp = list(R.symmetric_attention(y, None, return_lse=True, **kw))
        else:
            got = _run(lambda *a, **k: sk.symmetric_attention(*a, backend=backend, **k), y, None, None, **kw)
            ref64 = _run(R.symmetric_attention, y64, None, None, **kw)
            ref_lowp = _run(R.symmetric_attention, y, None, None, **kw)
        for name, a, r64, rl in zip(["out", "lse", "dy"], got, ref64, ref_lowp):
            assert_flash_rule(f"S={seqlen} {name}", a, r64, rl, 1e-2)


# The hard corner of flash-attn's grid for q = k: half precision at head dims 224 and 256,
# dropout 0.17, separate values, padding. A token's self-score dominates its row, so the backward's
# row term rowsum(dO * O) must come from the fp32 O: from the output rounded to bf16 the dq error
# exceeds flash-attn's gradient bound (3x the low-precision reference's error + 1e-5).
WIDE_HEAD_CASES = [(torch.bfloat16, 224, 203), (torch.bfloat16, 256, 203), (torch.float16, 256, 113)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype,head_dim,seqlen", WIDE_HEAD_CASES,
                         ids=[f"{'bf16' if d == torch.bfloat16 else 'fp16'}-D{h}-S{s}" for d, h, s in WIDE_HEAD_CASES])
def test_wide_head_backward_within_flash_rule(backend, dtype, head_dim, seqlen):
    _usable(backend)
    if _backward_unsupported(backend, head_dim):
        pytest.skip(f"{backend} has no backward at head dim {head_dim} on this GPU")
    gen = torch.Generator().manual_seed(head_dim * 10_000 + seqlen)
    q64, v64, dout64 = (torch.randn(2, seqlen, 2, head_dim, generator=gen, dtype=torch.float64).cuda()
                        for _ in range(3))
    mask = torch.arange(seqlen, device="cuda")[None, :] < torch.tensor([[seqlen - 7], [seqlen - 19]], device="cuda")
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    kw = dict(key_padding_mask=mask, dropout_p=0.17)

    def grads(dt, fn):
        q, v = q64.to(dt).requires_grad_(), v64.to(dt).requires_grad_()
        out = fn(q, v)
        return [out, *torch.autograd.grad((out * (dout64 * mask[..., None, None]).to(dt)).sum(), (q, v))]

    def kernel(q, v):
        torch.manual_seed(1)
        return sk.symmetric_attention(q, v, backend=backend, **kw)

    def reference(q, v):
        return R.symmetric_attention(q, v, dropout_seed=seed, **kw)

    got, ref64, ref_low = grads(dtype, kernel), grads(torch.float64, reference), grads(dtype, reference)
    for name, factor, a, r64, rl in zip(["out", "dq", "dv"], [2, 3, 3], got, ref64, ref_low):
        err = (a[mask].double() - r64[mask]).abs().max().item()
        bound = factor * (rl[mask].double() - r64[mask]).abs().max().item() + 1e-5
        assert err <= bound, f"{name}: max error {err:.3g} > {factor} x low-precision error + 1e-5 = {bound:.3g}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_shared_matches_sdpa_at_bert_shape(backend):
    _usable(backend)
    (y,) = _leaves(torch.bfloat16, (8, 512, 12, 64))
    out = sk.shared_attention(y, backend=backend)
    t = y.transpose(1, 2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(t, t, t).transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_padded_garbage_never_reaches_real_rows(backend, shared):
    _usable(backend)
    B, S, H, D = 2, 200, 2, 64
    q, v = _leaves(torch.float16, (B, S, H, D), (B, S, H, D))
    mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    mask[1, 7] = False
    mask[1, 150:] = False
    clean_q, clean_v = q.detach().double(), v.detach().double()
    with torch.no_grad():
        q[1, 7, 0, 3] = float("nan")
        q[1, 160:] = float("inf")
        v[1, 7], v[1, 170, :, 0] = float("nan"), float("-inf")
    v = None if shared else v
    out = sk.symmetric_attention(q, v, key_padding_mask=mask, backend=backend)
    ref = R.symmetric_attention(clean_q, None if shared else clean_v, key_padding_mask=mask)
    assert torch.isfinite(out[mask]).all()
    torch.testing.assert_close(out[mask].double(), ref[mask], atol=5e-3, rtol=0)
    grads = torch.autograd.grad((out * mask[..., None, None]).sum(), [t for t in (q, v) if t is not None])
    for g in grads:
        assert torch.isfinite(g[mask]).all(), "padding garbage reached the gradients of real tokens"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_sequence_heads_than_grid_axis_y_holds(backend):
    """4100 sequences of 16 heads: 65 600 (sequence, head) rows, past the 65 535 of CUDA's grid
    axis y, so every kernel launches in two chunks; with ragged key padding (1-8 real tokens per
    sequence) the rows of the second chunk (the last sequences' heads) must be as right as the
    first's. The padded layout keeps the fp64 reference to one batched call."""
    _usable(backend)
    lengths = torch.randint(1, 9, (4100,), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.arange(8, device="cuda")[None, :] < lengths[:, None]
    (q,) = _leaves(torch.bfloat16, (4100, 8, 16, 32))
    kw = dict(key_padding_mask=mask)
    got = _run(lambda *a, **k: sk.symmetric_attention(*a, backend=backend, **k), q, None, None, **kw)
    ref64 = _run(R.symmetric_attention, q.detach().double().requires_grad_(), None, None, **kw)
    ref_lowp = _run(R.symmetric_attention, q, None, None, **kw)
    for name, a, r64, rl in zip(["out", "lse", "dq"], got, ref64, ref_lowp):
        assert_flash_rule(name, a, r64, rl, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_norm,token_softmax", [("l2", True), (None, False)])
@pytest.mark.parametrize("batch,seqlen,dim,heads", [(3, 1, 64, 4), (8, 300, 256, 8), (2, 4096, 128, 16)])
def test_triton_lama_matches_reference(dtype, head_norm, token_softmax, batch, seqlen, dim, heads):
    """The fused LAMA kernels (bf16 is only compiled elsewhere: the interpreter's bf16 tl.dot is
    broken) against the fp64 reference: pooled, attn and the five gradients, ragged padding."""
    _usable("triton")
    h, u, context, p, q = _leaves(dtype, (batch, seqlen, dim), (batch, seqlen, dim), (batch, dim), (dim, heads),
                                  (dim, heads))
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")
    mask[0, seqlen // 2 + 1:] = False

    def run(fn, h, u, context, p, q):
        pooled, attn = fn(h, context, p, q, u=u, key_padding_mask=mask, head_norm=head_norm,
                          token_softmax=token_softmax)
        gen = torch.Generator().manual_seed(1)
        dpooled = torch.randn(pooled.shape, generator=gen, dtype=torch.float64).cuda().to(pooled.dtype)
        dattn = torch.randn(attn.shape, generator=gen, dtype=torch.float64).cuda().to(attn.dtype)
        loss = (pooled * dpooled).sum() + (attn * dattn).sum()
        return [pooled, attn, *torch.autograd.grad(loss, (h, u, context, p, q))]

    got = run(lambda *a, **k: sk.lowrank_context_attention(*a, backend="triton", **k), h, u, context, p, q)
    ref64 = run(R.lowrank_context_attention, *(t.detach().double().requires_grad_() for t in (h, u, context, p, q)))
    ref_lowp = run(R.lowrank_context_attention, h, u, context, p, q)
    atol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    for name, a, r64, rl in zip(["pooled", "attn", "dh", "du", "dcontext", "dp", "dq"], got, ref64, ref_lowp):
        assert not a.isnan().any(), f"{name} has NaN"
        assert_flash_rule(name, a, r64, rl, atol * max(1.0, r64.abs().max().item()))  # floor relative to size
