"""The Triton backend through the public API and the custom ops (interpreter, CPU tensors):
autograd wiring, varlen, opcheck. The kernel grid itself is in test_triton_interpret.py."""

import os

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import backends, ops
from symattn_kernels.backends import registry
from symattn_kernels import reference as R

from .attention_checks import assert_flash_rule

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (make test-interpret)"),
]


def leaves(dtype, *shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def outputs_and_grads(fn, q, v, coef, dout_seed=1, **kw):
    out, lse = fn(q, v, coef=coef, return_lse=True, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed), dtype=torch.float64)
    wrt = [t for t in (q, v, coef) if t is not None]
    return [out, lse, *torch.autograd.grad(out, wrt, dout.to(out.dtype))]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_public_api_matches_reference(dtype, atol, shared):
    q, v, coef = leaves(dtype, (2, 37, 2, 40), (2, 37, 2, 24), (2, 40))
    v = None if shared else v
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    kw = dict(causal=True, key_padding_mask=mask, exclude_self=True)
    got = outputs_and_grads(lambda *a, **k: sk.symmetric_attention(*a, backend="triton", **k), q, v, coef, **kw)
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in (q, v, coef)]
    ref64 = outputs_and_grads(R.symmetric_attention, *as64, **kw)
    ref_lowp = outputs_and_grads(R.symmetric_attention, q, v, coef, **kw)
    for name, a, r64, rl in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], got, ref64, ref_lowp):
        assert_flash_rule(name, a, r64, rl, atol)


@pytest.mark.parametrize("offsets", ["dense", "strided"])
def test_varlen_through_public_api_matches_torch_backend(offsets):
    """A strided cu_seqlens (a column of a stacked table) was read by the kernels as if dense."""
    (q,) = leaves(torch.float32, (23, 2, 16))
    cu = torch.tensor([0, 4, 5, 16, 23], dtype=torch.int32)
    if offsets == "strided":
        cu = torch.stack([cu, cu + 100], 1)[:, 0]
        assert not cu.is_contiguous()
    got = sk.symmetric_attention_varlen(q, None, cu, 11, causal=True, backend="triton", return_lse=True)
    want = sk.symmetric_attention_varlen(q, None, cu, 11, causal=True, backend="torch", return_lse=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(got[0].sum(), q)
    g2, = torch.autograd.grad(want[0].sum(), q)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_opcheck_with_triton_backend():
    q, v = leaves(torch.float32, (1, 17, 2, 16), (1, 17, 2, 16))
    args = (q, v, None, None, None, None, 0.25, True, 0.0, False, 17, True, "triton")
    torch.library.opcheck(ops.attention_fwd, args, test_utils=("test_schema", "test_autograd_registration",
                                                               "test_faketensor"))


def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) in ("cpu", "torch")
    with pytest.raises(TypeError, match="float64 inputs run on backend='torch' only"):
        sk.shared_attention(torch.randn(1, 4, 1, 16, dtype=torch.float64), backend="triton")


WIDE = backends.AttentionCase(head_dim=256, head_dim_v=256)


@pytest.fixture
def sm90(monkeypatch):
    """resolve() as on an sm_90 GPU: the Triton backend usable for CUDA tensors (it is, under the
    interpreter) and the device's config row forced to 90."""
    monkeypatch.setattr(registry, "_cuda_arch", lambda device: 90)
    return torch.device("cuda")


def test_auto_routes_cases_without_a_triton_backward_to_torch(sm90, monkeypatch):
    assert backends.resolve("auto", sm90, torch.bfloat16, case=WIDE) == "torch"
    assert backends.resolve("auto", sm90, torch.bfloat16, case=backends.AttentionCase(200, 64)) == "torch"
    # exactly those: narrower heads, no gradients, or sm_80 keep the Triton backend
    assert backends.resolve("auto", sm90, torch.bfloat16, case=backends.AttentionCase(128, 128)) == "triton"
    assert backends.resolve("auto", sm90, torch.bfloat16, case=backends.AttentionCase(256, 256, False)) == "triton"
    assert backends.resolve("auto", sm90, torch.bfloat16) == "triton"  # no case given: nothing to route on
    monkeypatch.setattr(registry, "_cuda_arch", lambda device: 80)
    assert backends.resolve("auto", sm90, torch.bfloat16, case=WIDE) == "triton"


def test_explicit_triton_raises_naming_the_argument(sm90):
    with pytest.raises(ValueError, match=r"q has head dim 256 and the values 256: .*sm_90.*backend='torch'"):
        backends.resolve("triton", sm90, torch.bfloat16, case=WIDE)
    assert backends.resolve("triton", sm90, torch.bfloat16, case=backends.AttentionCase(256, 256, False)) == "triton"


def test_the_launcher_refuses_the_same_case_before_any_work(monkeypatch):
    """A call that reaches the Triton backward anyway (ops called directly) gets the same
    ValueError from the launcher, before a kernel runs, not a spilling kernel."""
    from symattn_kernels.triton import attention_bwd

    monkeypatch.setattr(attention_bwd, "is_interpret", lambda: False)
    monkeypatch.setattr(attention_bwd, "device_arch", lambda device: 90)
    q = torch.randn(1, 4, 1, 200)
    dq = torch.full_like(q, float("nan"))
    lse = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="q has head dim 200"):
        attention_bwd.attention_backward(torch.ones_like(q), None, q, None, None, None, None, None, q, lse, dq, None,
                                         None, 0.1, False, 0.0, False, None, True)
    assert torch.isnan(dq).all()


def test_info_reports_the_detected_triton_features():
    st = backends.status("triton")
    assert st.usable and "warp_specialize" in st.reason and "tensor descriptors" in st.reason
