"""LAMA modules on CPU (backend "auto"): shapes, masks, gradients, the token-weights helper."""

from __future__ import annotations

import pytest
import torch

from symattn_kernels.lama import LAMAClassifier, LowRankContextAttention, masked_mean


@pytest.mark.parametrize("context", ["learned", "mean"])
@pytest.mark.parametrize("head_norm,token_softmax", [("l2", True), (None, False)], ids=["l2-softmax", "raw"])
def test_attention_shapes_masks_and_gradients(context, head_norm, token_softmax):
    torch.manual_seed(0)
    att = LowRankContextAttention(6, 3, context=context, head_norm=head_norm, token_softmax=token_softmax)
    h = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    pooled, attn = att(h, mask)
    assert pooled.shape == (2, 3, 6) and attn.shape == (2, 3, 5)
    assert torch.all(attn[0, :, 3:] == 0)
    if token_softmax:
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3))
    # Changing padded tokens changes nothing.
    h2 = h.detach().clone()
    h2[0, 3:] = 100.0
    pooled2, attn2 = att(h2, mask)
    torch.testing.assert_close(pooled2, pooled.detach())
    torch.testing.assert_close(attn2, attn.detach())
    (pooled.square().sum() + attn.sum()).backward()
    for name, p in att.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (context == "mean") == (att.context is None)


def test_masked_mean():
    h = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[True, False, True, False]])
    torch.testing.assert_close(masked_mean(h, mask), (h[0, 0] + h[0, 2])[None] / 2)
    assert torch.all(masked_mean(h, torch.zeros(1, 4, dtype=torch.bool)) == 0)
    torch.testing.assert_close(masked_mean(h, mask.long()), masked_mean(h, mask))


@pytest.mark.parametrize("stored", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_mean_context_never_reads_padded_positions(stored):
    """context="mean" took NaN or inf stored at padded positions into the whole sequence's
    context (h * 0 is NaN there), where lowrank_context_attention itself never reads them."""
    torch.manual_seed(0)
    layer = LowRankContextAttention(8, 3, context="mean")
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    dirty = h.clone()
    dirty[0, 3:] = stored
    assert torch.equal(layer(dirty, mask)[0], layer(h, mask)[0])


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="context"):
        LowRankContextAttention(4, 2, context="max")
    with pytest.raises(ValueError, match="num_heads"):
        LowRankContextAttention(4, 0)
    with pytest.raises(ValueError, match="head_norm"):
        LowRankContextAttention(4, 2, head_norm="l1")
    with pytest.raises(ValueError, match="backend"):
        LowRankContextAttention(4, 2, backend="nope")


def _model(**kw):
    torch.manual_seed(0)
    return LAMAClassifier(50, 8, 6, 3, 4, dropout=0.0, **kw)


@pytest.mark.parametrize("context", ["learned", "mean"])
def test_classifier_padding_does_not_change_real_tokens(context):
    model = _model(context=context).eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    ids_padded = ids.clone()
    ids_padded[0, 4:] = 0
    logits = model(ids_padded, mask)
    assert logits.shape == (2, 4)
    alone = model(ids[:1, :4], mask[:1, :4])
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
    other = ids_padded.clone()
    other[0, 4:] = 7  # different padding ids
    torch.testing.assert_close(model(other, mask), logits, atol=1e-6, rtol=1e-6)


def test_classifier_gradients_reach_every_parameter():
    model = _model()
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    torch.nn.functional.cross_entropy(model(ids, mask), torch.tensor([0, 1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "embedding.weight":
            assert p.grad.abs().sum() > 0, name
    assert model.attention_parameters() == 12 * 12 + 12 + 2 * 12 * 3 + 12


def test_token_weights_helper():
    model = _model().train()
    ids = torch.randint(1, 50, (5,))
    w = model.token_weights(ids)
    assert w.shape == (3, 5) and model.training
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    batch = model.token_weights(torch.stack([ids, ids]), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))
    assert batch.shape == (2, 3, 5)
    torch.testing.assert_close(batch[0], w)
    assert torch.all(batch[1, :, 3:] == 0)


def test_classifier_reads_every_mask_form_of_the_package():
    # bool, integer, float 0/1 and additive 0/-inf masks mean the same (masks.key_padding_mask);
    # .bool() of the additive one would have swapped real and padded tokens.
    model = _model().eval()
    ids = torch.randint(1, 50, (2, 7))
    real = torch.arange(7) < torch.tensor([[7], [4]])
    expected = model(ids, real)
    additive = torch.zeros(2, 7).masked_fill(~real, float("-inf"))
    for mask in (real.long(), real.float(), additive):
        torch.testing.assert_close(model(ids, mask), expected, atol=0, rtol=0)


def test_classifier_refuses_masks_its_packed_encoder_cannot_read():
    model = _model().eval()
    ids = torch.randint(1, 50, (3, 7))
    left = torch.ones(3, 7, dtype=torch.bool)
    left[1, :2] = False  # left padding: the BiGRU would read the padding, not the tokens
    hole = torch.ones(3, 7, dtype=torch.bool)
    hole[2, 3] = False
    for mask in (left, hole):
        with pytest.raises(ValueError, match="right-padded"):
            model(ids, mask)
    for mask in (torch.ones(2, 7), torch.ones(3, 8), torch.ones(3, 1, 1, 7)):
        with pytest.raises(ValueError, match=r"attention_mask must be a \[B, T\] tensor like input_ids"):
            model(ids, mask)


def test_classifier_under_autocast():
    model = _model().eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.arange(7) < torch.tensor([[7], [4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, mask)
    torch.testing.assert_close(logits.float(), model(ids, mask), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_functional_lama_takes_the_tokenizers_integer_mask(backend):
    """An int64 attention_mask means what the attention functions read it as: nonzero = real."""
    import symattn_kernels as sk

    torch.manual_seed(0)
    h, ctx, p, q = torch.randn(2, 5, 6), torch.randn(6), torch.randn(6, 3), torch.randn(6, 3)
    real = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    want = sk.lowrank_context_attention(h, ctx, p, q, key_padding_mask=real.bool(), backend=backend)
    got = sk.lowrank_context_attention(h, ctx, p, q, key_padding_mask=real * 7, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
