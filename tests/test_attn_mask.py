"""The public functions' ``attn_mask`` (SDPA's general mask, broadcastable to [B, H, S, S]) against
an fp64 softmax under the very same mask: key padding, causal and block-diagonal (packed) patterns,
bool or additive, alone or with key_padding_mask / causal, run exactly; anything else is refused
with an error naming attn_mask."""

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import backends

from .attention_checks import F64, assert_close

B, S, H, D = 2, 11, 2, 8
BACKENDS = [name for name in ("torch", "cpu") if backends.status(name).usable]


def _labels():
    return torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 7 + [1] * 4])


def _pattern(name):
    """attn_mask for the pattern ``name`` and the [B, S, S] keys it allows."""
    tril = torch.ones(S, S, dtype=torch.bool).tril()
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, 8:] = False
    if name == "key padding [B,1,1,S]":
        return real[:, None, None, :], real[:, None, :].expand(B, S, S)
    if name == "causal [S,S] additive":
        return torch.zeros(S, S).masked_fill(~tril, float("-inf")), tril.expand(B, S, S)
    if name == "causal padding [B,H,S,S]":
        allowed = tril & real[:, None, :]
        return allowed[:, None].expand(B, H, S, S), allowed
    blocks = _labels()[:, :, None] == _labels()[:, None, :]
    if name == "packed [B,1,S,S] additive":
        return torch.zeros(B, 1, S, S).masked_fill(~blocks[:, None], torch.finfo(torch.float32).min), blocks
    assert name == "packed padded [B,1,S,S]"
    allowed = blocks & real[:, None, :] & real[:, :, None]
    return allowed[:, None], allowed


PATTERNS = ["key padding [B,1,1,S]", "causal [S,S] additive", "causal padding [B,H,S,S]",
            "packed [B,1,S,S] additive", "packed padded [B,1,S,S]"]


def _expected(q, v, coef, allowed, scale):
    """fp64 softmax(scale * (q M) q^T) v over the allowed keys; 0 and lse -inf for a row with none."""
    y = q.transpose(1, 2)
    values = y if v is None else v.transpose(1, 2)
    query = y if coef is None else y * coef[None, :, None]
    scores = (scale * query @ y.transpose(-1, -2)).masked_fill(~allowed[:, None], float("-inf"))
    some = allowed.any(-1)[:, None, :, None]
    scores = scores.masked_fill(~some, 0.0)
    out = (scores.softmax(-1) * some) @ values
    lse = scores.logsumexp(-1).masked_fill(~some[..., 0], float("-inf"))
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("extra", ["alone", "with key_padding_mask", "with causal"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_attn_mask_patterns_equal_softmax_under_the_same_mask(backend, pattern, extra, shared):
    gen = torch.Generator().manual_seed(0)
    q, v, coef = torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, 4, generator=gen), torch.rand(H, D)
    v = None if shared else v
    attn_mask, allowed = _pattern(pattern)
    kw = {}
    if extra == "with key_padding_mask":
        real = kw["key_padding_mask"] = torch.arange(S)[None, :] < torch.tensor([[S], [9]])
        allowed = allowed & real[:, None, :]
        if pattern.startswith("packed"):  # packed sequences: a padded row is no query either
            allowed = allowed & real[:, :, None]
    elif extra == "with causal":
        kw["causal"] = True
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
    results = []
    for dtype, fn in ((torch.float32, None), (F64, _expected)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, v, coef) if t is not None]
        lq, lv, lc = leaves[0], (None if shared else leaves[1]), leaves[-1]
        if fn is None:
            out, lse = sk.symmetric_attention(lq, lv, coef=lc, attn_mask=attn_mask, return_lse=True, backend=backend,
                                              **kw)
        else:
            out, lse = fn(lq, lv, lc, allowed, D ** -0.5)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
        results.append([out, lse, *torch.autograd.grad(out, leaves, dout)])
    for name, got, want in zip(["out", "lse", "dq", "dv", "dcoef"][:len(results[0])] if not shared
                               else ["out", "lse", "dq", "dcoef"], *results):
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), name
        assert_close(got[finite], want[finite], atol=2e-5, name=f"{name} under {pattern} ({extra})")


def test_key_padding_attn_mask_draws_the_key_padding_calls_dropout():
    q = torch.randn(B, S, H, D)
    attn_mask, allowed = _pattern("key padding [B,1,1,S]")
    torch.manual_seed(3)
    a = sk.shared_attention(q, attn_mask=attn_mask, dropout_p=0.3)
    torch.manual_seed(3)
    b = sk.shared_attention(q, key_padding_mask=allowed[:, 0], dropout_p=0.3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mask,error,match", [
    (torch.rand(S, S) > 0.5, ValueError, r"attn_mask of shape \(11, 11\) is neither a key padding mask"),
    (torch.stack([torch.ones(S, S, dtype=torch.bool), torch.ones(S, S, dtype=torch.bool).tril()])[None],
     ValueError, "^attn_mask that differs between heads"),
    (torch.full((S, S), 0.5), ValueError, "additive float attn_mask may hold only 0"),
    (torch.ones(3, S, S, dtype=torch.bool), ValueError, r"attn_mask must be broadcastable to \[B, H, S, S\]"),
    (torch.ones(S, dtype=torch.bool), ValueError, "attn_mask must be broadcastable"),
    (torch.ones(S, S, dtype=torch.int64), TypeError, "^attn_mask must be bool"),
    ([[True] * S] * S, TypeError, "attn_mask must be a tensor or None"),
], ids=["arbitrary pattern", "heads differ", "score bias", "bad batch", "1 dim", "int", "list"])
def test_attn_mask_the_kernels_cannot_run_is_refused(mask, error, match):
    with pytest.raises(error, match=match):
        sk.shared_attention(torch.randn(B, S, H, D), attn_mask=mask)


def test_empty_sequences_with_attn_mask_give_empty_results():
    out, lse = sk.shared_attention(torch.randn(2, 0, H, D), attn_mask=torch.ones(0, 0, dtype=torch.bool),
                                   return_lse=True)
    assert out.shape == (2, 0, H, D) and lse.shape == (2, H, 0)


def test_learnable_attn_mask_is_refused_not_left_without_gradient():
    """The mask is read by value: a bias that requires grad would silently get none."""
    bias = torch.zeros(H, S, S, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        sk.shared_attention(torch.randn(B, S, H, D), attn_mask=bias)
    sk.shared_attention(torch.randn(B, S, H, D), attn_mask=bias.detach())
    with torch.no_grad():
        sk.shared_attention(torch.randn(B, S, H, D), attn_mask=bias)


@pytest.mark.parametrize("causal", ["False", None, 1])
def test_causal_must_be_a_bool_with_attn_mask_too(causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        sk.shared_attention(torch.randn(B, S, H, D), attn_mask=torch.ones(S, S, dtype=torch.bool), causal=causal)


def test_vmap_over_attn_mask_is_refused_and_over_q_works():
    q = torch.randn(3, B, S, H, D)
    masks = torch.ones(3, S, S, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="attn_mask is read by value .* cannot be vmapped"):
        torch.vmap(lambda x, m: sk.shared_attention(x, attn_mask=m))(q, masks)
    got = torch.vmap(lambda x: sk.shared_attention(x, attn_mask=masks[0]))(q)
    assert_close(got, torch.stack([sk.shared_attention(x, causal=True) for x in q]), atol=1e-6, name="vmap over q")


def test_attn_mask_under_export_says_what_traces():
    class Masked(torch.nn.Module):
        def forward(self, q, m):
            return sk.shared_attention(q, attn_mask=m, backend="torch")

    with pytest.raises(Exception, match="attn_mask is read by value.*pass key_padding_mask"):
        torch.export.export(Masked(), (torch.randn(B, S, H, D), torch.ones(S, S, dtype=torch.bool).tril()))
