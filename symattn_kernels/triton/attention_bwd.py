"""Fused backward of shared-projection attention.

With S = scale * (Y M) Y^T, P = softmax_rows(S), keep the dropout mask, r = reference.dropout_scale(p) and
Pd = P * keep * r:

    dP    = (dO V^T) * keep * r
    Delta = rowsum(dO * O) - dlse       (_symattn_bwd_preprocess; ROUNDED_DELTA_MAX_HEAD_DIM)
    G     = P * (dP - Delta)                                          dL/dS
    dY    = scale * (G Y M^T + G^T Y M)   (+ Pd^T dO in shared mode)
    dM    = scale * Y^T G Y               summed over batch; diagonal M keeps its diagonal
    dV    = Pd^T dO

Program j owns token block J of one (batch, head) and plays its roles: J as keys/values against
query blocks I (accumulating G_IJ^T Y_I and Pd_IJ^T dO_I) and J as queries against key blocks I
(accumulating G_JI Y_I). The roles of J sum in registers and dY_J is written once: no atomics, no
extra sum kernel, so the result is deterministic. A diagonal M scales the iterated tile (Y_I M),
so J's own operands stay plain loads (shared memory operands on sm_90); a full M is applied on
the host: the kernels take Y M as operand (one batched matmul; both roles multiply Y M of the
query rows with plain Y of the keys, the forward's rounding) and return scale G Y and scale G^T Y, and dY = (scale G^T Y) M + (scale G Y) M^T (+ Pd^T dO) is one more
matmul, so no [D, D] tile is ever staged in the kernel. In shared mode with M = I or diagonal,
the key and value roles share one fp32 accumulator (scale * G^T (Y_I M) + Pd^T dO_I).

Schedules (ROLES). All roles in one launch, one loop over the blocks I: each Y_I / dO_I tile is
read once per program and, for M = I or diagonal (S symmetric), one recomputed score tile serves
both roles (S_JI = S_IJ^T): six matmuls per loop step instead of seven. Where that state would
spill (``bwd_fuse_roles``), a query launch and then a key launch, each holding only its own
accumulators: the query launch writes its fp32 share of dY to a workspace that the key launch
adds (or, for a full M, scale G Y for the host). SPLIT_D > 1 gives each program a group of the
output columns (grid axis 2; the scores are recomputed per group). Causal: blocks I left of J
need only the query role, blocks right of J only the key role, the diagonal blocks both with the
causal mask. A diagonal dM is Y_J^T (scale G_J Y) per program, written to a [B, blocks, H, D]
fp32 buffer and summed by torch (deterministic).

Symmetric path (opt-in, ``deterministic=False``, non-causal, M = I or diagonal, head dim <= 64
on a GPU): ``_symattn_bwd_sym_kernel`` recomputes each score tile once for the block pair
{I, J} (S_IJ = S_JI^T; every row's lse is known), accumulates block J's gradient in registers
and adds block I's by fp32 atomics: 7 matmuls per block pair instead of 10, i.e. about 0.7x
the backward matmul work, at the price of fp32 read-modify-write traffic and an order of
additions that varies from run to run. ``bwd_plan`` / ``sym_bwd_config`` are the config tables
the launchers and ``python -m bench.compile_report`` share; ``backward_unsupported`` names the
cases without a spill-free config (``backends.resolve`` routes ``backend="auto"`` past them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Device side: constants and the @triton.jit helpers the kernels share.
from .attention_common import (LOG2E, _dropout_keep, _has_other_key, _kpm_stat, _padding_finite,
                               _partial_row, _program_sequence, _real_tokens, _in_int64, _row_ctr0, _seq_bounds,
                               _token0)
# Host side: the launch pieces and argument bundles the launchers share.
from .attention_common import (TokenStrides, coef_mode, coef_product, coef_strides, device_arch, dot_precision,
                               dropout_grouped, grid_row_chunks, is_interpret, kpm_operand, lse_strides, mask_strides,
                               padded_head_dim, padding_finite, partial_rows, prepare_call, tail_args, token_strides,
                               unit_last_stride)
from .attention_fwd import attention_forward
from .features import TRITON_VERSION

__all__ = ["attention_backward"]

# ROLES of _symattn_bwd_kernel: every role of the owned block in one launch, or the query role
# and then, in a second launch, the key and value roles.
BWD_ALL_ROLES = tl.constexpr(0)
BWD_QUERY_ROLE = tl.constexpr(1)
BWD_KEY_ROLES = tl.constexpr(2)


class BwdSequence(NamedTuple):
    """What ``_symattn_bwd_inner`` reads of the blocks I of one (batch, head): pointers at the
    sequence's token 0 with their row strides, and its sizes."""

    Y: object
    V: object
    DO: object
    Lse: object
    Delta: object
    Kpm: object
    stride_ys: int
    stride_vs: int
    stride_dos: int
    stride_kpms: int
    seqlen: int
    head_dim: int
    head_dim_v: int
    kpm_stat: int  # ``_kpm_stat`` of the sequence (exclude_self with a padding mask)
    row_ctr0: int  # dropout counter row of token 0
    QM: object  # Y M at token 0 (a full M), with its row stride
    stride_ms: int


class OwnedBlock(NamedTuple):
    """The owned block J in registers: its token rows (start + [0, BLOCK_M)), score operands (kq = Y_J;
    qm = Y_J M for a full M, Y_J otherwise: M rides on the query side, for a diagonal one on the iterated
    tile, so J's operand stays a plain load), value and output-gradient tiles, the first output columns of the accumulators
    ([col0, col0 + D / SPLIT_D), [colv0, ...) of the values) and a diagonal M on all columns
    (coef) and on the output ones (coef_out)."""

    offs_j: object
    start: int
    kq: object
    qm: object
    v_j: object
    do_j: object
    col0: int
    colv0: int
    coef: object
    coef_out: object


@triton.jit
def _symattn_bwd_preprocess(
    Out, DO, DLse, Delta, CuSeqlens, out_strides, do_strides, lse_strides,
    num_heads, seqlen_padded, head_dim_v,
    HEAD_DIM_V: tl.constexpr, HAS_DLSE: tl.constexpr, IS_VARLEN: tl.constexpr, BH_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = BH_OFFSET + tl.program_id(1)  # grid_row_chunks
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    seq_start, seqlen = _seq_bounds(CuSeqlens, off_b, seqlen_padded, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    seq_start64 = seq_start.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_mask = offs_m < seqlen
    tile_mask = row_mask[:, None] & (offs_dv[None, :] < head_dim_v)
    rows = (seq_start64 + offs_m.to(tl.int64))[:, None]
    o = tl.load(Out + off_b64 * out_strides.batch + off_h64 * out_strides.head + rows * out_strides.token
                + offs_dv[None, :], mask=tile_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_V]
    do = tl.load(DO + off_b64 * do_strides.batch + off_h64 * do_strides.head + rows * do_strides.token
                 + offs_dv[None, :], mask=tile_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_V]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_offs = off_b64 * lse_strides.batch + off_h64 * lse_strides.head + seq_start64 + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + lse_offs, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(Delta + lse_offs, delta, mask=row_mask)


@triton.jit
def _symattn_bwd_inner(
    dq_acc, dk_acc, dv_acc, owned, seq, scale, dropout, lo, hi,
    SHARED_V: tl.constexpr, COEF_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_ROLE: tl.constexpr, QUERY_ROLE: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """Blocks I in [lo, hi) against the owned block J (``OwnedBlock``) in the roles KEY_ROLE /
    QUERY_ROLE select: the one loop body of the backward, called once per causal stage; ``seq``
    (``BwdSequence``) is what it reads of the blocks I. J's row statistics are loaded here, so
    that each lives only through the loops of its role."""
    HEAD_DIM_OUT: tl.constexpr = HEAD_DIM // SPLIT_D
    HEAD_DIM_V_OUT: tl.constexpr = HEAD_DIM_V // SPLIT_D
    offs_j, seqlen = owned.offs_j, seq.seqlen
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    offs_do = owned.col0 + tl.arange(0, HEAD_DIM_OUT)
    offs_dvo = owned.colv0 + tl.arange(0, HEAD_DIM_V_OUT)
    valid_j = offs_j < seqlen
    qk_scale = scale * LOG2E
    real_j = valid_j
    if HAS_KPM:
        real_j = tl.load(seq.Kpm + offs_j.to(tl.int64) * seq.stride_kpms, mask=valid_j, other=0) != 0
    if QUERY_ROLE:
        lse2_j = tl.load(seq.Lse + offs_j, mask=valid_j, other=0.0) * LOG2E
        delta_j = tl.load(seq.Delta + offs_j, mask=valid_j, other=0.0)
        row_ctr_j = seq.row_ctr0 + offs_j.to(tl.int64)  # dropout counter rows of J as queries
        has_other_j = valid_j
        if EXCLUDE_SELF:
            has_other_j = _has_other_key(offs_j, seqlen, seq.kpm_stat, real_j, IS_CAUSAL, HAS_KPM)
    for start_i in range(lo, hi, BLOCK_N):
        start_i = tl.multiple_of(start_i, BLOCK_N)
        offs_i = start_i + tl.arange(0, BLOCK_N)
        offs_i64 = offs_i.to(tl.int64)
        valid_i = offs_i < seqlen
        real_i = valid_i
        if HAS_KPM and not KEY_ROLE:
            real_i = _real_tokens(seq.Kpm, seq.stride_kpms, offs_i, seqlen)
        # Padded rows of I: as keys only (the query role) they read as 0; as queries of J's key
        # role their NaN/Inf reads as 0 and the rest as stored (they feed J's gradients).
        y_i = tl.load(
            seq.Y + offs_i64[:, None] * seq.stride_ys + offs_d[None, :],
            mask=real_i[:, None] & (offs_d[None, :] < seq.head_dim), other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        if SPLIT_D == 1:
            y_o = y_i
        else:  # the accumulators' columns of the tile
            y_o = tl.load(
                seq.Y + offs_i64[:, None] * seq.stride_ys + offs_do[None, :],
                mask=real_i[:, None] & (offs_do[None, :] < seq.head_dim), other=0.0,
            )  # [BLOCK_N, HEAD_DIM_OUT]
        if HAS_KPM and KEY_ROLE:
            real_i = _real_tokens(seq.Kpm, seq.stride_kpms, offs_i, seqlen)
            y_i = _padding_finite(y_i, real_i)
            y_o = y_i if SPLIT_D == 1 else _padding_finite(y_o, real_i)
        if COEF_MODE == 1:
            y_m = (y_i.to(tl.float32) * owned.coef[None, :]).to(y_i.dtype)  # Y_I M
        else:
            y_m = y_i
        if KEY_ROLE:
            # Block J as keys/values, block I as queries; tiles are [keys J, queries I].
            do_i = tl.load(
                seq.DO + offs_i64[:, None] * seq.stride_dos + offs_dv[None, :],
                mask=valid_i[:, None] & (offs_dv[None, :] < seq.head_dim_v), other=0.0,
            )  # [BLOCK_N, HEAD_DIM_V]
            if SPLIT_D == 1:
                do_o = do_i
            else:
                do_o = tl.load(
                    seq.DO + offs_i64[:, None] * seq.stride_dos + offs_dvo[None, :],
                    mask=valid_i[:, None] & (offs_dvo[None, :] < seq.head_dim_v), other=0.0,
                )  # [BLOCK_N, HEAD_DIM_V_OUT]
            lse2_i = tl.load(seq.Lse + offs_i, mask=valid_i, other=0.0) * LOG2E
            delta_i = tl.load(seq.Delta + offs_i, mask=valid_i, other=0.0)
            if COEF_MODE == 2:  # the forward's operands, Y_J and Y_I M, so that P matches its lse
                y_m = tl.load(
                    seq.QM + offs_i64[:, None] * seq.stride_ms + offs_d[None, :],
                    mask=valid_i[:, None] & (offs_d[None, :] < seq.head_dim), other=0.0,
                )  # [BLOCK_N, HEAD_DIM]
            s_t = tl.dot(owned.kq, tl.trans(y_m), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            allowed_t = valid_j[:, None] & valid_i[None, :]
            if DIAGONAL:
                allowed_t = allowed_t & (offs_j[:, None] <= offs_i[None, :])
            if HAS_KPM:
                allowed_t = allowed_t & real_j[:, None]
            if EXCLUDE_SELF:
                has_other_i = _has_other_key(offs_i, seqlen, seq.kpm_stat, real_i, IS_CAUSAL, HAS_KPM)
                allowed_t = allowed_t & ((offs_j[:, None] != offs_i[None, :]) | (has_other_i[None, :] == 0))
            # Disallowed entries may overflow exp2 (lse = -inf rows); tl.where drops them.
            p_t = tl.where(allowed_t, tl.math.exp2(s_t - lse2_i[None, :]), 0.0)
            dp_t = tl.dot(owned.v_j, tl.trans(do_i), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            if HAS_DROPOUT:
                keep_t = _dropout_keep(dropout, seq.row_ctr0 + offs_i64, owned.start, offs_j.shape[0], True,
                                       DROPOUT_GROUPED)  # [keys J, queries I]
                pd_t = tl.where(keep_t, p_t * dropout.inv_keep, 0.0)
                dp_t = tl.where(keep_t, dp_t * dropout.inv_keep, 0.0)
            else:
                pd_t = p_t
            ds_t = p_t * (dp_t - delta_i[None, :])
            dv_acc = tl.dot(pd_t.to(do_i.dtype), do_o, dv_acc, input_precision=DOT_PRECISION)
            if SHARED_V and COEF_MODE != 2:
                # One accumulator for the key and value roles: dY_J += scale G^T (Y_I M) + Pd^T dO_I.
                if COEF_MODE == 1 and SPLIT_D > 1:
                    y_mo = (y_o.to(tl.float32) * owned.coef_out[None, :]).to(y_i.dtype)
                elif COEF_MODE == 1:
                    y_mo = y_m
                else:
                    y_mo = y_o
                dv_acc = tl.dot((ds_t * scale).to(y_i.dtype), y_mo, dv_acc, input_precision=DOT_PRECISION)
            else:
                dk_acc = tl.dot(ds_t.to(y_i.dtype), y_o, dk_acc, input_precision=DOT_PRECISION)
        if QUERY_ROLE:
            # Block J as queries, block I as keys/values; tiles are [queries J, keys I].
            if KEY_ROLE and COEF_MODE == 0:
                s = s_t  # M = I: S_JI = S_IJ^T exactly, one score tile serves both roles
            else:
                # The forward's rounding: M rides on the query-side tile (qm), so P matches its lse
                # (a diagonal M on the key side gives other fp16/bf16 scores, off by up to |S| 2^-11).
                s = tl.dot(owned.qm, tl.trans(y_i), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            if SHARED_V:
                v_i = y_i
            else:
                v_i = tl.load(
                    seq.V + offs_i64[:, None] * seq.stride_vs + offs_dv[None, :],
                    mask=real_i[:, None] & (offs_dv[None, :] < seq.head_dim_v), other=0.0,
                )  # [BLOCK_N, HEAD_DIM_V]
            allowed = valid_j[:, None] & real_i[None, :]
            if DIAGONAL:
                allowed = allowed & (offs_i[None, :] <= offs_j[:, None])
            if EXCLUDE_SELF:
                allowed = allowed & ((offs_j[:, None] != offs_i[None, :]) | (has_other_j[:, None] == 0))
            p = tl.where(allowed, tl.math.exp2(s - lse2_j[:, None]), 0.0)
            dp = tl.dot(owned.do_j, tl.trans(v_i), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            if HAS_DROPOUT:
                keep = _dropout_keep(dropout, row_ctr_j, start_i, BLOCK_N, False, DROPOUT_GROUPED)
                dp = tl.where(keep, dp * dropout.inv_keep, 0.0)
            ds = p * (dp - delta_j[:, None])
            dq_acc = tl.dot(ds.to(y_i.dtype), y_o, dq_acc, input_precision=DOT_PRECISION)
    return dq_acc, dk_acc, dv_acc


@triton.jit
def _symattn_bwd_kernel(
    Y, V, Coef, QM, Kpm, CuSeqlens, DO, Lse, Delta, DY, DV, DQM, DKM, Work, DCoefPartial,
    y_strides, v_strides, do_strides, dy_strides, dv_strides, m_strides, lse_strides, coef_strides, kpm_strides,
    num_heads, seqlen_padded, head_dim, head_dim_v, n_rows, scale, dropout,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    SHARED_V: tl.constexpr, COEF_MODE: tl.constexpr, NEED_DCOEF: tl.constexpr, IS_CAUSAL: tl.constexpr,
    ROLES: tl.constexpr, SPLIT_D: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BH_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (j, b * H + h - BH_OFFSET, g) plays the roles ROLES selects (BWD_ALL_ROLES, or BWD_QUERY_ROLE
    then, in a second launch, BWD_KEY_ROLES) of token block J for the output columns of group g
    (SPLIT_D groups). QM is Y M and DQM / DKM receive scale G Y / scale G^T Y for a
    full M (the host applies M); Work carries the query launch's fp32 share of dY to the key
    launch for M = I or diagonal; all of them share m_strides. Lse and Delta share lse_strides."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM % SPLIT_D == 0 and HEAD_DIM_V % SPLIT_D == 0)
    HEAD_DIM_OUT: tl.constexpr = HEAD_DIM // SPLIT_D
    HEAD_DIM_V_OUT: tl.constexpr = HEAD_DIM_V // SPLIT_D
    KEY: tl.constexpr = ROLES != BWD_QUERY_ROLE
    QUERY: tl.constexpr = ROLES != BWD_KEY_ROLES
    start_j = tl.program_id(0)
    prog = _program_sequence(CuSeqlens, num_heads, seqlen_padded, BH_OFFSET, IS_VARLEN)
    seqlen = prog.seqlen
    col0 = tl.program_id(2) * HEAD_DIM_OUT
    colv0 = tl.program_id(2) * HEAD_DIM_V_OUT
    if start_j * BLOCK_M >= seqlen:
        return
    prog = _in_int64(prog)
    Y += _token0(prog, y_strides)
    V += _token0(prog, v_strides)
    DO += _token0(prog, do_strides)
    Lse += _token0(prog, lse_strides)
    Delta += _token0(prog, lse_strides)
    Kpm += prog.b * kpm_strides.batch
    Coef += prog.h * coef_strides.head

    offs_j = start_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j64 = offs_j.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    offs_do = col0 + tl.arange(0, HEAD_DIM_OUT)
    offs_dvo = colv0 + tl.arange(0, HEAD_DIM_V_OUT)
    valid_j = offs_j < seqlen
    y_mask = valid_j[:, None] & (offs_d[None, :] < head_dim)
    v_mask = valid_j[:, None] & (offs_dv[None, :] < head_dim_v)
    out_mask = valid_j[:, None] & (offs_do[None, :] < head_dim)
    kpm_stat = seqlen
    if HAS_KPM and EXCLUDE_SELF:
        kpm_stat = _kpm_stat(Kpm, kpm_strides.token, seqlen, IS_CAUSAL, BLOCK_M)
    row_ctr0 = _row_ctr0(prog, n_rows, seqlen_padded, IS_VARLEN)
    if COEF_MODE == 1:
        coef = tl.load(Coef + offs_d * coef_strides.column, mask=offs_d < head_dim,
                       other=0.0).to(tl.float32)  # [HEAD_DIM]
        coef_out = tl.load(Coef + offs_do * coef_strides.column, mask=offs_do < head_dim, other=0.0).to(tl.float32)
    else:
        coef = scale  # unused
        coef_out = scale

    # J's operand tiles, each staged through registers once. On wide heads a barrier between the
    # loads keeps ptxas from holding several [BLOCK_M, 256] tiles in flight at once (it spilled).
    y_j = tl.load(Y + offs_j64[:, None] * y_strides.token + offs_d[None, :], mask=y_mask,
                  other=0.0)  # [BLOCK_M, HEAD_DIM]
    real_j = valid_j
    if HAS_KPM:  # padded rows: NaN/Inf read as 0, values as 0 (see _symattn_bwd_inner)
        real_j = _real_tokens(Kpm, kpm_strides.token, offs_j, seqlen)
        y_j = _padding_finite(y_j, real_j)
    if QUERY:
        if HEAD_DIM > 128:
            tl.debug_barrier()
        do_j = tl.load(DO + offs_j64[:, None] * do_strides.token + offs_dv[None, :], mask=v_mask, other=0.0)
        if COEF_MODE == 2:  # Y_J M, folded on the host
            qm = tl.load(QM + _token0(prog, m_strides) + offs_j64[:, None] * m_strides.token
                         + offs_d[None, :], mask=y_mask, other=0.0)
        elif COEF_MODE == 1:  # Y_J M rounded once, exactly as the forward's query tile
            qm = (y_j.to(tl.float32) * coef[None, :]).to(y_j.dtype)
        else:
            qm = y_j
    else:
        qm, do_j = y_j, y_j  # placeholders: the key roles do not read them
    if KEY:
        if SHARED_V:
            v_j = y_j
        else:
            if HEAD_DIM > 128:
                tl.debug_barrier()
            v_j = tl.load(V + offs_j64[:, None] * v_strides.token + offs_dv[None, :],
                          mask=real_j[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        kq = y_j
    else:
        kq, v_j = y_j, y_j  # placeholders: the query role does not read them

    owned = OwnedBlock(offs_j, start_j * BLOCK_M, kq, qm, v_j, do_j, col0, colv0, coef, coef_out)
    seq = BwdSequence(Y, V, DO, Lse, Delta, Kpm, y_strides.token, v_strides.token, do_strides.token,
                      kpm_strides.token, seqlen, head_dim, head_dim_v, kpm_stat, row_ctr0,
                      QM + _token0(prog, m_strides), m_strides.token)
    dq_acc = tl.zeros([BLOCK_M, HEAD_DIM_OUT], dtype=tl.float32)
    dk_acc = tl.zeros([BLOCK_M, HEAD_DIM_OUT], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_M, HEAD_DIM_V_OUT], dtype=tl.float32)
    # Causal: blocks I left of J need only the query role, right of J only the key roles. The
    # role flags stay inline: a constexpr assigned to a name in a loop becomes a tensor.
    for stage in tl.static_range(3 if IS_CAUSAL else 1):
        if not IS_CAUSAL:
            lo, hi = 0, seqlen
        elif stage == 0:
            lo, hi = 0, start_j * BLOCK_M
        elif stage == 1:
            lo, hi = start_j * BLOCK_M, tl.minimum((start_j + 1) * BLOCK_M, seqlen)
        else:
            lo, hi = (start_j + 1) * BLOCK_M, seqlen
        if (KEY and (not IS_CAUSAL or stage > 0)) or (QUERY and (not IS_CAUSAL or stage < 2)):
            dq_acc, dk_acc, dv_acc = _symattn_bwd_inner(
                dq_acc, dk_acc, dv_acc, owned, seq, scale, dropout, lo, hi,
                SHARED_V, COEF_MODE, IS_CAUSAL, HAS_KPM, EXCLUDE_SELF, HAS_DROPOUT, DROPOUT_GROUPED,
                DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, SPLIT_D, BLOCK_N,
                KEY_ROLE=KEY and (not IS_CAUSAL or stage > 0),
                QUERY_ROLE=QUERY and (not IS_CAUSAL or stage < 2),
                DIAGONAL=IS_CAUSAL and stage == 1,
            )

    # Outputs of J, each written once; row pointers are formed here, not kept live.
    m_rows = _token0(prog, m_strides) + offs_j64[:, None] * m_strides.token
    if QUERY:
        if NEED_DCOEF:  # diagonal dM share of the block: scale * sum_rows Y_J * (G_J. Y)
            y_o = tl.load(Y + offs_j64[:, None] * y_strides.token + offs_do[None, :], mask=out_mask, other=0.0)
            if HAS_KPM:
                y_o = _padding_finite(y_o, real_j)
            slot = _partial_row(prog, start_j, IS_VARLEN, BLOCK_M) * num_heads + prog.h
            tl.store(DCoefPartial + slot * head_dim + offs_do, tl.sum(y_o.to(tl.float32) * dq_acc, axis=0) * scale,
                     mask=offs_do < head_dim)
        if COEF_MODE == 2:  # the host applies a full M: dY = DKM M + DQM M^T (+ dV, shared mode)
            tl.store(DQM + m_rows + offs_do[None, :], (dq_acc * scale).to(DQM.dtype.element_ty), mask=out_mask)
        else:
            if SHARED_V or KEY:  # the query role's share of dY itself
                if COEF_MODE == 1:
                    dq_acc = dq_acc * (coef_out * scale)[None, :]
                else:
                    dq_acc = dq_acc * scale
            if not KEY:  # to the key launch; without shared values it scales G^T Y + G Y at once
                tl.store(Work + m_rows + offs_do[None, :], dq_acc, mask=out_mask)
    if KEY:
        if COEF_MODE == 2:
            tl.store(DKM + m_rows + offs_do[None, :], (dk_acc * scale).to(DKM.dtype.element_ty), mask=out_mask)
        else:
            if ROLES == BWD_KEY_ROLES:  # the query launch's share (G Y unscaled without shared values)
                share = tl.load(Work + m_rows + offs_do[None, :], mask=out_mask, other=0.0)
                if SHARED_V:
                    dv_acc += share
                else:
                    dk_acc += share
            if SHARED_V:
                dy = dv_acc
            elif COEF_MODE == 1:
                dy = dk_acc * (coef_out * scale)[None, :]
            else:
                dy = dk_acc * scale
            if QUERY:  # one launch for all roles: the query role's share is added here
                dy += dq_acc
            DY += _token0(prog, dy_strides)
            tl.store(DY + offs_j64[:, None] * dy_strides.token + offs_do[None, :], dy.to(DY.dtype.element_ty),
                     mask=out_mask)
        if not SHARED_V or COEF_MODE == 2:  # shared mode, full M: the fp32 value-role share of dY
            DV += _token0(prog, dv_strides)
            tl.store(DV + offs_j64[:, None] * dv_strides.token + offs_dvo[None, :], dv_acc.to(DV.dtype.element_ty),
                     mask=valid_j[:, None] & (offs_dvo[None, :] < head_dim_v))


@triton.jit
def _symattn_bwd_sym_kernel(
    Y, V, Coef, Kpm, CuSeqlens, DO, Lse, Delta, DYAcc, DVAcc, DCoefPartial,
    y_strides, v_strides, do_strides, dy_acc_strides, dv_acc_strides, lse_strides, coef_strides, kpm_strides,
    num_heads, seqlen_padded, head_dim, head_dim_v, n_rows, scale, dropout,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    SHARED_V: tl.constexpr, COEF_MODE: tl.constexpr, NEED_DCOEF: tl.constexpr,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr, BH_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Symmetric backward (non-causal, M = I or diagonal, so S_IJ = S_JI^T): program j owns block
    J and visits its diagonal tile, then the BLOCK_N-row blocks I right of J. One score tile S_JI serves both ordered pairs: with
    G_sum = G_JI + G_IJ^T ([J, I], each from its own rows' lse and delta),
    dY_J += scale (G_sum Y_I) M + Pd_IJ^T dO_I in registers and dY_I += scale (G_sum^T Y_J) M +
    Pd_JI^T dO_J by fp32 atomics: 7 matmuls per block pair instead of 10 (not deterministic)."""
    start_j = tl.program_id(0)
    prog = _program_sequence(CuSeqlens, num_heads, seqlen_padded, BH_OFFSET, IS_VARLEN)
    seqlen = prog.seqlen
    if start_j * BLOCK_M >= seqlen:
        return
    prog = _in_int64(prog)
    Y += _token0(prog, y_strides)
    V += _token0(prog, v_strides)
    DO += _token0(prog, do_strides)
    DYAcc += _token0(prog, dy_acc_strides)
    DVAcc += _token0(prog, dv_acc_strides)
    Lse += _token0(prog, lse_strides)
    Delta += _token0(prog, lse_strides)
    Kpm += prog.b * kpm_strides.batch

    offs_j = start_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j64 = offs_j.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    valid_j = offs_j < seqlen
    y_mask = valid_j[:, None] & (offs_d[None, :] < head_dim)
    v_mask = valid_j[:, None] & (offs_dv[None, :] < head_dim_v)
    real_j = valid_j
    if HAS_KPM:
        real_j = _real_tokens(Kpm, kpm_strides.token, offs_j, seqlen)
    y_j = tl.load(Y + offs_j64[:, None] * y_strides.token + offs_d[None, :], mask=y_mask,
                  other=0.0)  # [BLOCK_M, HEAD_DIM]
    if HAS_KPM:  # padded rows: NaN/Inf read as 0, values as 0 (see _symattn_bwd_inner)
        y_j = _padding_finite(y_j, real_j)
    if SHARED_V:
        v_j = y_j
    else:
        v_j = tl.load(V + offs_j64[:, None] * v_strides.token + offs_dv[None, :],
                      mask=real_j[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    do_j = tl.load(DO + offs_j64[:, None] * do_strides.token + offs_dv[None, :], mask=v_mask, other=0.0)
    lse2_j = tl.load(Lse + offs_j, mask=valid_j, other=0.0) * LOG2E
    delta_j = tl.load(Delta + offs_j, mask=valid_j, other=0.0)
    kpm_stat = seqlen
    if HAS_KPM:
        if EXCLUDE_SELF:
            kpm_stat = _kpm_stat(Kpm, kpm_strides.token, seqlen, False, BLOCK_M)
    row_ctr_base = _row_ctr0(prog, n_rows, seqlen_padded, IS_VARLEN)
    row_ctr_j = row_ctr_base + offs_j64
    qk_scale = scale * LOG2E
    if COEF_MODE == 1:
        c = tl.load(Coef + prog.h * coef_strides.head + offs_d * coef_strides.column, mask=offs_d < head_dim,
                    other=0.0).to(tl.float32)
        qm_j = (y_j.to(tl.float32) * c[None, :]).to(y_j.dtype)
        out_coef = c * scale  # [HEAD_DIM]
    else:
        qm_j = y_j
        out_coef = tl.full([HEAD_DIM], 1.0, tl.float32) * scale

    # Diagonal block (J, J): one tile [queries J, keys J]; dY_J += scale (G + G^T) Y_J M.
    s_d = tl.dot(qm_j, tl.trans(y_j), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_M]
    allowed = valid_j[:, None] & real_j[None, :]
    if EXCLUDE_SELF:
        has_other_j = _has_other_key(offs_j, seqlen, kpm_stat, real_j, False, HAS_KPM)
        allowed = allowed & ((offs_j[:, None] != offs_j[None, :]) | (has_other_j[:, None] == 0))
    p_d = tl.where(allowed, tl.math.exp2(s_d - lse2_j[:, None]), 0.0)
    dp_d = tl.dot(do_j, tl.trans(v_j), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        # Per-element draws: at the register cap already, the grouped draw spills (sm_90, 8 bytes).
        keep_d = _dropout_keep(dropout, row_ctr_j, start_j * BLOCK_M, BLOCK_M, False, False)
        pd_d = tl.where(keep_d, p_d * dropout.inv_keep, 0.0)
        dp_d = tl.where(keep_d, dp_d * dropout.inv_keep, 0.0)
    else:
        pd_d = p_d
    g_d = p_d * (dp_d - delta_j[:, None])
    a_acc = tl.dot((g_d + tl.trans(g_d)).to(y_j.dtype), y_j, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM]
    dv_acc = tl.dot(tl.trans(pd_d).to(do_j.dtype), do_j, input_precision=DOT_PRECISION)  # [BLOCK_M, HEAD_DIM_V]
    dc_acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if NEED_DCOEF:
        dc_acc += 0.5 * tl.sum(y_j.to(tl.float32) * a_acc, axis=0)

    for start_i in range((start_j + 1) * BLOCK_M, seqlen, BLOCK_N):
        start_i = tl.multiple_of(start_i, BLOCK_N)
        offs_i = start_i + tl.arange(0, BLOCK_N)
        offs_i64 = offs_i.to(tl.int64)
        valid_i = offs_i < seqlen
        yi_mask = valid_i[:, None] & (offs_d[None, :] < head_dim)
        vi_mask = valid_i[:, None] & (offs_dv[None, :] < head_dim_v)
        real_i = valid_i
        if HAS_KPM:
            real_i = _real_tokens(Kpm, kpm_strides.token, offs_i, seqlen)
        y_i = tl.load(Y + offs_i64[:, None] * y_strides.token + offs_d[None, :], mask=yi_mask, other=0.0)
        if HAS_KPM:
            y_i = _padding_finite(y_i, real_i)
        if SHARED_V:
            v_i = y_i
        else:
            v_i = tl.load(V + offs_i64[:, None] * v_strides.token + offs_dv[None, :],
                          mask=real_i[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        do_i = tl.load(DO + offs_i64[:, None] * do_strides.token + offs_dv[None, :], mask=vi_mask, other=0.0)
        lse2_i = tl.load(Lse + offs_i, mask=valid_i, other=0.0) * LOG2E
        delta_i = tl.load(Delta + offs_i, mask=valid_i, other=0.0)
        # One score tile [J, I]: S_JI, and S_IJ^T (the same numbers, M symmetric).
        s = tl.dot(qm_j, tl.trans(y_i), input_precision=DOT_PRECISION) * qk_scale
        pair = valid_j[:, None] & valid_i[None, :]
        p = tl.where(pair & real_i[None, :], tl.math.exp2(s - lse2_j[:, None]), 0.0)  # P_JI
        p_t = tl.where(pair & real_j[:, None], tl.math.exp2(s - lse2_i[None, :]), 0.0)  # P_IJ^T
        dp = tl.dot(do_j, tl.trans(v_i), input_precision=DOT_PRECISION)  # dP_JI
        dp_t = tl.dot(v_j, tl.trans(do_i), input_precision=DOT_PRECISION)  # dP_IJ^T
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout, row_ctr_j, start_i, BLOCK_N, False, False)
            keep_t = _dropout_keep(dropout, row_ctr_base + offs_i64, start_j * BLOCK_M, BLOCK_M, True,
                                   False)  # [J, I]
            pd = tl.where(keep, p * dropout.inv_keep, 0.0)
            dp = tl.where(keep, dp * dropout.inv_keep, 0.0)
            pd_t = tl.where(keep_t, p_t * dropout.inv_keep, 0.0)
            dp_t = tl.where(keep_t, dp_t * dropout.inv_keep, 0.0)
        else:
            pd = p
            pd_t = p_t
        g_sum = (p * (dp - delta_j[:, None]) + p_t * (dp_t - delta_i[None, :])).to(y_j.dtype)  # G_JI + G_IJ^T
        a_acc = tl.dot(g_sum, y_i, a_acc, input_precision=DOT_PRECISION)
        dv_acc = tl.dot(pd_t.to(do_i.dtype), do_i, dv_acc, input_precision=DOT_PRECISION)
        t_i = tl.dot(tl.trans(g_sum), y_j, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM]
        dv_i = tl.dot(tl.trans(pd).to(do_j.dtype), do_j, input_precision=DOT_PRECISION)  # [BLOCK_N, HEAD_DIM_V]
        if NEED_DCOEF:
            dc_acc += tl.sum(y_i.to(tl.float32) * t_i, axis=0)
        dy_i = t_i * out_coef[None, :]
        if SHARED_V:
            tl.atomic_add(DYAcc + offs_i64[:, None] * dy_acc_strides.token + offs_d[None, :], dy_i + dv_i, mask=yi_mask,
                          sem="relaxed")
        else:
            tl.atomic_add(DYAcc + offs_i64[:, None] * dy_acc_strides.token + offs_d[None, :], dy_i, mask=yi_mask,
                          sem="relaxed")
            tl.atomic_add(DVAcc + offs_i64[:, None] * dv_acc_strides.token + offs_dv[None, :], dv_i, mask=vi_mask,
                          sem="relaxed")

    dy_j = a_acc * out_coef[None, :]
    if SHARED_V:
        tl.atomic_add(DYAcc + offs_j64[:, None] * dy_acc_strides.token + offs_d[None, :], dy_j + dv_acc, mask=y_mask,
                      sem="relaxed")
    else:
        tl.atomic_add(DYAcc + offs_j64[:, None] * dy_acc_strides.token + offs_d[None, :], dy_j, mask=y_mask,
                      sem="relaxed")
        tl.atomic_add(DVAcc + offs_j64[:, None] * dv_acc_strides.token + offs_dv[None, :], dv_acc, mask=v_mask,
                      sem="relaxed")
    if NEED_DCOEF:
        slot = _partial_row(prog, start_j, IS_VARLEN, BLOCK_M) * num_heads + prog.h
        tl.store(DCoefPartial + slot * head_dim + offs_d, dc_acc * scale, mask=offs_d < head_dim)


def bwd_fuse_roles(head_dim_pad: int, head_dim_v_pad: int, shared_v: bool, coef_mode: int, dropout: bool) -> bool:
    """One launch for all roles (each tile read once, one score tile for both roles) where its
    register state fits without spills on sm_80/sm_90 (bench.compile_report): shared mode,
    symmetric M, no dropout, head dim <= 64. Otherwise a query launch, then a key launch."""
    return shared_v and coef_mode != 2 and not dropout and max(head_dim_pad, head_dim_v_pad) <= 64


# Widest (padded) head dim the backward runs on sm_90: at 256 the [64, 256] operand and fp32
# tiles leave too few registers for the rest, even with SPLIT_D (bench.compile_report).
BWD_MAX_HEAD_DIM_SM90 = 128


def backward_unsupported(head_dim: int, head_dim_v: int, arch: int) -> str:
    """Why the Triton backward cannot run these head dims on sm_``arch`` ("" when it can): the
    cases without a spill-free config. ``backends.resolve`` routes ``backend="auto"`` past them
    and an explicit ``backend="triton"`` raises this message."""
    widest = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    if arch >= 90 and widest > BWD_MAX_HEAD_DIM_SM90:
        return (f"q has head dim {head_dim} and the values {head_dim_v}: the Triton backward has no spill-free "
                f"sm_90 kernel for head dims above {BWD_MAX_HEAD_DIM_SM90} (python -m bench.compile_report); use "
                "backend='torch' (or 'auto', which picks it), or call without gradients")
    return ""


def bwd_plan(head_dim_pad: int, head_dim_v_pad: int, shared_v: bool, coef_mode: int, dropout: bool, arch: int = 90):
    """(fuse_roles, (BLOCK_M, BLOCK_N, num_warps, num_stages), splits) of the default backward on
    sm_``arch``: the one table the launcher and ``python -m bench.compile_report`` both read, each
    entry checked there for spills (none) and, on sm_90, HGMMA. ``splits`` has one SPLIT_D per
    launch (all roles, or query then key roles).

    A table, not autotuned: the dcoef partial buffer is laid out by BLOCK_M, and an autotuner's
    trial runs would leave stale slots of other block sizes in it. An fp32 [rows, D] accumulator
    costs D/2 registers a thread whatever the rows and warps (chained dots put the warps along
    the rows), so the table trims what else is live: sm_90 keeps 64 rows (one wgmma) on 4 warps
    (8 warps would duplicate every tile), sm_80 takes 32 rows on 8 warps; on sm_90 the key launch
    of separate values with D + Dv >= 256 (192 before Triton 3.9 or with a full M) holds dK and
    dV for half the columns at a time, and so does sm_80's with a full M at 256/256.

    Raises ValueError where no config is spill-free (``backward_unsupported``)."""
    reason = backward_unsupported(head_dim_pad, head_dim_v_pad, arch)
    if reason:
        raise ValueError(reason)
    if bwd_fuse_roles(head_dim_pad, head_dim_v_pad, shared_v, coef_mode, dropout):
        # sm_80 single-stage: two stages spill 32 bytes under Triton 3.6 (clean under 3.9).
        return True, (64, 32, 4, 2 if arch >= 90 else 1), (1,)
    if arch < 90:  # a full M's key launch at 256/256 also holds the Y_I M tile: half the columns
        split_key = 2 if not shared_v and coef_mode == 2 and head_dim_pad + head_dim_v_pad >= 512 else 1
        if shared_v and dropout and head_dim_pad >= 256:
            # The shared key launch with dropout at 256 spills 16 bytes at 32 rows (split or not);
            # 16 rows on 8 warps is clean, and the query launch with its columns halved
            # (bench.compile_report).
            return False, (16, 16, 8, 1), (2, 1)
        return False, (32, 16, 8, 1), (1, split_key)
    split_key = 2 if not shared_v and head_dim_pad + head_dim_v_pad >= _sm90_split_key_width(coef_mode) else 1
    return False, (64, 16, 4, 1), (1, split_key)


def _sm90_split_key_width(coef_mode: int = 0) -> int:
    """Narrowest D + Dv whose sm_90 key launch (separate values) splits its columns: 256, but
    192 for a full coefficient (its key role also loads the Y_I M tile: 48 bytes of stack at
    64/128 under Triton 3.9) and before Triton 3.9, whose allocation spills the all-options
    64/128 key launch (32 bytes under Triton 3.6, python -m bench.compile_report) unless split."""
    return 256 if TRITON_VERSION >= (3, 9) and coef_mode != 2 else 192


# Under the interpreter (and in tests) one fixed config; BLOCK_M != BLOCK_N exercises the stages.
INTERPRET_BWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
INTERPRET_BWD_SPLIT_D = 1  # SPLIT_D of every launch (tests set 2)
PREPROCESS_BLOCK_M = 32
# Widest (padded) head of a half-precision call whose Delta = rowsum(dO * O) reads the rounded O.
# With q = k a token's self-score dominates its row, and dS_ii = P_ii (dP_ii - Delta_i) cancels
# the rounding of O into the gradients; flash-attn's error rule fails from head dim 224 in bf16.
# Wider heads take O in fp32 from one more forward pass (the unrounded O, recomputed).
ROUNDED_DELTA_MAX_HEAD_DIM = 128


# Triton releases before this one spill the sm_90 symmetric backward with dropout (with a
# padding mask and a diagonal coefficient, 56 bytes of stack under Triton 3.6, at every 64-row
# config; 32 rows lose wgmma), so there that case takes the default backward.
SYM_BWD_SM90_DROPOUT_MIN_TRITON = (3, 9)


def sym_bwd_config(head_dim_pad: int, head_dim_v_pad: int, arch: int, dropout: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the symmetric backward on sm_``arch`` (80 or
    90), or None where its register state (two fp32 accumulators of the owned block, the pair's
    five score-sized tiles and the other block's contributions) spills: head dims above 64 use
    the default backward, and so does dropout on sm_90 under Triton older than
    ``SYM_BWD_SM90_DROPOUT_MIN_TRITON``. sm_90 keeps 64 owned rows (one wgmma), single-stage with
    dropout (two stages spill the Philox state); sm_80 fits 32, single-stage (two stages spill
    16 bytes under Triton 3.6)."""
    if max(head_dim_pad, head_dim_v_pad) > 64:
        return None
    if arch >= 90:
        return None if dropout and TRITON_VERSION < SYM_BWD_SM90_DROPOUT_MIN_TRITON else (64, 16, 8, 1 if dropout else 2)
    return (32, 16, 8, 1)


# Triton releases before this one spill the sm_80 query launch at head dim 256 with every option
# (varlen, full coefficient, separate values, padding, exclude_self) when it draws one Philox call
# per 8 keys (8 bytes of stack under Triton 3.6; per element it stays clean).
BWD_SM80_WIDE_GROUPED_DROPOUT_MIN_TRITON = (3, 9)


def bwd_groups_dropout(head_dim_pad: int, head_dim_v_pad: int, arch: int) -> bool:
    """Whether the default backward's launches may draw one Philox call per 8 keys
    (DROPOUT_GROUPED, where ``dropout_grouped`` allows it): not on sm_80 at head dim 256 under
    Triton older than ``BWD_SM80_WIDE_GROUPED_DROPOUT_MIN_TRITON``."""
    return arch >= 90 or max(head_dim_pad, head_dim_v_pad) < 256 or \
        TRITON_VERSION >= BWD_SM80_WIDE_GROUPED_DROPOUT_MIN_TRITON


def use_symmetric_bwd(coef, causal: bool, deterministic: bool, head_dim_pad: int = 16,
                      head_dim_v_pad: int = 16, arch: int = 90, dropout: bool = False) -> bool:
    """The symmetric backward (opt-in with deterministic=False) needs S symmetric (M = I or
    diagonal) and gains nothing under a causal mask (the pair (J, I) of I > J is masked); on a
    GPU also a config from ``sym_bwd_config``."""
    if deterministic or causal or coef_mode(coef) == 2:
        return False
    return is_interpret() or sym_bwd_config(head_dim_pad, head_dim_v_pad, arch, dropout) is not None


def _symmetric_backward(q, v, coef, key_padding_mask, cu_seqlens, seed, dout, lse, delta, dq, dv, dcoef, scale,
                        dropout_p, exclude_self, layout):
    """Launch ``_symattn_bwd_sym_kernel`` into fp32 accumulators, then convert into dq / dv."""
    batch, seqlen_padded, num_heads, head_dim, head_dim_v = layout[:5]
    is_varlen = layout.is_varlen
    if is_interpret():
        block_m, block_n, launch = INTERPRET_BWD_CONFIG["BLOCK_M"], INTERPRET_BWD_CONFIG["BLOCK_N"], {}
    else:
        block_m, block_n, warps, stages = sym_bwd_config(padded_head_dim(q.shape[-1]),
                                                         padded_head_dim(q.shape[-1] if v is None else v.shape[-1]),
                                                         device_arch(q.device), dropout_p > 0.0)
        launch = {"num_warps": warps, "num_stages": stages}
    mode = coef_mode(coef)
    n_blocks = triton.cdiv(seqlen_padded, block_m)
    need_dcoef = dcoef is not None and mode != 0
    dy_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dv_acc = None if v is None else torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dcoef_partial = None
    if need_dcoef:
        dcoef_partial = torch.zeros((partial_rows(layout, block_m), num_heads, head_dim), dtype=torch.float32,
                                    device=q.device)
    has_dropout = dropout_p > 0.0
    kpm = kpm_operand(key_padding_mask)
    dummy = lse  # never dereferenced: its constexpr flag is off
    args = [
        q, q if v is None else v, dummy if coef is None else coef, dummy if kpm is None else kpm,
        cu_seqlens if is_varlen else dummy, dout, lse, delta, dy_acc, dummy if dv_acc is None else dv_acc,
        dummy if dcoef_partial is None else dcoef_partial,
        token_strides(q, is_varlen), token_strides(q if v is None else v, is_varlen), token_strides(dout, is_varlen),
        token_strides(dy_acc, is_varlen), TokenStrides(0, 0, 0) if dv_acc is None else token_strides(dv_acc, is_varlen),
        lse_strides(lse, is_varlen), coef_strides(coef), mask_strides(kpm), *tail_args(layout, scale, dropout_p, seed),
    ]
    for bh_offset, rows in grid_row_chunks(batch * num_heads):
        _symattn_bwd_sym_kernel[(n_blocks, rows)](
            *args, BH_OFFSET=bh_offset, HEAD_DIM=padded_head_dim(head_dim), HEAD_DIM_V=padded_head_dim(head_dim_v),
            SHARED_V=v is None, COEF_MODE=mode, NEED_DCOEF=need_dcoef, HAS_KPM=kpm is not None, IS_VARLEN=is_varlen,
            HAS_DROPOUT=has_dropout, EXCLUDE_SELF=bool(exclude_self), DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, **launch,
        )
    dq.copy_(dy_acc)
    if dv is not None:
        dv.copy_(dv_acc)
    if dcoef is not None:
        if need_dcoef:
            dcoef.copy_(dcoef_partial.sum(dim=0).to(dcoef.dtype))
        else:
            dcoef.zero_()



def attention_backward(
    dout, dlse, q, v, coef, key_padding_mask, cu_seqlens, seed, out, lse, dq, dv, dcoef, scale, causal,
    dropout_p, exclude_self, max_seqlen, deterministic,
):
    """Fused attention backward; see the module docstring for the math.

    Writes, overwriting fully, ``dq`` (like ``q``; in shared mode the sum of the query, key and
    value roles), ``dv`` (like ``v``, or None) and ``dcoef`` (like ``coef``, or None when not
    needed). ``dout`` is like ``out``; ``dlse`` (like ``lse``) is optional. The other arguments
    are those of ``attention_forward`` plus its outputs ``out`` and ``lse``. With
    ``deterministic=False``, non-causal attention and M = I or diagonal, the symmetric kernel
    runs (one score tile per block pair, fp32 atomics; ``use_symmetric_bwd``); otherwise the
    default kernel, which never uses atomics and is deterministic.
    """
    q, v, coef, layout = prepare_call(q, v, coef, cu_seqlens, max_seqlen, dropout_p, seed)
    is_varlen = layout.is_varlen
    dout, out = unit_last_stride(dout), unit_last_stride(out)
    batch, seqlen_padded, num_heads, head_dim, head_dim_v = layout[:5]
    if q.numel() == 0 or seqlen_padded == 0 or (v is not None and v.numel() == 0):
        for t in (dq, dv, dcoef):
            if t is not None:
                t.zero_()
        return
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    # dq / dv may be any caller buffer with unit last stride; otherwise write a copy back.
    dq_k = dq if dq.stride(-1) == 1 else torch.empty_like(dq, memory_format=torch.contiguous_format)
    dv_k = dv if dv is None or dv.stride(-1) == 1 else torch.empty_like(dv, memory_format=torch.contiguous_format)

    interpret = is_interpret()
    hd_pad, hdv_pad = padded_head_dim(head_dim), padded_head_dim(head_dim_v)
    arch = 90 if interpret else device_arch(q.device)
    symmetric = use_symmetric_bwd(coef, causal, deterministic, hd_pad, hdv_pad, arch, dropout_p > 0.0)
    if interpret:
        fuse_roles = bwd_fuse_roles(hd_pad, hdv_pad, v is None, coef_mode(coef), dropout_p > 0.0)
        blocks, launch, splits = dict(INTERPRET_BWD_CONFIG), {}, (INTERPRET_BWD_SPLIT_D,) * (1 if fuse_roles else 2)
    elif not symmetric:  # a variant without a config raises ValueError here, before any work
        reason = backward_unsupported(head_dim, head_dim_v, arch)
        if reason:
            raise ValueError(reason)
        fuse_roles, (block_m, block_n, warps, stages), splits = bwd_plan(
            hd_pad, hdv_pad, v is None, coef_mode(coef), dropout_p > 0.0, arch)
        blocks, launch = {"BLOCK_M": block_m, "BLOCK_N": block_n}, {"num_warps": warps, "num_stages": stages}
    if out.dtype in (torch.float16, torch.bfloat16) and max(hd_pad, hdv_pad) > ROUNDED_DELTA_MAX_HEAD_DIM:
        out = attention_forward(q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p,
                                exclude_self, max_seqlen, deterministic, out_dtype=torch.float32)[0]
    delta = torch.empty_like(lse)
    for bh_offset, rows in grid_row_chunks(batch * num_heads):
        _symattn_bwd_preprocess[(triton.cdiv(seqlen_padded, PREPROCESS_BLOCK_M), rows)](
            out, dout, lse if dlse is None else dlse, delta, cu_seqlens if is_varlen else lse,
            token_strides(out, is_varlen), token_strides(dout, is_varlen), lse_strides(lse, is_varlen),
            num_heads, seqlen_padded, head_dim_v, BH_OFFSET=bh_offset,
            HEAD_DIM_V=hdv_pad, HAS_DLSE=dlse is not None, IS_VARLEN=is_varlen, BLOCK_M=PREPROCESS_BLOCK_M,
        )

    if symmetric:
        _symmetric_backward(q, v, coef, key_padding_mask, cu_seqlens, seed, dout, lse, delta, dq, dv, dcoef, scale,
                            dropout_p, exclude_self, layout)
        return

    n_blocks = triton.cdiv(seqlen_padded, blocks["BLOCK_M"])
    mode = coef_mode(coef)
    need_dcoef = dcoef is not None and mode == 1
    dcoef_partial = None
    if need_dcoef:
        dcoef_partial = torch.zeros((partial_rows(layout, blocks["BLOCK_M"]), num_heads, head_dim),
                                    dtype=torch.float32, device=q.device)
    qm = dqm = dkm = work = None
    if mode == 2:  # a full M enters as the folded operand Y M and leaves as G Y, G^T Y
        qm = padding_finite(coef_product(q, coef), key_padding_mask).contiguous()  # as the kernel reads Y
        dqm, dkm = torch.empty_like(qm), torch.empty_like(qm)
        if v is None:  # the value role's share of dY, added on the host in fp32
            dv_k = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    elif not fuse_roles:  # the query launch's fp32 share of dY, for the key launch
        work = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    m_like = qm if qm is not None else work  # QM, DQM, DKM and Work share one contiguous layout

    has_dropout = dropout_p > 0.0
    kpm = kpm_operand(key_padding_mask)
    dummy = lse  # never dereferenced: its constexpr flag is off
    args = [
        q, q if v is None else v, coef if mode == 1 else dummy, dummy if qm is None else qm,
        dummy if kpm is None else kpm, cu_seqlens if is_varlen else dummy, dout, lse,
        delta, dq_k, dummy if dv_k is None else dv_k, dummy if dqm is None else dqm, dummy if dkm is None else dkm,
        dummy if work is None else work, dummy if dcoef_partial is None else dcoef_partial,
        token_strides(q, is_varlen), token_strides(q if v is None else v, is_varlen), token_strides(dout, is_varlen),
        token_strides(dq_k, is_varlen), TokenStrides(0, 0, 0) if dv_k is None else token_strides(dv_k, is_varlen),
        TokenStrides(0, 0, 0) if m_like is None else token_strides(m_like, is_varlen), lse_strides(lse, is_varlen),
        coef_strides(coef), mask_strides(kpm), *tail_args(layout, scale, dropout_p, seed),
    ]
    constexprs = dict(
        HEAD_DIM=hd_pad, HEAD_DIM_V=hdv_pad, SHARED_V=v is None, COEF_MODE=mode, NEED_DCOEF=need_dcoef,
        IS_CAUSAL=bool(causal), HAS_KPM=kpm is not None, IS_VARLEN=is_varlen,
        HAS_DROPOUT=has_dropout,
        DROPOUT_GROUPED=has_dropout and dropout_grouped(layout) and bwd_groups_dropout(hd_pad, hdv_pad, arch),
        EXCLUDE_SELF=bool(exclude_self), DOT_PRECISION=dot_precision(q.dtype), **blocks,
    )
    for roles, split_d in zip((BWD_ALL_ROLES,) if fuse_roles else (BWD_QUERY_ROLE, BWD_KEY_ROLES), splits):
        for bh_offset, rows in grid_row_chunks(batch * num_heads):
            _symattn_bwd_kernel[(n_blocks, rows, split_d)](*args, ROLES=roles, SPLIT_D=split_d, BH_OFFSET=bh_offset,
                                                           **constexprs, **launch)

    if mode == 2:
        # dY = (scale G^T Y) M + (scale G Y) M^T in one fp32-accumulated matmul, + Pd^T dO (shared);
        # dM = Y^T (scale G Y), reduced over batch and tokens in fp32.
        lhs = torch.cat((dkm, dqm), dim=-1).float()  # [..., H, 2D]
        rhs = torch.cat((coef, coef.transpose(1, 2)), dim=1).float()  # [H, 2D, D]
        dy = torch.einsum("...hk,hkd->...hd", lhs, rhs)
        if v is None:
            dy += dv_k
        dq_k.copy_(dy)
        if dcoef is not None:
            y = padding_finite(q.float(), key_padding_mask)
            dcoef.copy_(torch.einsum("...hd,...he->hde", y, dqm.float()).to(dcoef.dtype))
    if dq_k is not dq:
        dq.copy_(dq_k)
    if dv is not None and dv_k is not dv:
        dv.copy_(dv_k)
    if dcoef is not None and mode != 2:
        if need_dcoef:
            dcoef.copy_(dcoef_partial.sum(dim=0).to(dcoef.dtype))
        else:
            dcoef.zero_()
