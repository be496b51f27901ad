"""The ``torch`` backend: composite PyTorch forward and backward of every op.

It runs anywhere PyTorch does and is the float64 path. Unlike ``reference`` it does not lean on
autograd: the backward recomputes the probabilities and applies the closed-form gradients of
docs/design.md ("Gradients"), the same data flow the fused kernels follow:

    P  = softmax(S)                      recomputed, 0 where masked
    dP = (dO V^T) * keep * r             r = reference.dropout_scale(p) = 1 / (keep probability)
    G  = P * (dP - delta),               delta = rowsum(P * dP) - dlse  (= rowsum(dO * O) - dlse)
    dY = scale * (G Y M^T + G^T Y M)     (+ Pd^T dO when V = Y)
    dM = scale * Y^T G Y  (summed over batch; its diagonal for a diagonal M)

Half-precision inputs are computed in float32, float64 in float64. Varlen sequences are
gathered into groups of equal length, so memory and time follow the real lengths; they keep the
dropout counters of the varlen layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import attention_mask, dropout_keep_mask, dropout_scale


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of lse: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_padding(x: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``x`` [B, S, ...], with its padded tokens read as zeros when any of them holds NaN or Inf.

    Padded tokens are never attended to, but a kernel multiplies their zero weights with their
    stored values (0 * NaN = NaN): this keeps garbage in padding out of the real rows. Finite
    padding is left alone (no copy), so padded rows are computed from their own values then.
    """
    if x is None or key_padding_mask is None:
        return x
    pad = ~key_padding_mask
    if bool(torch.isfinite(x[pad]).all()):
        return x
    return x.masked_fill(pad.view(*pad.shape, *([1] * (x.dim() - 2))), 0.0)


class _Varlen:
    """The sequences of a varlen call grouped by length, so that work and memory follow the real
    lengths (sum of L^2), never ``max_seqlen``: group ``g`` is ``index[g]`` [n_g, L_g], the token
    rows of its n_g sequences of length L_g."""

    def __init__(self, cu_seqlens: Tensor):
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        self.total = int(cu[-1])
        self.groups = []
        for length in sorted(set(lengths.tolist())):
            if length > 0:
                starts = cu[:-1][lengths == length]
                self.groups.append(starts[:, None] + torch.arange(length, device=cu.device))


def query_operand(y: Tensor, coef: Optional[Tensor]) -> Tensor:
    """Y M for y [B, H, S, D] (coef None, [H, D] diagonal or [H, D, D] full)."""
    if coef is None:
        return y
    if coef.dim() == 2:
        return y * coef[None, :, None, :]
    return torch.einsum("bhsd,hde->bhse", y, coef)


class _Problem:
    """Inputs of one padded attention call in [B, H, S, D] compute-dtype layout. ``row_ids``
    [B, S] number the query tokens for the dropout counters (``b * S + i`` when None),
    ``n_rows`` and ``key_stride`` are the counter strides (see ``reference.dropout_keep_mask``)."""

    def __init__(self, q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self,
                 row_ids=None, n_rows=0, key_stride=0):
        batch, seqlen, num_heads, _ = q.shape
        cd = accumulate_dtype(q.dtype)
        q, v = finite_padding(q, key_padding_mask), finite_padding(v, key_padding_mask)
        self.y = q.transpose(1, 2).to(cd)
        self.values = self.y if v is None else v.transpose(1, 2).to(cd)
        self.coef = None if coef is None else coef.to(cd)
        self.query = query_operand(self.y, self.coef)
        self.scale = scale
        self.allowed = attention_mask(
            batch, seqlen, causal=causal, key_padding_mask=key_padding_mask, exclude_self=exclude_self, device=q.device
        )
        self.keep_scale = None
        if dropout_p > 0.0:
            if row_ids is None:
                row_ids = torch.arange(batch * seqlen, device=q.device).view(batch, seqlen)
                n_rows, key_stride = batch * seqlen, seqlen
            keep = dropout_keep_mask(seed, dropout_p, row_ids, n_rows, num_heads, key_stride, seqlen)
            self.keep_scale = keep.to(cd) * dropout_scale(dropout_p)

    def scores(self) -> Tensor:
        scores = self.scale * (self.query @ self.y.transpose(-1, -2))
        return scores.masked_fill(~self.allowed, float("-inf"))

    def dropped(self, probs: Tensor) -> Tensor:
        return probs if self.keep_scale is None else probs * self.keep_scale


def _forward_padded(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, *counters):
    pb = _Problem(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, *counters)
    scores = pb.scores()
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)  # rows with no allowed key
    unnormalised = torch.exp(scores - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    probs = unnormalised / row_sum.clamp_min(torch.finfo(row_sum.dtype).tiny)
    lse = row_max.squeeze(-1) + torch.log(row_sum.squeeze(-1))  # log(0) = -inf for empty rows
    out = (pb.dropped(probs) @ pb.values).transpose(1, 2).to(q.dtype)
    # Outputs of their own, as the other backends return: a view (of a transposed [B, 1, S, Dv]
    # or [B, H, 1, Dv]) refuses in-place edits that theirs accept.
    return (out.clone() if out.is_contiguous() and out._base is not None else out.contiguous()), lse


def _empty_result(q, v, cu_seqlens):
    out = q.new_zeros((*q.shape[:-1], (q if v is None else v).shape[-1]))
    if cu_seqlens is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        lse_shape = (q.shape[1], q.shape[0])
    return out, q.new_full(lse_shape, float("-inf"), dtype=accumulate_dtype(q.dtype))


def attention_forward(
    q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen, deterministic
):
    del deterministic, max_seqlen  # every composite path is deterministic; lengths come from cu_seqlens
    if cu_seqlens is None:
        if q.numel() == 0:
            return _empty_result(q, v, None)
        out, lse = _forward_padded(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self)
        return out, lse.to(accumulate_dtype(q.dtype))
    out, lse = _empty_result(q, v, cu_seqlens)
    vl = _Varlen(cu_seqlens)
    for index in vl.groups:
        out_g, lse_g = _forward_padded(
            q[index], None if v is None else v[index], coef, None, seed, scale, causal, dropout_p, exclude_self,
            index, vl.total, vl.total,
        )
        out[index] = out_g
        lse[:, index] = lse_g.transpose(0, 1).to(lse.dtype)
    return out, lse


def _backward_padded(dout, dlse, q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self,
                     *counters):
    """Returns (dy [B, S, H, D], dv [B, S, H, Dv] or None, dcoef or None) in compute dtype.

    Probabilities come back from a fresh softmax in the compute dtype, and delta = rowsum(P * dP)
    from them: equal to rowsum(dO * O) in exact arithmetic, but free of the rounding of O to
    the input dtype, which dominates G where one key (the token itself, as q = k) takes most
    of a row's weight.
    """
    pb = _Problem(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, *counters)
    cd = pb.y.dtype
    scores = pb.scores()
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    unnormalised = torch.exp(scores - row_max)
    probs = unnormalised / unnormalised.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
    dout = dout.transpose(1, 2).to(cd)
    dvalues = pb.dropped(probs).transpose(-1, -2) @ dout
    dprobs = pb.dropped(dout @ pb.values.transpose(-1, -2))
    delta = (probs * dprobs).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(cd)[..., None]
    grad_scores = probs * (dprobs - delta)
    dquery = pb.scale * (grad_scores @ pb.y)  # gradient of the query-side operand Y M
    dy = pb.scale * (grad_scores.transpose(-1, -2) @ pb.query)
    dcoef = None
    if pb.coef is None:
        dy = dy + dquery
    elif pb.coef.dim() == 2:
        dy = dy + dquery * pb.coef[None, :, None, :]
        dcoef = (pb.y * dquery).sum(dim=(0, 2))
    else:
        dy = dy + torch.einsum("bhse,hde->bhsd", dquery, pb.coef)
        dcoef = torch.einsum("bhsd,bhse->hde", pb.y, dquery)
    if v is None:
        return (dy + dvalues).transpose(1, 2), None, dcoef
    return dy.transpose(1, 2), dvalues.transpose(1, 2), dcoef


def attention_backward(
    dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, dq, dv, dcoef,
    scale, causal, dropout_p, exclude_self, max_seqlen, deterministic,
):
    del deterministic, max_seqlen, out, lse  # the softmax is recomputed (see _backward_padded)
    if cu_seqlens is None:
        if q.numel() == 0:
            dy, dvalues, dc = torch.zeros_like(q), None if v is None else torch.zeros_like(v), None
            dc = None if coef is None else torch.zeros_like(coef)
        else:
            dy, dvalues, dc = _backward_padded(
                dout, dlse, q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self
            )
    else:
        dy, dvalues = torch.zeros_like(q), None if v is None else torch.zeros_like(v)
        dc = None if coef is None else torch.zeros_like(coef, dtype=accumulate_dtype(q.dtype))
        vl = _Varlen(cu_seqlens)
        for index in vl.groups:
            dy_g, dv_g, dc_g = _backward_padded(
                dout[index], None if dlse is None else dlse[:, index].transpose(0, 1), q[index],
                None if v is None else v[index], coef, None, seed, scale, causal, dropout_p, exclude_self,
                index, vl.total, vl.total,
            )
            dy[index] = dy_g.to(dy.dtype)
            if dvalues is not None:
                dvalues[index] = dv_g.to(dvalues.dtype)
            if dc is not None:
                dc += dc_g
    dq.copy_(dy)
    if dv is not None:
        dv.copy_(dvalues)
    if dcoef is not None:
        dcoef.copy_(dc)


def _lowrank_parts(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    """Forward intermediates of LAMA in compute dtype; see reference.lowrank_context_attention."""
    cd = accumulate_dtype(h.dtype)
    h, u = finite_padding(h, key_padding_mask), finite_padding(u, key_padding_mask)
    h, p, q = h.to(cd), p.to(cd), q.to(cd)
    u = h if u is None else u.to(cd)
    ctx = context.to(cd)
    ctx = ctx if ctx.dim() == 2 else ctx[None].expand(h.shape[0], -1)
    gate = ctx @ p  # [B, m]
    keys = u @ q  # [B, T, m]
    act = torch.tanh(gate[:, None, :] * keys)
    norm = act.norm(dim=-1, keepdim=True).clamp_min(eps) if head_norm == "l2" else None
    feats = act if norm is None else act / norm
    scores = feats.transpose(1, 2)  # [B, m, T]
    real = None if key_padding_mask is None else key_padding_mask[:, None, :]
    if token_softmax:
        if real is not None:
            scores = scores.masked_fill(~real, float("-inf"))
        # Every score lies in [-1, 1] (tanh, then a unit-norm vector's entry): 1 is a fixed
        # stabiliser, with no max pass to trip over T = 0, and a NaN score stays NaN.
        unnormalised = torch.exp(scores - 1.0)
        attn = unnormalised / unnormalised.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
    else:
        attn = scores if real is None else scores.masked_fill(~real, 0.0)
    return dict(h=h, u=u, p=p, q=q, ctx=ctx, gate=gate, keys=keys, act=act, norm=norm, feats=feats, attn=attn, real=real)


def lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    parts = _lowrank_parts(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps)
    attn = parts["attn"]
    # attn comes from transposed features: [B, m, T] contiguous, the strides the fake function
    # declares (and the other backends return).
    return (attn @ parts["h"]).to(h.dtype), attn.to(h.dtype).contiguous()


def lowrank_backward(
    dpooled, dattn, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, dh, dcontext, dp, dq, du,
    pooled=None, attn=None,
):
    """Closed-form LAMA gradients, written into dh, dcontext, dp, dq and du (when given)."""
    del pooled, attn  # the forward's results (ops saves them for backends that use them): recomputed here
    parts = _lowrank_parts(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps)
    cd = parts["h"].dtype
    attn = parts["attn"]
    dpooled = dpooled.to(cd)
    dA = dpooled @ parts["h"].transpose(1, 2)  # [B, m, T]
    if dattn is not None:
        dA = dA + dattn.to(cd)
    grad_h = attn.transpose(1, 2) @ dpooled  # [B, T, E]
    if token_softmax:
        dscores = attn * (dA - (dA * attn).sum(dim=-1, keepdim=True))
    else:
        dscores = dA if parts["real"] is None else dA.masked_fill(~parts["real"], 0.0)
    dfeats = dscores.transpose(1, 2)  # [B, T, m]
    if parts["norm"] is None:
        dact = dfeats
    else:
        feats, norm = parts["feats"], parts["norm"]
        clamped = norm <= eps  # F.normalize's clamp: the norm is a constant there
        radial = (feats * dfeats).sum(dim=-1, keepdim=True)
        dact = torch.where(clamped, dfeats, dfeats - feats * radial) / norm
    dz = dact * (1.0 - parts["act"] ** 2)
    dgate = (dz * parts["keys"]).sum(dim=1)  # [B, m]
    dkeys = dz * parts["gate"][:, None, :]  # [B, T, m]
    grad_u = dkeys @ parts["q"].transpose(0, 1)
    if u is None:
        grad_h = grad_h + grad_u
    if dh is not None:
        dh.copy_(grad_h)
    if du is not None:
        du.copy_(grad_u)
    if dq is not None:
        dq.copy_(torch.einsum("bte,btm->em", parts["u"], dkeys))
    if dp is not None:
        dp.copy_(parts["ctx"].transpose(0, 1) @ dgate)
    if dcontext is not None:
        grad_ctx = dgate @ parts["p"].transpose(0, 1)  # [B, E]
        dcontext.copy_(grad_ctx if context.dim() == 2 else grad_ctx.sum(dim=0))


