"""Fused forward of shared-projection attention (FlashAttention-2 structure).

Per batch b and head h, with Y = q[b, :, h] ([S, D]) and M = I | diag(coef[h]) | coef[h]:

    S   = scale * (Y M) Y^T + mask        P = softmax_rows(S)        lse = logsumexp_rows(S)
    out = (P * keep * r) V                V = v[b, :, h], or Y itself (shared mode)

with keep the dropout mask and r = reference.dropout_scale(p) = 1 / its keep probability.

One program per (query block, batch * head, value-column group). The coefficient enters the
query tile once (Y_I M: a diagonal M scales the loaded tile, a full one arrives as QM = Y M from
one batched matmul on the host), so every key tile costs one tl.dot. The online softmax keeps a
running max m_i and sum l_i in log2 units (exp2 with log2(e) folded into the scale) and fp32
accumulators; lse is stored in nats for the backward. In shared mode (v is None) the values are
the keys, so one tile load per key block serves as key and value, and the program's own query
tile Y_I, already in registers, is its diagonal key/value tile (skipped in the key loop): the
kernel reads one [S, D] tensor where standard attention reads three, and each program reads it
once. Causal attention visits the blocks left of the diagonal without masks (STAGE 1) and masks
only the diagonal blocks (STAGE 2); non-causal attention is one pass with a boundary mask
(STAGE 3). SPLIT_D > 1 gives each program a group of the value columns (scores recomputed per
group), for wide heads. A row with no allowed key keeps m_i = -inf and l_i = 0 and stores
out = 0, lse = -inf. Dropout regenerates ``reference.dropout_keep_mask`` with Philox-4x32-10,
one call per 8 keys of a row when the key stride is a multiple of 8 (``_dropout_keep``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Device side: constants and the @triton.jit helpers the kernels share.
from .attention_common import (LN2, LOG2E, _dropout_keep, _has_other_key, _kpm_stat, _padding_finite,
                               _program_sequence, _real_tokens, _in_int64, _row_ctr0, _token0)
# Host side: the launch pieces and argument bundles the launchers share.
from .attention_common import (TokenStrides, coef_mode, coef_product, coef_strides, device_arch, dot_precision,
                               dropout_grouped, grid_row_chunks, is_interpret, kpm_operand, lse_strides, mask_strides,
                               padded_head_dim, padding_finite, prepare_call, tail_args, token_strides,
                               unit_last_stride)
from .features import warp_specialize_for

__all__ = ["attention_forward"]


class FwdQueries(NamedTuple):
    """The program's query block as the key loop uses it: its token rows, Y_I M (the query
    tile), the score scale in log2 units, whether each row has an allowed key other than itself
    (exclude_self) and its dropout counter rows."""

    offs_m: object
    qm: object
    qk_scale: float
    has_other: object
    row_ctr: object


class FwdKeys(NamedTuple):
    """What the key loop reads of one (batch, head): key and value pointers at the sequence's
    token 0 (Kpm at its mask byte) with their row strides, its sizes, and the key columns
    (offs_d) and value columns (offs_dv, those the accumulator holds) of a tile."""

    K: object
    V: object
    Kpm: object
    stride_ks: int
    stride_vs: int
    stride_kpms: int
    seqlen: int
    head_dim: int
    head_dim_v: int
    offs_d: object
    offs_dv: object


@triton.jit
def _symattn_fwd_update(
    acc, l_i, m_i, qk, v, key0, offs_n, real_n, queries, keys, dropout,
    STAGE: tl.constexpr, HAS_KPM: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DROPOUT_GROUPED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step: scaled scores qk [BLOCK_M, keys] (log2 units) against the key
    rows offs_n = key0 + [0, keys) (key0 a multiple of the key block), value tile v [keys, HEAD_DIM_V]."""
    offs_m = queries.offs_m
    if STAGE != 1 or HAS_KPM or EXCLUDE_SELF:
        # STAGE 1 keys lie left of the query block, hence inside the sequence.
        allowed = offs_n[None, :] < keys.seqlen
        if STAGE == 2:
            allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
        if HAS_KPM:
            allowed = allowed & real_n[None, :]
        if EXCLUDE_SELF:
            allowed = allowed & ((offs_m[:, None] != offs_n[None, :]) | (queries.has_other[:, None] == 0))
        qk = tl.where(allowed, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing allowed so far keeps m = -inf; subtract 0 there instead (no NaN).
    m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(dropout, queries.row_ctr, key0, offs_n.shape[0], False, DROPOUT_GROUPED)
        p = tl.where(keep, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _symattn_fwd_block(
    acc, l_i, m_i, start_n, queries, keys, dropout,
    STAGE: tl.constexpr, SHARED_V: tl.constexpr, HAS_KPM: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key block at start_n: load it (and its values), then one online-softmax step."""
    offs_d, offs_dv = keys.offs_d, keys.offs_dv
    start_n = tl.multiple_of(start_n, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    rows_n = offs_n < keys.seqlen
    if HAS_KPM:  # padded keys read as 0: their zero weights must not meet NaN/Inf stored there
        rows_n = _real_tokens(keys.Kpm, keys.stride_kpms, offs_n, keys.seqlen)
    k = tl.load(
        keys.K + offs_n64[:, None] * keys.stride_ks + offs_d[None, :],
        mask=((rows_n if SHARED_V else offs_n < keys.seqlen)[:, None]) & (offs_d[None, :] < keys.head_dim), other=0.0,
    )  # [BLOCK_N, HEAD_DIM]; separate values: padded keys meet -inf scores
    qk = tl.dot(queries.qm, tl.trans(k), input_precision=DOT_PRECISION) * queries.qk_scale  # [BLOCK_M, BLOCK_N]
    if SHARED_V and offs_dv.shape[0] == offs_d.shape[0]:  # all of the values: the key tile itself
        v = k
    else:
        v = tl.load(
            keys.V + offs_n64[:, None] * keys.stride_vs + offs_dv[None, :],
            mask=rows_n[:, None] & (offs_dv[None, :] < keys.head_dim_v), other=0.0,
        )  # [BLOCK_N, HEAD_DIM_V / SPLIT_D]
    return _symattn_fwd_update(acc, l_i, m_i, qk, v, start_n, offs_n, rows_n, queries, keys, dropout,
                               STAGE, HAS_KPM, EXCLUDE_SELF, HAS_DROPOUT, DROPOUT_GROUPED, DOT_PRECISION)


@triton.jit
def _symattn_fwd_inner(
    acc, l_i, m_i, lo, hi, queries, keys, dropout,
    STAGE: tl.constexpr, SHARED_V: tl.constexpr, HAS_KPM: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Key blocks [lo, hi) of one causal STAGE. The warp-specialised loop is only reached where
    ``features.warp_specialize_for`` allows it (the keyword does not exist before Triton 3.4)."""
    if WARP_SPECIALIZE:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _symattn_fwd_block(acc, l_i, m_i, start_n, queries, keys, dropout, STAGE, SHARED_V,
                                               HAS_KPM, EXCLUDE_SELF, HAS_DROPOUT, DROPOUT_GROUPED, DOT_PRECISION,
                                               BLOCK_N)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _symattn_fwd_block(acc, l_i, m_i, start_n, queries, keys, dropout, STAGE, SHARED_V,
                                               HAS_KPM, EXCLUDE_SELF, HAS_DROPOUT, DROPOUT_GROUPED, DOT_PRECISION,
                                               BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _symattn_fwd_kernel(
    Q, V, Coef, QM, Kpm, CuSeqlens, Out, Lse,
    q_strides, v_strides, out_strides, qm_strides, lse_strides, coef_strides, kpm_strides,
    num_heads, seqlen_padded, head_dim, head_dim_v, n_rows, scale, dropout,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    SHARED_V: tl.constexpr, COEF_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_GROUPED: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr, REUSE_DIAG: tl.constexpr,
    SPLIT_D: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BH_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, b * H + h - BH_OFFSET, g): query block m of one head, value columns of group g of SPLIT_D
    (each group recomputes the scores; the first stores lse). Strides come per tensor
    (``TokenStrides``, ``CoefStrides``, ``MaskStrides``), dropout constants as ``Dropout``."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM_V % SPLIT_D == 0 and (SPLIT_D == 1 or not REUSE_DIAG))
    HEAD_DIM_V_OUT: tl.constexpr = HEAD_DIM_V // SPLIT_D
    start_m = tl.program_id(0)
    prog = _program_sequence(CuSeqlens, num_heads, seqlen_padded, BH_OFFSET, IS_VARLEN)
    seqlen = prog.seqlen
    if start_m * BLOCK_M >= seqlen:
        return
    prog = _in_int64(prog)
    Q += _token0(prog, q_strides)
    V += _token0(prog, v_strides)
    Out += _token0(prog, out_strides)
    Lse += _token0(prog, lse_strides)
    Kpm += prog.b * kpm_strides.batch

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.program_id(2) * HEAD_DIM_V_OUT + tl.arange(0, HEAD_DIM_V_OUT)
    row_mask = offs_m < seqlen
    q = tl.load(
        Q + offs_m.to(tl.int64)[:, None] * q_strides.token + offs_d[None, :],
        mask=row_mask[:, None] & (offs_d[None, :] < head_dim), other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    real_m = row_mask
    if HAS_KPM:  # a padded query row is computed from its finite entries: it feeds the key gradients
        real_m = _real_tokens(Kpm, kpm_strides.token, offs_m, seqlen)
        q = _padding_finite(q, real_m)
    # The coefficient enters the query tile once: scores = (Y_I M) Y_J^T for every key block. A
    # full M arrives folded (QM = Y M, one batched matmul on the host).
    if COEF_MODE == 1:
        c = tl.load(Coef + prog.h * coef_strides.head + offs_d * coef_strides.column, mask=offs_d < head_dim,
                    other=0.0)
        qm = (q.to(tl.float32) * c.to(tl.float32)[None, :]).to(q.dtype)
    elif COEF_MODE == 2:
        QM += _token0(prog, qm_strides)
        qm = tl.load(
            QM + offs_m.to(tl.int64)[:, None] * qm_strides.token + offs_d[None, :],
            mask=row_mask[:, None] & (offs_d[None, :] < head_dim), other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
    else:
        qm = q

    has_other = row_mask
    if EXCLUDE_SELF:
        kpm_stat = seqlen
        if HAS_KPM:
            kpm_stat = _kpm_stat(Kpm, kpm_strides.token, seqlen, IS_CAUSAL, BLOCK_M)
        has_other = _has_other_key(offs_m, seqlen, kpm_stat, real_m, IS_CAUSAL, HAS_KPM)
    row_ctr = _row_ctr0(prog, n_rows, seqlen_padded, IS_VARLEN) + offs_m.to(tl.int64)  # dropout counter rows

    queries = FwdQueries(offs_m, qm, scale * LOG2E, has_other, row_ctr)
    keys = FwdKeys(Q, V, Kpm, q_strides.token, v_strides.token, kpm_strides.token, seqlen, head_dim, head_dim_v,
                   offs_d, offs_dv)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_OUT], dtype=tl.float32)
    diag_lo = start_m * BLOCK_M
    if SHARED_V and REUSE_DIAG:
        # The program's own query tile is also a key/value tile: process the diagonal block from
        # registers first (q is then dead for the key loop) and skip it in the key loop, so one
        # load of Y_I serves as query, key and value. Online softmax takes the blocks in any order.
        qk = tl.dot(qm, tl.trans(q), input_precision=DOT_PRECISION) * queries.qk_scale  # [BLOCK_M, BLOCK_M]
        acc, l_i, m_i = _symattn_fwd_update(acc, l_i, m_i, qk, q, diag_lo, offs_m, real_m, queries, keys, dropout,
                                            2 if IS_CAUSAL else 3, HAS_KPM, EXCLUDE_SELF, HAS_DROPOUT,
                                            DROPOUT_GROUPED, DOT_PRECISION)
    # Key ranges: the blocks left of the query block (STAGE 1, unmasked when causal), then the
    # diagonal block (STAGE 2, causal) or the blocks right of it (after the reused diagonal);
    # without either, one range (STAGE 3). Stage values stay inline: a constexpr assigned to a
    # name in a loop becomes a tensor.
    for part in tl.static_range(2 if IS_CAUSAL != (SHARED_V and REUSE_DIAG) else 1):
        if part == 0:
            lo = 0
            hi = diag_lo if IS_CAUSAL or (SHARED_V and REUSE_DIAG) else seqlen
        elif IS_CAUSAL:
            lo, hi = diag_lo, tl.minimum(diag_lo + BLOCK_M, seqlen)
        else:
            lo, hi = diag_lo + BLOCK_M, seqlen
        acc, l_i, m_i = _symattn_fwd_inner(
            acc, l_i, m_i, lo, hi, queries, keys, dropout,
            SHARED_V=SHARED_V, HAS_KPM=HAS_KPM, EXCLUDE_SELF=EXCLUDE_SELF, HAS_DROPOUT=HAS_DROPOUT,
            DROPOUT_GROUPED=DROPOUT_GROUPED, DOT_PRECISION=DOT_PRECISION, WARP_SPECIALIZE=WARP_SPECIALIZE,
            BLOCK_N=BLOCK_N,
            STAGE=(1 if part == 0 else 2) if IS_CAUSAL else 3,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * dropout.inv_keep
    if tl.program_id(2) == 0:
        tl.store(Lse + offs_m, lse, mask=row_mask)
    tl.store(
        Out + offs_m.to(tl.int64)[:, None] * out_strides.token + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_mask[:, None] & (offs_dv[None, :] < head_dim_v),
    )


def fwd_reuse_diag(shared_v: bool, head_dim_pad: int, arch: int, has_kpm: bool = False) -> bool:
    """REUSE_DIAG: in shared mode, serve the diagonal key/value block from the query tile in
    registers (no reload). Its [BLOCK_M, BLOCK_M] score step spills on wide heads
    (``python -m bench.compile_report``): up to head dim 128 on sm_90, 64 on sm_80; and with a
    padding mask, whose padded rows the query tile reads NaN/Inf-free but the values as zeros
    (two tiles; 440 bytes of stack on sm_80 at head dim 64), the diagonal block is reloaded."""
    return shared_v and not has_kpm and head_dim_pad <= (128 if arch >= 90 else 64)


def fwd_split_d(head_dim_v_pad: int, dropout: bool, arch: int) -> int:
    """SPLIT_D: value-column groups of the forward, one program each (program_id(2); each group
    recomputes the scores). 2 on sm_90 for a 256-wide value head with dropout, whose [64, 256]
    fp32 accumulator (128 registers a thread) and Philox state spill together; 1 elsewhere."""
    return 2 if arch >= 90 and head_dim_v_pad >= 256 and dropout else 1


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on sm_80 / sm_90. BLOCK_M
# stays >= 64, the rows of one sm_90 warpgroup MMA (wgmma).
FWD_CONFIGS = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3),
    (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2), (64, 32, 4, 2),
    (64, 16, 8, 1),  # only for dropout on a wide head (fwd_configs_for)
]


def fwd_configs_for(max_seqlen: int, head_dim_pad: int, head_dim_v_pad: int, dropout: bool = False,
                    coef_mode: int = 0, shared_v: bool = False) -> list:
    """The FWD_CONFIGS worth trying for a shape: no block much longer than the sequence, and no
    tile whose registers would spill (checked by ``python -m bench.compile_report``, which reads
    this same function): wide heads and dropout (Philox keeps four 32-bit words per score
    element) need more warps per tile, and both at once the narrowest key block, single-stage.
    In shared mode the diagonal step holds a [BLOCK_M, BLOCK_M] score tile: 128-row blocks only
    with 8 warps and 32-key tiles. ``coef_mode`` is accepted for the callers' sake: a full
    coefficient reaches the kernel folded (QM), so it costs what the identity costs."""
    width = max(head_dim_pad, head_dim_v_pad)
    kept = []
    for block_m, block_n, warps, stages in FWD_CONFIGS:
        scores_per_thread = block_m * block_n // (32 * warps)
        if block_m > max(64, triton.next_power_of_2(max_seqlen)):
            continue
        if width >= 256 and (block_m > 64 or warps < 8):
            continue
        if width >= 128 and warps < 8 and block_m * block_n >= 128 * 32:
            continue
        if dropout and scores_per_thread > 8:
            continue
        if (dropout and width >= 256) != (block_n == 16):
            continue
        if shared_v and block_m > 64 and (warps < 8 or block_n > 32):
            continue
        kept.append((block_m, block_n, warps, stages))
    return kept or [(64, 32, 8, 2)]


def _as_triton_configs(configs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs]


def _prune_fwd_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wanted = set(fwd_configs_for(args["seqlen_padded"], args["HEAD_DIM"], args["HEAD_DIM_V"], args["HAS_DROPOUT"],
                                 args["COEF_MODE"], args["SHARED_V"]))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


_fwd_autotuned = triton.autotune(
    configs=_as_triton_configs(FWD_CONFIGS),
    key=["seqlen_padded", "HEAD_DIM", "HEAD_DIM_V", "SHARED_V", "COEF_MODE", "IS_CAUSAL", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)(_symattn_fwd_kernel)


def fwd_autotune() -> bool:
    """Whether the forward autotunes over ``fwd_configs_for`` (the default) or launches its first
    config: ``SYMATTN_TRITON_AUTOTUNE=0`` pins it, so that every kernel variant compiles once,
    not once per candidate config (the GPU test suite does this to bound its compile time)."""
    return os.environ.get("SYMATTN_TRITON_AUTOTUNE", "1") != "0"


# Under the interpreter (and in tests) one fixed config, small for speed; BLOCK_M != BLOCK_N
# exercises the causal stages.
INTERPRET_FWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
INTERPRET_FWD_SPLIT_D = 1  # tests set 2


def attention_forward(
    q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen,
    deterministic, out_dtype=None,
):
    """Fused attention forward; see the module docstring for the math.

    Args:
        q (Tensor): [B, S, H, D], or [total, H, D] when ``cu_seqlens`` is given.
        v (Tensor, Optional): [B, S, H, Dv] / [total, H, Dv]; None means the values are ``q``.
        coef (Tensor, Optional): [H, D] diagonal or [H, D, D] full coefficient (any float dtype).
        key_padding_mask (Tensor, Optional): [B, S] bool, True = real token (padded layout only).
        cu_seqlens (Tensor, Optional): [B + 1] int32 sequence offsets (varlen layout).
        seed (int, Optional): dropout seed; needed when ``dropout_p > 0``.
        scale (float): score scale.
        causal (bool): key j allowed only for j <= i.
        dropout_p (float): dropout probability on P, in [0, 1).
        exclude_self (bool): drop the diagonal unless it is a row's only allowed key.
        max_seqlen (int, Optional): longest sequence (varlen layout).
        deterministic (bool): unused by the forward (it never uses atomics).
        out_dtype (torch.dtype, Optional): dtype of out (the backward asks for the unrounded float32
            output of a half-precision call). Default: q's dtype.

    Returns:
        (out, lse): out like ``v`` (or ``q``) in ``out_dtype``; lse float32 [B, H, S] or [H, total].
    """
    q, v, coef, layout = prepare_call(q, v, coef, cu_seqlens, max_seqlen, dropout_p, seed)
    is_varlen = layout.is_varlen
    batch, seqlen_padded, num_heads, head_dim, head_dim_v = layout[:5]
    out = torch.empty(q.shape[:-1] + (head_dim_v,), dtype=out_dtype or q.dtype, device=q.device)
    if is_varlen:
        lse = torch.empty(num_heads, q.shape[0], dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty(batch, num_heads, seqlen_padded, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seqlen_padded == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse

    has_dropout = dropout_p > 0.0
    kpm = kpm_operand(key_padding_mask)
    mode = coef_mode(coef)
    arch = 90 if is_interpret() else device_arch(q.device)
    qm = unit_last_stride(padding_finite(coef_product(q, coef), key_padding_mask)) if mode == 2 else None
    dummy = q  # never dereferenced: its constexpr flag is off
    args = [
        q, q if v is None else v, coef if mode == 1 else dummy, dummy if qm is None else qm,
        dummy if kpm is None else kpm, cu_seqlens if is_varlen else dummy, out, lse,
        token_strides(q, is_varlen), token_strides(q if v is None else v, is_varlen), token_strides(out, is_varlen),
        TokenStrides(0, 0, 0) if qm is None else token_strides(qm, is_varlen), lse_strides(lse, is_varlen),
        coef_strides(coef), mask_strides(kpm), *tail_args(layout, scale, dropout_p, seed),
    ]
    hd_pad, hdv_pad = padded_head_dim(head_dim), padded_head_dim(head_dim_v)
    split_d = INTERPRET_FWD_SPLIT_D if is_interpret() else fwd_split_d(hdv_pad, has_dropout, arch)
    constexprs = dict(
        HEAD_DIM=hd_pad, HEAD_DIM_V=hdv_pad,
        SHARED_V=v is None, COEF_MODE=mode, IS_CAUSAL=bool(causal), HAS_KPM=kpm is not None,
        IS_VARLEN=is_varlen, HAS_DROPOUT=has_dropout, DROPOUT_GROUPED=has_dropout and dropout_grouped(layout),
        EXCLUDE_SELF=bool(exclude_self), DOT_PRECISION=dot_precision(q.dtype),
        WARP_SPECIALIZE=warp_specialize_for(arch), SPLIT_D=split_d,
        # The diagonal reuse serves all value columns from the query tile: one group only.
        REUSE_DIAG=split_d == 1 and fwd_reuse_diag(v is None, hd_pad, arch, kpm is not None),
    )

    if is_interpret():
        kernel, config = _symattn_fwd_kernel, INTERPRET_FWD_CONFIG
    elif fwd_autotune():
        kernel, config = _fwd_autotuned, {}
    else:
        block_m, block_n, warps, stages = fwd_configs_for(seqlen_padded, hd_pad, hdv_pad, has_dropout, mode,
                                                          v is None)[0]
        kernel = _symattn_fwd_kernel
        config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    for bh_offset, rows in grid_row_chunks(batch * num_heads):

        def grid(meta, rows=rows):
            return (triton.cdiv(seqlen_padded, meta["BLOCK_M"]), rows, split_d)

        kernel[grid](*args, **constexprs, BH_OFFSET=bh_offset, **config)
    return out, lse
