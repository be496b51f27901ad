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
