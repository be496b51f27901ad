"""ONNX export: the ``symattn::`` forward ops written in standard ONNX operators.

``torch.onnx.export(..., dynamo=True)`` keeps ``symattn::attention_fwd`` and
``symattn::lowrank_fwd`` as single graph nodes and needs a translation for each; this module
writes them with ONNX Script as the math of ``symattn_kernels.reference`` (MatMul, Transpose,
masks, a softmax that gives 0 on a row with no allowed key), so the exported model runs on any
ONNX runtime without custom operators::

    program = torch.onnx.export(model.eval(), (input_ids, attention_mask), "model.onnx", dynamo=True,
                                custom_translation_table=symattn_kernels.onnx_translation_table())

The table has to be passed on every export: torch builds the exporter's operator registry anew
on each call and has no public hook that a package could extend at import.

Inference only. Dropout has no ONNX counterpart here (the kernels draw their own Philox mask), so
a graph that still carries ``dropout_p > 0`` (a model exported in training mode) is refused;
``model.eval()`` first. Needs ``onnxscript``: ``pip install symattn_kernels[onnx]``, which also
brings ``onnxruntime``.
"""

from __future__ import annotations

import math
from functools import reduce

import torch

try:
    from onnxscript import ir
    from onnxscript import opset18 as op
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "symattn_kernels ONNX export needs onnxscript: pip install symattn_kernels[onnx]"
    ) from error

__all__ = ["onnx_translation_table"]

_MOVE_HEADS = [0, 2, 1, 3]  # [B, S, H, D] <-> [B, H, S, D]
_LAST = [-1]
_INT64_MAX = 2**63 - 1


def onnx_translation_table() -> dict:
    """Translations of the ``symattn::`` forward ops into standard ONNX operators.

    Pass the result as ``custom_translation_table`` to ``torch.onnx.export(..., dynamo=True)``
    (also when exporting a ``torch.export.ExportedProgram``). The exported graph computes what
    ``symattn_kernels.reference`` does: every coefficient mode, shared or separate values,
    ``scale``, ``causal``, ``exclude_self``, the key padding mask and packed (varlen) sequences; a
    query row with no allowed key gives 0, a sequence with no real token pools to 0. Arithmetic
    runs in float32 (float64 for float64 models); outputs come back in the model's dtype.

    Returns:
        dict: ``{torch.ops.symattn.attention_fwd.default: ..., torch.ops.symattn.lowrank_fwd.default: ...}``.

    Raises (at export):
        ValueError: for ``dropout_p > 0``: export the model in eval mode.
    """
    return {
        torch.ops.symattn.attention_fwd.default: attention_fwd,
        torch.ops.symattn.lowrank_fwd.default: lowrank_fwd,
    }


def _accumulate(x, dtype):
    """``x`` in the arithmetic's dtype (float32, or float64 for float64 models), as the kernels."""
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _accumulate_dtype(x):
    return ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _scalar(value: float, dtype):
    # Made in its own dtype: a Python float would become a float32 constant first, which
    # rounds a float64 model's scale.
    return op.Constant(value=ir.tensor(value, dtype=dtype))


def _masked_softmax(scores, allowed, dtype):
    """Softmax over the last axis where ``allowed`` (bool, broadcastable; None = all), and the
    natural log-sum-exp. A row with no allowed entry gives probabilities 0 and lse -inf, never NaN."""
    if allowed is not None:
        scores = op.Where(allowed, scores, _scalar(-math.inf, dtype))
    row_max = op.ReduceMax(scores, _LAST, keepdims=1)
    zero = _scalar(0.0, dtype)
    # An empty row's max is -inf, and -inf - (-inf) is NaN: shift such rows by 0 instead.
    row_max = op.Where(op.IsInf(row_max, detect_positive=0), zero, row_max)
    weights = op.Exp(op.Sub(scores, row_max))  # exp(-inf) = 0 on masked entries
    total = op.ReduceSum(weights, _LAST, keepdims=1)
    probs = op.Div(weights, op.Where(op.Equal(total, zero), _scalar(1.0, dtype), total))
    lse = op.Add(op.Log(total), row_max)  # log(0) = -inf on empty rows
    return probs, op.Squeeze(lse, _LAST)


def _allowed_pairs(q, key_padding_mask, cu_seqlens, causal: bool, exclude_self: bool):
    """The reference's ``attention_mask`` in ONNX: bool broadcastable to [B, 1, S, S], or None
    when every pair is allowed. ``q`` is [B, S, H, D]; with ``cu_seqlens`` B is 1 and S the
    packed tokens, of which only those of one sequence see each other."""
    conditions, allowed = [], None
    if causal or exclude_self or cu_seqlens is not None:
        seqlen = op.Squeeze(op.Shape(q, start=1, end=2))
        idx = op.Range(op.Constant(value_int=0), seqlen, op.Constant(value_int=1))
        query_idx, key_idx = op.Unsqueeze(idx, [1]), op.Unsqueeze(idx, [0])  # [S, 1], [1, S]
    if cu_seqlens is not None:
        ends = op.Slice(cu_seqlens, op.Constant(value_ints=[1]), op.Constant(value_ints=[_INT64_MAX]))
        ended = op.GreaterOrEqual(query_idx, op.Unsqueeze(op.Cast(ends, to=ir.DataType.INT64), [0]))  # [S, B]
        # Sequence number of each token: how many sequences end at or before it.
        sequence = op.ReduceSum(op.Cast(ended, to=ir.DataType.INT64), _LAST, keepdims=1)  # [S, 1]
        conditions.append(op.Equal(sequence, op.Transpose(sequence, perm=[1, 0])))  # [S, S]
    if causal:
        conditions.append(op.LessOrEqual(key_idx, query_idx))  # [S, S]
    if key_padding_mask is not None:
        conditions.append(op.Unsqueeze(key_padding_mask, [1, 2]))  # [B, 1, 1, S]
    if conditions:
        allowed = reduce(op.And, conditions)
    if exclude_self:
        self_pair = op.Equal(query_idx, key_idx)
        others = op.Not(self_pair) if allowed is None else op.And(allowed, op.Not(self_pair))
        own = self_pair if allowed is None else op.And(allowed, self_pair)
        count = op.ReduceSum(op.Cast(others, to=ir.DataType.INT64), _LAST, keepdims=1)
        allowed = op.Or(others, op.And(own, op.Equal(count, op.Constant(value_int=0))))
    return allowed


def attention_fwd(
    q,
    v=None,
    coef=None,
    key_padding_mask=None,
    cu_seqlens=None,
    seed=None,
    scale: float = 1.0,
    causal: bool = False,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    max_seqlen: int = 0,
    deterministic: bool = True,
    backend: str = "auto",
):
    """``symattn::attention_fwd`` in ONNX: (out [B, S, H, Dv], lse [B, H, S], an empty residual), or
    for varlen input (out [total, H, Dv], lse [H, total], an empty residual). ``seed``,
    ``max_seqlen``, ``deterministic`` and ``backend`` do not change the inference result (the
    residual, which only the CPU kernels keep, for long half-precision heads, is always empty here)."""
    if dropout_p > 0.0:
        raise ValueError(
            f"symattn::attention_fwd with dropout_p = {dropout_p} has no ONNX translation (inference "
            "only): call model.eval() before torch.onnx.export"
        )
    dtype = _accumulate_dtype(q)
    packed = cu_seqlens is not None
    if packed:  # one batch row holding every sequence; the mask keeps them apart
        q = op.Unsqueeze(q, [0])
        v = None if v is None else op.Unsqueeze(v, [0])
    y = op.Transpose(_accumulate(q, dtype), perm=_MOVE_HEADS)  # [B, H, S, D]
    values = y if v is None else op.Transpose(_accumulate(v, dtype), perm=_MOVE_HEADS)
    query = y
    if coef is not None:
        diagonal = len(coef.shape) == 2
        coef = _accumulate(coef, dtype)
        if diagonal:  # [H, D] -> [1, H, 1, D]
            query = op.Mul(y, op.Unsqueeze(coef, [0, 2]))
        else:  # [H, D, D] -> [1, H, D, D]
            query = op.MatMul(y, op.Unsqueeze(coef, [0]))
    scores = op.Mul(op.MatMul(query, op.Transpose(y, perm=[0, 1, 3, 2])), _scalar(scale, dtype))
    allowed = _allowed_pairs(q, key_padding_mask, cu_seqlens, causal, exclude_self)
    probs, lse = _masked_softmax(scores, allowed, dtype)
    if key_padding_mask is not None:
        # Values stored at padded tokens never reach a row: P is 0 there, but 0 * NaN is NaN.
        values = op.Where(op.Unsqueeze(key_padding_mask, [1, 3]), values, _scalar(0.0, dtype))
    out = op.CastLike(op.Transpose(op.MatMul(probs, values), perm=_MOVE_HEADS), q)
    residual = op.CastLike(op.Constant(value=ir.tensor([], dtype=dtype)), q)
    if packed:
        return op.Squeeze(out, [0]), op.Squeeze(lse, [0]), residual
    return out, lse, residual


def lowrank_fwd(
    h,
    context,
    p,
    q,
    u=None,
    key_padding_mask=None,
    head_norm: str = "l2",
    token_softmax: bool = True,
    eps: float = 1e-12,
    backend: str = "auto",
):
    """``symattn::lowrank_fwd`` (LAMA pooling) in ONNX: (pooled [B, m, E], attn [B, m, T])."""
    dtype = _accumulate_dtype(h)
    states = _accumulate(h, dtype)
    keys = states if u is None else _accumulate(u, dtype)
    shared_context = len(context.shape) == 1
    context = _accumulate(context, dtype)
    if shared_context:
        context = op.Unsqueeze(context, [0])  # one context for the batch: [1, E]
    gate = op.Unsqueeze(op.MatMul(context, _accumulate(p, dtype)), [1])  # [B, 1, m]
    feats = op.Tanh(op.Mul(gate, op.MatMul(keys, _accumulate(q, dtype))))  # [B, T, m]
    if head_norm == "l2":
        norm = op.ReduceL2(feats, _LAST, keepdims=1)
        feats = op.Div(feats, op.Max(norm, _scalar(eps, dtype)))
    scores = op.Transpose(feats, perm=[0, 2, 1])  # [B, m, T]
    real = None if key_padding_mask is None else op.Unsqueeze(key_padding_mask, [1])  # [B, 1, T]
    if token_softmax:
        attn, _ = _masked_softmax(scores, real, dtype)
    else:
        attn = scores if real is None else op.Where(real, scores, _scalar(0.0, dtype))
    if key_padding_mask is not None:  # padded states never reach pooled (attn is 0 there; 0 * inf is NaN)
        states = op.Where(op.Unsqueeze(key_padding_mask, [2]), states, _scalar(0.0, dtype))
    pooled = op.MatMul(attn, states)
    return op.CastLike(pooled, h), op.CastLike(attn, h)
