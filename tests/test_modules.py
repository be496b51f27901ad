"""nn.Modules against the naive reference: outputs, padding, every form of mask, gradients."""

import pytest
import torch

from symattn_kernels import reference
from symattn_kernels.modules import (
    SharedWeightSelfAttention,
    StandardSelfAttention,
    SymmetricSelfAttention,
    key_padding_mask,
)
from symattn_kernels.masks import plan_mask

from .attention_checks import assert_close

HIDDEN, HEADS = 48, 3
LENGTHS = (7, 3, 5)


def _module(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "shared":
        module = SharedWeightSelfAttention(HIDDEN, HEADS, **kw)
        with torch.no_grad():  # role scales away from 1, so that a misplaced one shows
            for p in (module.d_q, module.d_k, module.d_v):
                p.uniform_(0.5, 1.5)
        return module
    if kind == "standard":
        return StandardSelfAttention(HIDDEN, HEADS, **kw)
    pairwise = {"symmetric": None, "diag": "diag", "full": "full"}[kind]
    return SymmetricSelfAttention(HIDDEN, HEADS, pairwise=pairwise, **kw)


def _padded_batch(dtype=torch.float64):
    torch.manual_seed(1)
    x = torch.randn(len(LENGTHS), max(LENGTHS), HIDDEN, dtype=dtype)
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]
    return x, mask


def _expected(module, x, mask, causal=False):
    """The module's math spelled out with the naive reference (float64)."""
    batch, seqlen, _ = x.shape
    heads = (batch, seqlen, HEADS, HIDDEN // HEADS)
    if isinstance(module, SharedWeightSelfAttention):
        y = module.proj(x).view(heads)
        coef = (module.d_q * module.d_k).view(HEADS, -1)
        out = reference.shared_attention(y, coef=coef, key_padding_mask=mask, causal=causal)
        return out.reshape(batch, seqlen, HIDDEN) * module.d_v
    if isinstance(module, StandardSelfAttention):
        q, k, v = (p(x).view(heads).transpose(1, 2) for p in (module.query, module.key, module.value))
        scores = q @ k.transpose(-1, -2) * (HIDDEN // HEADS) ** -0.5
        allowed = reference.attention_mask(batch, seqlen, causal=causal, key_padding_mask=mask)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).reshape(batch, seqlen, HIDDEN)
    y, v = module.qk(x).view(heads), module.value(x).view(heads)
    out = reference.symmetric_attention(y, v, coef=module.coef, key_padding_mask=mask, causal=causal)
    return out.reshape(batch, seqlen, HIDDEN)


KINDS = ["symmetric", "diag", "full", "shared", "standard"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, causal):
    module = _module(kind, causal=causal).double()
    x, mask = _padded_batch()
    with torch.no_grad():
        actual, expected = module(x, mask), _expected(module, x, mask, causal)
    real = mask[..., None].expand_as(actual)
    assert_close(actual[real], expected[real], atol=1e-10, name=f"{kind} output")


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_unpadded_samples(kind):
    module = _module(kind).eval()
    x, mask = _padded_batch(torch.float32)
    with torch.no_grad():
        padded = module(x, mask.long())
        for b, length in enumerate(LENGTHS):
            alone = module(x[b : b + 1, :length])
            assert_close(padded[b, :length], alone[0], atol=1e-5, name=f"{kind} sample {b}")


def test_every_mask_form_is_the_same_key_padding():
    x, mask = _padded_batch(torch.float32)
    batch, seqlen = mask.shape
    lowest = torch.finfo(torch.float32).min
    additive = torch.zeros(batch, 1, seqlen, seqlen).masked_fill(~mask[:, None, None, :], lowest)
    forms = {"bool": mask, "long": mask.long(), "float": mask.float(), "4d bool": mask[:, None, None, :].expand(
        batch, 1, seqlen, seqlen), "4d additive": additive}
    for name, form in forms.items():
        plan = plan_mask(form, batch, seqlen)
        assert torch.equal(plan.key_padding_mask, mask) and not plan.causal and not plan.packed, name
    assert key_padding_mask(None, batch, seqlen) is None
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        key_padding_mask(mask[:, :-1], batch, seqlen)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_module_takes_4d_masks(kind):
    module = _module(kind, causal=True).double()
    x, mask = _padded_batch()
    batch, seqlen = mask.shape
    additive = torch.zeros(batch, 1, seqlen, seqlen, dtype=x.dtype).masked_fill(
        ~mask[:, None, None, :], torch.finfo(x.dtype).min)
    forms = {"4d bool": mask[:, None, None, :].expand(batch, 1, seqlen, seqlen), "4d additive": additive}
    with torch.no_grad():
        expected = _expected(module, x, mask, causal=True)
        for name, form in forms.items():
            actual = module(x, form)
            real = mask[..., None].expand_as(actual)
            assert_close(actual[real], expected[real], atol=1e-10, name=f"{kind} causal, {name} mask")


@pytest.mark.parametrize("kind", ["symmetric", "diag", "full", "shared"])
def test_gradients_reach_every_parameter(kind):
    module = _module(kind, dropout=0.1).train()
    x, mask = _padded_batch(torch.float32)
    module(x, mask).square().sum().backward()
    names = [name for name, _ in module.named_parameters()]
    expected = {"symmetric": 4, "diag": 5, "full": 5, "shared": 5}[kind]
    assert len(names) == expected, names
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"


@pytest.mark.parametrize("kind", ["symmetric", "full", "shared"])
def test_gradients_match_reference(kind):
    module = _module(kind).double()
    x, mask = _padded_batch()
    module(x, mask)[mask].sum().backward()
    actual = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    _expected(module, x, mask)[mask].sum().backward()
    for name, p in module.named_parameters():
        assert_close(actual[name], p.grad, atol=1e-9, rtol=1e-9, name=f"{kind} grad {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_gives_the_autocast_dtype_and_fp32_values(kind):
    module = _module(kind)
    x, mask = _padded_batch(torch.float32)
    with torch.no_grad():
        expected = module(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, mask)
    assert out.dtype == torch.bfloat16, f"{kind}: {out.dtype}"
    assert_close(out, expected, atol=0.05, rtol=0.05, name=f"{kind} under bf16 autocast")


def test_dropout_only_in_training():
    module = _module("symmetric", dropout=0.5)
    x, mask = _padded_batch(torch.float32)
    with torch.no_grad():
        module.train()
        torch.manual_seed(3)
        first = module(x, mask)
        torch.manual_seed(3)
        assert torch.equal(module(x, mask), first), "same seed must give the same dropout mask"
        module.eval()
        assert not torch.allclose(module(x, mask), first)


def test_pairwise_init():
    assert torch.equal(SymmetricSelfAttention(32, 2, pairwise="diag", pairwise_init="identity").coef, torch.ones(2, 16))
    full = SymmetricSelfAttention(32, 2, pairwise="full", pairwise_init="identity").coef
    assert torch.equal(full, torch.eye(16).expand(2, 16, 16))
    assert SymmetricSelfAttention(32, 2).coef is None
    assert SymmetricSelfAttention(32, 2, pairwise="full").coef.std() > 0.5  # N(0, 1), as published


@pytest.mark.parametrize("make", [
    lambda: SymmetricSelfAttention(32, 2, pairwise="full"),
    lambda: SymmetricSelfAttention(32, 2, pairwise="diag", pairwise_init="identity"),
    lambda: SymmetricSelfAttention(32, 2, pairwise="full", pairwise_init="identity"),
    lambda: SharedWeightSelfAttention(32, 2),
], ids=["full-normal", "diag-identity", "full-identity", "shared"])
def test_reset_parameters_after_building_on_meta(make):
    """Built on the meta device, moved with to_empty() and reset module by module (FSDP's and
    torchtitan's way): coef and the role vectors had no reset_parameters and kept to_empty()'s
    memory (seen: coef up to 6.5e36, NaN role vectors, NaN output), silently."""
    with torch.device("meta"):
        module = make()
    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))  # what to_empty() may leave
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    built = make()
    for name, p in module.named_parameters(recurse=False):
        expected = getattr(built, name)
        if name == "coef" and built.pairwise_init == "normal":
            assert abs(p.mean().item()) < 0.2 and 0.8 < p.std().item() < 1.2, f"{name} is not N(0, 1)"
        else:
            assert torch.equal(p, expected), name
    assert torch.isfinite(module(torch.randn(2, 5, 32))).all()


def test_parameter_counts():
    d = HIDDEN
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(StandardSelfAttention(d, HEADS)) == 3 * (d * d + d)
    assert count(SymmetricSelfAttention(d, HEADS)) == 2 * (d * d + d)
    assert count(SymmetricSelfAttention(d, HEADS, pairwise="full")) == 2 * (d * d + d) + d * d // HEADS
    assert count(SharedWeightSelfAttention(d, HEADS)) == d * d + d + 3 * d
    assert count(SharedWeightSelfAttention(d, HEADS, role_scales=False, bias=False)) == d * d


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SymmetricSelfAttention(50, 3)
    with pytest.raises(ValueError, match="pairwise"):
        SymmetricSelfAttention(48, 3, pairwise="diagonal")
    with pytest.raises(ValueError, match="pairwise_init"):
        SymmetricSelfAttention(48, 3, pairwise="full", pairwise_init="zeros")
    with pytest.raises(ValueError, match="dropout"):
        SharedWeightSelfAttention(48, 3, dropout=1.0)
    with pytest.raises(TypeError, match="role_scales must be a bool"):  # "no" is truthy
        SharedWeightSelfAttention(48, 3, role_scales="no")


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_with_no_allowed_key_gives_zero(kind):
    # Every module, the SDPA baseline included (SDPA's own answer there varies: NaN, 0, or in an
    # ONNX export the values' mean).
    module = _module(kind).double()
    x, mask = _padded_batch()
    mask[1] = False
    with torch.no_grad():
        out = module(x, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])), kind
    real = mask[..., None].expand_as(out)
    assert_close(out[real], _expected(module, x, mask)[real], atol=1e-10, name=kind)
