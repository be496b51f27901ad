"""What the forward and backward attention kernels share: Triton device functions for a
program's sequence (``ProgramSequence``, ``_token0``), key-padding statistics, the exclude-self
rule and the dropout mask; the named tuples the kernels take as arguments (``TokenStrides``,
``MaskStrides``, ``CoefStrides``, ``Dropout``: one argument per tensor's strides, so that a
launch names what it passes); and the host-side pieces every launcher needs (``prepare_call``,
``tail_args``, ``grid_row_chunks``, head-dim padding, dot precision, the full-coefficient
products; the LAMA launcher takes the generic ones).

Triton passes a named tuple of scalars to a kernel as its fields and specializes each field as
it would a separate argument (a stride of 1 becomes a constant, a multiple of 16 an alignment
hint): bundling changes no specialization, and ``python -m bench.compile_report`` checks that
the kernels still do not spill.

exclude_self rule. Row i's allowed keys before the rule are
A_i = {j < seqlen : (not causal or j <= i) and kpm[j]}. The diagonal is removed unless
A_i is a subset of {i}, i.e. the diagonal stays allowed iff no *other* key is allowed:

    has_other(i) = seqlen > 1                      no padding mask, not causal
                 = i > 0                           no padding mask, causal (key 0 < i)
                 = n_real - kpm[i] > 0             padding mask, not causal
                 = first_real < i                  padding mask, causal

with n_real = number of real keys of the sequence and first_real = index of its first real key
(seqlen when there is none). Both are one scalar per sequence (``_kpm_stat``), so the rule costs
one pass over the sequence's mask bytes per program and no per-row reduction.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import dropout_scale, dropout_threshold

# exp(x) == exp2(x * LOG2E): the kernels use exp2 (a native instruction) and fold LOG2E into the
# score scale once.
LOG2E = tl.constexpr(1.4426950408889634)
# ln(x) == log2(x) * LN2: the forward keeps its running max in log2 units and stores lse in nats.
LN2 = tl.constexpr(0.6931471805599453)
# Philox-4x32-10 (Salmon et al. 2011), the constants of triton.language.random.
PHILOX_ROUNDS = tl.constexpr(10)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


# CUDA's limit on grid axis y, where the attention kernels put one program row per (sequence,
# head). A call with more rows launches in chunks (``grid_row_chunks``), each kernel told its
# first row (the BH_OFFSET constexpr): packed training batches of thousands of short sequences
# pass it (4096 sequences x 16 heads). Axis 0 (no such limit) keeps the query blocks, so the
# programs that run together share a head's keys in L2. A constexpr, not an argument: at 0, every
# call's offset below the limit, the kernels compile as they did without it (a runtime offset
# pushed the sm_90 symmetric backward of head dim 64 with dropout and padding to 255 registers and
# 8 bytes of stack, ``python -m bench.compile_report``), and each later chunk compiles once.
MAX_GRID_Y = 65535


def grid_row_chunks(rows: int) -> list[tuple[int, int]]:
    """(first row, count) of the launches that cover ``rows`` = sequences x heads program rows,
    at most ``MAX_GRID_Y`` each, in order."""
    return [(first, min(MAX_GRID_Y, rows - first)) for first in range(0, rows, MAX_GRID_Y)]


def is_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_head_dim(dim: int) -> int:
    """Register-tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of the kernels' tl.dot calls on fp32 operands.

    Every tensor-core operand is in the input dtype (scores and gradients are rounded to it
    before their matmuls, as in FlashAttention), so this matters only for fp32 inputs: "tf32"
    when ``torch.backends.cuda.matmul.allow_tf32`` is set, else "ieee" (exact fp32 products, the
    torch default). The interpreter always uses "ieee". For fp16/bf16 inputs it has no effect.
    """
    if is_interpret():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def device_arch(device) -> int:
    """80 or 90: the architecture whose row of the config tables a CUDA device uses (sm_8x -> 80,
    sm_9x and later -> 90)."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def coef_mode(coef) -> int:
    """COEF_MODE constexpr: 0 identity, 1 diagonal [H, D], 2 full [H, D, D]."""
    return 0 if coef is None else coef.dim() - 1


class CoefStrides(NamedTuple):
    """Element strides of a diagonal coefficient [H, D]."""

    head: int
    column: int


def coef_strides(coef) -> CoefStrides:
    """``CoefStrides`` of a diagonal coefficient [H, D]; zeros otherwise (a full one reaches the
    kernels folded, see ``coef_product``)."""
    if coef is None or coef.dim() != 2:
        return CoefStrides(0, 0)
    return CoefStrides(coef.stride(0), coef.stride(1))


def coef_product(y, coef):
    """Y M per head for a full coefficient [H, D, D] and y [..., H, D], in y's dtype:
    one batched matmul with fp32 accumulation, the same rounding as a tensor-core fold in a kernel
    (and TF32 for fp32 inputs exactly when ``dot_precision`` says so). The kernels take this as
    an operand instead of staging [D, D] tiles of M in registers."""
    m = coef.to(y.dtype)
    return torch.einsum("...hd,hde->...he", y, m)


def padding_finite(x, key_padding_mask):
    """x [B, S, H, X] with the NaN/Inf entries of padded tokens read as 0, as the kernels read
    them (``_padding_finite``): for the operands folded on the host."""
    if key_padding_mask is None:
        return x
    pad = ~key_padding_mask.bool()[:, :, None, None]
    return x.masked_fill(pad & ~torch.isfinite(x), 0.0)


class Layout(NamedTuple):
    """The sizes of one attention call as its launchers and kernels use them."""

    batch: int
    seqlen_padded: int  # S, or max_seqlen in the varlen layout
    num_heads: int
    head_dim: int
    head_dim_v: int
    n_rows: int  # token rows of one head: B * S, or total
    key_stride: int  # dropout counter step from one query row to the next: S, or total
    is_varlen: bool

    def kernel_sizes(self) -> tuple[int, ...]:
        """The kernels' (num_heads, seqlen_padded, head_dim, head_dim_v, n_rows); key_stride
        reaches them in ``Dropout``."""
        return self.num_heads, self.seqlen_padded, self.head_dim, self.head_dim_v, self.n_rows


def attention_layout(q, v, cu_seqlens, max_seqlen) -> Layout:
    """``Layout`` of q [B, S, H, D] (or varlen [total, H, D] with cu_seqlens and max_seqlen) and
    v like q with Dv columns, or None (shared mode)."""
    head_dim_v = q.shape[-1] if v is None else v.shape[-1]
    if cu_seqlens is not None:
        total, num_heads, head_dim = q.shape
        # Key stride = total tokens, never the bound: the dropout mask follows the real positions.
        return Layout(cu_seqlens.numel() - 1, int(max_seqlen), num_heads, head_dim, head_dim_v, total, total, True)
    batch, seqlen, num_heads, head_dim = q.shape
    return Layout(batch, seqlen, num_heads, head_dim, head_dim_v, batch * seqlen, seqlen, False)


class TokenStrides(NamedTuple):
    """Element strides of a tensor of per-token rows, [B, S, H, X] or varlen [total, H, X]
    (batch stride 0), as one kernel argument; ``_token0`` reads it."""

    batch: int
    token: int
    head: int


class MaskStrides(NamedTuple):
    """Element strides of a key padding mask [B, S] (one byte per token, ``kpm_operand``)."""

    batch: int
    token: int


def lse_strides(lse, is_varlen: bool) -> TokenStrides:
    """``TokenStrides`` of a contiguous lse [B, H, S], or of varlen [H, total] (batch 0): its
    tokens are adjacent (token stride 1, a constant once the JIT specializes it)."""
    if is_varlen:
        return TokenStrides(0, 1, lse.stride(0))
    return TokenStrides(lse.stride(0), 1, lse.stride(1))


def token_strides(t, is_varlen: bool) -> TokenStrides:
    """``TokenStrides`` of a [B, S, H, X] or varlen [total, H, X] tensor."""
    if is_varlen:
        return TokenStrides(0, t.stride(0), t.stride(1))
    return TokenStrides(t.stride(0), t.stride(1), t.stride(2))


def mask_strides(kpm) -> MaskStrides:
    """``MaskStrides`` of the padding mask operand, or zeros without one."""
    return MaskStrides(0, 0) if kpm is None else MaskStrides(kpm.stride(0), kpm.stride(1))


def unit_last_stride(t):
    """t itself when its last stride is 1 (the kernels need only that), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def check_dropout(dropout_p: float, seed) -> None:
    """The launchers' own guard: dropout_p in [0, 1) (``reference.dropout_threshold``) and
    dropout needs a seed."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout_p > 0 needs an integer seed, got None")


class Dropout(NamedTuple):
    """A call's dropout constants (``dropout_args``), one kernel argument that the kernels hand
    on to their loops."""

    seed: int  # Philox seed
    key_stride: int  # counter step from one query row to the next (the padded sequence length)
    threshold: int  # keep iff the 16-bit value >= threshold, ``reference.dropout_threshold``
    inv_keep: float  # the kept elements' multiplier, ``reference.dropout_scale``


def prepare_call(q, v, coef, cu_seqlens, max_seqlen, dropout_p: float, seed):
    """What every attention launcher does first: the dropout guard (``check_dropout``), q and v
    with a unit last stride (``unit_last_stride``, all the kernels need), a contiguous coefficient,
    and the call's ``Layout``. Returns (q, v, coef, layout)."""
    check_dropout(dropout_p, seed)
    coef = None if coef is None else coef.contiguous()
    q, v = unit_last_stride(q), unit_last_stride(v)
    layout = attention_layout(q, v, cu_seqlens, max_seqlen)
    return q, v, coef, layout


def tail_args(layout: Layout, scale: float, dropout_p: float, seed) -> list:
    """The arguments every attention kernel's runtime list ends with, in its order:
    ``Layout.kernel_sizes``, the score scale and the ``Dropout`` bundle."""
    return [*layout.kernel_sizes(), float(scale), dropout_args(dropout_p, seed, layout.key_stride)]


def kpm_operand(key_padding_mask):
    """The padding mask as the kernels read it: one byte per token, contiguous (a unit token
    stride is specialized by the JIT, as ``bench.compile_report`` assumes), or None."""
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask
    return (kpm.view(torch.uint8) if kpm.dtype == torch.bool else kpm).contiguous()


def dropout_args(dropout_p: float, seed, key_stride: int) -> Dropout:
    """The kernels' ``Dropout`` argument; seed and threshold 0 and inv_keep 1 when dropout is off
    (HAS_DROPOUT keeps them unread)."""
    if dropout_p <= 0.0:
        return Dropout(0, key_stride, 0, 1.0)
    return Dropout(int(seed), key_stride, dropout_threshold(dropout_p), dropout_scale(dropout_p))


def dropout_grouped(layout: Layout) -> bool:
    """DROPOUT_GROUPED constexpr of a call: the key stride is a multiple of 8, so the element
    offsets of a row start on a Philox counter and every key tile (its first key a multiple of
    BLOCK_N, hence of 8) covers whole counters: ``_dropout_keep`` then draws each Philox call
    once for its 8 keys. Otherwise a row starts inside a counter and each element draws its own."""
    return layout.key_stride % 8 == 0


class ProgramSequence(NamedTuple):
    """The (batch, head) sequence of a program (``_program_sequence``): batch, head, first token
    row and length (int32; ``_in_int64`` converts the first three for address arithmetic)."""

    b: object
    h: object
    start: object
    seqlen: object


@triton.jit
def _program_sequence(CuSeqlens, num_heads, seqlen_padded, BH_OFFSET: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``ProgramSequence`` of program axis 1 in a launch whose first row is ``BH_OFFSET``
    (``grid_row_chunks``): b * H + h = BH_OFFSET + program_id(1)."""
    off_bh = BH_OFFSET + tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = off_bh % num_heads
    seq_start, seqlen = _seq_bounds(CuSeqlens, off_b, seqlen_padded, IS_VARLEN)
    return ProgramSequence(off_b, off_h, seq_start, seqlen)


@triton.jit
def _partial_row(seq, block, IS_VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """Row of a per-block partial sum (``partial_rows`` of them) for query block ``block`` of the
    sequence ``seq``: (b, block) in the padded layout; in varlen start // BLOCK + b + block, distinct
    for every real block of every sequence and below cdiv(total, BLOCK) + B, so the buffer follows
    the real tokens, never max_seqlen."""
    if IS_VARLEN:
        return seq.start // BLOCK + seq.b + block
    else:
        return seq.b * tl.num_programs(0) + block


def partial_rows(layout: "Layout", block: int) -> int:
    """Rows of a per-block partial sum buffer with ``_partial_row``'s layout."""
    if layout.is_varlen:
        return triton.cdiv(layout.n_rows, block) + layout.batch
    return layout.batch * triton.cdiv(layout.seqlen_padded, block)


@triton.jit
def _in_int64(seq):
    """``seq`` with batch, head and first token row in int64, for address arithmetic. A kernel
    converts after its early exit: converted before it, the sm_80 query launch of head dim 128
    spilled 8 bytes (``python -m bench.compile_report``)."""
    return ProgramSequence(seq.b.to(tl.int64), seq.h.to(tl.int64), seq.start.to(tl.int64), seq.seqlen)


@triton.jit
def _row_ctr0(seq, n_rows, seqlen_padded, IS_VARLEN: tl.constexpr):
    """Dropout counter row (``_dropout_keep``) of token 0 of the program's sequence ``seq``: the
    counters follow the real token rows, the varlen start or b * S when padded. Computed where a
    kernel needs it, not in ``_program_sequence``: held from the prologue, it spilled the sm_80
    query launch of head dim 128 (8 bytes, ``python -m bench.compile_report``)."""
    if IS_VARLEN:
        row_ctr0 = seq.h * n_rows + seq.start
    else:
        row_ctr0 = seq.h * n_rows + seq.b * seqlen_padded
    return row_ctr0


@triton.jit
def _token0(seq, strides):
    """Element offset of token 0 of the program's sequence ``seq`` (``ProgramSequence``) in its
    head, in a tensor of those ``TokenStrides``."""
    return seq.b * strides.batch + seq.start * strides.token + seq.h * strides.head


@triton.jit
def _seq_bounds(CuSeqlens, off_b, seqlen_padded, IS_VARLEN: tl.constexpr):
    """(first token row, length) of sequence off_b: varlen reads cu_seqlens, padded uses S."""
    if IS_VARLEN:
        seq_start = tl.load(CuSeqlens + off_b)
        seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start
    else:
        seq_start = off_b * 0
        seqlen = seqlen_padded + off_b * 0
    return seq_start, seqlen


@triton.jit
def _kpm_stat(Kpm, stride_kpms, seqlen, IS_CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Per-sequence padding statistic for exclude_self: first real key (causal) or count of
    real keys (not causal); Kpm points at the sequence's mask row."""
    offs = tl.arange(0, BLOCK)
    if IS_CAUSAL:
        stat = seqlen
    else:
        stat = seqlen * 0
    for start in range(0, seqlen, BLOCK):
        idx = start + offs
        real = tl.load(Kpm + idx.to(tl.int64) * stride_kpms, mask=idx < seqlen, other=0) != 0
        if IS_CAUSAL:
            stat = tl.minimum(stat, tl.min(tl.where(real, idx, seqlen), axis=0))
        else:
            stat += tl.sum(real.to(tl.int32), axis=0)
    return stat


@triton.jit
def _has_other_key(offs, seqlen, kpm_stat, real, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """For each row in offs: does it have an allowed key other than itself (module docstring)."""
    if HAS_KPM:
        if IS_CAUSAL:
            has_other = kpm_stat < offs
        else:
            has_other = (kpm_stat - real.to(tl.int32)) > 0
    else:
        if IS_CAUSAL:
            has_other = offs > 0
        else:
            has_other = (offs * 0 + seqlen) > 1
    return has_other


@triton.jit
def _dropout_keep(dropout, row_ctr, key0, BLOCK_KEYS: tl.constexpr, KEYS_FIRST: tl.constexpr,
                  GROUPED: tl.constexpr):
    """Keep-mask of reference.dropout_keep_mask for the counter rows row_ctr [rows] (int64,
    ``_row_ctr0`` + token row) against the keys key0 + [0, BLOCK_KEYS): [rows, BLOCK_KEYS], or
    [BLOCK_KEYS, rows] with KEYS_FIRST. GROUPED (``dropout_grouped``: the key stride and key0 are
    multiples of 8) draws each Philox call once for the 8 keys it serves (``_dropout_keep_grouped``);
    otherwise each element draws its own (``_dropout_keep_elements``)."""
    if GROUPED:
        keep = _dropout_keep_grouped(dropout, row_ctr, key0, BLOCK_KEYS)  # [rows, BLOCK_KEYS]
        if KEYS_FIRST:
            keep = tl.trans(keep)
    else:
        offs_key = key0 + tl.arange(0, BLOCK_KEYS)
        if KEYS_FIRST:
            keep = _dropout_keep_elements(dropout, row_ctr[None, :], offs_key[:, None])
        else:
            keep = _dropout_keep_elements(dropout, row_ctr[:, None], offs_key[None, :])
    return keep


@triton.jit
def _philox_key(dropout):
    """Philox key (low, high 32 bits of the seed), as tl.randint4x splits it."""
    seed = tl.cast(dropout.seed, tl.uint64)  # a tensor even when the JIT made a seed of 1 a constant
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _dropout_keep_grouped(dropout, row_ctr, key0, BLOCK_KEYS: tl.constexpr):
    """``_dropout_keep`` [rows, BLOCK_KEYS] when 8 divides the key stride and key0: the 8 keys
    8 g .. 8 g + 7 of a row are the 8 halves of one Philox call, at counter
    row_ctr * key_stride / 8 + key0 / 8 + g, in the order (word 0 low, word 0 high, word 1 low,
    ...). One Philox per 8 keys on a [rows, BLOCK_KEYS / 8] grid; two interleaves put the words
    in key-pair order, a third the halves."""
    tl.static_assert(BLOCK_KEYS % 8 == 0)
    groups = (key0 >> 3) + tl.arange(0, BLOCK_KEYS // 8)
    ctr = row_ctr[:, None] * (dropout.key_stride >> 3) + groups[None, :].to(tl.int64)  # [rows, BLOCK_KEYS / 8]
    k0, k1 = _philox_key(dropout)
    c0 = ctr.to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox_impl(c0, (ctr >> 32).to(tl.uint32), zero, zero, k0, k1, PHILOX_ROUNDS)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # [rows, BLOCK_KEYS / 2], word 4 g + w
    threshold = dropout.threshold
    return tl.interleave((words & 0xFFFF).to(tl.int32) >= threshold, (words >> 16).to(tl.int32) >= threshold)


@triton.jit
def _dropout_keep_elements(dropout, row_ctr, offs_key):
    """``_dropout_keep`` for any key stride, one Philox call per element: element offset
    e = row_ctr * key_stride + key (row_ctr and offs_key broadcast against each other); its
    16-bit value is half e % 2 of output word (e // 2) % 4 of Philox-4x32-10 (tl.randint4x) at
    counter e // 8; keep iff value >= threshold. The last round computes only the element's word
    (one product, not two): fewer live registers than the four words of tl.randint4x."""
    elem = row_ctr * dropout.key_stride + offs_key.to(tl.int64)
    ctr = elem >> 3
    slot = (elem & 7).to(tl.int32)  # value 2 * word + half of the counter (one live int32, not elem)
    k0, k1 = _philox_key(dropout)
    c0 = ctr.to(tl.uint32)
    zero = c0 * 0
    c0, c1, c2, c3 = tl.philox_impl(c0, (ctr >> 32).to(tl.uint32), zero, zero, k0, k1, PHILOX_ROUNDS - 1)
    last_k0 = k0 + (((PHILOX_ROUNDS - 1) * PHILOX_KEY_A) & 0xFFFFFFFF)  # the last round's key (mod 2^32)
    last_k1 = k1 + (((PHILOX_ROUNDS - 1) * PHILOX_KEY_B) & 0xFFFFFFFF)
    # Last round: words 0, 1 are the high / low halves of ROUND_B * c2 (word 0 also ^ c1 ^ k0),
    # words 2, 3 those of ROUND_A * c0 (word 2 also ^ c3 ^ k1).
    first_pair = slot < 4
    high_word = (slot & 2) == 0  # words 0 and 2 are a product's high half
    x = tl.where(first_pair, c2, c0)
    rest = tl.where(first_pair, c1 ^ last_k0, c3 ^ last_k1)
    if_b = tl.where(high_word, tl.math.umulhi(x, PHILOX_ROUND_B) ^ rest, x * PHILOX_ROUND_B)
    if_a = tl.where(high_word, tl.math.umulhi(x, PHILOX_ROUND_A) ^ rest, x * PHILOX_ROUND_A)
    rnd = tl.where(first_pair, if_b, if_a)
    half = (rnd >> ((slot & 1) * 16).to(tl.uint32)) & 0xFFFF
    return half.to(tl.int32) >= dropout.threshold


@triton.jit
def _real_tokens(Kpm, stride_kpms, offs, seqlen):
    """Whether each token row in offs is real (inside the sequence and unmasked)."""
    return tl.load(Kpm + offs.to(tl.int64) * stride_kpms, mask=offs < seqlen, other=0) != 0


@triton.jit
def _padding_finite(x, real):
    """Tile x [rows, cols] with the NaN/Inf entries of padded rows (real == 0) read as 0. Padded
    keys get zero weights, but 0 * NaN = NaN in a product, and a padded query's row feeds the
    key-side gradients; finite padding is read as stored."""
    return tl.where(real[:, None] | (x - x == 0), x, tl.zeros_like(x))  # x - x is 0 iff x is finite
