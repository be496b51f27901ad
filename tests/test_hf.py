"""Hugging Face integration: conversion exactness against HF's own eager BERT / RoBERTa, padding,
gradients, save / load, revert, warm start, attention registration, parameter counts, compile."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaModel,
)

from symattn_kernels import reference  # noqa: E402
from symattn_kernels.integrations import hf  # noqa: E402
from symattn_kernels.parameter_counts import BERT_BASE, count_parameters  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

VARIANTS = hf.VARIANTS
VOCAB, LENGTHS = 100, (9, 4, 6)
# initializer_range 0.15 instead of BERT's 0.02: peaked attention, so a wrong score shows.
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             initializer_range=0.15)


def _model(family="bert", cls=None, **overrides):
    torch.manual_seed(0)
    if family == "roberta":
        return RobertaModel(RobertaConfig(**SMALL, attn_implementation="eager", **overrides)).eval()
    return (cls or BertModel)(BertConfig(**SMALL, attn_implementation="eager", **overrides)).eval()


def _batch(pad_id=0):
    torch.manual_seed(1)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(3, VOCAB, mask.shape).masked_fill(mask == 0, pad_id)
    return ids, mask


def _self_attentions(model):
    return [layer.attention.self for layer in model.encoder.layer]


@torch.no_grad()
def _tie(model, variant):
    """Give the weights the variant's structure: key = query (and value = query for shared)."""
    for attn in _self_attentions(model):
        attn.key.load_state_dict(attn.query.state_dict())
        if variant == "shared":
            attn.value.load_state_dict(attn.query.state_dict())
    return model


def _real(x, mask):
    return x[mask.bool()]


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tied_conversion_matches_hf_eager(variant, family):
    original = _tie(_model(family), variant)
    converted = hf.convert_bert(copy.deepcopy(original), variant)
    ids, mask = _batch(pad_id=1 if family == "roberta" else 0)
    with torch.no_grad():
        expected = original(ids, attention_mask=mask).last_hidden_state
        actual = converted(ids, attention_mask=mask).last_hidden_state
    layer_class = hf.BertSharedWeightSelfAttention if variant == "shared" else hf.BertSymmetricSelfAttention
    assert all(type(a) is layer_class for a in _self_attentions(converted))
    assert_close(actual, expected, atol=1e-5, name=f"{family} {variant} last hidden state (all positions)")


def test_tied_causal_decoder_matches_hf_eager():
    original = _tie(_model(is_decoder=True), "symmetric")
    converted = hf.convert_bert(copy.deepcopy(original), "symmetric")
    assert all(a.causal for a in _self_attentions(converted))
    ids, mask = _batch()
    with torch.no_grad():
        expected = original(ids, attention_mask=mask, use_cache=False).last_hidden_state
        actual = converted(ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert_close(_real(actual, mask), _real(expected, mask), atol=1e-5, name="causal last hidden state")


def test_half_precision_within_three_times_hf_error():
    # flash-attention's model-level rule: converted bf16 vs HF fp32 within 3x HF bf16 vs HF fp32.
    original = _tie(_model(), "symmetric")
    converted = hf.convert_bert(copy.deepcopy(original), "symmetric").to(torch.bfloat16)
    ids, mask = _batch()
    with torch.no_grad():
        ref = _real(original(ids, attention_mask=mask).last_hidden_state, mask)
        ref_half = _real(original.to(torch.bfloat16)(ids, attention_mask=mask).last_hidden_state, mask)
        out = _real(converted(ids, attention_mask=mask).last_hidden_state, mask)
    hf_error = (ref_half.float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 3 * hf_error + 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_unpadded_samples(variant):
    model = hf.convert_bert(_model(), variant)
    ids, mask = _batch()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).last_hidden_state
        for b, length in enumerate(LENGTHS):
            alone = model(ids[b : b + 1, :length]).last_hidden_state[0]
            assert_close(padded[b, :length], alone, atol=1e-5, name=f"{variant} sample {b}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_converted_parameter(variant):
    model = hf.convert_bert(_model(cls=BertForSequenceClassification), variant, init="random").train()
    ids, mask = _batch()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    expected = {"shared": {"proj.weight", "proj.bias", "d_q", "d_k", "d_v"},
                "symmetric": {"qk.weight", "qk.bias", "value.weight", "value.bias"}}
    expected = expected.get(variant, expected["symmetric"] | {"coef"})
    for i, attn in enumerate(model.bert.encoder.layer):
        params = dict(attn.attention.self.named_parameters())
        assert set(params) == expected, f"layer {i}: {sorted(params)}"
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i}: no gradient reaches {name}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    model = hf.convert_bert(_model(cls=BertForMaskedLM), variant, init="random")
    ids, mask = _batch()
    model.save_pretrained(tmp_path)
    loaded = hf.load_converted(BertForMaskedLM, tmp_path)
    assert loaded.config.symattn_variant == variant
    assert loaded.config._attn_implementation == "symattn"
    with torch.no_grad():
        assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=0.0,
                     name=f"{variant} logits after save/load")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_revert_restores_types_and_function(variant):
    original = _model()
    original_types = [type(a) for a in _self_attentions(original)]
    model = hf.convert_bert(copy.deepcopy(original), variant, init="random", pairwise_init="normal")
    with torch.no_grad():
        for p in model.parameters():  # move away from the init so that every weight matters
            p.add_(0.1 * torch.randn_like(p))
    ids, mask = _batch()
    with torch.no_grad():
        converted = model(ids, attention_mask=mask).last_hidden_state
        hf.revert_bert(model)
        reverted = model(ids, attention_mask=mask).last_hidden_state
    assert [type(a) for a in _self_attentions(model)] == original_types
    assert not hasattr(model.config, "symattn_variant")
    assert model.config._attn_implementation == "eager"
    assert_close(reverted, converted, atol=1e-4, name=f"{variant} reverted vs converted")
    assert sorted(model.state_dict()) == sorted(original.state_dict())


@torch.no_grad()
def _symmetric_form(model, variant):
    """Weights whose bilinear forms W_q^T W_k are symmetric (PSD for "symmetric") but not tied, with
    a key-side bias the variant can express: the warm start must then be exact."""
    torch.manual_seed(2)
    for attn in _self_attentions(model):
        heads, dim = attn.num_attention_heads, attn.attention_head_size
        wq = attn.query.weight.view(heads, dim, -1)
        if variant == "shared":
            wv, bv = attn.value.weight.view(heads, dim, -1), attn.value.bias.view(heads, dim)
            a, c = torch.rand(2, heads, dim) + 0.5
            wq.copy_(a[..., None] * wv)
            attn.query.bias.copy_((a * bv).flatten())
            attn.key.weight.copy_((c[..., None] * wv).flatten(0, 1))
            continue
        r = torch.randn(heads, dim, dim)
        sym = r @ r.transpose(1, 2) / dim if variant == "symmetric" else (r + r.transpose(1, 2)) / 2
        attn.key.weight.copy_((sym @ wq).flatten(0, 1))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_warm_start_is_exact_for_forms_the_variant_can_express(variant):
    original = _symmetric_form(_model(), variant)
    assert not torch.equal(original.encoder.layer[0].attention.self.key.weight,
                           original.encoder.layer[0].attention.self.query.weight)
    converted = hf.convert_bert(copy.deepcopy(original), variant)
    ids, mask = _batch()
    report = hf.warm_start_report(original, converted, input_ids=ids, attention_mask=mask)
    assert len(report.layer_logit_errors) == SMALL["num_hidden_layers"]
    assert max(report.layer_logit_errors) < 1e-5, report
    assert report.hidden_rel_error < 1e-5 and report.hidden_cosine > 1 - 1e-6, report


def test_warm_start_report_on_general_weights():
    original = _model()
    ids, mask = _batch()
    reports = {v: hf.warm_start_report(original, hf.convert_bert(copy.deepcopy(original), v),
                                       input_ids=ids, attention_mask=mask) for v in VARIANTS}
    for variant, report in reports.items():
        assert all(0.0 < e < 2.0 for e in report.layer_logit_errors), (variant, report)
        assert -1.0 <= report.hidden_cosine <= 1.0 + 1e-9
        assert "rel. logit error" in str(report)
    # Signed eigenvalues can represent indefinite forms; the PSD clip of "symmetric" cannot.
    assert sum(reports["pairwise_diag"].layer_logit_errors) < sum(reports["symmetric"].layer_logit_errors)


def test_random_init_follows_bert_and_pairwise_init():
    model = hf.convert_bert(_model(), "pairwise_full", init="random", pairwise_init="identity")
    attn = model.encoder.layer[0].attention.self
    assert abs(attn.qk.weight.std().item() - SMALL["initializer_range"]) < 0.02
    assert torch.equal(attn.qk.bias, torch.zeros_like(attn.qk.bias))
    assert torch.equal(attn.coef, torch.eye(attn.head_dim).expand_as(attn.coef))
    shared = hf.convert_bert(_model(), "shared", init="random").encoder.layer[0].attention.self
    assert all(torch.equal(p, torch.ones_like(p)) for p in (shared.d_q, shared.d_k, shared.d_v))


@pytest.mark.parametrize("variant", ["pairwise_full", "shared"])
def test_init_weights_initialises_converted_layers_built_on_meta(variant):
    """transformers' init_weights() after building on the meta device knows Linears, embeddings
    and norms only: coef and the role vectors kept to_empty()'s memory, with finite logits."""
    with torch.device("meta"):
        model = hf.convert_bert(_model(), variant, init="random", pairwise_init="identity")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what to_empty() may leave
    model.init_weights()
    attn = model.encoder.layer[0].attention.self
    own = [attn.coef] if variant != "shared" else [attn.d_q, attn.d_k, attn.d_v]
    expected = torch.eye(attn.head_dim).expand_as(attn.coef) if variant != "shared" else torch.ones_like(attn.d_q)
    assert all(torch.equal(p, expected) for p in own)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    projection = attn.proj if variant == "shared" else attn.qk
    assert abs(projection.weight.std().item() - SMALL["initializer_range"]) < 0.02
    hf.revert_bert(model)
    assert "_init_weights" not in vars(model), "revert_bert leaves the class's init_weights"


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_weights_keeps_initialised_converted_and_reverted_layers(variant, tmp_path):
    """transformers' init_weights() leaves a built or loaded model as it is (its modules and tensors
    are flagged initialised): so it must leave a converted model, a reverted one and a loaded
    converted one, instead of drawing their attention weights again."""
    ids, mask = _batch()

    def unchanged_by_init_weights(model, what):
        with torch.no_grad():
            before = model(ids, attention_mask=mask).last_hidden_state
            model.init_weights()
            assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, before), what

    model = hf.convert_bert(_model(), variant)
    unchanged_by_init_weights(model, f"{variant}: init_weights() re-initialised the converted layers")
    model.save_pretrained(tmp_path)
    unchanged_by_init_weights(hf.load_converted(BertModel, tmp_path), f"{variant}: after load_converted")
    unchanged_by_init_weights(hf.revert_bert(model), f"{variant}: init_weights() re-initialised the reverted layers")


def test_register_attention_routes_stock_bert_to_sdpa_with_padding():
    original = _model()
    model = copy.deepcopy(original)
    hf.register_attention()
    model.set_attn_implementation("symattn")
    ids, mask = _batch()
    with torch.no_grad():
        expected = original(ids, attention_mask=mask).last_hidden_state
        actual = model(ids, attention_mask=mask).last_hidden_state
    # Padding reaches the layers only through the mask interface; without it padded keys would count.
    assert_close(_real(actual, mask), _real(expected, mask), atol=1e-5, name="symattn (SDPA route) vs eager")


def test_without_the_mask_interface_padding_is_dropped(monkeypatch):
    # Why register_attention fills both interfaces: an attention name unknown to the mask
    # interface makes transformers pass no mask at all.
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "symattn_nomask", hf.symattn_attention_forward)
    original = _model()
    model = copy.deepcopy(original)
    model.set_attn_implementation("symattn_nomask")
    ids, mask = _batch()
    with torch.no_grad():
        expected = original(ids, attention_mask=mask).last_hidden_state
        actual = model(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(actual[0], expected[0], atol=1e-5), "the unpadded sample is unaffected"
    assert not torch.allclose(_real(actual[1:], mask[1:]), _real(expected[1:], mask[1:]), atol=1e-3)


@pytest.mark.parametrize("shared_values", [False, True], ids=["separate_v", "v_is_q"])
def test_attention_function_uses_the_kernel_when_key_is_query(shared_values, monkeypatch):
    calls = []
    kernel = hf.attend
    monkeypatch.setattr(hf, "attend", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(3)
    q = torch.randn(2, 3, 5, 16)  # [B, H, S, D], Hugging Face's layout
    v = q if shared_values else torch.randn(2, 3, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    module = torch.nn.Module()
    out, weights = hf.symattn_attention_forward(module, q, q, v, mask, scaling=0.3)
    expected = reference.symmetric_attention(q.transpose(1, 2), None if shared_values else v.transpose(1, 2),
                                             scale=0.3, key_padding_mask=mask)
    assert calls == [1] and weights is None
    assert_close(out, expected, atol=1e-6, name="kernel route")
    sdpa_out, _ = hf.symattn_attention_forward(module, q, q.clone(), v, mask, scaling=0.3)
    assert calls == [1], "a key that is a different tensor must go to SDPA"
    assert_close(sdpa_out, expected, atol=1e-5, name="SDPA route")


def test_bert_base_parameter_counts():
    expected = {"standard": 109_482_240, "symmetric": 102_395_136, "pairwise_full": 102_984_960,
                "pairwise_diag": 102_404_352, "shared": 95_335_680}
    counts = {variant: count_parameters(BERT_BASE, variant) for variant in expected}
    assert {v: c["total"] for v, c in counts.items()} == expected
    qkv_change = 1 - counts["shared"]["qkv"] / counts["standard"]["qkv"]
    assert round(100 * qkv_change, 2) == 66.54
    assert round(100 * (1 - expected["symmetric"] / expected["standard"]), 2) == 6.47
    assert round(100 * (1 - expected["pairwise_full"] / expected["standard"]), 2) == 5.93


def test_convert_rejects_bad_use():
    model = _model()
    with pytest.raises(ValueError, match="variant must be one of"):
        hf.convert_bert(model, "pairwise")
    with pytest.raises(ValueError, match="init must be"):
        hf.convert_bert(model, "shared", init="zeros")
    hf.convert_bert(model, "shared")
    with pytest.raises(ValueError, match="already converted"):
        hf.convert_bert(model, "symmetric")
    with pytest.raises(ValueError, match="no BERT-family self-attention"):
        hf.convert_bert(torch.nn.Linear(2, 2), "shared")
    with pytest.raises(ValueError, match="no converted"):
        hf.revert_bert(_model())
    model.set_attn_implementation("flex_attention")  # its masks are BlockMasks, which the layers cannot read
    with pytest.raises(TypeError, match="attention_mask is a BlockMask"):
        model(*_batch())


def test_revert_an_encoder_decoder_model():
    """The decoder's layers revert with the decoder's config (an EncoderDecoderConfig has no
    hidden_size) and compute what the converted model did."""
    torch.manual_seed(0)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**SMALL), BertConfig(**SMALL, is_decoder=True, add_cross_attention=True))
    model = transformers.EncoderDecoderModel(config=config).eval()
    types = [type(m) for m in model.modules()]
    hf.convert_bert(model, "pairwise_diag", init="random")
    ids, mask = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=mask)
    with torch.no_grad():
        converted = model(**kw).logits
        hf.revert_bert(model)
        reverted = model(**kw).logits
    assert [type(m) for m in model.modules()] == types
    assert_close(reverted[mask.bool()], converted[mask.bool()], atol=1e-4, name="reverted encoder-decoder")


def test_torch_compile_matches_eager():
    model = hf.convert_bert(_model(cls=BertForSequenceClassification), "pairwise_full")
    ids, mask = _batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model)(ids, attention_mask=mask).logits
    assert_close(compiled, eager, atol=1e-5, name="compiled logits")


def test_converted_layers_keep_the_autocast_dtype():
    """Under bf16 autocast the stock self-attention returns bf16; the converted shared layer's
    role scale d_v (an fp32 parameter) promoted its output to fp32."""
    dtypes = {}
    for variant in ("stock",) + VARIANTS:
        model = _model() if variant == "stock" else hf.convert_bert(_model(), variant, init="random")
        attn = _self_attentions(model)[0]
        attn.register_forward_hook(lambda module, args, out, variant=variant: dtypes.__setitem__(variant, out[0].dtype))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(_batch()[0])
    assert dtypes == {variant: torch.bfloat16 for variant in dtypes}, dtypes
