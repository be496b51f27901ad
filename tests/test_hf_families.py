"""Which Hugging Face models ``convert_bert`` takes: each self-attention class it converts
(``hf.SUPPORTED_ATTENTION``) gives its stock model's outputs after conversion (key tied to query,
so the symmetric variant expresses the model exactly); models whose attention has the same
query / key / value Linears but adds rotary positions, relative or layout biases or an
approximation are refused, not converted into a different function. A layer shared by several
paths stays shared; each family's decoder (causal, with cross-attention that stays standard)
matches its stock decoder; a changed
``is_decoder`` and a value bias without a query bias are refused."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

from symattn_kernels.integrations import hf  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             initializer_range=0.15, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(name: str, **kw):
    """A tiny ``transformers.<name>Model`` (encoder classes named otherwise are spelled out)."""
    config = getattr(T, f"{name}Config")(**{**SMALL, **kw})
    model_class = {"BertGeneration": T.BertGenerationEncoder}.get(name) or getattr(T, f"{name}Model")
    return model_class(config)


# One builder per class of hf.SUPPORTED_ATTENTION (keywords: config options).
SUPPORTED = {
    "BertSelfAttention": lambda **kw: _model("Bert", **kw),
    "RobertaSelfAttention": lambda **kw: _model("Roberta", **kw, pad_token_id=1),
    "XLMRobertaSelfAttention": lambda **kw: _model("XLMRoberta", **kw, pad_token_id=1),
    "CamembertSelfAttention": lambda **kw: _model("Camembert", **kw, pad_token_id=1),
    "ElectraSelfAttention": lambda **kw: _model("Electra", **kw, embedding_size=16),
    "BertGenerationSelfAttention": lambda **kw: _model("BertGeneration", **kw),
    "ErnieSelfAttention": lambda **kw: _model("Ernie", **kw),
    "MegatronBertSelfAttention": lambda **kw: _model("MegatronBert", **kw),
    "RemBertSelfAttention": lambda **kw: _model("RemBert", **kw, input_embedding_size=32, output_embedding_size=32),
    "BigBirdSelfAttention": lambda **kw: _model("BigBird", **kw, attention_type="original_full"),
    "SplinterSelfAttention": lambda **kw: _model("Splinter", **kw),
    "XmodSelfAttention": lambda **kw: _model("Xmod", **kw, pad_token_id=1, languages=["en_XX"],
                                             default_language="en_XX"),
    "Data2VecTextSelfAttention": lambda **kw: _model("Data2VecText", **kw, pad_token_id=1),
    "RobertaPreLayerNormSelfAttention": lambda **kw: _model("RobertaPreLayerNorm", **kw, pad_token_id=1),
    "XLMRobertaXLSelfAttention": lambda **kw: _model("XLMRobertaXL", **kw, pad_token_id=1),
    "RoCBertSelfAttention": lambda **kw: _model("RoCBert", **kw, pronunciation_vocab_size=10, shape_vocab_size=10,
                                           pronunciation_embed_dim=8, shape_embed_dim=8),
    "TapasSelfAttention": lambda **kw: _model("Tapas", **kw),
}

# Same Linears, another function: what a converted layer would silently drop is in the id.
REFUSED = {
    "roformer-rotary": lambda: _model("RoFormer", embedding_size=32),
    "esm-rotary": lambda: _model("Esm", pad_token_id=1, mask_token_id=2, position_embedding_type="rotary"),
    "layoutlmv3-relative-bias": lambda: _model("LayoutLMv3", pad_token_id=1, max_2d_position_embeddings=64,
                                               coordinate_size=4, shape_size=8, visual_embed=False),
    "bros-box-terms": lambda: _model("Bros", dim_bbox=8),
    "mra-approximate": lambda: _model("Mra", pad_token_id=0),
    "yoso-approximate": lambda: _model("Yoso", pad_token_id=0),
    "luke-entity-calls": lambda: _model("Luke", entity_vocab_size=10, entity_emb_size=16, pad_token_id=1),
    "layoutlm-4d-masks": lambda: _model("LayoutLM", max_2d_position_embeddings=64),
}


def _batch(pad_id):
    torch.manual_seed(1)
    mask = (torch.arange(12)[None, :] < torch.tensor([[12], [7], [9]])).long()
    ids = torch.randint(3, SMALL["vocab_size"], mask.shape).masked_fill(mask == 0, pad_id)
    return ids, mask


@torch.no_grad()
def _tie_keys(model):
    """Key = query in every layer: the symmetric variant then computes the stock function."""
    for module in model.modules():
        if hf._is_original(module):
            module.key.load_state_dict(module.query.state_dict())
    return model


def test_every_supported_class_has_a_check():
    assert set(SUPPORTED) == hf.SUPPORTED_ATTENTION


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_family_equals_its_stock_model(name):
    torch.manual_seed(0)
    stock = _tie_keys(SUPPORTED[name]()).eval()
    stock.set_attn_implementation("eager")
    assert {type(m).__name__ for m in stock.modules() if hf._is_original(m)} == {name}
    converted = hf.convert_bert(copy.deepcopy(stock), "symmetric")
    assert not any(hf._is_original(m) for m in converted.modules())
    ids, mask = _batch(stock.config.pad_token_id or 0)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(actual[real], expected[real], atol=1e-5, name=f"{name} converted vs stock eager")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_attention_with_the_same_linears_is_refused(case):
    torch.manual_seed(0)
    model = REFUSED[case]()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="convert_bert cannot convert .*SelfAttention"):
        hf.convert_bert(model, "symmetric")
    assert [type(m) for m in model.modules()] == before, "a refused model must be left as it was"


def _bert(**kw):
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(**{**SMALL, **kw}, attn_implementation="eager")).eval()


def test_a_layer_shared_by_several_paths_stays_shared():
    stock = _bert()
    stock.encoder.layer[1].attention.self = stock.encoder.layer[0].attention.self
    _tie_keys(stock)
    params = sum(p.numel() for p in stock.parameters())
    converted = hf.convert_bert(copy.deepcopy(stock), "symmetric")
    first, second = (layer.attention.self for layer in converted.encoder.layer)
    assert first is second and isinstance(first, hf.BertSymmetricSelfAttention)
    # Symmetric drops the key projection of the one shared layer, nothing else.
    assert sum(p.numel() for p in converted.parameters()) == params - SMALL["hidden_size"] ** 2 - SMALL["hidden_size"]
    ids, mask = _batch(0)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-5, name="shared layer")
    reverted = hf.revert_bert(converted)
    first, second = (layer.attention.self for layer in reverted.encoder.layer)
    assert first is second and type(first) is T.models.bert.modeling_bert.BertSelfAttention


def test_cross_attention_layers_stay_standard_and_match_the_stock_decoder():
    torch.manual_seed(0)
    config = T.BertConfig(**SMALL, is_decoder=True, add_cross_attention=True, attn_implementation="eager")
    stock = _tie_keys(T.BertLMHeadModel(config)).eval()
    converted = hf.convert_bert(copy.deepcopy(stock), "pairwise_full")
    ids, mask = _batch(0)
    encoder_states = torch.randn(3, 5, SMALL["hidden_size"])
    encoder_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    kw = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder_states,
              encoder_attention_mask=encoder_mask)
    with torch.no_grad():
        expected, actual = stock(**kw).logits, converted(**kw).logits
    assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-5, name="decoder with cross-attention")


# Every family but Splinter builds decoders. MegatronBert, RemBert, BigBird and Tapas build their
# cross-attention from the self-attention class, whose layers there have no is_causal.
DECODERS = sorted(set(SUPPORTED) - {"SplinterSelfAttention"})


def _decoder_inputs(stock, encoder: bool):
    ids, mask = _batch(stock.config.pad_token_id or 0)
    if not encoder:
        return dict(input_ids=ids, attention_mask=mask), mask.bool()
    # The encoder states are as long as the decoder's: MegatronBert's and Tapas's stock
    # cross-attention (transformers 5.25) views the keys with the decoder's length.
    encoder_mask = (torch.arange(12)[None, :] < torch.tensor([[12], [5], [9]])).long()
    return dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=torch.randn(3, 12, SMALL["hidden_size"]),
                encoder_attention_mask=encoder_mask), mask.bool()


@pytest.mark.parametrize("encoder", [False, True], ids=["causal_lm", "cross_attention"])
@pytest.mark.parametrize("name", DECODERS)
def test_supported_decoder_equals_its_stock_model(name, encoder):
    torch.manual_seed(0)
    stock = _tie_keys(SUPPORTED[name](is_decoder=True, add_cross_attention=encoder)).eval()
    stock.set_attn_implementation("eager")
    converted = hf.convert_bert(copy.deepcopy(stock), "symmetric")
    layers = {n: m for n, m in converted.named_modules() if n.endswith(".self")}
    # TapasModel's mask is bidirectional whatever is_decoder says: its converted layers are too.
    causal = name != "TapasSelfAttention"
    assert all(isinstance(m, hf._HFSelfAttention) and m.causal == causal
               for n, m in layers.items() if ".attention." in n)
    cross = [m for n, m in layers.items() if ".crossattention." in n]
    assert bool(cross) == encoder and not any(isinstance(m, hf._HFSelfAttention) for m in cross)
    kw, real = _decoder_inputs(stock, encoder)
    if encoder and name == "BigBirdSelfAttention":
        # BigBird's decoder layer hands the encoder states to its self-attention too, which then
        # attends to them: a converted layer cannot compute that and says so.
        with pytest.raises(ValueError, match="cannot attend to encoder_hidden_states"):
            converted(**kw)
        return
    # Padded, the eager models pass 4D masks that hold causality; unpadded, some pass none at all,
    # and causality comes from the converted layer alone.
    for unpadded in (False, True):
        call = dict(kw, attention_mask=None) if unpadded else kw
        with torch.no_grad():
            expected, actual = stock(**call).last_hidden_state, converted(**call).last_hidden_state
        rows = torch.ones_like(real) if unpadded else real
        assert_close(actual[rows], expected[rows], atol=1e-5, name=f"{name} decoder vs stock eager, unpadded={unpadded}")


def test_changing_is_decoder_after_conversion_is_refused():
    converted = hf.convert_bert(_tie_keys(_bert()), "symmetric")
    ids, mask = _batch(0)
    converted.config.is_decoder = True
    with pytest.raises(ValueError, match="is_decoder is True, but this layer was converted with is_decoder=False"):
        converted(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("variant", ["shared", "symmetric"])
def test_value_bias_without_query_bias_is_refused(variant):
    model = _bert()
    for layer in model.encoder.layer:
        layer.attention.self.query.bias = layer.attention.self.key.bias = None
    with pytest.raises(ValueError, match="value projection has a bias and the query projection none"):
        hf.convert_bert(model, variant)
