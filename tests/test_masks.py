"""4D masks through the modules against an fp64 softmax under the very same mask: key padding,
causal, and packed (block-diagonal, optionally causal and padded) patterns run exactly through the
padded or the varlen kernel; anything else is refused."""

import pytest
import torch

from symattn_kernels.masks import packed_plan, plan_mask
from symattn_kernels.modules import SharedWeightSelfAttention, SymmetricSelfAttention

from .attention_checks import assert_close

B, S, WIDTH, HEADS = 2, 11, 32, 2


def _expected(layer, hidden, allowed):
    """softmax(scale * Y M Y^T) over the allowed keys in float64, 0 for a row with none."""
    y, v, coef = (t.double() if t is not None else None for t in layer.project(hidden))
    y, v = y.transpose(1, 2), (y if v is None else v).transpose(1, 2)
    query = y if coef is None else (y * coef[None, :, None] if coef.dim() == 2 else y @ coef)
    scores = (query @ y.transpose(-1, -2) * y.shape[-1] ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    out = torch.nan_to_num(scores.softmax(-1)) @ v
    out = out.transpose(1, 2).reshape(hidden.shape)
    return out * layer.d_v.double() if isinstance(layer, SharedWeightSelfAttention) else out


def _packed(causal, padded):
    labels = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 7 + [1] * 4])
    allowed = labels[:, :, None] == labels[:, None, :]
    if padded:  # the last two tokens of row 1 are padding: no row sees them, their own rows are empty
        real = torch.arange(S) < torch.tensor([[S], [S - 2]])
        allowed &= real[:, None, :] & real[:, :, None]
    return allowed.tril() if causal else allowed


@pytest.mark.parametrize("layer_class", [SymmetricSelfAttention, SharedWeightSelfAttention])
@pytest.mark.parametrize("pattern", ["packed", "packed_causal", "packed_padded", "causal_padding"])
def test_4d_masks_honoured_exactly(layer_class, pattern):
    torch.manual_seed(0)
    layer = layer_class(WIDTH, HEADS)
    hidden = torch.randn(B, S, WIDTH)
    if pattern == "causal_padding":
        real = torch.arange(S) < torch.tensor([[S], [6]])
        allowed = real[:, None, :] & torch.ones(S, S, dtype=torch.bool).tril()
    else:
        allowed = _packed("causal" in pattern, "padded" in pattern)
    plan = plan_mask(allowed[:, None], B, S)
    assert plan.packed == pattern.startswith("packed") and plan.causal == ("causal" in pattern)
    for mask in (allowed[:, None], torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], float("-inf"))):
        assert_close(layer(hidden, mask), _expected(layer, hidden, allowed), atol=1e-5, name=pattern)


def test_causal_layer_combines_its_causality_with_a_4d_mask():
    torch.manual_seed(0)
    layer = SymmetricSelfAttention(WIDTH, HEADS, causal=True)
    hidden = torch.randn(B, S, WIDTH)
    allowed = _packed(causal=False, padded=False)
    assert_close(layer(hidden, allowed[:, None]), _expected(layer, hidden, allowed.tril()), atol=1e-5,
                 name="causal layer, block-diagonal mask")


def test_patterns_the_kernels_cannot_run_are_refused():
    labels = torch.tensor([0, 0, 1, 1, 0, 0])  # sequence 0 is split in two runs
    with pytest.raises(ValueError, match="neither a key padding mask"):
        plan_mask((labels[:, None] == labels[None, :])[None, None], 1, 6)
    heads = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    heads[0, 1, 0, 1] = False
    with pytest.raises(ValueError, match="differs between heads"):
        plan_mask(heads, 1, 6)
    with pytest.raises(TypeError, match="must be bool"):
        plan_mask(torch.ones(1, 1, 6, 6, dtype=torch.int64), 1, 6)


def test_packed_path_passes_gradients():
    torch.manual_seed(0)
    layer = SymmetricSelfAttention(WIDTH, HEADS, pairwise="diag").double()
    hidden = torch.randn(B, S, WIDTH, dtype=torch.float64)
    allowed = _packed(causal=True, padded=True)
    weights = torch.randn(B, S, WIDTH, dtype=torch.float64)
    grads = []
    for run in (lambda: layer(hidden, allowed[:, None]), lambda: _expected(layer, hidden, allowed)):
        layer.zero_grad()
        (run() * weights).sum().backward()
        grads.append([p.grad.clone() for p in (layer.qk.weight, layer.value.weight, layer.coef)])
    for name, got, want in zip(("qk.weight", "value.weight", "coef"), *grads):
        assert_close(got, want, atol=1e-9, name=f"gradient of {name} through the varlen route")


@pytest.mark.parametrize("labels", [[[5] * 4, [0] * 4], [[0] * 4, [-5] * 4], [[0, 0, 9, 9], [9, 9, 0, 0]]],
                         ids=["above-S", "negative", "same-labels"])
def test_packed_labels_never_join_two_rows(labels):
    # Each row's runs are its own sequences, whatever the label values.
    plan = packed_plan(torch.tensor(labels))
    lengths = torch.diff(plan.cu_seqlens).tolist()
    expected = [4, 4] if labels[0][0] == labels[0][-1] else [2, 2, 2, 2]
    assert lengths == expected
    with pytest.raises(ValueError, match="sequence_ids must be a \\[B, S\\] tensor"):
        packed_plan(torch.tensor(labels[0]))


def test_masks_of_the_wrong_kind_are_named():
    layer = SymmetricSelfAttention(WIDTH, HEADS)
    hidden = torch.randn(B, S, WIDTH)
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        layer(hidden, [[1] * S] * B)
    for mask in (torch.ones(B, S, S, dtype=torch.bool), torch.ones(B, 1, 1, S, S, dtype=torch.bool)):
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            layer(hidden, mask)


def _mask_forms():
    real = torch.arange(S)[None, :] < torch.tensor([[S], [S - 3]])
    pair = real[:, None, None, :] & real[:, None, :, None]
    return {
        "float 0/1": real.float(),
        "additive": torch.zeros(B, S).masked_fill(~real, float("-inf")),
        "4D bool": real[:, None, None, :].expand(B, 1, S, S),
        "4D additive": torch.zeros(B, 1, S, S).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min),
        "4D packed": _packed(causal=False, padded=False)[:, None] & pair,
    }


@pytest.mark.parametrize("form", list(_mask_forms()))
def test_masks_read_by_value_break_the_graph_or_say_why(form):
    # A float or 4D mask is read by value: torch.compile runs that read eagerly at a graph break and
    # gives the eager answer; fullgraph=True and torch.export stop with the reason, not with torch's
    # data-dependent guard errors.
    torch.manual_seed(0)
    layer = SymmetricSelfAttention(WIDTH, HEADS).eval()
    hidden, mask = torch.randn(B, S, WIDTH), _mask_forms()[form]
    with torch.no_grad():
        expected = layer(hidden, mask)
        torch._dynamo.reset()
        assert_close(torch.compile(layer, backend="eager")(hidden, mask), expected, atol=1e-6, name=f"{form}, compiled")
        torch._dynamo.reset()
        with pytest.raises(Exception, match="read by value .*pass a bool or integer \\[B, S\\] attention_mask"):
            torch.compile(layer, backend="eager", fullgraph=True)(hidden, mask)
        torch._dynamo.reset()
    with pytest.raises(ValueError, match="read by value"):
        torch.export.export(layer, (hidden, mask))


def test_bool_and_integer_masks_trace_whole():
    torch.manual_seed(0)
    layer = SymmetricSelfAttention(WIDTH, HEADS).eval()
    hidden = torch.randn(B, S, WIDTH)
    real = _mask_forms()["float 0/1"]
    for mask in (real.bool(), real.long()):
        with torch.no_grad():
            torch._dynamo.reset()
            assert_close(torch.compile(layer, backend="eager", fullgraph=True)(hidden, mask), layer(hidden, mask),
                         atol=1e-6, name=f"{mask.dtype} mask, fullgraph")
            program = torch.export.export(layer, (hidden, mask))
            assert_close(program.module()(hidden, mask), layer(hidden, mask), atol=1e-6, name=f"{mask.dtype}, exported")
        torch._dynamo.reset()
