"""Triton attention kernels under the interpreter (TRITON_INTERPRET=1), against the fp64 reference.

Run in its own process, since the variable must be set before triton is imported:

    TRITON_INTERPRET=1 pytest -m interpret tests/test_triton_interpret.py

The kernels are called directly (``attention_forward`` / ``attention_backward``), so these tests
do not depend on the ops layer. Pass rule (flash-attn): max error against the fp64 reference is
at most 2x the error of the reference run in the kernel's dtype, plus a floor of ATOL times the
reference's magnitude, for out, lse and every gradient. bf16 is not tested: the interpreter's
bf16 tl.dot is wrong (triton-lang/triton#11584).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from symattn_kernels import reference
from tests.attention_checks import max_error

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (own process)"),
]

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    from symattn_kernels.triton.attention_bwd import attention_backward
    from symattn_kernels.triton.attention_common import Dropout, _dropout_keep
    from symattn_kernels.triton.attention_fwd import attention_forward

    @triton.jit
    def _keep_grid_kernel(Out, seed, row_ctr0, key0, key_stride, threshold, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, KEYS_FIRST: tl.constexpr, GROUPED: tl.constexpr):
        """The kernels' keep decisions of rows row_ctr0 + [0, BLOCK_R) x keys key0 + [0, BLOCK_K),
        stored [rows, keys] whichever orientation _dropout_keep returns."""
        dropout = Dropout(seed, key_stride, threshold, 1.0)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        row_ctr = row_ctr0.to(tl.int64) + offs_r.to(tl.int64)
        keep = _dropout_keep(dropout, row_ctr, key0, BLOCK_K, KEYS_FIRST, GROUPED).to(tl.int8)
        if KEYS_FIRST:
            tl.store(Out + offs_r[None, :] * BLOCK_K + offs_k[:, None], keep)
        else:
            tl.store(Out + offs_r[:, None] * BLOCK_K + offs_k[None, :], keep)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


@dataclass(frozen=True)
class Case:
    seqlen: int
    head_dim: int
    head_dim_v: Optional[int]  # None: shared mode (values are q)
    coef: str = "none"  # none | diag | full
    causal: bool = False
    kpm: bool = False  # key padding mask, batch row 1 fully masked
    exclude_self: bool = False
    dropout_p: float = 0.0
    dtype: torch.dtype = torch.float32
    varlen: Optional[tuple] = None  # sequence lengths; seqlen is then their max
    batch: int = 2
    heads: int = 2

    @property
    def id(self) -> str:
        parts = [f"S{self.seqlen}" if self.varlen is None else "varlen" + "-".join(map(str, self.varlen))]
        parts.append(f"D{self.head_dim}" + ("shared" if self.head_dim_v is None else f"Dv{self.head_dim_v}"))
        parts.append(f"coef-{self.coef}")
        flags = [("causal", self.causal), ("kpm", self.kpm), ("noself", self.exclude_self)]
        parts += [name for name, on in flags if on]
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p}")
        parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


F16, F32 = torch.float16, torch.float32
CASES = [
    Case(1, 16, None),
    Case(1, 40, 24, "full", causal=True, exclude_self=True, dtype=F16),
    Case(17, 40, None, "diag", causal=True, kpm=True),
    Case(17, 64, 40, "full", dropout_p=0.25, dtype=F16),
    Case(17, 16, 16, "none", exclude_self=True, kpm=True, dtype=F16),
    Case(64, 16, 64, "none", causal=True, exclude_self=True),
    Case(64, 64, None, "full", causal=True, kpm=True, dropout_p=0.2, dtype=F16),
    Case(64, 40, 16, "diag", kpm=True),
    Case(113, 40, None, "none", kpm=True, exclude_self=True),
    Case(113, 128, 40, "diag", causal=True, batch=1),
    Case(113, 128, None, "full", dtype=F16, batch=1),
    Case(113, 64, 128, "none", causal=True, dropout_p=0.1, exclude_self=True, batch=1),
    Case(256, 64, None, "diag", causal=True, dropout_p=0.15, dtype=F16, batch=1, heads=1),
    Case(256, 16, 40, "full", exclude_self=True, batch=1, heads=1),
    Case(256, 40, None, "none", kpm=True, batch=1, heads=1),
    Case(40, 40, None, "none", causal=True, varlen=(1, 17, 40, 29)),
    Case(64, 64, 16, "full", exclude_self=True, dropout_p=0.3, dtype=F16, varlen=(33, 64, 2)),
    Case(37, 16, None, "diag", causal=True, exclude_self=True, varlen=(37, 5, 1, 20), heads=3),
    Case(50, 128, 64, "none", dropout_p=0.2, varlen=(50, 13)),
    # Key strides of 8 (one Philox call per 8 keys): odd lengths in a total of 48, a partial last key tile.
    Case(27, 40, None, "diag", causal=True, dropout_p=0.3, varlen=(13, 27, 8)),
    Case(40, 16, 24, "none", dropout_p=0.25, dtype=F16),
    Case(33, 200, 256, "full", causal=True, exclude_self=True, batch=1, heads=1),
    Case(20, 256, None, "diag", dtype=F16, batch=1, heads=1),
]


def make_inputs(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    heads, dim = case.heads, case.head_dim

    def randn(*shape, dtype=case.dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if case.varlen is None:
        lead = (case.batch, case.seqlen)
        cu_seqlens = None
    else:
        lead = (sum(case.varlen),)
        cu_seqlens = torch.tensor([0, *torch.tensor(case.varlen).cumsum(0).tolist()], dtype=torch.int32)
    q = randn(*lead, heads, dim)
    v = None if case.head_dim_v is None else randn(*lead, heads, case.head_dim_v)
    coef = None
    if case.coef == "diag":
        coef = randn(heads, dim, dtype=F32)
    elif case.coef == "full":
        coef = randn(heads, dim, dim, dtype=F32, scale=dim**-0.5)
    kpm = None
    if case.kpm:
        kpm = torch.rand(case.batch, case.seqlen, generator=gen) > 0.3
        if case.batch > 1:
            kpm[1] = False  # a fully masked batch row: out 0, lse -inf, zero gradients
    return q, v, coef, kpm, cu_seqlens


def run_kernels(case: Case, q, v, coef, kpm, cu_seqlens, dout, dlse, seed=1234, need=(True, True, True),
                deterministic=True):
    """Forward then backward through the Triton kernels; returns out, lse, dq, dv, dcoef."""
    scale = case.head_dim**-0.5
    out, lse = attention_forward(
        q, v, coef, kpm, cu_seqlens, seed, scale, case.causal, case.dropout_p, case.exclude_self,
        case.seqlen if cu_seqlens is not None else None, True,
    )
    dq = torch.full_like(q, float("nan"))
    dv = None if v is None else torch.full_like(v, float("nan"))
    dcoef = None if coef is None else torch.full_like(coef, float("nan"))
    attention_backward(
        dout.to(out.dtype), dlse, q, v, coef, kpm, cu_seqlens, seed, out, lse, dq, dv, dcoef, scale,
        case.causal, case.dropout_p, case.exclude_self, case.seqlen if cu_seqlens is not None else None,
        deterministic,
    )
    return out, lse, dq, dv, dcoef


def run_reference(case: Case, q, v, coef, kpm, cu_seqlens, dout, dlse, dtype, seed=1234):
    """Reference out, lse and autograd gradients computed in ``dtype``."""
    qr = q.detach().to(dtype).requires_grad_()
    vr = None if v is None else v.detach().to(dtype).requires_grad_()
    cr = None if coef is None else coef.detach().to(torch.float64 if dtype == torch.float64 else F32).requires_grad_()
    kw = dict(coef=cr, scale=case.head_dim**-0.5, causal=case.causal, dropout_p=case.dropout_p,
              exclude_self=case.exclude_self, return_lse=True, dropout_seed=seed)
    if cu_seqlens is None:
        out, lse = reference.symmetric_attention(qr, vr, key_padding_mask=kpm, **kw)
    else:
        out, lse = reference.symmetric_attention_varlen(qr, vr, cu_seqlens, case.seqlen, **kw)
    finite = torch.isfinite(lse)
    loss = (out.to(torch.float64) * dout).sum() + (lse.to(torch.float64).where(finite, 0.0) * dlse).sum()
    leaves = [t for t in (qr, vr, cr) if t is not None]
    grads = list(torch.autograd.grad(loss, leaves))
    dq = grads.pop(0)
    dv = None if vr is None else grads.pop(0)
    dcoef = None if cr is None else grads.pop(0)
    return out.detach(), lse.detach(), dq, dv, dcoef


def check_case(case: Case, input_seed: int = 0, deterministic: bool = True):
    q, v, coef, kpm, cu_seqlens = make_inputs(case, input_seed)
    gen = torch.Generator().manual_seed(input_seed + 1)
    out_shape = q.shape[:-1] + ((case.head_dim if v is None else v.shape[-1]),)
    dout = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    lse_shape = (case.batch, case.heads, case.seqlen) if cu_seqlens is None else (case.heads, q.shape[0])
    dlse = torch.randn(lse_shape, generator=gen, dtype=torch.float64)

    got = run_kernels(case, q, v, coef, kpm, cu_seqlens, dout, dlse.float(), deterministic=deterministic)
    ref64 = run_reference(case, q, v, coef, kpm, cu_seqlens, dout, dlse, torch.float64)
    ref_lo = run_reference(case, q, v, coef, kpm, cu_seqlens, dout, dlse, case.dtype)
    for name, actual, r64, rlo in zip(("out", "lse", "dq", "dv", "dcoef"), got, ref64, ref_lo):
        if r64 is None:
            assert actual is None, name
            continue
        assert not torch.isnan(actual).any(), f"{name}: NaN in kernel output"
        expected_dtype = {"lse": F32, "dcoef": F32}.get(name, case.dtype)
        assert actual.dtype == expected_dtype, f"{name}: dtype {actual.dtype}, expected {expected_dtype}"
        finite = r64[torch.isfinite(r64)]
        magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        err = max_error(actual, r64)
        bound = 2 * max_error(rlo, r64) + ATOL[case.dtype] * magnitude
        assert err <= bound, f"{case.id} {name}: max error {err:.3g} > bound {bound:.3g}"
    if case.kpm and case.batch > 1:
        out, lse, dq = got[0], got[1], got[2]
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1])) and torch.all(dq[1] == 0)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_backward_matches_reference(case):
    check_case(case)


ROLE_CASES = [
    Case(45, 40, 24, "full", causal=True, kpm=True, exclude_self=True, dropout_p=0.2),
    Case(40, 16, None, "diag", dropout_p=0.3, exclude_self=True, dtype=F16, varlen=(1, 40, 23)),
    Case(70, 128, None, "none", causal=True, batch=1),
    Case(33, 64, None, "diag", kpm=True),
]


@pytest.mark.parametrize("fuse_roles", [True, False], ids=["fused-roles", "split-roles"])
@pytest.mark.parametrize("case", ROLE_CASES, ids=[c.id for c in ROLE_CASES])
def test_backward_role_passes(case, fuse_roles, monkeypatch):
    """Both backward schedules (one fused pass, or key pass then query pass) on any variant,
    whatever the launcher's heuristic would pick for it."""
    from symattn_kernels.triton import attention_bwd

    monkeypatch.setattr(attention_bwd, "bwd_fuse_roles", lambda *args: fuse_roles)
    check_case(case)


SYMMETRIC_CASES = [c for c in CASES + ROLE_CASES if c.coef != "full" and not c.causal] + [
    Case(70, 64, None, "diag", kpm=True, exclude_self=True, dropout_p=0.2, dtype=F16, batch=2),
    Case(96, 40, 24, "none", dropout_p=0.1),
]


@pytest.mark.parametrize("case", SYMMETRIC_CASES, ids=[c.id for c in SYMMETRIC_CASES])
def test_symmetric_backward_matches_reference(case):
    """The opt-in symmetric backward (deterministic=False: one score tile per block pair,
    atomics), same pass rule as the default path."""
    from symattn_kernels.triton.attention_bwd import use_symmetric_bwd

    assert use_symmetric_bwd(None if case.coef == "none" else torch.ones(1, 1), case.causal, False)
    check_case(case, deterministic=False)


def test_dropout_same_seed_same_result_other_seed_differs():
    case = Case(33, 40, 24, "diag", causal=True, dropout_p=0.3)
    q, v, coef, kpm, cu = make_inputs(case)
    dout = torch.randn(q.shape[:-1] + (24,), dtype=torch.float64)
    dlse = torch.zeros(case.batch, case.heads, case.seqlen)
    first = run_kernels(case, q, v, coef, kpm, cu, dout, dlse, seed=7)
    again = run_kernels(case, q, v, coef, kpm, cu, dout, dlse, seed=7)
    other = run_kernels(case, q, v, coef, kpm, cu, dout, dlse, seed=8)
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], other[1])  # lse does not see dropout


@pytest.mark.parametrize("keys_first", [False, True], ids=["rows-first", "keys-first"])
@pytest.mark.parametrize("key_stride,first_row,key0,grouped", [
    (37, 0, 0, False), (32, 5, 0, False), (37, (2**35 - 200) // 37, 16, False), (130, 2**50 // 130, 32, False),
    (32, 5, 0, True), (40, 3, 16, True), (40, (2**35 - 200) // 40, 32, True), (136, 2**50 // 136, 48, True),
], ids=["odd", "multiple-of-4", "odd-across-2^35", "large", "grouped", "grouped-tile-2", "grouped-across-2^35",
        "grouped-large"])
def test_dropout_keep_bit_equal_to_reference(key_stride, first_row, key0, grouped, keys_first):
    """Half e % 2 of tl.randint4x's word (e // 2) % 4 at counter e // 8, as
    reference.dropout_keep_mask draws it, per element (rows of an odd key stride start inside a
    counter) and grouped (one Philox per 8 keys: a swapped word or half changes the mask); offsets
    cross 2^35 (the counter's high word); key tiles start past 0; both orientations (the
    backward's key-side tiles are [keys, queries])."""
    rows, keys, p = 16, 32, 0.4
    for seed in (3, 2**40 + 12345):
        out = torch.empty(rows, keys, dtype=torch.int8)
        _keep_grid_kernel[(1,)](out, seed, first_row, key0, key_stride, reference.dropout_threshold(p), BLOCK_R=rows,
                                BLOCK_K=keys, KEYS_FIRST=keys_first, GROUPED=grouped)
        row_ids = first_row + torch.arange(rows)[None]
        want = reference.dropout_keep_mask(seed, p, row_ids, 1, 1, key_stride, key0 + keys)[0, 0, :, key0:]
        assert torch.equal(out.bool(), want), f"seed {seed}: {int((out.bool() != want).sum())} of {want.numel()} differ"
        assert 0 < int(want.sum()) < rows * keys


def test_dropout_large_seed_matches_reference():
    case = Case(17, 16, None, "none", dropout_p=0.4, batch=1)
    q, v, coef, kpm, cu = make_inputs(case)
    dout = torch.zeros(q.shape, dtype=torch.float64)
    dlse = torch.zeros(1, case.heads, case.seqlen)
    big = 2**40 + 12345
    out, *_ = run_kernels(case, q, v, coef, kpm, cu, dout, dlse, seed=big)
    ref = run_reference(case, q, v, coef, kpm, cu, dout, dlse.double(), torch.float64, seed=big)[0]
    assert max_error(out, ref) < 1e-5


def test_strided_inputs_and_gradient_buffers():
    """q and v as views into one packed projection; dq, dv as views into one gradient buffer."""
    batch, seqlen, heads, dim, dim_v = 2, 29, 2, 40, 24
    packed = torch.randn(batch, seqlen, heads, dim + dim_v + 3)
    q, v = packed[..., :dim], packed[..., dim + 3:]
    coef = torch.randn(heads, dim, dim).transpose(1, 2) * 0.2  # non-contiguous coef
    case = Case(seqlen, dim, dim_v, "full", causal=True, batch=batch, heads=heads)
    dout = torch.randn(batch, seqlen, heads, dim_v, dtype=torch.float64)
    dlse = torch.randn(batch, heads, seqlen, dtype=torch.float64)
    scale = dim**-0.5
    out, lse = attention_forward(q, v, coef, None, None, None, scale, True, 0.0, False, None, True)
    grads = torch.full_like(packed, float("nan"))
    dq, dv = grads[..., :dim], grads[..., dim + 3:]
    dcoef = torch.full((heads, dim, dim), float("nan"))
    attention_backward(dout.float(), dlse.float(), q, v, coef, None, None, None, out, lse, dq, dv, dcoef, scale,
                       True, 0.0, False, None, True)
    ref = run_reference(case, q, v, coef, None, None, dout, dlse, torch.float64)
    for name, actual, expected in zip(("out", "lse", "dq", "dv", "dcoef"), (out, lse, dq, dv, dcoef), ref):
        assert max_error(actual, expected) < 5e-5 * max(1.0, expected.abs().max().item()), name
    assert torch.isnan(grads[..., dim:dim + 3]).all()  # the gap between the views is untouched


def test_no_dlse_no_dcoef_requested():
    """dlse None folds nothing into Delta; dcoef None skips the coefficient reduction."""
    case = Case(21, 16, None, "diag", causal=True, batch=1)
    q, v, coef, kpm, cu = make_inputs(case)
    scale = case.head_dim**-0.5
    out, lse = attention_forward(q, v, coef, None, None, None, scale, True, 0.0, False, None, True)
    dout = torch.randn_like(out)
    dq = torch.full_like(q, float("nan"))
    attention_backward(dout, None, q, v, coef, None, None, None, out, lse, dq, None, None, scale, True, 0.0, False,
                       None, True)
    ref = run_reference(case, q, v, coef, kpm, cu, dout.double(), torch.zeros_like(lse, dtype=torch.float64),
                        torch.float64)
    assert max_error(dq, ref[2]) < 1e-5


def test_deterministic_bitwise():
    case = Case(45, 40, None, "full", kpm=True, exclude_self=True, dropout_p=0.1)
    q, v, coef, kpm, cu = make_inputs(case)
    dout = torch.randn(q.shape, dtype=torch.float64)
    dlse = torch.randn(case.batch, case.heads, case.seqlen)
    first = run_kernels(case, q, v, coef, kpm, cu, dout, dlse)
    again = run_kernels(case, q, v, coef, kpm, cu, dout, dlse)
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:

    @st.composite
    def small_cases(draw):
        varlen = draw(st.booleans())
        if varlen:
            lengths = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
            seqlen, batch, kpm = max(lengths), len(lengths), False
        else:
            lengths, seqlen, batch = None, draw(st.integers(1, 48)), draw(st.integers(1, 2))
            kpm = draw(st.booleans())
        shared = draw(st.booleans())
        return Case(
            seqlen=seqlen,
            head_dim=draw(st.sampled_from([1, 8, 16, 24, 33, 64])),
            head_dim_v=None if shared else draw(st.sampled_from([1, 16, 20, 48])),
            coef=draw(st.sampled_from(["none", "diag", "full"])),
            causal=draw(st.booleans()),
            kpm=kpm,
            exclude_self=draw(st.booleans()),
            dropout_p=draw(st.sampled_from([0.0, 0.0, 0.5])),
            dtype=draw(st.sampled_from([F32, F32, F16])),
            varlen=lengths,
            batch=batch,
            heads=draw(st.integers(1, 2)),
        )

    @settings(max_examples=15, deadline=None)
    @given(case=small_cases(), input_seed=st.integers(0, 2**16))
    def test_property_random_small_shapes(case, input_seed):
        check_case(case, input_seed)

    @settings(max_examples=10, deadline=None)
    @given(seqlen=st.integers(1, 40), causal=st.booleans(), input_seed=st.integers(0, 2**16))
    def test_property_fully_masked_rows_are_zero(seqlen, causal, input_seed):
        """Every key padded: out 0, lse -inf, all gradients 0, never NaN."""
        case = Case(seqlen, 16, 16, "diag", causal=causal, exclude_self=True, batch=1)
        q, v, coef, _, cu = make_inputs(case, input_seed)
        kpm = torch.zeros(1, seqlen, dtype=torch.bool)
        dout = torch.randn(1, seqlen, case.heads, 16, dtype=torch.float64)
        dlse = torch.randn(1, case.heads, seqlen)
        out, lse, dq, dv, dcoef = run_kernels(case, q, v, coef, kpm, cu, dout, dlse)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        assert torch.all(dq == 0) and torch.all(dv == 0) and torch.all(dcoef == 0)


def test_backward_plan_covers_every_case_but_wide_heads_on_sm90():
    """bwd_plan (the table compile_report checks) has a config for every variant on sm_80, a full
    coefficient at D = 256 included, and refuses head dims above 128 on sm_90 with the message
    backends.resolve uses to route backend="auto" to torch."""
    from symattn_kernels.triton.attention_bwd import backward_unsupported, bwd_plan

    assert bwd_plan(256, 256, False, 2, True, 80)[1] == (32, 16, 8, 1)
    with pytest.raises(ValueError, match="q has head dim 256 .*backend='torch'"):
        bwd_plan(256, 256, False, 2, False, 90)
    assert backward_unsupported(200, 64, 90) and not backward_unsupported(128, 128, 90)
    fuse, (block_m, *_), splits = bwd_plan(128, 128, False, 2, True, 90)
    assert not fuse and block_m >= 64 and splits == (1, 2)  # sm_90 wgmma rows; dK, dV in two halves
    assert bwd_plan(64, 64, True, 1, False, 90)[0]  # shared, diagonal, no dropout: one launch


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[11], CASES[19], ROLE_CASES[0]],
                         ids=lambda c: c.id)
def test_value_column_groups(case, monkeypatch):
    """SPLIT_D = 2 (each program owns half the output columns, scores recomputed per half), which
    the launchers pick for wide heads on sm_90, in the forward and both backward launches."""
    from symattn_kernels.triton import attention_bwd, attention_fwd

    monkeypatch.setattr(attention_fwd, "INTERPRET_FWD_SPLIT_D", 2)
    monkeypatch.setattr(attention_bwd, "INTERPRET_BWD_SPLIT_D", 2)
    check_case(case)


def test_symmetric_backward_only_where_scores_are_symmetric():
    from symattn_kernels.triton.attention_bwd import use_symmetric_bwd

    diag, full = torch.ones(1, 4), torch.ones(1, 4, 4)
    assert use_symmetric_bwd(None, False, False) and use_symmetric_bwd(diag, False, False)
    assert not use_symmetric_bwd(full, False, False)  # M not symmetric in general: default path
    assert not use_symmetric_bwd(None, True, False)  # causal: nothing to share
    assert not use_symmetric_bwd(None, False, True)  # deterministic: no atomics
