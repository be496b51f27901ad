"""ONNX export: the translations of the ``symattn::`` ops against the fp64 reference in
onnxruntime, converted BERT models and LAMA against PyTorch, dynamic batch and sequence axes,
the ``torch.export`` round trip, and the refusal of dropout."""

import itertools
import sys

import pytest
import torch
from torch.export import Dim

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime: pip install .[onnx]")
pytest.importorskip("onnxscript", reason="ONNX export tests need onnxscript: pip install .[onnx]")
pytest.importorskip("transformers", reason="the converted-model tests need transformers: pip install .[hf]")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import symattn_kernels as sk  # noqa: E402
from symattn_kernels import reference as R  # noqa: E402
from symattn_kernels.integrations import hf  # noqa: E402
from symattn_kernels.lama import LAMAClassifier, LowRankContextAttention  # noqa: E402

from .attention_checks import assert_close  # noqa: E402

F64 = torch.float64
ATOL = 1e-5  # fp32 graph vs fp64 reference / fp32 PyTorch
# Named axes: the export fails if tracing fixed one to the example's size.
BATCH_SEQ = {0: Dim("batch"), 1: Dim("sequence", max=512)}


def _export(module, args, dynamic_shapes=None):
    program = torch.onnx.export(
        module, args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
        custom_translation_table=sk.onnx_translation_table(),
    )
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, *inputs):
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def _padding(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


def test_translation_table_is_public_and_names_its_extra(monkeypatch):
    table = sk.onnx_translation_table()
    assert set(table) == {torch.ops.symattn.attention_fwd.default, torch.ops.symattn.lowrank_fwd.default}
    with pytest.raises(AttributeError, match="no_such_name"):
        sk.no_such_name  # noqa: B018
    # Without onnxscript the table is out of reach, with the command that installs it.
    monkeypatch.delitem(sys.modules, "symattn_kernels.integrations.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install symattn_kernels\[onnx\]"):
        sk.onnx_translation_table()


class _AttentionGrid(torch.nn.Module):
    """Every (values, causal, exclude_self) combination for one coef mode, in one graph."""

    CASES = list(itertools.product(("shared", "separate"), (False, True), (False, True)))

    def __init__(self, coef, scale):
        super().__init__()
        self.coef, self.scale = coef, scale

    def forward(self, q, v, key_padding_mask):
        outs = []
        for values, causal, exclude_self in self.CASES:
            outs += sk.symmetric_attention(
                q, v if values == "separate" else None, coef=self.coef, scale=self.scale, causal=causal,
                key_padding_mask=key_padding_mask, exclude_self=exclude_self, return_lse=True,
            )
        return tuple(outs)


def _attention_inputs(B, S, H=2, D=8, Dv=5, lengths=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, v = torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, Dv, generator=gen)
    return q, v, _padding(lengths or [S] * B, S)


@pytest.mark.parametrize("coef_mode", [None, "diag", "full"], ids=["coef_none", "coef_diag", "coef_full"])
def test_attention_translation_matches_reference(coef_mode):
    H, D = 2, 8
    gen = torch.Generator().manual_seed(1)
    coefs = {None: None, "diag": torch.randn(H, D, generator=gen), "full": torch.randn(H, D, D, generator=gen)}
    coef = coefs[coef_mode]
    scale = None if coef_mode is None else 0.3
    grid = _AttentionGrid(coef, scale).eval()
    # Sequence 1 is padded, sequence 2 has no real token (its rows must come out 0, lse -inf).
    example = _attention_inputs(3, 7, H, D, lengths=[7, 4, 0])
    session = _export(grid, example, dynamic_shapes=(BATCH_SEQ,) * 3)
    for inputs in (example, _attention_inputs(2, 11, H, D, lengths=[1, 9], seed=2), _attention_inputs(1, 1, H, D)):
        q, v, mask = inputs
        actual = _run(session, *inputs)
        for i, (values, causal, exclude_self) in enumerate(_AttentionGrid.CASES):
            out, lse = R.symmetric_attention(
                q.to(F64), v.to(F64) if values == "separate" else None, coef=None if coef is None else coef.to(F64),
                scale=scale, causal=causal, key_padding_mask=mask, exclude_self=exclude_self, return_lse=True,
            )
            name = f"{values} causal={causal} exclude_self={exclude_self} shape={tuple(q.shape)}"
            assert_close(actual[2 * i], out, atol=ATOL, name=f"out {name}")
            assert_close(actual[2 * i + 1], lse, atol=ATOL, name=f"lse {name}")


class _OneOfEach(torch.nn.Module):
    """One attention call (full coef, separate values, causal, padding) and one LAMA call."""

    def forward(self, q, v, coef, h, context, p, key_padding_mask):
        out, lse = sk.symmetric_attention(q, v, coef=coef, causal=True, key_padding_mask=key_padding_mask,
                                          return_lse=True)
        return (out, lse, *sk.lowrank_context_attention(h, context, p, p, key_padding_mask=key_padding_mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_translation_keeps_dtype(dtype):
    half = dtype == torch.float16
    # Half inputs are computed in float32 and rounded once at the end: within half an ulp. Their
    # lse stays float32, as the op's.
    tol = dict(atol=1e-4, rtol=1e-3) if half else dict(atol=1e-12)
    lse_dtype, lse_tol = (torch.float32, dict(atol=ATOL)) if half else (dtype, tol)
    gen = torch.Generator().manual_seed(7)
    shapes = ((2, 5, 2, 8), (2, 5, 2, 8), (2, 8, 8), (2, 5, 6), (2, 6), (6, 3))
    q, v, coef, h, context, p = (torch.randn(*shape, generator=gen).to(dtype) for shape in shapes)
    mask = _padding([5, 2], 5)
    inputs = (q, v, coef, h, context, p, mask)
    actual = _run(_export(_OneOfEach().eval(), inputs), *inputs)
    q, v, coef, h, context, p = (x.to(F64) for x in inputs[:-1])
    expected = (*R.symmetric_attention(q, v, coef=coef, causal=True, key_padding_mask=mask, return_lse=True),
                *R.lowrank_context_attention(h, context, p, p, key_padding_mask=mask))
    assert [x.dtype for x in actual] == [dtype, lse_dtype, dtype, dtype]
    for name, got, ref in zip(("out", "lse", "pooled", "attn"), actual, expected):
        assert_close(got, ref, name=f"{name} {dtype}", **(lse_tol if name == "lse" else tol))


class _VarlenOp(torch.nn.Module):
    # The public function: under export its check of the offsets' values becomes an assertion
    # the exported program runs (torch._assert_async).
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, v, cu_seqlens):
        return sk.symmetric_attention_varlen(q, v, cu_seqlens, 8, causal=self.causal, exclude_self=True,
                                             return_lse=True, backend="torch")


@pytest.mark.parametrize("causal, dtype", [(False, F64), (True, torch.float32)], ids=["full-fp64", "causal-fp32"])
def test_varlen_translation_matches_reference(causal, dtype):
    gen = torch.Generator().manual_seed(3)
    q, v = torch.randn(12, 2, 8, generator=gen).to(dtype), torch.randn(12, 2, 5, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0, 5, 5, 12, 12], dtype=torch.int32)  # lengths 5, 0, 7, 0
    session = _export(_VarlenOp(causal), (q, v, cu_seqlens))
    out, lse = _run(session, q, v, cu_seqlens)
    ref_out, ref_lse = R.symmetric_attention_varlen(
        q.to(F64), v.to(F64), cu_seqlens, 8, causal=causal, exclude_self=True, return_lse=True,
    )
    atol = 1e-12 if dtype == F64 else ATOL
    assert out.dtype == lse.dtype == dtype
    assert_close(out, ref_out, atol=atol, name=f"varlen out {dtype}")
    assert_close(lse, ref_lse, atol=atol, name=f"varlen lse {dtype}")


class _LamaGrid(torch.nn.Module):
    """LowRankContextAttention in every option combination, one graph; h is also the u of the
    even-numbered layers."""

    CASES = list(itertools.product(("learned", "mean"), ("l2", None), (True, False)))

    def __init__(self, dim, heads):
        super().__init__()
        torch.manual_seed(4)
        self.layers = torch.nn.ModuleList(
            LowRankContextAttention(dim, heads, context=context, head_norm=norm, token_softmax=softmax)
            for context, norm, softmax in self.CASES
        )

    def forward(self, h, u, key_padding_mask):
        outs = []
        for i, layer in enumerate(self.layers):
            outs += layer(h, key_padding_mask, u=None if i % 2 == 0 else u)
        return tuple(outs)


def test_lama_translation_matches_reference():
    gen = torch.Generator().manual_seed(5)
    grid = _LamaGrid(dim=6, heads=3).eval()

    def inputs(B, T, lengths):
        return torch.randn(B, T, 6, generator=gen), torch.randn(B, T, 6, generator=gen), _padding(lengths, T)

    example = inputs(3, 7, [7, 3, 0])  # a padded sequence and one with no real token
    session = _export(grid, example, dynamic_shapes=(BATCH_SEQ,) * 3)
    for h, u, mask in (example, inputs(2, 10, [1, 10])):
        actual = _run(session, h, u, mask)
        for i, (layer, case) in enumerate(zip(grid.layers, _LamaGrid.CASES)):
            context = layer.context if layer.context is not None else sk.lama.masked_mean(h.to(F64), mask)
            pooled, attn = R.lowrank_context_attention(
                h.to(F64), context.detach().to(F64), layer.p.detach().to(F64), layer.q.detach().to(F64),
                u=None if i % 2 == 0 else u.to(F64), key_padding_mask=mask, head_norm=case[1], token_softmax=case[2],
            )
            name = f"context={case[0]} head_norm={case[1]} token_softmax={case[2]} u={i % 2 == 1} T={h.shape[1]}"
            assert_close(actual[2 * i], pooled, atol=ATOL, name=f"pooled {name}")
            assert_close(actual[2 * i + 1], attn, atol=ATOL, name=f"attn {name}")


def test_lama_classifier_exports_at_fixed_length_without_mask():
    # torch.export fixes nn.GRU's sequence length and cannot trace packed sequences (a mask).
    torch.manual_seed(6)
    model = LAMAClassifier(vocab_size=50, embed_dim=8, hidden_size=6, num_heads=3, num_classes=4).eval()
    session = _export(model, (torch.randint(1, 50, (2, 7)),), dynamic_shapes=({0: Dim("batch")},))
    for batch in (2, 5):
        ids = torch.randint(1, 50, (batch, 7))
        (logits,) = _run(session, ids)
        with torch.no_grad():
            assert_close(logits, model(ids), atol=ATOL, name=f"LAMAClassifier logits, batch {batch}")


# Converted Hugging Face models: the export call of the README, outputs against PyTorch.
SMALL_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  num_labels=3, initializer_range=0.15)  # peaked attention, so a wrong score shows


def _bert_batch(lengths, seqlen, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = _padding(lengths, seqlen).long()
    return torch.randint(3, 100, mask.shape, generator=gen).masked_fill(mask == 0, 0), mask


def _converted_bert(variant):
    torch.manual_seed(0)
    return hf.convert_bert(BertForSequenceClassification(BertConfig(**SMALL_BERT)), variant, init="random").eval()


def _assert_logits_match(session, model, batches, variant):
    for ids, mask in batches:
        (logits,) = _run(session, ids, mask)
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
        assert_close(logits, expected, atol=ATOL, name=f"{variant} logits, batch {tuple(ids.shape)}")


BATCHES = [((9, 4, 6), 9, 0), ((2, 13), 13, 1), ((1,), 1, 2)]  # (lengths, padded length, seed)


@pytest.mark.slow
@pytest.mark.parametrize("variant", hf.VARIANTS)
def test_converted_bert_exports_to_onnx(variant, tmp_path):
    model = _converted_bert(variant)
    ids, mask = _bert_batch(*BATCHES[0])
    path = tmp_path / "model.onnx"
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, (ids, mask), path, dynamo=True, verbose=False, dynamic_shapes=(axes, axes),
                      custom_translation_table=sk.onnx_translation_table())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [arg.name for arg in session.get_inputs()] == ["input_ids", "attention_mask"]
    _assert_logits_match(session, model, [_bert_batch(*b) for b in BATCHES], variant)


@pytest.mark.slow
def test_torch_export_round_trip_then_onnx(tmp_path):
    model = _converted_bert("pairwise_full")
    ids, mask = _bert_batch(*BATCHES[0])
    program = torch.export.export(model, (ids,), {"attention_mask": mask},
                                  dynamic_shapes={"input_ids": BATCH_SEQ, "attention_mask": BATCH_SEQ})
    assert any(node.target == torch.ops.symattn.attention_fwd.default for node in program.graph.nodes)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    batches = [_bert_batch(*b) for b in BATCHES]
    for ids2, mask2 in batches:
        with torch.no_grad():
            expected = model(ids2, attention_mask=mask2).logits
        assert_close(loaded.module()(ids2, attention_mask=mask2).logits, expected, atol=ATOL,
                     name=f"reloaded program, batch {tuple(ids2.shape)}")
    onnx_program = torch.onnx.export(loaded, dynamo=True, verbose=False,
                                     custom_translation_table=sk.onnx_translation_table())
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    _assert_logits_match(session, model, batches, "pairwise_full from the reloaded program")


def test_training_mode_dropout_is_refused():
    model = _converted_bert("symmetric").train()  # BERT's attention dropout is 0.1: the converted layers keep it
    ids, mask = _bert_batch(*BATCHES[0])
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match=r"dropout_p = 0\.1 .*model\.eval\(\)"):
        torch.onnx.export(model, (ids, mask), dynamo=True, verbose=False,
                          custom_translation_table=sk.onnx_translation_table())


def test_standard_module_exports_zero_for_a_row_with_no_allowed_key():
    # onnxruntime's attention gives such a row the mean of the values; the module sets it to 0,
    # as its eager forward and the symmetric modules do.
    from symattn_kernels.modules import StandardSelfAttention

    torch.manual_seed(0)
    module = StandardSelfAttention(8, 2).eval()
    x, mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool)
    session = _export(module, (x, mask))
    mask[1] = False
    (out,) = _run(session, x, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    with torch.no_grad():
        assert_close(out, module(x, mask), atol=ATOL, name="StandardSelfAttention through onnxruntime")


def test_float_mask_export_says_to_pass_a_bool_mask():
    # A float mask is read by value (0/1 or additive): the export stops with that reason, not with
    # torch.export's data-dependent guard error.
    from symattn_kernels.modules import SymmetricSelfAttention

    module = SymmetricSelfAttention(8, 2).eval()
    with pytest.raises(torch.onnx.errors.OnnxExporterError,
                       match=r"read by value .*pass a bool or integer \[B, S\] attention_mask"):
        _export(module, (torch.randn(2, 6, 8), torch.ones(2, 6)))


def test_non_finite_padding_never_reaches_real_rows():
    # Padded tokens holding NaN or inf (fp16 overflow, NaN-filled padding) leave the real rows as
    # eager leaves them: the graph zeroes padded values and states (P is 0 there, but 0 * NaN is NaN).
    gen = torch.Generator().manual_seed(7)
    q, v, mask = _attention_inputs(2, 6, lengths=[6, 4], seed=3)
    h, context, p = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(8, 3, generator=gen)
    coef = torch.randn(2, 8, 8, generator=gen)
    session = _export(_OneOfEach().eval(), (q, v[..., :8], coef, h, context, p, mask))
    padded = ~mask
    for bad in (float("nan"), float("inf")):
        dirty = [t.masked_fill(padded[..., None, None] if t.dim() == 4 else padded[..., None], bad)
                 for t in (q, v[..., :8], h)]
        actual = _run(session, dirty[0], dirty[1], coef, dirty[2], context, p, mask)
        clean = _run(session, q, v[..., :8], coef, h, context, p, mask)
        out_real = mask[:, :, None, None].expand_as(actual[0])
        assert torch.equal(actual[0][out_real], clean[0][out_real]), f"out, padding = {bad}"
        lse_real = mask[:, None, :].expand_as(actual[1])
        assert torch.equal(actual[1][lse_real], clean[1][lse_real]), f"lse, padding = {bad}"
        for name, a, c in zip(("pooled", "attn"), actual[2:], clean[2:]):
            assert torch.equal(a, c), f"{name}, padding = {bad}"
