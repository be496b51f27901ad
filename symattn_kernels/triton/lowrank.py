"""Fused LAMA pooling (low-rank multi-head context attention, Mehta et al., arXiv 1912.00835).

Per sequence b, with token states H [T, E], token keys U [T, E] (U = H when ``u`` is None),
context c [E], factors P, Q [E, m]:

    g      = P^T c                                   [m]      once per sequence
    k_t    = Q^T u_t                                 [m]      one tl.dot per token tile
    a_t    = tanh(g * k_t)                           [m]
    f_t    = a_t / max(||a_t||_2, eps)               [m]      (head_norm="l2"; else f_t = a_t)
    attn   = softmax_t(f) over the real tokens per head, or f with padded tokens zeroed
    pooled = attn H                                  [m, E]

Forward: one program per sequence walks the token tiles once; each tile of U (and of H, or the
same registers when U = H) is loaded once. Every score lies in [-1, 1] (tanh, then a unit-norm
vector), so the token softmax uses the fixed stabiliser 1 instead of a running max: this is
flash attention's online softmax with m_i pinned at its upper bound, so no rescale of the
accumulator is ever needed and exp never overflows or underflows (exp(f - 1) >= e^-2). The
pooled accumulator and the sums l [m] stay in fp32 registers; the accumulator is kept transposed,
[E, m], so that the token tile is the wide operand of the matmul (an sm_90 wgmma needs 64 rows
and m is small). The attn output needs
the final l: the tile loop stores p = exp(f - 1) (fp32 workspace [B, m, T]) and a second light
kernel writes attn = p / l in h's dtype (one read and one write of [B, m, T], no recomputation
of U Q). A sequence with no real token has l = 0 and gets attn = 0, pooled = 0.

Backward (closed form, as ``backends.torch.lowrank_backward``), with dA = dpooled H^T + dattn:

    dscores = attn * (dA - sum_t attn dA)            (token softmax; else dA, 0 on padding)
    da      = (df - f <f, df>) / ||a||               (l2; the clamped case ||a|| <= eps: df / eps)
    dz      = da * (1 - a^2)
    dg      = sum_t dz * k_t,   dk_t = dz * g
    du_t    = Q dk_t,   dh_t = attn[:, t]^T dpooled (+ du_t when U = H)
    dQ      = sum_{b,t} u_t dk_t^T,   dP = sum_b c dg^T,   dc = P dg

One program per sequence, two passes over its tokens: the first recomputes l and
sum_t p_t dA_t (needed by the softmax gradient), the second everything else; the first pass is
skipped without the token softmax. dQ is reduced per sequence in registers and written as a
[B, E, m] fp32 partial; the batch sums of dQ, dP and dc are small torch reductions on the host
(deterministic, no atomics).

Precision: token tiles and factors stay in the inputs' dtype. Matmuls of inputs only (U Q,
H dpooled^T) take them as they are (tensor cores for fp16/bf16, fp32 accumulation); the softmax
weights and attn are rounded to that dtype for the pooled and dh matmuls, as FlashAttention
rounds P. The key-gradient matmuls (dk Q^T, U^T dk) keep dk in fp32 and use DOT_PRECISION (tf32
for half inputs, whose values tf32 holds exactly): dk can leave fp16's range (it scales with
1 / ||a||), and rounding it to bf16 loses du where the head norm cancels. Everything elementwise
is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import _real_tokens, device_arch, dot_precision, is_interpret, unit_last_stride

__all__ = ["lowrank_forward", "lowrank_backward", "lama_config", "NORMALISE_BLOCK_T"]

# Scores are bounded by 1 (tanh, then a unit vector): the softmax's fixed stabiliser.
SCORE_BOUND = tl.constexpr(1.0)


@triton.jit
def _lama_tanh(z):
    # tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|) in (0, 1]: no overflow; below |z| = 0.1,
    # where 1 - e cancels, the odd Taylor series to z^7 (truncation < 1e-10 relative).
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(z < 0, -t, t)
    z2 = z * z
    series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0))))
    return tl.where(a < 0.1, series, t)


@triton.jit
def _lama_load_tokens(X, stride_xs, offs_t, offs_e, rows, dim):
    """Rows ``offs_t`` of a sequence's [T, E] matrix where ``rows`` (the real tokens), zero elsewhere
    and past E: [BLOCK_T, BLOCK_E]. A padded token is read as 0, never as stored: its weight is 0,
    but 0 * NaN = NaN in the products that pool h and sum the gradients over tokens, and nothing
    else reads it (its attn and gradients are 0 whatever it holds)."""
    return tl.load(
        X + offs_t.to(tl.int64)[:, None] * stride_xs + offs_e[None, :],
        mask=rows[:, None] & (offs_e[None, :] < dim), other=0.0,
    )


@triton.jit
def _lama_tile_scores(
    U, H, Kpm, stride_us, stride_hs, stride_kpms, offs_t, offs_e, seqlen, dim, q, gate, eps,
    SHARED_U: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REAL_KEYS: tl.constexpr,
):
    """Scores of one token tile: returns (u, hv, keys, act, norm, feats, real); hv is the tile of
    h (u itself when the keys come from h), read for real tokens only; u too where REAL_KEYS (the
    backward's products read u and the keys; the forward reads them only through weights that are
    0 on padded tokens, and loads the mask after the scores: loaded before, it stays live through
    them and the forward spills at m = 32, as h would)."""
    in_seq = offs_t < seqlen
    if REAL_KEYS:
        real = in_seq
        if HAS_KPM:
            real = _real_tokens(Kpm, stride_kpms, offs_t, seqlen)
        u = _lama_load_tokens(U, stride_us, offs_t, offs_e, real, dim)  # [BLOCK_T, BLOCK_E]
    else:
        u = _lama_load_tokens(U, stride_us, offs_t, offs_e, in_seq, dim)
    keys = tl.dot(u, q, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_M]
    act = _lama_tanh(keys * gate[None, :])
    if HEAD_NORM:
        norm = tl.maximum(tl.sqrt(tl.sum(act * act, 1)), eps)  # [BLOCK_T]
    else:
        norm = tl.full([act.shape[0]], 1.0, tl.float32)
    feats = act / norm[:, None]
    if not REAL_KEYS:
        real = in_seq
        if HAS_KPM:
            real = _real_tokens(Kpm, stride_kpms, offs_t, seqlen)
    # h last: loaded before the scores it stays live through them and the forward spills at m = 32.
    if SHARED_U:
        hv = u
    else:
        # Padded tokens moved past the end, so that the load's row mask is the plain bound: with
        # `real` as the mask the sm_90 forward at E = 256, m = 32 spilled 16 bytes.
        offs_h = tl.where(real, offs_t, seqlen)
        hv = _lama_load_tokens(H, stride_hs, offs_h, offs_e, offs_h < seqlen, dim)
    return u, hv, keys, act, norm, feats, real


@triton.jit
def _lama_tile_dscores(hv, dpo, DAttn, stride_dam, offs_t, offs_m, mmask, seqlen,
                       HAS_DATTN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dA = h dpooled^T (+ dattn) of one token tile: [BLOCK_T, BLOCK_M], fp32."""
    da = tl.dot(hv, tl.trans(dpo), input_precision=DOT_PRECISION)
    if HAS_DATTN:
        da += tl.load(
            DAttn + offs_m.to(tl.int64)[None, :] * stride_dam + offs_t[:, None],
            mask=(offs_t[:, None] < seqlen) & mmask[None, :], other=0.0,
        ).to(tl.float32)
    return da


@triton.jit
def _lama_load_factors(
    Ctx, P, Q, b, stride_cb, stride_pe, stride_qe, offs_e, offs_m, dim, heads,
):
    """gate = P^T c [BLOCK_M] in fp32 and Q [BLOCK_E, BLOCK_M] in its own dtype, zero-padded."""
    emask = offs_e < dim
    fmask = emask[:, None] & (offs_m[None, :] < heads)
    c = tl.load(Ctx + b.to(tl.int64) * stride_cb + offs_e, mask=emask, other=0.0).to(tl.float32)
    p = tl.load(P + offs_e[:, None] * stride_pe + offs_m[None, :], mask=fmask, other=0.0).to(tl.float32)
    q = tl.load(Q + offs_e[:, None] * stride_qe + offs_m[None, :], mask=fmask, other=0.0)
    gate = tl.sum(c[:, None] * p, 0)  # [BLOCK_M]
    return gate, q


@triton.jit
def _lama_fwd_kernel(
    H, U, Ctx, P, Q, Kpm, Pooled, Attn, Work, L,
    stride_hb, stride_hs, stride_ub, stride_us, stride_cb, stride_pe, stride_qe,
    stride_kpmb, stride_kpms, stride_ob, stride_om, stride_ab, stride_am, stride_wb, stride_wm,
    seqlen, dim, heads, eps,
    SHARED_U: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_NORM: tl.constexpr, TOKEN_SOFTMAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    gate, q = _lama_load_factors(Ctx, P, Q, b, stride_cb, stride_pe, stride_qe, offs_e, offs_m, dim, heads)
    H += b64 * stride_hb
    U += b64 * stride_ub
    Kpm += b64 * stride_kpmb
    acc = tl.zeros([BLOCK_E, BLOCK_M], dtype=tl.float32)  # pooled^T: the tile is the wide operand
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_t in range(0, seqlen, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        u, hv, keys, act, norm, feats, real = _lama_tile_scores(
            U, H, Kpm, stride_us, stride_hs, stride_kpms, offs_t, offs_e, seqlen, dim, q, gate, eps,
            SHARED_U, HAS_KPM, HEAD_NORM, DOT_PRECISION, SHARED_U,
        )
        if TOKEN_SOFTMAX:
            w = tl.where(real[:, None], tl.exp(feats - SCORE_BOUND), 0.0)  # [BLOCK_T, BLOCK_M]
            l_i += tl.sum(w, 0)
            dst = Work + b64 * stride_wb
            dst_stride = stride_wm
        else:
            w = tl.where(real[:, None], feats, 0.0)
            dst = Attn + b64 * stride_ab
            dst_stride = stride_am
        acc += tl.dot(tl.trans(hv), w.to(hv.dtype), input_precision=DOT_PRECISION)  # [BLOCK_E, BLOCK_M]
        tl.store(
            dst + offs_m.to(tl.int64)[None, :] * dst_stride + offs_t[:, None],
            w.to(dst.dtype.element_ty), mask=(offs_t[:, None] < seqlen) & (offs_m[None, :] < heads),
        )
    if TOKEN_SOFTMAX:
        inv = tl.where(l_i == 0.0, 0.0, 1.0 / l_i)
        acc = acc * inv[None, :]
        tl.store(L + b64 * heads + offs_m, l_i, mask=offs_m < heads)
    tl.store(
        Pooled + b64 * stride_ob + offs_m.to(tl.int64)[None, :] * stride_om + offs_e[:, None],
        acc.to(Pooled.dtype.element_ty), mask=(offs_m[None, :] < heads) & (offs_e[:, None] < dim),
    )


@triton.jit
def _lama_fwd_normalise(
    Work, L, Attn, stride_wb, stride_wm, stride_ab, stride_am, seqlen, heads, BLOCK_T: tl.constexpr,
):
    """attn = p / l for one (sequence, head) row; a row with l = 0 (no real token) stores 0."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    l_i = tl.load(L + b * heads + h)
    inv = tl.where(l_i == 0.0, 0.0, 1.0 / l_i)
    for start_t in range(0, seqlen, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        w = tl.load(Work + b * stride_wb + h * stride_wm + offs_t, mask=offs_t < seqlen, other=0.0)
        tl.store(Attn + b * stride_ab + h * stride_am + offs_t, (w * inv).to(Attn.dtype.element_ty),
                 mask=offs_t < seqlen)


@triton.jit
def _lama_bwd_kernel(
    H, U, Ctx, P, Q, Kpm, DPooled, DAttn, DH, DU, DQPart, DGate,
    stride_hb, stride_hs, stride_ub, stride_us, stride_cb, stride_pe, stride_qe,
    stride_kpmb, stride_kpms, stride_dob, stride_dom, stride_dab, stride_dam,
    stride_dhb, stride_dhs, stride_dub, stride_dus,
    seqlen, dim, heads, eps,
    SHARED_U: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_NORM: tl.constexpr, TOKEN_SOFTMAX: tl.constexpr,
    HAS_DATTN: tl.constexpr, WRITE_DH: tl.constexpr, WRITE_DU: tl.constexpr, WRITE_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    gate, q = _lama_load_factors(Ctx, P, Q, b, stride_cb, stride_pe, stride_qe, offs_e, offs_m, dim, heads)
    H += b64 * stride_hb
    U += b64 * stride_ub
    Kpm += b64 * stride_kpmb
    DAttn += b64 * stride_dab
    DH += b64 * stride_dhb
    DU += b64 * stride_dub
    mmask = offs_m < heads
    dpo = tl.load(
        DPooled + b64 * stride_dob + offs_m.to(tl.int64)[:, None] * stride_dom + offs_e[None, :],
        mask=mmask[:, None] & (offs_e[None, :] < dim), other=0.0,
    )  # [BLOCK_M, BLOCK_E]
    q32 = q.to(tl.float32)

    # Pass 1 (token softmax only): l = sum_t p_t and s = sum_t p_t dA_t, p_t = exp(f_t - 1).
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if TOKEN_SOFTMAX:
        for start_t in range(0, seqlen, BLOCK_T):
            offs_t = start_t + tl.arange(0, BLOCK_T)
            u, hv, keys, act, norm, feats, real = _lama_tile_scores(
                U, H, Kpm, stride_us, stride_hs, stride_kpms, offs_t, offs_e, seqlen, dim, q, gate, eps,
                SHARED_U, HAS_KPM, HEAD_NORM, DOT_PRECISION, SHARED_U,
            )
            da = _lama_tile_dscores(hv, dpo, DAttn, stride_dam, offs_t, offs_m, mmask, seqlen,
                                    HAS_DATTN, DOT_PRECISION)  # [BLOCK_T, BLOCK_M]
            w = tl.where(real[:, None], tl.exp(feats - SCORE_BOUND), 0.0)
            l_i += tl.sum(w, 0)
            s_i += tl.sum(w * da, 0)
    inv = tl.where(l_i == 0.0, 0.0, 1.0 / l_i)
    delta = s_i * inv  # sum_t attn_t dA_t

    dgate = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq_acc = tl.zeros([BLOCK_E, BLOCK_M], dtype=tl.float32)
    for start_t in range(0, seqlen, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        offs_t64 = offs_t.to(tl.int64)
        tmask = (offs_t[:, None] < seqlen) & (offs_e[None, :] < dim)
        u, hv, keys, act, norm, feats, real = _lama_tile_scores(
            U, H, Kpm, stride_us, stride_hs, stride_kpms, offs_t, offs_e, seqlen, dim, q, gate, eps,
            SHARED_U, HAS_KPM, HEAD_NORM, DOT_PRECISION, True,
        )
        da = _lama_tile_dscores(hv, dpo, DAttn, stride_dam, offs_t, offs_m, mmask, seqlen,
                                HAS_DATTN, DOT_PRECISION)  # [BLOCK_T, BLOCK_M]
        if TOKEN_SOFTMAX:
            attn = tl.where(real[:, None], tl.exp(feats - SCORE_BOUND), 0.0) * inv[None, :]
            dfeats = attn * (da - delta[None, :])
        else:
            attn = tl.where(real[:, None], feats, 0.0)
            dfeats = tl.where(real[:, None], da, 0.0)
        if HEAD_NORM:
            radial = tl.sum(feats * dfeats, 1)  # [BLOCK_T]
            clamped = norm <= eps
            dact = tl.where(clamped[:, None], dfeats, dfeats - feats * radial[:, None]) / norm[:, None]
        else:
            dact = dfeats
        dz = dact * (1.0 - act * act)
        dgate += tl.sum(dz * keys, 0)
        dkeys = dz * gate[None, :]  # [BLOCK_T, BLOCK_M]
        grad_u = tl.dot(dkeys, tl.trans(q32), input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_E]
        if WRITE_DQ:
            dq_acc += tl.dot(tl.trans(u).to(tl.float32), dkeys, input_precision=DOT_PRECISION)  # [BLOCK_E, BLOCK_M]
        if WRITE_DH:
            grad_h = tl.dot(attn.to(dpo.dtype), dpo, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_E]
            if SHARED_U:
                grad_h += grad_u
            tl.store(DH + offs_t64[:, None] * stride_dhs + offs_e[None, :], grad_h.to(DH.dtype.element_ty),
                     mask=tmask)
        if WRITE_DU:
            tl.store(DU + offs_t64[:, None] * stride_dus + offs_e[None, :], grad_u.to(DU.dtype.element_ty),
                     mask=tmask)
    tl.store(DGate + b64 * heads + offs_m, dgate, mask=mmask)
    if WRITE_DQ:
        tl.store(
            DQPart + b64 * dim * heads + offs_e[:, None] * heads + offs_m[None, :], dq_acc,
            mask=(offs_e[:, None] < dim) & mmask[None, :],
        )


# Elements of one [BLOCK_T, BLOCK_E] token tile a program may hold (the registers' main tenant):
# the backward holds more tiles at once (h, u, dh, du) and [E, m] state (dQ, Q) besides.
_TILE_ELEMENTS = {"fwd": 64 * 256, "bwd": 16 * 256}
# Block of the attn normalisation kernel (no tl.dot, one row per program).
NORMALISE_BLOCK_T = 256


def lama_config(dim: int, heads: int, seqlen: int, direction: str = "fwd") -> dict:
    """Blocks, warps and stages of the ``direction`` ("fwd" / "bwd") kernel, the same on sm_80
    and sm_90; bench.compile_report compiles exactly these.

    BLOCK_E and BLOCK_M cover E and m whole (tl.dot needs >= 16). BLOCK_T is 64, the M of the
    token-side wgmma (sm_90's HGMMA needs 64 rows), unless the tile budget asks for fewer; 8 warps
    from E = 128 on. python -m bench.compile_report: no sm_90 config spills up to E = 512, m = 32;
    on sm_80 the backward spills from E = 512 or m = 32 on (tens to hundreds of bytes), where even
    16 tokens of fp32 gradient tiles and the [E, m] state exceed the registers.
    """
    block_e = max(16, triton.next_power_of_2(dim))
    block_t = max(16, min(64, _TILE_ELEMENTS[direction] // block_e, triton.next_power_of_2(seqlen)))
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_M=max(16, triton.next_power_of_2(heads)),
                num_warps=8 if block_e >= 128 else 4, num_stages=3)


def backward_unsupported(dim: int, heads: int, arch: int) -> str:
    """Why the Triton LAMA backward cannot run E = ``dim``, m = ``heads`` on sm_``arch`` ("" when
    it can): on sm_80 the backward spills from tiles of E = 512 or m = 32 on (lama_config), that is
    E > 256 or m > 16 (tiles are powers of two), so it is not shipped there. ``backends.resolve`` routes ``backend="auto"`` past it; an explicit
    ``backend="triton"`` raises this message."""
    block_e, block_m = max(16, triton.next_power_of_2(dim)), max(16, triton.next_power_of_2(heads))
    if arch < 90 and (block_e >= 512 or block_m >= 32):
        return (f"h has E = {dim} and p has m = {heads} heads: the Triton LAMA backward has no spill-free sm_80 "
                "kernel for E > 256 or m > 16 (python -m bench.compile_report); use backend='torch' "
                "(or 'auto', which picks it), or call without gradients")
    return ""


# Under the interpreter (tests) small token tiles exercise the tile loop; bench.workcount clears
# this to count the production tiles.
INTERPRET_CONFIG = {"BLOCK_T": 16}


def _launch_config(h, heads: int, direction: str) -> dict:
    _, seqlen, dim = h.shape
    config = lama_config(dim, heads, seqlen, direction)
    return {**config, **INTERPRET_CONFIG} if is_interpret() else config


def _common(h, context, p, q, u, key_padding_mask):
    h, context, p, q, u = (unit_last_stride(t) for t in (h, context, p, q, u))
    kpm = key_padding_mask
    if kpm is not None:
        kpm = kpm.view(torch.uint8) if kpm.dtype == torch.bool else kpm
    shared = u is None
    uu = h if shared else u
    stride_cb = context.stride(0) if context.dim() == 2 else 0
    kpm_strides = (0, 0) if kpm is None else (kpm.stride(0), kpm.stride(1))
    return h, context, p, q, uu, shared, kpm, stride_cb, kpm_strides


def lowrank_forward(h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps):
    """Fused LAMA forward; see the module docstring for the math.

    Args as ``backends.torch.lowrank_forward``: h, u [B, T, E], context [E] or [B, E], p, q [E, m],
    key_padding_mask [B, T] bool or None, head_norm "l2" or None, token_softmax, eps.

    Returns:
        (pooled [B, m, E], attn [B, m, T]), contiguous, in h's dtype.
    """
    h, context, p, q, uu, shared, kpm, stride_cb, kpm_strides = _common(h, context, p, q, u, key_padding_mask)
    batch, seqlen, dim = h.shape
    heads = p.shape[1]
    pooled = torch.empty(batch, heads, dim, dtype=h.dtype, device=h.device)
    attn = torch.empty(batch, heads, seqlen, dtype=h.dtype, device=h.device)
    if batch == 0 or seqlen == 0:
        return pooled.zero_(), attn.zero_()
    if token_softmax:
        work = torch.empty(batch, heads, seqlen, dtype=torch.float32, device=h.device)
        lsum = torch.empty(batch, heads, dtype=torch.float32, device=h.device)
    else:
        work, lsum = attn, pooled  # never dereferenced without the token softmax
    _lama_fwd_kernel[(batch,)](
        h, uu, context, p, q, h if kpm is None else kpm, pooled, attn, work, lsum,
        h.stride(0), h.stride(1), uu.stride(0), uu.stride(1), stride_cb, p.stride(0), q.stride(0),
        *kpm_strides, pooled.stride(0), pooled.stride(1), attn.stride(0), attn.stride(1),
        work.stride(0), work.stride(1),
        seqlen, dim, heads, float(eps),
        SHARED_U=shared, HAS_KPM=kpm is not None, HEAD_NORM=head_norm == "l2", TOKEN_SOFTMAX=bool(token_softmax),
        DOT_PRECISION=dot_precision(h.dtype), **_launch_config(h, heads, "fwd"),
    )
    if token_softmax:
        _lama_fwd_normalise[(batch, heads)](
            work, lsum, attn, work.stride(0), work.stride(1), attn.stride(0), attn.stride(1), seqlen, heads,
            BLOCK_T=64 if is_interpret() else NORMALISE_BLOCK_T,
        )
    return pooled, attn


def lowrank_backward(
    dpooled, dattn, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps, dh, dcontext, dp, dq, du,
    pooled=None, attn=None,
):
    """Closed-form LAMA gradients (module docstring), written into the given buffers.

    Same arguments as ``backends.torch.lowrank_backward``: dpooled [B, m, E], dattn [B, m, T] or None;
    dh, dcontext, dp, dq, du are caller-allocated (None = not needed).
    """
    del pooled, attn  # the forward's results (ops saves them for backends that use them): recomputed here
    h, context, p, q, uu, shared, kpm, stride_cb, kpm_strides = _common(h, context, p, q, u, key_padding_mask)
    batch, seqlen, dim = h.shape
    heads = p.shape[1]
    reason = "" if is_interpret() else backward_unsupported(dim, heads, device_arch(h.device))
    if reason:  # before any work
        raise ValueError(reason)
    dpooled = unit_last_stride(dpooled)
    dattn = unit_last_stride(dattn)
    dgate = torch.zeros(batch, heads, dtype=torch.float32, device=h.device)
    write_dq = dq is not None
    dq_part = torch.zeros(batch, dim, heads, dtype=torch.float32, device=h.device) if write_dq else dgate
    write_dh, write_du = dh is not None, du is not None and not shared
    dh_buf = dh if write_dh else h
    du_buf = du if write_du else h
    if batch > 0 and seqlen > 0:
        _lama_bwd_kernel[(batch,)](
            h, uu, context, p, q, h if kpm is None else kpm, dpooled, dpooled if dattn is None else dattn,
            dh_buf, du_buf, dq_part, dgate,
            h.stride(0), h.stride(1), uu.stride(0), uu.stride(1), stride_cb, p.stride(0), q.stride(0),
            *kpm_strides, dpooled.stride(0), dpooled.stride(1),
            *((0, 0) if dattn is None else (dattn.stride(0), dattn.stride(1))),
            dh_buf.stride(0), dh_buf.stride(1), du_buf.stride(0), du_buf.stride(1),
            seqlen, dim, heads, float(eps),
            SHARED_U=shared, HAS_KPM=kpm is not None, HEAD_NORM=head_norm == "l2",
            TOKEN_SOFTMAX=bool(token_softmax), HAS_DATTN=dattn is not None, WRITE_DH=write_dh, WRITE_DU=write_du,
            WRITE_DQ=write_dq, DOT_PRECISION=dot_precision(h.dtype), **_launch_config(h, heads, "bwd"),
        )
    elif write_dh:
        dh.zero_()
    if du is not None and shared:
        du.zero_()
    elif du is not None and seqlen == 0:
        du.zero_()
    if write_dq:
        dq.copy_(dq_part.sum(0))
    ctx = context.float() if context.dim() == 2 else context.float()[None].expand(batch, -1)
    if dp is not None:
        dp.copy_(ctx.transpose(0, 1) @ dgate)
    if dcontext is not None:
        grad_ctx = dgate @ p.float().transpose(0, 1)  # [B, E]
        dcontext.copy_(grad_ctx if context.dim() == 2 else grad_ctx.sum(dim=0))
