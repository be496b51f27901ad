"""The ``torch`` backend: composite PyTorch forward and backward of every op.

It runs anywhere PyTorch does and is the float64 path. Unlike ``reference`` it does not lean on
autograd: the backward recomputes the probabilities from the saved log-sum-exp and applies the
closed-form gradients of docs/design.md ("Gradients"), the same data flow the fused kernels follow:

    P  = exp(S - lse)                    recomputed, 0 where masked
    dP = (dO V^T) * keep / (1 - p)
    G  = P * (dP - delta),               delta = rowsum(dO * O) - dlse
    dY = scale * (G Y M^T + G^T Y M)     (+ Pd^T dO when V = Y)
    dM = scale * Y^T G Y  (summed over batch; its diagonal for a diagonal M)

Half-precision inputs are computed in float32, float64 in float64. The varlen layout is padded
to [B, max_seqlen] and unpadded again, keeping the dropout counters of the varlen layout.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import attention_mask, dropout_keep_mask


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and of lse: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Varlen:
    """Index maps between the varlen layout [total, ...] and a padded [B, max_seqlen, ...] one."""

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int):
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        self.total = int(cu[-1])
        self.batch = lengths.numel()
        self.max_seqlen = max_seqlen
        positions = torch.arange(max_seqlen, device=cu.device)
        self.real = positions[None, :] < lengths[:, None]  # [B, max_seqlen]
        self.batch_idx, self.pos_idx = self.real.nonzero(as_tuple=True)
        self.row_ids = cu[:-1, None] + positions[None, :]

    def pad(self, x: Tensor) -> Tensor:
        padded = x.new_zeros(self.batch, self.max_seqlen, *x.shape[1:])
        padded[self.batch_idx, self.pos_idx] = x
        return padded

    def unpad(self, x: Tensor) -> Tensor:
        return x[self.batch_idx, self.pos_idx]

    def pad_lse(self, lse: Tensor) -> Tensor:  # [H, total] -> [B, H, max_seqlen]
        return self.pad(lse.transpose(0, 1)).transpose(1, 2)

    def unpad_lse(self, lse: Tensor) -> Tensor:  # [B, H, max_seqlen] -> [H, total]
        return self.unpad(lse.transpose(1, 2)).transpose(0, 1).contiguous()


def _query_operand(y: Tensor, coef: Optional[Tensor]) -> Tensor:
    """Y M for y [B, H, S, D]."""
    if coef is None:
        return y
    if coef.dim() == 2:
        return y * coef[None, :, None, :]
    return torch.einsum("bhsd,hde->bhse", y, coef)


class _Problem:
    """Inputs of one padded attention call in [B, H, S, D] compute-dtype layout."""

    def __init__(self, q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, row_ids, n_rows):
        batch, seqlen, num_heads, _ = q.shape
        cd = accumulate_dtype(q.dtype)
        self.y = q.transpose(1, 2).to(cd)
        self.values = self.y if v is None else v.transpose(1, 2).to(cd)
        self.coef = None if coef is None else coef.to(cd)
        self.query = _query_operand(self.y, self.coef)
        self.scale = scale
        self.allowed = attention_mask(
            batch, seqlen, causal=causal, key_padding_mask=key_padding_mask, exclude_self=exclude_self, device=q.device
        )
        self.keep_scale = None
        if dropout_p > 0.0:
            if row_ids is None:
                row_ids = torch.arange(batch * seqlen, device=q.device).view(batch, seqlen)
                n_rows = batch * seqlen
            keep = dropout_keep_mask(seed, dropout_p, row_ids, n_rows, num_heads, seqlen, seqlen)
            self.keep_scale = keep.to(cd) / (1.0 - dropout_p)

    def scores(self) -> Tensor:
        scores = self.scale * (self.query @ self.y.transpose(-1, -2))
        return scores.masked_fill(~self.allowed, float("-inf"))

    def dropped(self, probs: Tensor) -> Tensor:
        return probs if self.keep_scale is None else probs * self.keep_scale


def _forward_padded(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, row_ids=None, n_rows=0):
    pb = _Problem(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, row_ids, n_rows)
    scores = pb.scores()
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)  # rows with no allowed key
    unnormalised = torch.exp(scores - row_max)
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    probs = unnormalised / row_sum.clamp_min(torch.finfo(row_sum.dtype).tiny)
    lse = (row_max + torch.log(row_sum)).squeeze(-1)  # log(0) = -inf for empty rows
    out = pb.dropped(probs) @ pb.values
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_forward(
    q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen, deterministic
):
    del deterministic  # every composite path is deterministic
    if cu_seqlens is None:
        out, lse = _forward_padded(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self)
        return out, lse.to(accumulate_dtype(q.dtype))
    vl = _Varlen(cu_seqlens, max_seqlen)
    out, lse = _forward_padded(
        vl.pad(q), None if v is None else vl.pad(v), coef, vl.real, seed, scale, causal, dropout_p, exclude_self,
        vl.row_ids, vl.total,
    )
    return vl.unpad(out), vl.unpad_lse(lse).to(accumulate_dtype(q.dtype))


def _backward_padded(
    dout, dlse, q, v, coef, key_padding_mask, seed, out, lse, scale, causal, dropout_p, exclude_self,
    row_ids=None, n_rows=0,
):
    """Returns (dy [B, S, H, D], dv [B, S, H, Dv] or None, dcoef or None) in compute dtype."""
    pb = _Problem(q, v, coef, key_padding_mask, seed, scale, causal, dropout_p, exclude_self, row_ids, n_rows)
    cd = pb.y.dtype
    lse = lse.to(cd)[..., None]
    live = pb.allowed & torch.isfinite(lse)
    probs = torch.exp(pb.scores() - lse.masked_fill(~torch.isfinite(lse), 0.0)).masked_fill(~live, 0.0)
    dout = dout.transpose(1, 2).to(cd)
    delta = (dout * out.transpose(1, 2).to(cd)).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(cd)[..., None]
    dvalues = pb.dropped(probs).transpose(-1, -2) @ dout
    dprobs = pb.dropped(dout @ pb.values.transpose(-1, -2))
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
    del deterministic
    if cu_seqlens is None:
        dy, dvalues, dc = _backward_padded(
            dout, dlse, q, v, coef, key_padding_mask, seed, out, lse, scale, causal, dropout_p, exclude_self
        )
    else:
        vl = _Varlen(cu_seqlens, max_seqlen)
        dy, dvalues, dc = _backward_padded(
            vl.pad(dout), None if dlse is None else vl.pad_lse(dlse), vl.pad(q), None if v is None else vl.pad(v),
            coef, vl.real, seed, vl.pad(out), vl.pad_lse(lse), scale, causal, dropout_p, exclude_self,
            vl.row_ids, vl.total,
        )
        dy = vl.unpad(dy)
        dvalues = None if dvalues is None else vl.unpad(dvalues)
    dq.copy_(dy)
    if dv is not None:
        dv.copy_(dvalues)
    if dcoef is not None:
        dcoef.copy_(dc)


def _lowrank_parts(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    """Forward intermediates of LAMA in compute dtype; see reference.lowrank_context_attention."""
    cd = accumulate_dtype(h.dtype)
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
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
        unnormalised = torch.exp(scores - row_max)
        attn = unnormalised / unnormalised.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
    else:
        attn = scores if real is None else scores.masked_fill(~real, 0.0)
    return dict(h=h, u=u, p=p, q=q, ctx=ctx, gate=gate, keys=keys, act=act, norm=norm, feats=feats, attn=attn, real=real)


def lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    parts = _lowrank_parts(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps)
    attn = parts["attn"]
    return (attn @ parts["h"]).to(h.dtype), attn.to(h.dtype)


def lowrank_backward(
    dpooled, dattn, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, dh, dcontext, dp, dq, du
):
    """Closed-form LAMA gradients, written into dh, dcontext, dp, dq and du (when given)."""
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


