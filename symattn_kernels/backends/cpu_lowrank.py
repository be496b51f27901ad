"""LAMA for the ``cpu`` backend: plain PyTorch, lean in memory (no compiled extension needed).

Same arguments, results and math as ``backends.torch.lowrank_forward`` / ``lowrank_backward`` (the
formulas are in ``triton/lowrank.py``), but at most one [B, m, T] intermediate exists at a time;
the composite path holds about a dozen, plus float32 copies of all of h and u for half inputs.

Forward: the keys Q^T u_t are written by a matmul straight into one [B, m, T] buffer, and tanh,
the head norm, the padding mask and the token softmax run in place on it; for float32 and
float64 inputs that buffer is the returned attn. Every score lies in [-1, 1] (tanh, then a unit
vector), so the softmax uses the fixed stabiliser 1, as the Triton kernel does: exp(f - 1) never
overflows, needs no max pass, and pooled = (sum_t exp(f_t - 1) h_t) / l can be normalised last.

Backward: the score gradient multiplies two [B, m, T] matmul results elementwise (recomputed
activations a = tanh(g k) and dA = dpooled H^T), so a gets the one [B, m, T] buffer and dA is
computed a token slice at a time (``_CHUNKS`` slices, like the Triton kernel's token tiles). The
first pass fills a (and the head norm) and, with the token softmax, sums l = sum_t exp(f_t - 1)
and sum_t exp(f_t - 1) dA_t; the second turns each slice into dz, writes dh and du for its tokens
and accumulates W = dz U [B, m, E], from which the factor gradients follow without the keys:

    dg[b, j] = sum_e Q[e, j] W[b, j, e]        (= sum_t dz[b, j, t] k[b, j, t])
    dQ[e, j] = sum_b g[b, j] W[b, j, e]        (= sum_{b,t} u[b, t, e] dk[b, j, t])

All arithmetic is float32 (float64 for float64 inputs). Half inputs are converted one token
slice at a time (never all of h or u at once) and every result is rounded once: rounding the
keys or dz to bf16 before a matmul, as the reference run in bf16 does, loses up to all digits of
du where the head norm cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .torch import accumulate_dtype, finite_padding

__all__ = ["lowrank_forward", "lowrank_backward"]

# Token slices of the backward (and of the half-input forward): a pass holds up to three
# [B, m, T / _CHUNKS] temporaries besides the [B, m, T] buffer (dA, the weights and, with the
# head norm, f = a / norm), and six keep them at half of it.
_CHUNKS = 6


def _divisor(total: Tensor) -> Tensor:
    """l, and 1 where l = 0 (a sequence with no real token: its weights and pooled rows are 0 and
    stay 0); NaN stays NaN. Weights are divided by l, not multiplied by 1 / l, so that one real
    token weighs exactly 1 (e * (1 / e) can round to 1 - ulp), as in the reference's softmax."""
    return total.masked_fill(total == 0, 1.0)


def _sum_over_heads(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[:, j] * b[:, j] as [B, 1, Tc], head by head: one [B, 1, Tc] accumulator instead of
    a [B, m, Tc] product (and linalg.vector_norm over the middle dim is ~100x slower on CPU)."""
    total = a[:, :1] * b[:, :1]
    for head in range(1, a.shape[1]):
        total.addcmul_(a[:, head:head + 1], b[:, head:head + 1])
    return total


def _exp_scores(feats: Tensor, pad: Optional[Tensor]) -> Tensor:
    """exp(f - 1), 0 on padded tokens, in place: the unnormalised token softmax."""
    feats.sub_(1.0).exp_()
    return feats if pad is None else feats.masked_fill_(pad, 0.0)


@dataclass
class _Lama:
    """One call's inputs, with the per-slice pieces both directions recompute."""

    h: Tensor
    u: Optional[Tensor]  # None: the keys come from h
    q: Tensor  # [E, m], compute dtype
    gate: Tensor  # [B, m] = (P^T c)^T, compute dtype
    key_padding_mask: Optional[Tensor]
    head_norm: Optional[str]
    eps: float

    @classmethod
    def build(cls, h, context, p, q, u, key_padding_mask, head_norm, eps) -> "_Lama":
        cd = accumulate_dtype(h.dtype)
        gate = context.to(cd) @ p.to(cd)
        gate = gate if gate.dim() == 2 else gate.expand(h.shape[0], -1)
        h, u = finite_padding(h, key_padding_mask), finite_padding(u, key_padding_mask)
        return cls(h, u, q.to(cd), gate, key_padding_mask, head_norm, eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.gate.dtype

    def operands(self, tokens: slice, with_h: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """(u, h) of a token slice in compute dtype (h None unless with_h): views for float32 and
        float64 inputs, float32 copies of just this slice for half inputs."""
        cd = self.compute_dtype
        u = (self.h if self.u is None else self.u)[:, tokens].to(cd)
        if not with_h:
            return u, None
        return u, (u if self.u is None else self.h[:, tokens].to(cd))

    def keys(self, u: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Q^T u_t for a slice's u [B, Tc, E]: [B, m, Tc], written into ``out`` when given."""
        q_t = self.q.t().expand(u.shape[0], -1, -1)
        if out is None or out.is_contiguous():
            return torch.bmm(q_t, u.transpose(1, 2), out=out)
        # bmm into a strided view (a token slice of the [B, m, T] buffer) takes a slow path, ~8x
        # slower than into fresh memory on CPU: compute the slice, then copy it in.
        return out.copy_(torch.bmm(q_t, u.transpose(1, 2)))

    def activate(self, keys: Tensor, normalize: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """f = normalize_over_heads(tanh(g * k)) in place (only a = tanh(g * k) where not
        ``normalize``); returns it and the clamped head norm [B, 1, Tc] (None without head_norm)."""
        keys.mul_(self.gate[:, :, None]).tanh_()
        if self.head_norm != "l2":
            return keys, None
        norm = _sum_over_heads(keys, keys).sqrt_().clamp_min_(self.eps)
        return (keys.div_(norm) if normalize else keys), norm

    def pad(self, tokens: slice) -> Optional[Tensor]:
        """[B, 1, Tc] True on padded tokens, or None without a mask."""
        return None if self.key_padding_mask is None else ~self.key_padding_mask[:, None, tokens]


def _store_products(dst: Tensor, *pairs: tuple[Tensor, Tensor]) -> None:
    """dst = sum of the batched products a @ b; computed in dst itself when it is contiguous in
    the compute dtype, else in one compute-dtype temporary copied (rounded once) into dst."""
    (a, b), *rest = pairs
    direct = dst.dtype == a.dtype and dst.is_contiguous()  # bmm(out=strided view) is slow, see keys()
    acc = torch.bmm(a, b, out=dst if direct else None)
    for a, b in rest:
        acc.baddbmm_(a, b)
    if not direct:
        dst.copy_(acc)


def lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    """Lean LAMA forward; arguments and results as ``backends.torch.lowrank_forward``.

    Half inputs go through in token slices (each converted to float32 once); float32 and
    float64 inputs need no copies and take all tokens at once.
    """
    lama = _Lama.build(h, context, p, q, u, key_padding_mask, head_norm, eps)
    batch, seqlen, dim = h.shape
    cd = lama.compute_dtype
    scores = torch.empty(batch, q.shape[1], seqlen, dtype=cd, device=h.device)  # [B, m, T]
    pooled = torch.zeros(batch, q.shape[1], dim, dtype=cd, device=h.device)
    total = pooled.new_zeros(batch, q.shape[1], 1)
    for tokens in [slice(0, seqlen)] if h.dtype == cd else _token_slices(seqlen):
        u_slice, h_slice = lama.operands(tokens)
        feats, _ = lama.activate(lama.keys(u_slice, out=scores[:, :, tokens]))
        pad = lama.pad(tokens)
        if token_softmax:
            total = total + _exp_scores(feats, pad).sum(dim=-1, keepdim=True)
        elif pad is not None:
            feats.masked_fill_(pad, 0.0)
        pooled.baddbmm_(feats, h_slice)
    if token_softmax:  # the fixed stabiliser lets the normalisation come last
        divisor = _divisor(total)
        scores.div_(divisor)
        pooled.div_(divisor)
    return pooled.to(h.dtype), scores.to(h.dtype)


def _token_slices(seqlen: int) -> list[slice]:
    step = max(1, math.ceil(seqlen / _CHUNKS))
    return [slice(start, start + step) for start in range(0, seqlen, step)]


def _dscores(dpooled: Tensor, dattn: Optional[Tensor], h_slice: Tensor, tokens: slice) -> Tensor:
    """dA = dpooled H^T (+ dattn) for a token slice: [B, m, Tc]."""
    grad = torch.bmm(dpooled, h_slice.transpose(1, 2))
    return grad if dattn is None else grad.add_(dattn[:, :, tokens])


def _features_and_statistics(lama: _Lama, dpooled, dattn, slices, token_softmax: bool):
    """Pass 1: a = tanh(g * k) [B, m, T] (the backward's one full-size buffer), the clamped head
    norm [B, 1, T] (None without head_norm) and, with the token softmax, (l, delta) [B, m, 1]:
    l = sum_t exp(f_t - 1) over the real tokens, delta = sum_t attn_t dA_t (the softmax's row term)."""
    batch, seqlen, _ = lama.h.shape
    options = dict(dtype=lama.compute_dtype, device=lama.h.device)
    acts = torch.empty(batch, lama.q.shape[1], seqlen, **options)
    norm = torch.empty(batch, 1, seqlen, **options) if lama.head_norm == "l2" else None
    total = torch.zeros(batch, lama.q.shape[1], 1, **options)
    weighted = torch.zeros_like(total)
    for tokens in slices:
        u_slice, h_slice = lama.operands(tokens, with_h=token_softmax)
        acts_slice, norm_slice = lama.activate(lama.keys(u_slice, out=acts[:, :, tokens]), normalize=False)
        if norm is not None:
            norm[:, :, tokens] = norm_slice
        if token_softmax:
            weights = _exp_scores(acts_slice.clone() if norm is None else acts_slice / norm_slice, lama.pad(tokens))
            total = total + weights.sum(dim=-1, keepdim=True)
            weighted = weighted + _dscores(dpooled, dattn, h_slice, tokens).mul_(weights).sum(dim=-1, keepdim=True)
    if not token_softmax:
        return acts, norm, None
    divisor = _divisor(total)
    return acts, norm, (divisor, weighted / divisor)


def _slice_grads(acts, norm, dfeats, pad, softmax_stats, eps: float) -> tuple[Tensor, Tensor]:
    """(attn, dz) [B, m, Tc] of a token slice from its a = tanh(g * k), head norm and dA (a and
    dA are overwritten); dz = dL/d(g * k). The derivative 1 - a^2 takes a as tanh gave it: rebuilt
    as f * norm, its rounding made a saturated token's exact 0 about 1e-7 in fp32, which every
    such token then added to dcontext, dp and dq (68 % of dcontext at E = 1030)."""
    feats = acts if norm is None else acts / norm  # f, a temporary of the slice
    if softmax_stats is not None:
        divisor, delta = softmax_stats
        attn = _exp_scores(feats.clone(), pad).div_(divisor)
        dfeats.sub_(delta).mul_(attn)
        if pad is not None:  # 0 * NaN: a NaN real token's delta must not reach the padded ones
            dfeats.masked_fill_(pad, 0.0)
    else:
        if pad is not None:
            dfeats.masked_fill_(pad, 0.0)
        # f of the slice is a temporary with the head norm (and a padded token's f meets only
        # its dA = 0 below): it can be the weights themselves.
        attn = feats if norm is not None else feats.clone()
        if pad is not None:
            attn.masked_fill_(pad, 0.0)
    if norm is not None:
        radial = _sum_over_heads(feats, dfeats)
        radial.masked_fill_(norm <= eps, 0.0)  # F.normalize's clamp: the norm is a constant there
        dfeats.addcmul_(feats, radial, value=-1.0).div_(norm)
    return attn, dfeats.mul_(acts.square_().neg_().add_(1.0))


def lowrank_backward(
    dpooled, dattn, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, dh, dcontext, dp, dq, du,
    pooled=None, attn=None,
):
    """Lean closed-form LAMA gradients, written into dh, dcontext, dp, dq and du (when given);
    arguments as ``backends.torch.lowrank_backward``."""
    del pooled, attn  # the forward's results (ops saves them for backends that use them): recomputed here
    lama = _Lama.build(h, context, p, q, u, key_padding_mask, head_norm, eps)
    dpooled = dpooled.to(lama.compute_dtype)
    slices = _token_slices(h.shape[1])
    acts, norm, stats = _features_and_statistics(lama, dpooled, dattn, slices, token_softmax)
    dkeys_to_u = lama.gate[:, :, None] * lama.q.t()  # [B, m, E]: du_t = dz_t^T (g * Q^T)
    dz_u = torch.zeros_like(dpooled)  # W = dz U
    for tokens in slices:
        u_slice, h_slice = lama.operands(tokens)
        attn, dz = _slice_grads(acts[:, :, tokens], None if norm is None else norm[:, :, tokens],
                                _dscores(dpooled, dattn, h_slice, tokens), lama.pad(tokens), stats, eps)
        dz_u.baddbmm_(dz, u_slice)
        key_grad = (dz.transpose(1, 2), dkeys_to_u)
        if dh is not None:  # with u = None the key gradient adds into dh
            _store_products(dh[:, tokens], (attn.transpose(1, 2), dpooled), *([key_grad] if u is None else []))
        if du is not None:
            _store_products(du[:, tokens], key_grad)
    _factor_grads(lama, context, p, dz_u, dcontext, dp, dq)


def _factor_grads(lama: _Lama, context, p, dz_u, dcontext, dp, dq) -> None:
    """dq, dp and dcontext from W = dz U [B, m, E] (module docstring)."""
    cd = lama.compute_dtype
    dgate = (dz_u * lama.q.t()).sum(dim=-1)  # [B, m]
    if dq is not None:
        dq.copy_((dz_u * lama.gate[:, :, None]).sum(dim=0).t())
    if dp is not None:
        ctx = context.to(cd)
        ctx = ctx if ctx.dim() == 2 else ctx.expand(dgate.shape[0], -1)
        dp.copy_(ctx.t() @ dgate)
    if dcontext is not None:
        grad_ctx = dgate @ p.to(cd).t()  # [B, E]
        dcontext.copy_(grad_ctx if context.dim() == 2 else grad_ctx.sum(dim=0))
