"""A converted checkpoint is a standard BERT checkpoint: plain ``from_pretrained`` (model, head and
Auto classes) or ``load_state_dict`` into an unconverted model gives the converted model's outputs
through standard attention; ``load_converted`` and ``load_state_dict`` into a converted model read
the converted weights back exactly; weights without the variant's structure are refused. On small
random configs (test_hf_loading.py has the same on all-MiniLM-L6-v2)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertLMHeadModel,
    BertModel,
)

from symattn_kernels.integrations import hf  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             initializer_range=0.15, num_labels=3)
# Folding the coefficient into the query rounds once per weight: fp32 agreement, not bit equality.
ATOL = 1e-5


def _small_classifier(variant):
    torch.manual_seed(0)
    return hf.convert_bert(BertForSequenceClassification(BertConfig(**SMALL)), variant, init="random").eval()


def _small_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, SMALL["vocab_size"], (3, 9))
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4, 6])[:, None]).long()
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_plain_from_pretrained_of_a_converted_head_model(variant, tmp_path):
    converted = _small_classifier(variant)
    converted.save_pretrained(tmp_path)
    batch = _small_batch()
    expected = _logits(converted, batch)
    for cls in (BertForSequenceClassification, AutoModelForSequenceClassification):
        assert_close(_logits(cls.from_pretrained(tmp_path).eval(), batch), expected, atol=ATOL,
                     name=f"{variant} logits via {cls.__name__}.from_pretrained")
    base = BertModel.from_pretrained(tmp_path).eval()  # the base model out of a head checkpoint
    with torch.no_grad():
        expected_hidden = converted.bert(**batch).last_hidden_state
        assert_close(base(**batch).last_hidden_state, expected_hidden, atol=ATOL, name=f"{variant} base model")
    reloaded = hf.load_converted(AutoModelForSequenceClassification, tmp_path)
    assert_close(_logits(reloaded, batch), expected, atol=0.0, name=f"{variant} via load_converted")


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_state_dict_into_an_unconverted_model(variant):
    converted = _small_classifier(variant)
    batch = _small_batch()
    state = converted.state_dict()
    plain = BertForSequenceClassification(converted.config).eval()
    extras = {"symmetric": [], "pairwise_diag": ["coef"], "pairwise_full": ["coef"], "shared": ["d_q", "d_k", "d_v"]}
    if extras[variant]:
        with pytest.raises(RuntimeError, match="Unexpected key.*" + extras[variant][0]):
            plain.load_state_dict(state)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        assert not missing and sorted({k.rsplit(".", 1)[1] for k in unexpected}) == sorted(extras[variant])
    else:
        plain.load_state_dict(state)  # a symmetric checkpoint is exactly a standard one
    assert_close(_logits(plain, batch), _logits(converted, batch), atol=ATOL, name=f"{variant} state dict, plain model")


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_state_dict_round_trip_is_exact(variant):
    converted = _small_classifier(variant)
    fresh = hf.convert_bert(BertForSequenceClassification(converted.config), variant, init="random")
    fresh.load_state_dict(converted.state_dict())
    for (name, a), (_, b) in zip(converted.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    own_names = dict(converted.named_parameters())  # a state dict in the layers' own names also loads
    fresh = hf.convert_bert(BertForSequenceClassification(converted.config), variant, init="random")
    missing, _ = fresh.load_state_dict(own_names, strict=False)
    assert not [k for k in missing if ".attention.self." in k]
    assert all(torch.equal(a, b) for a, b in zip(converted.parameters(), fresh.parameters()))


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_unconverted_weights_into_a_converted_model_are_refused(variant):
    torch.manual_seed(0)
    original = BertForSequenceClassification(BertConfig(**SMALL)).eval()
    converted = hf.convert_bert(copy.deepcopy(original), variant)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=f"do not have the structure of a converted {variant} layer"):
            converted.load_state_dict(original.state_dict(), strict=strict)


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_nearly_structured_weights_are_refused_and_refolded_ones_read(variant):
    """A query that differs from the converted weights' fold by more than rounding is another
    model's (here 1e-4 of the largest weight on every element, about 2000 ulps): refused; one
    folded in another order (a last-bit change) reads back."""
    converted = _small_classifier(variant)
    queries = [k for k in converted.state_dict() if k.endswith("attention.self.query.weight")]
    torch.manual_seed(3)
    for change, readable in (("ulp", True), ("1e-4", False)):
        state = converted.state_dict()
        for name in queries:
            weight = state[name]
            if change == "ulp":
                state[name] = torch.nextafter(weight, torch.full_like(weight, float("inf")))
            else:
                state[name] = weight + 1e-4 * weight.abs().max() * torch.randn_like(weight).sign()
        target = hf.convert_bert(BertForSequenceClassification(converted.config), variant, init="random")
        if readable:
            target.load_state_dict(state)
            continue
        with pytest.raises(RuntimeError, match=f"do not have the structure of a converted {variant} layer"):
            target.load_state_dict(state)


def test_another_variants_checkpoint_is_refused(tmp_path):
    _small_classifier("pairwise_diag").save_pretrained(tmp_path)
    target = hf.convert_bert(BertForSequenceClassification(BertConfig(**SMALL)), "pairwise_full", init="random")
    with pytest.raises(RuntimeError, match="converted pairwise_full layer"):
        target.load_state_dict(BertForSequenceClassification.from_pretrained(tmp_path).state_dict())


def test_plain_from_pretrained_of_a_converted_decoder_generates_the_same(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(**SMALL, is_decoder=True, pad_token_id=0)
    converted = hf.convert_bert(BertLMHeadModel(config), "shared", init="random").eval()
    converted.save_pretrained(tmp_path)
    plain = BertLMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, SMALL["vocab_size"], (2, 5))

    def generate(model):
        return model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0)

    expected, actual = generate(converted), generate(plain)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_close(a, e, atol=ATOL, name=f"decoder logits at step {step}")
