"""The hostile-input behaviour of tests/test_reliability.py on the Triton backend, under the
interpreter (own process: ``TRITON_INTERPRET=1 pytest -m interpret``), fp32 and tiny shapes."""

from __future__ import annotations

import os

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import reference as R
from tests.helpers import assert_close

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (own process)"),
]


def test_varlen_dropout_mask_ignores_the_bound():
    q = torch.randn(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    outs = []
    for bound in (5, 64):
        torch.manual_seed(3)
        outs.append(sk.symmetric_attention_varlen(q, None, cu, bound, dropout_p=0.3, backend="triton"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    ref = R.symmetric_attention_varlen(q.double(), None, cu, 5, dropout_p=0.3, dropout_seed=seed)
    assert_close(outs[0], ref, atol=2e-5, name="dropout out")


def test_varlen_loose_bound():
    q = torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = sk.symmetric_attention_varlen(q, None, cu, 100_000, backend="triton")
    assert_close(out, R.symmetric_attention_varlen(q.double(), None, cu, 7), atol=2e-5, name="out")


def test_lama_nan_normaliser_propagates():
    h = torch.randn(2, 6, 16)
    context = torch.randn(16)
    context[0] = float("nan")
    p, q = torch.randn(16, 4), torch.randn(16, 4)
    pooled, attn = sk.lowrank_context_attention(h, context, p, q, backend="triton")
    ref_pooled, ref_attn = R.lowrank_context_attention(h, context, p, q)
    assert torch.isnan(ref_attn).all()
    assert torch.equal(torch.isnan(attn), torch.isnan(ref_attn))
    assert torch.equal(torch.isnan(pooled), torch.isnan(ref_pooled))


def test_empty_sizes():
    out, lse = sk.symmetric_attention(torch.randn(2, 0, 2, 16), return_lse=True, backend="triton")
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    pooled, attn = sk.lowrank_context_attention(torch.randn(2, 0, 16), torch.randn(16), torch.randn(16, 4),
                                                torch.randn(16, 4), backend="triton")
    assert_close(pooled, torch.zeros(2, 4, 16), atol=0, name="pooled of no tokens")
    assert attn.shape == (2, 4, 0)


def test_double_backward_is_refused():
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    out = sk.symmetric_attention(q, backend="triton")
    with pytest.raises(RuntimeError, match="second-order gradients.*backend='torch'"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
