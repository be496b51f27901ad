"""Naive PyTorch implementations of every public op: the specification in code.

Everything else in the package (the torch, Triton, CPU and CUDA backends) is tested against
these functions run in float64. They favour clarity over speed: scores are materialised as
full [B, H, S, S] tensors and gradients come from autograd.

Math (docs/design.md, "Variants"), per batch b and head h, with Y = q[b, :, h] of shape [S, D]:

    scores  S = scale * (Y M) Y^T + mask      M = I | diag(coef[h]) | coef[h]
    P       = softmax_rows(S)                 a row with no allowed key gives P = 0
    out     = dropout(P) V                    V = v[b, :, h], or Y itself when v is None
    lse     = logsumexp_rows(S)               -inf for a row with no allowed key

Dropout draws its keep-mask from a counter-based generator (Philox-4x32-10, the generator of
``triton.language.randint4x``) keyed by one 64-bit seed, so every backend regenerates the same
mask from the same seed; each Philox call gives the 16-bit random values of eight consecutive
elements (the two halves of its four 32-bit output words), compared with a 16-bit threshold:
see ``dropout_keep_mask`` and ``dropout_threshold``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "symmetric_attention",
    "shared_attention",
    "symmetric_attention_varlen",
    "lowrank_context_attention",
    "attention_mask",
    "dropout_keep_mask",
    "philox_randint",
    "philox_randint4x",
    "dropout_random16",
    "dropout_threshold",
    "dropout_scale",
]

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon et al. 2011), identical to triton.language.random.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # b < 2**32 and a < 2**32, so the product fits in 64 unsigned bits; int64 wraps, and
    # masking after the shift recovers the exact high word.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox_randint4x(seed: int, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit outputs of Philox-4x32-10 for each int64 counter in ``offsets``.

    Bit-identical to ``triton.language.randint4x(seed, offsets)``: the counter is
    (offset low word, offset high word, 0, 0) and the key is (seed low word, seed high word).
    Returned as int64 values in [0, 2**32).
    """
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: Tensor) -> Tensor:
    """First 32-bit output of Philox-4x32-10 for each int64 counter in ``offsets``: the first word
    of ``philox_randint4x``, bit-identical to ``triton.language.randint(seed, offsets)``."""
    return philox_randint4x(seed, offsets)[0]


def dropout_random16(seed: int, elements: Tensor) -> Tensor:
    """The 16-bit random value of each int64 element offset (values in [0, 2**16)): the low
    (``element`` even) or high (odd) half of output word ``(element // 2) % 4`` of
    Philox-4x32-10 at counter ``element // 8``, so one Philox call serves eight consecutive
    elements."""
    elements = elements.to(torch.int64)
    words = torch.stack(philox_randint4x(seed, elements >> 3), dim=-1)
    word = torch.gather(words, -1, ((elements >> 1) & 3)[..., None])[..., 0]
    return (word >> (16 * (elements & 1))) & 0xFFFF


def dropout_threshold(dropout_p: float) -> int:
    """Keep an element when its 16-bit random value is >= this threshold: ``dropout_p`` in steps
    of 2**-16, rounded to nearest (ties up), and for 0 < dropout_p < 1 clamped into [1, 65535], so
    that no dropout probability becomes "no dropout" or "drop everything". 0 for dropout_p = 0
    (everything kept, exactly). The element is dropped with probability ``threshold / 2**16``.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p == 0.0:
        return 0
    return min(max(int(dropout_p * 2**16 + 0.5), 1), 2**16 - 1)


def dropout_scale(dropout_p: float) -> float:
    """The kept elements' multiplier, ``1 / (1 - threshold / 2**16)``: the inverse of the keep
    probability the threshold actually gives, so that the multiplier's expectation is exactly 1."""
    return 2**16 / (2**16 - dropout_threshold(dropout_p))


def dropout_keep_mask(
    seed: int, dropout_p: float, row_ids: Tensor, n_rows: int, num_heads: int, key_stride: int, seqlen_k: int
) -> Tensor:
    """Keep-mask [B, H, S_q, S_k] (bool) for dropout on the attention probabilities.

    Element (b, h, i, j) has the offset ``e = (h * n_rows + row_ids[b, i]) * key_stride + j``,
    where ``row_ids`` numbers the query tokens globally: ``b * S + i`` in the padded layout,
    ``cu_seqlens[b] + i`` in the varlen layout (``n_rows`` = B * S or total tokens,
    ``key_stride`` = S or total tokens: never ``max_seqlen``, so the mask depends on the real
    positions only). Its 16-bit random value is half ``e % 2`` of output word ``(e // 2) % 4`` of
    Philox-4x32-10 at counter ``e // 8`` (``dropout_random16``): one Philox call serves eight
    consecutive offsets, which may straddle two rows when ``key_stride`` is not a multiple of 8.
    An element is kept when that value is ``>= dropout_threshold(dropout_p)``, so
    ``dropout_p = 0`` keeps everything exactly; kept probabilities are multiplied by
    ``dropout_scale(dropout_p)``.
    """
    heads = torch.arange(num_heads, device=row_ids.device, dtype=torch.int64)
    keys = torch.arange(seqlen_k, device=row_ids.device, dtype=torch.int64)
    rows = heads[None, :, None] * n_rows + row_ids.to(torch.int64)[:, None, :]  # [B, H, S_q]
    elements = rows[..., None] * key_stride + keys  # [B, H, S_q, S_k]
    return dropout_random16(seed, elements) >= dropout_threshold(dropout_p)


def attention_mask(
    batch: int,
    seqlen: int,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    device=None,
) -> Tensor:
    """Allowed (query, key) pairs as a bool tensor broadcastable to [B, 1, S, S]; True = allowed.

    ``key_padding_mask`` is [B, S] bool with True for real tokens (Hugging Face's
    ``attention_mask == 1``). With ``exclude_self`` the diagonal is removed, except in a row
    where the diagonal is the only allowed key: a token attends to itself only when nothing
    else is allowed. Example for S = 3, causal and exclude_self::

        1 0 0      row 0 has only itself, so it keeps it
        1 0 0
        1 1 0
    """
    idx = torch.arange(seqlen, device=device)
    allowed = torch.ones(batch, 1, seqlen, seqlen, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    if exclude_self:
        eye = idx[None, :] == idx[:, None]
        others = allowed & ~eye
        only_self = allowed & eye & ~others.any(dim=-1, keepdim=True)
        allowed = others | only_self
    return allowed


def _apply_coef(y: Tensor, coef: Optional[Tensor]) -> Tensor:
    """Query-side operand Y M per head: y [B, H, S, D], coef None | [H, D] | [H, D, D]."""
    if coef is None:
        return y
    coef = coef.to(y.dtype)
    if coef.dim() == 2:
        return y * coef[None, :, None, :]
    return torch.einsum("bhsd,hde->bhse", y, coef)


def _attend(
    y: Tensor,
    v: Tensor,
    allowed: Tensor,
    coef: Optional[Tensor],
    scale: float,
    keep: Optional[Tensor],
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Core of every mode in [B, H, S, D] layout: returns out [B, H, S, Dv] and lse [B, H, S]."""
    scores = scale * (_apply_coef(y, coef) @ y.transpose(-1, -2))
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A key no row may attend to is never read: its stored values (even NaN) contribute nothing.
    v = v.masked_fill(~allowed.any(dim=-2)[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    empty_row = torch.isneginf(lse)[..., None]
    # A row with no allowed key: exp(-inf - (-inf)) is NaN, so force P = 0 there.
    probs = torch.exp(scores - lse[..., None].masked_fill(empty_row, 0.0))
    probs = probs.masked_fill(~allowed | empty_row, 0.0)
    if keep is not None:
        probs = probs * keep * dropout_scale(dropout_p)
    return probs @ v, lse


def symmetric_attention(
    q: Tensor,
    v: Optional[Tensor] = None,
    *,
    coef: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    return_lse: bool = False,
    dropout_seed: Optional[int] = None,
    dropout_mask: Optional[Tensor] = None,
):
    """Reference for ``symattn_kernels.symmetric_attention``; same arguments, layout [B, S, H, D].

    Dropout (when ``dropout_p > 0``) uses ``dropout_mask`` ([B, H, S, S] bool, True = keep) when
    given, else the mask ``dropout_keep_mask`` derives from ``dropout_seed`` (required then);
    kept probabilities are multiplied by ``dropout_scale(dropout_p)``.
    Computes in the dtype of ``q``; ``lse`` is returned in float32, or float64 for float64 input.
    """
    batch, seqlen, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    y = q.transpose(1, 2)
    values = y if v is None else v.transpose(1, 2).to(q.dtype)
    allowed = attention_mask(
        batch, seqlen, causal=causal, key_padding_mask=key_padding_mask, exclude_self=exclude_self, device=q.device
    )
    keep = None
    if dropout_p > 0.0:
        if dropout_mask is None:
            if dropout_seed is None:
                raise ValueError("reference dropout needs dropout_mask or dropout_seed")
            row_ids = torch.arange(batch * seqlen, device=q.device).view(batch, seqlen)
            dropout_mask = dropout_keep_mask(
                dropout_seed, dropout_p, row_ids, batch * seqlen, num_heads, seqlen, seqlen
            )
        keep = dropout_mask
    out, lse = _attend(y, values, allowed, coef, scale, keep, dropout_p)
    out = out.transpose(1, 2)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out


def shared_attention(y: Tensor, **kwargs):
    """Reference for ``symattn_kernels.shared_attention``: ``symmetric_attention(y, None, ...)``."""
    return symmetric_attention(y, None, **kwargs)


def symmetric_attention_varlen(
    q: Tensor,
    v: Optional[Tensor],
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    coef: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    return_lse: bool = False,
    dropout_seed: Optional[int] = None,
):
    """Reference for the varlen layout: q [total, H, D], v [total, H, Dv] or None.

    Sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``; each attends only within itself.
    ``lse`` is [H, total]. Dropout counters use the global token index (see
    ``dropout_keep_mask``) so the mask does not depend on how sequences are batched.
    """
    total, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = None
        if dropout_p > 0.0:
            if dropout_seed is None:
                raise ValueError("reference dropout needs dropout_seed")
            row_ids = torch.arange(start, end, device=q.device)[None]
            mask = dropout_keep_mask(dropout_seed, dropout_p, row_ids, total, num_heads, total, end - start)
        out, lse = symmetric_attention(
            q[None, start:end],
            None if v is None else v[None, start:end],
            coef=coef,
            scale=scale,
            causal=causal,
            dropout_p=dropout_p,
            exclude_self=exclude_self,
            return_lse=True,
            dropout_mask=mask,
        )
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def lowrank_context_attention(
    h: Tensor,
    context: Tensor,
    p: Tensor,
    q: Tensor,
    *,
    u: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    head_norm: Optional[str] = "l2",
    token_softmax: bool = True,
    eps: float = 1e-12,
):
    """Reference for LAMA pooling (Mehta et al., arXiv 1912.00835).

    h, u [B, T, E] (u defaults to h), context [E] or [B, E], p, q [E, m]:

        f_t    = normalize_over_heads(tanh((p^T c) * (q^T u_t)))   in R^m
        attn   = softmax over tokens of f (masked), or f with padded tokens zeroed
        pooled = attn @ h                                          [B, m, E]

    ``head_norm="l2"`` divides by ``max(||.||_2, eps)`` over the m heads (``F.normalize``);
    ``None`` skips it. A sequence with no real token gets attn = 0 and pooled = 0.
    Returns (pooled [B, m, E], attn [B, m, T]).
    """
    u = h if u is None else u
    ctx = context if context.dim() == 2 else context[None].expand(h.shape[0], -1)
    gate = ctx @ p  # [B, m]
    feats = torch.tanh(gate[:, None, :] * (u @ q))  # [B, T, m]
    if head_norm == "l2":
        feats = F.normalize(feats, p=2.0, dim=-1, eps=eps)
    scores = feats.transpose(1, 2)  # [B, m, T]
    real = None if key_padding_mask is None else key_padding_mask[:, None, :]
    if token_softmax:
        if real is not None:
            scores = scores.masked_fill(~real, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        if real is not None:  # rows with no real token: 0, not the 0/0 of the softmax
            attn = attn.masked_fill(~real.any(dim=-1, keepdim=True), 0.0)
    else:
        attn = scores if real is None else scores.masked_fill(~real, 0.0)
    if real is not None:  # padded tokens are never read, whatever they hold
        h = h.masked_fill(~real.transpose(1, 2), 0.0)
    return attn @ h, attn
