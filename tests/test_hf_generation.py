"""Converted BERT-family decoders under transformers' Cache API: greedy generate() equals Hugging
Face's own model (tokens, and logits to 1e-5 in fp32) with and without padding; the shared-weight
layer caches Y only; unsupported caches raise under either cache keyword."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertLMHeadModel, DynamicCache, StaticCache  # noqa: E402

from symattn_kernels.integrations import hf  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

VOCAB = 50
DECODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               initializer_range=0.15, is_decoder=True, pad_token_id=0, attn_implementation="eager")


@torch.no_grad()
def _tied_decoder(variant):
    torch.manual_seed(0)
    model = BertLMHeadModel(BertConfig(**DECODER)).eval()
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        attn.key.load_state_dict(attn.query.state_dict())
        if variant == "shared":
            attn.value.load_state_dict(attn.query.state_dict())
    return model


def _prompts(padded):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as generate() wants for decoders
        mask[1, :3] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_generate_matches_hf_tokens_and_logits(variant, padded):
    original = _tied_decoder(variant)
    converted = hf.convert_bert(copy.deepcopy(original), variant)
    ids, mask = _prompts(padded)
    expected, actual = _generate(original, ids, mask), _generate(converted, ids, mask)
    assert torch.equal(actual.sequences, expected.sequences), (actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_close(a, e, atol=1e-5, name=f"{variant} logits at step {step}")


def _cache_bytes(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_shared_weight_cache_holds_half_of_standard():
    ids, _ = _prompts(False)
    standard = _cache_bytes(_tied_decoder("shared"), ids)
    shared = _cache_bytes(hf.convert_bert(_tied_decoder("shared"), "shared"), ids)
    symmetric = _cache_bytes(hf.convert_bert(_tied_decoder("symmetric"), "symmetric"), ids)
    assert standard == 2 * 2 * ids.numel() * DECODER["hidden_size"] * 4  # layers x (K, V) x tokens x width x fp32
    assert shared * 2 == standard
    assert symmetric == standard


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_layer_takes_the_cache_under_either_keyword(keyword):
    model = hf.convert_bert(_tied_decoder("pairwise_diag"), "pairwise_diag", init="random")
    layer = model.bert.encoder.layer[0].attention.self
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, DECODER["hidden_size"])
    with torch.no_grad():
        full, _ = layer(hidden)
        cache = DynamicCache(config=model.config)
        first, _ = layer(hidden[:, :3], **{keyword: cache})
        rest, _ = layer(hidden[:, 3:], **{keyword: cache})
    assert cache.get_seq_length(0) == 5
    assert_close(torch.cat([first, rest], 1), full, atol=1e-5, name=f"cached steps via {keyword}")


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_unsupported_cache_raises_under_either_keyword(keyword):
    model = hf.convert_bert(_tied_decoder("symmetric"), "symmetric")
    ids, _ = _prompts(False)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="DynamicCache only, got StaticCache"), torch.no_grad():
        model(ids, use_cache=True, **{keyword: cache})


@pytest.mark.parametrize("variant", hf.VARIANTS)
@pytest.mark.parametrize("writer", ["stock", "other variant"])
def test_cache_filled_by_another_kind_of_layer_is_refused(variant, writer):
    """A stock layer caches K and V, a converted one its own projections: a cache the stock model
    (or another variant) filled was read as this variant's (wrong logits, or a size error for the
    shared variant). It is refused, and this model's own cache still serves generate()."""
    original = _tied_decoder(variant)
    converted = hf.convert_bert(copy.deepcopy(original), variant)
    other = "symmetric" if variant != "symmetric" else "pairwise_diag"
    filler = original if writer == "stock" else hf.convert_bert(copy.deepcopy(original), other)
    ids, _ = _prompts(False)
    cache = DynamicCache(config=original.config)
    with torch.no_grad():
        filler(ids[:, :5], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="past_key_values: layer 0 of the cache was filled by"):
            converted(ids[:, 5:], past_key_values=cache, use_cache=True)
        own = DynamicCache(config=original.config)
        converted(ids[:, :5], past_key_values=own, use_cache=True)
        stepped = converted(ids[:, 5:], past_key_values=own, use_cache=True).logits
        whole = converted(ids).logits[:, 5:]
    assert_close(stepped, whole, atol=1e-5, name=f"{variant} logits through its own cache")
