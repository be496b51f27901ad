"""GPU backends against the fp64 reference and SDPA (`pytest -m gpu`; skipped without CUDA).

Nothing here touches CUDA at import time."""

import pytest
import torch
import torch.nn.functional as F

import symattn_kernels as sk
from symattn_kernels import backends
from symattn_kernels import reference as R

from .helpers import assert_flash_rule

pytestmark = pytest.mark.gpu


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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("coef_mode", [None, "diag", "full"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
@pytest.mark.parametrize("seqlen,head_dim", [(113, 64), (1025, 128), (512, 40)])
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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_shared_matches_sdpa_at_bert_shape(backend):
    _usable(backend)
    (y,) = _leaves(torch.bfloat16, (8, 512, 12, 64))
    out = sk.shared_attention(y, backend=backend)
    t = y.transpose(1, 2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(t, t, t).transpose(1, 2), atol=2e-2, rtol=2e-2)


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
