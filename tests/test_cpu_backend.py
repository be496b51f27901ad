"""The fused C++ ``cpu`` backend against the fp64 reference: every mode and option, fully masked
rows, ragged and non-contiguous inputs, varlen, fp32 / bf16 / fp16 under flash-attn's error rule,
outputs, lse and every gradient; bit-equal dropout masks; identical results with 1 and 2
threads (bf16 operands too); every instruction-set build; custom-op checks of the kernel ops."""


import os
import subprocess
import sys

import pytest
import torch

from symattn_kernels import extensions

# Prebuilt, or compiled just in time on first use; skipped only where neither can happen.
if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels import ops
from symattn_kernels.backends import cpu as cpu_backend
from symattn_kernels.backends import registry
from symattn_kernels import reference as R

from .attention_checks import (
    COEF_MODES, F64, GRID, GRID_IDS, assert_close, assert_flash_rule, make_inputs, padding_mask, reference, run,
    run_on_instruction_set, with_threads,
)

# Error floor added to 2x the reference's own error (flash-attn's rule), per dtype.
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAMES = ["out", "lse", "dq", "dv/dcoef", "dcoef"]


def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)


def lowp(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def check_against_reference(inputs, dtype, **kw):
    """Flash-attn's rule on out, lse and every gradient for inputs given in fp64."""
    ref64 = run(reference, *inputs, **kw)
    ref_lowp = run(reference, *lowp(inputs, dtype), **kw)
    got = run(cpu, *lowp(inputs, dtype), **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, r64, rl in zip(NAMES, got, ref64, ref_lowp):
        assert not a.isnan().any(), f"{name} has NaN"
        assert_flash_rule(name, a, r64, rl, ATOL[dtype])


def test_kernel_isa_is_reported():
    assert cpu_backend.kernel_isa() in ("AVX512_AMX", "AVX512_BF16", "AVX512", "AVX2", "DEFAULT")


@pytest.mark.parametrize("coef_mode,shared,causal,padding,exclude_self", GRID, ids=GRID_IDS)
def test_matches_reference_fp32(coef_mode, shared, causal, padding, exclude_self):
    inputs = make_inputs(coef_mode=coef_mode, shared=shared)
    check_against_reference(inputs, torch.float32, causal=causal, key_padding_mask=padding_mask(2, 9, padding),
                            exclude_self=exclude_self)


# Ragged lengths and head dims; 600 > 512 takes the query-block path instead of whole heads.
SHAPES = [(1, 16, 16), (63, 40, 40), (97, 59, 111), (130, 64, 64), (600, 16, 24)]


@pytest.mark.parametrize("seqlen,head_dim,value_dim", SHAPES, ids=[f"S{s}-D{d}-Dv{dv}" for s, d, dv in SHAPES])
@pytest.mark.parametrize("coef_mode", COEF_MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged_shapes_fp32(seqlen, head_dim, value_dim, coef_mode, causal):
    shared = coef_mode != "full"  # exercise both value modes without doubling the grid
    batch = 2 if seqlen < 600 else 1
    inputs = make_inputs(B=batch, S=seqlen, H=2, D=head_dim, Dv=value_dim, coef_mode=coef_mode, shared=shared)
    mask = None
    if seqlen > 1:
        mask = torch.ones(batch, seqlen, dtype=torch.bool)
        mask[0, seqlen // 3:] = False
    check_against_reference(inputs, torch.float32, causal=causal, key_padding_mask=mask, exclude_self=causal)


# Whole heads of several 64-key tiles on the symmetric schedule read their later keys down the
# stored lower tiles: padded keys among them (middle and end, at most a quarter trailing) and
# exclude_self on the diagonal tiles.
@pytest.mark.parametrize("seqlen", [65, 200, 512])
@pytest.mark.parametrize("coef_mode", [None, "diag"], ids=["none", "diag"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_whole_symmetric_heads_with_padding_fp32(seqlen, coef_mode, shared):
    inputs = make_inputs(B=2, S=seqlen, H=2, D=16, Dv=24, coef_mode=coef_mode, shared=shared)
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[0, 3:seqlen:7] = False
    mask[1, 1:seqlen // 2] = False
    mask[1, seqlen - seqlen // 5:] = False
    check_against_reference(inputs, torch.float32, key_padding_mask=mask, exclude_self=True)


# A stored tile below the diagonal serves a row of tile row J and a column of tile row I: one
# exponential per score for both where every key of both is real and their rows' maxima lie
# within 40 of each other, two elsewhere. Every fifth token `stretch` times longer spreads the
# maxima of two 64-token tile rows by about 13-26 (1.5), 38-76 (2.5: both kinds of tile in one
# head) and 100-200 (4); a padded hole and tail, and exclude_self, send their tiles the
# two-exponential way.
@pytest.mark.parametrize("stretch", [1.5, 2.5, 4.0])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_whole_symmetric_heads_share_exponentials_across_spreads(stretch, padded):
    S = 500
    q, v, coef = make_inputs(B=2, S=S, H=2, D=24, Dv=20, coef_mode="diag")
    long_tokens = (1 + (stretch - 1) * (torch.arange(S) % 5 == 0).to(F64))[None, :, None, None]
    mask = None
    if padded:
        mask = torch.ones(2, S, dtype=torch.bool)
        mask[0, 200] = False
        mask[1, S - S // 6:] = False
    check_against_reference((q * long_tokens, v, coef), torch.float32, key_padding_mask=mask, exclude_self=padded)


def test_whole_symmetric_head_nan_key_beyond_the_diagonal_tile():
    # Row 0's only allowed keys, 70 and 71, are NaN ones in a later tile: the output is NaN as the
    # reference's, not an empty row's zeros.
    q = torch.randn(1, 72, 1, 8)
    q[0, 70:] = float("nan")
    mask = torch.zeros(1, 72, dtype=torch.bool)
    mask[0, [0, 70, 71]] = True
    out, lse = cpu(q, None, key_padding_mask=mask, exclude_self=True, return_lse=True)
    ref, ref_lse = R.symmetric_attention(q.double(), None, key_padding_mask=mask, exclude_self=True, return_lse=True)
    assert ref[0, 0].isnan().all() and ref_lse[0, 0].isnan().all()
    assert out[0, 0].isnan().all() and lse[0, 0].isnan().all()


# The fp32 backward reads Y, V and dO (every head's rows H * D floats apart) from per-head copies
# at a padded row stride of their own width: whole heads (symmetric schedule, and causal) and
# tiled ones, D and Dv of different padded strides, a diagonal coefficient, padding.
@pytest.mark.parametrize("seqlen,causal", [(512, False), (320, True), (600, False)], ids=["S512", "S320-causal", "S600"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_fp32_backward_of_strided_heads(seqlen, causal, shared):
    inputs = make_inputs(B=2, S=seqlen, H=2, D=64, Dv=40, coef_mode="diag", shared=shared)
    check_against_reference(inputs, torch.float32, causal=causal, key_padding_mask=padding_mask(2, seqlen, "partial"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("coef_mode", COEF_MODES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_precision_flash_rule(dtype, coef_mode, shared, causal):
    inputs = make_inputs(S=33, D=16, Dv=24, coef_mode=coef_mode, shared=shared)
    check_against_reference(inputs, dtype, causal=causal, key_padding_mask=padding_mask(2, 33, "partial"))


# bf16 runs on bf16 operands (vdpbf16ps, P and G rounded to bf16) where the CPU has AVX512-BF16:
# odd head dims and lengths exercise the pair padding, 600 the query-block path.
@pytest.mark.parametrize("seqlen,head_dim,value_dim", SHAPES, ids=[f"S{s}-D{d}-Dv{dv}" for s, d, dv in SHAPES])
@pytest.mark.parametrize("coef_mode", COEF_MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ragged_shapes_half_precision(seqlen, head_dim, value_dim, coef_mode, causal, dtype):
    shared = coef_mode != "diag"
    batch = 2 if seqlen < 600 else 1
    inputs = make_inputs(B=batch, S=seqlen, H=2, D=head_dim, Dv=value_dim, coef_mode=coef_mode, shared=shared)
    mask = None
    if seqlen > 1:
        mask = torch.ones(batch, seqlen, dtype=torch.bool)
        mask[-1, seqlen - seqlen // 5:] = False
    check_against_reference(inputs, dtype, causal=causal, key_padding_mask=mask, exclude_self=not causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_dropout_flash_rule(dtype):
    inputs = make_inputs(S=70, H=2, D=24, Dv=24, coef_mode="diag", shared=False)
    kw = dict(dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    got = run(cpu, *lowp(inputs, dtype), **kw)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    ref64 = run(reference, *inputs, dropout_seed=seed, **kw)
    ref_lowp = run(reference, *lowp(inputs, dtype), dropout_seed=seed, **kw)
    for name, a, r64, rl in zip(NAMES, got, ref64, ref_lowp):
        assert_flash_rule(name, a, r64, rl, ATOL[dtype])


def test_fully_masked_rows_give_zeros_and_no_nan():
    q, v, coef = make_inputs(S=7, coef_mode="diag", shared=False, dtype=torch.float32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    out, lse = cpu(q, v, coef=coef, key_padding_mask=mask, return_lse=True)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    (out.sum() + lse[0].sum()).backward()
    for t in (q, v, coef):
        assert not t.grad.isnan().any()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


def test_exclude_self_single_token_keeps_itself():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    out = cpu(q, None, exclude_self=True)
    assert_close(out, q, atol=0, name="out")


def test_noncontiguous_inputs_and_gradients():
    gen = torch.Generator().manual_seed(2)
    # Strided views with a unit last stride, as Linear(x).view(...) slices give them.
    q = torch.randn(2, 7, 3, 2, 10, generator=gen)[..., 0, :8]
    v = torch.randn(2, 3, 7, 12, generator=gen).transpose(1, 2)[..., 2:7]
    dout = torch.randn(2, 7, 3, 9, generator=gen)[..., 2:7]
    for t in (q, v, dout):
        assert t.stride(-1) == 1 and not t.is_contiguous()
    coef = torch.rand(3, 8, generator=gen) + 0.5
    kw = dict(causal=True, key_padding_mask=padding_mask(2, 7, "partial"))
    leaves = [t.requires_grad_() for t in (q, v, coef)]
    out = cpu(*leaves[:2], coef=leaves[2], **kw)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*leaves64[:2], coef=leaves64[2], **kw)
    want = [ref, *torch.autograd.grad(ref, leaves64, dout.double())]
    for name, a, b in zip(["out", "dq", "dv", "dcoef"], got, want):
        assert_close(a, b, atol=1e-5, name=name)


def _varlen_inputs(shared, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 4, 5, 16, 16, 40], dtype=torch.int32)  # unequal, one empty, one of length 1
    q = torch.randn(40, 2, 8, generator=gen, dtype=F64)
    v = None if shared else torch.randn(40, 2, 3, generator=gen, dtype=F64)
    coef = torch.rand(2, 8, generator=gen, dtype=F64) + 0.5
    return cu, q, v, coef


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_varlen_matches_reference(causal, shared, dropout_p):
    cu, q, v, coef = _varlen_inputs(shared)
    kw = dict(causal=causal, exclude_self=True, dropout_p=dropout_p)
    leaves64 = [t.requires_grad_() for t in (q, v, coef) if t is not None]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    split = (lambda ls: (ls[0], None, ls[1])) if shared else (lambda ls: tuple(ls))
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(5)
    q32, v32, c32 = split(leaves32)
    out, lse = sk.symmetric_attention_varlen(q32, v32, cu, 24, coef=c32, return_lse=True, backend="cpu", **kw)
    q64, v64, c64 = split(leaves64)
    ref, ref_lse = R.symmetric_attention_varlen(q64, v64, cu, 24, coef=c64, return_lse=True, dropout_seed=seed,
                                                **kw)
    assert_close(out, ref, atol=2e-6, name="out")
    assert_close(lse, ref_lse, atol=2e-6, name="lse")
    dout = torch.randn(ref.shape, dtype=F64)
    for name, a, b in zip(["dq", "dv/dcoef", "dcoef"], torch.autograd.grad(out, leaves32, dout.float()),
                          torch.autograd.grad(ref, leaves64, dout)):
        assert_close(a, b, atol=1e-5, name=name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_varlen_bf16_flash_rule(shared):
    # one sequence longer than 512 takes the query-block path beside whole-head ones
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 4, 5, 16, 16, 600], dtype=torch.int32)
    q = torch.randn(600, 2, 19, generator=gen, dtype=F64)
    v = None if shared else torch.randn(600, 2, 7, generator=gen, dtype=F64)
    coef = torch.rand(2, 19, generator=gen, dtype=F64) + 0.5
    dout = torch.randn(600, 2, 19 if shared else 7, generator=gen, dtype=F64)

    def grads(fn, dtype, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, v, coef) if t is not None]
        out = fn(leaves[0], None if shared else leaves[1], cu, 584, coef=leaves[-1], causal=True, exclude_self=True,
                 **kw)
        return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]

    ref64 = grads(R.symmetric_attention_varlen, F64)
    ref_bf16 = grads(R.symmetric_attention_varlen, torch.bfloat16)
    got = grads(sk.symmetric_attention_varlen, torch.bfloat16, backend="cpu")
    for name, a, r64, rl in zip(["out", "dq", "dv/dcoef", "dcoef"], got, ref64, ref_bf16):
        assert_flash_rule(name, a, r64, rl, ATOL[torch.bfloat16])


def test_philox_bit_equal_to_reference():
    gen = torch.Generator().manual_seed(0)
    offsets = torch.cat([torch.arange(70), torch.randint(0, 2**62, (500,), generator=gen),
                         torch.tensor([2**32 - 1, 2**32, 2**40 + 3, 2**62 - 1])])
    for seed in (0, 1, 2**32 + 7, 2**62 - 5):
        got = torch.ops.symattn.philox4x_cpu(offsets, seed)
        assert torch.equal(got, torch.stack(R.philox_randint4x(seed, offsets), dim=-1)), f"seed {seed}"


def _kernel_keep_mask(q_shape, p, seed_state, cu=None, max_seqlen=0):
    """The kernel's dropout mask, read off its output: q = 0 makes P uniform, v = identity makes
    out[..., i, j] = P_ij * keep_ij * dropout_scale(p)."""
    torch.manual_seed(seed_state)
    if cu is None:
        B, S, H, _ = q_shape
        q = torch.zeros(q_shape)
        v = torch.eye(S)[None, :, None, :].expand(B, S, H, S).contiguous()
        out = sk.symmetric_attention(q, v, dropout_p=p, backend="cpu")  # [B, S_q, H, S_k]
        return out.permute(0, 2, 1, 3) != 0  # [B, H, S_q, S_k]
    total, H, _ = q_shape
    q = torch.zeros(q_shape)
    starts = cu[:-1].repeat_interleave(cu.diff())
    pos = torch.arange(total) - starts
    v = torch.nn.functional.one_hot(pos, max_seqlen).float()[:, None, :].expand(total, H, max_seqlen).contiguous()
    return sk.symmetric_attention_varlen(q, v, cu, max_seqlen, dropout_p=p, backend="cpu") != 0  # [total, H, max]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_bit_equal_to_reference(p):
    B, S, H = 2, 40, 3
    mask = _kernel_keep_mask((B, S, H, 8), p, seed_state=21)
    torch.manual_seed(21)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    row_ids = torch.arange(B * S).view(B, S)
    want = R.dropout_keep_mask(seed, p, row_ids, B * S, H, S, S)
    assert torch.equal(mask, want)
    assert 0.0 < mask.float().mean().item() < 1.0


def test_varlen_dropout_mask_bit_equal_to_reference():
    cu = torch.tensor([0, 7, 7, 20, 33], dtype=torch.int32)
    max_seqlen, H, p = 16, 2, 0.3
    mask = _kernel_keep_mask((33, H, 8), p, seed_state=4, cu=cu, max_seqlen=max_seqlen)
    torch.manual_seed(4)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end == start:
            continue
        want = R.dropout_keep_mask(seed, p, torch.arange(start, end)[None], 33, H, 33, end - start)[0]
        got = mask[start:end, :, : end - start].permute(1, 0, 2)  # [H, L, L]
        assert torch.equal(got, want), f"sequence {start}:{end}"


def test_dropout_matches_reference_and_is_reproducible():
    q, v, coef = make_inputs(S=16, shared=False, coef_mode="diag", dtype=torch.float32)
    kw = dict(dropout_p=0.3, causal=True)
    torch.manual_seed(11)
    first = run(cpu, q, v, coef, **kw)
    torch.manual_seed(11)
    second = run(cpu, q, v, coef, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    q64, v64, c64 = [t.detach().double().requires_grad_() for t in (q, v, coef)]
    want = run(reference, q64, v64, c64, dropout_seed=seed, **kw)
    for name, a, b in zip(NAMES, first, want):
        assert_close(a, b, atol=1e-5, name=name)


def test_dropout_zero_is_exact():
    q, v, _ = make_inputs(shared=False, dtype=torch.float32)
    assert torch.equal(cpu(q, v, dropout_p=0.0), cpu(q, v))


@pytest.mark.parametrize("case", ["shared-diag-dropout", "v-full-causal", "long-noself", "varlen",
                                  "bf16-shared-dropout", "bf16-v-long-causal"])
def test_identical_with_one_and_two_threads(case):
    if case == "varlen":
        cu, q, v, coef = _varlen_inputs(shared=False, seed=3)
        leaves = [t.float().requires_grad_() for t in (q, v, coef)]

        def fn():
            torch.manual_seed(0)
            out = sk.symmetric_attention_varlen(*leaves[:2], cu, 24, coef=leaves[2], dropout_p=0.2, causal=True,
                                                backend="cpu")
            return [out, *torch.autograd.grad(out.square().sum(), leaves)]
    else:
        opts = {
            "shared-diag-dropout": (dict(coef_mode="diag", shared=True, S=70), dict(dropout_p=0.2)),
            "v-full-causal": (dict(coef_mode="full", shared=False, S=70), dict(causal=True)),
            "long-noself": (dict(coef_mode="diag", shared=True, S=530, B=1), dict(exclude_self=True)),
            "bf16-shared-dropout": (dict(shared=True, S=70, dtype=torch.bfloat16), dict(dropout_p=0.2)),
            "bf16-v-long-causal": (dict(coef_mode="diag", shared=False, S=530, B=1, dtype=torch.bfloat16),
                                   dict(causal=True)),
        }[case]
        q, v, coef = make_inputs(H=4, D=16, Dv=16, **{"dtype": torch.float32, **opts[0]})

        def fn():
            torch.manual_seed(0)
            return run(cpu, q, v, coef, **opts[1])
    one, two = with_threads(1, fn), with_threads(2, fn)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


_ISA_SCRIPT = """
import torch, symattn_kernels as sk
from symattn_kernels import reference as R
from symattn_kernels.backends import cpu as cpu_backend
from symattn_kernels.backends import registry
print(cpu_backend.kernel_isa())
torch.manual_seed(0)
worst, worst_bf16 = 0.0, 0.0
for coef_shape, v_dim, causal, S in [(None, None, False, 70), ((2, 24), 16, True, 70), ((2, 24, 24), None, False, 37),
                                    ((2, 24), None, False, 530)]:
    q = torch.randn(2, S, 2, 24, dtype=torch.float64, requires_grad=True)
    v = None if v_dim is None else torch.randn(2, S, 2, v_dim, dtype=torch.float64, requires_grad=True)
    c = None if coef_shape is None else (torch.rand(*coef_shape, dtype=torch.float64) + 0.5).requires_grad_()
    leaves = [t for t in (q, v, c) if t is not None]
    ref = R.symmetric_attention(q, v, coef=c, causal=causal)
    g = torch.randn_like(ref)
    want = [ref, *torch.autograd.grad(ref, leaves, g)]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in (("cpu", sk.symmetric_attention), ("ref", R.symmetric_attention)):
            low = [t.detach().to(dtype).requires_grad_() for t in leaves]
            it = iter(low); lq = next(it); lv = None if v is None else next(it); lc = None if c is None else next(it)
            out = fn(lq, lv, coef=lc, causal=causal, **({"backend": "cpu"} if name == "cpu" else {}))
            results[dtype, name] = [out, *torch.autograd.grad(out, low, g.to(dtype))]
    for a, b in zip(results[torch.float32, "cpu"], want):
        worst = max(worst, ((a.double() - b).abs() / (1 + b.abs())).max().item())
    # bf16: error over (2 x the bf16 reference's error + 1e-2), flash-attn's rule
    for a, r, b in zip(results[torch.bfloat16, "cpu"], results[torch.bfloat16, "ref"], want):
        err, ref_err = (a.double() - b).abs().max().item(), (r.double() - b).abs().max().item()
        worst_bf16 = max(worst_bf16, err / (2 * ref_err + 1e-2))
print(worst, worst_bf16)
"""

@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_every_instruction_set_build(isa):
    used, worst, worst_bf16 = run_on_instruction_set(isa, _ISA_SCRIPT).split()
    assert used == isa.upper()
    assert float(worst) < 5e-5
    assert float(worst_bf16) <= 1.0


def test_float64_stays_on_torch_backend():
    q, v, coef = make_inputs(coef_mode="full", shared=False)
    got = run(lambda *a, **kw: sk.symmetric_attention(*a, **kw), q, v, coef, causal=True)  # auto
    want = run(reference, q, v, coef, causal=True)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, atol=1e-9, rtol=1e-9, name=name)
    with pytest.raises(TypeError, match="float64"):
        cpu(q, v, coef=coef)


def test_auto_picks_cpu_backend():
    q, v, _ = make_inputs(shared=False, dtype=torch.float32)
    q, v = q.detach(), v.detach()
    assert torch.equal(sk.symmetric_attention(q, v), cpu(q, v))


def _kernel_op_args(varlen=False):
    gen = torch.Generator().manual_seed(9)
    if varlen:
        q = torch.randn(9, 2, 4, generator=gen)
        cu = torch.tensor([0, 3, 9], dtype=torch.int32)
        return (q, None, torch.rand(2, 4, generator=gen), None, cu, None, 0.5, True, 0.0, False, 6)
    q = torch.randn(1, 5, 2, 4, generator=gen)
    v = torch.randn(1, 5, 2, 3, generator=gen)
    coef = torch.randn(2, 4, 4, generator=gen)
    mask = torch.tensor([[True, True, False, True, True]])
    return (q, v, coef, mask, None, 7, 0.5, True, 0.2, True, 5)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_opcheck_kernel_ops(varlen, residual):
    args = _kernel_op_args(varlen)
    if residual:  # bf16 with dropout and no coefficient: the forward keeps its output residual
        args = (args[0].bfloat16(), None if args[1] is None else args[1].bfloat16(), None, *args[3:5], 7, 0.5,
                args[7], 0.2, *args[9:])
    args = (*args, residual)
    torch.library.opcheck(torch.ops.symattn.attention_fwd_cpu.default, args)
    q, v, coef = args[:3]
    out, lse, kept = torch.ops.symattn.attention_fwd_cpu(*args)
    assert kept.shape == (out.shape if residual else (0,))
    dq, dv = torch.empty_like(q), None if v is None else torch.empty_like(v)
    dcoef = None if coef is None else torch.empty_like(coef)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), *args[:6], out, kept if residual else None, lse, dq, dv,
                dcoef, *args[6:-1])
    torch.library.opcheck(torch.ops.symattn.attention_bwd_cpu.default, bwd_args)


def test_opcheck_philox():
    torch.library.opcheck(torch.ops.symattn.philox4x_cpu.default, (torch.arange(10), 3))


@pytest.mark.parametrize("dtype,coef_mode,S", [(torch.float32, "diag", 5), (torch.bfloat16, None, 5),
                                               (torch.bfloat16, None, 600)],
                         ids=["fp32-diag", "bf16-short", "bf16-residual"])
def test_opcheck_public_op_on_cpu_backend(dtype, coef_mode, S):
    q, v, coef = make_inputs(B=1, S=S, H=2, D=4, Dv=3, coef_mode=coef_mode, shared=False, dtype=dtype)
    seed = torch.tensor(7, dtype=torch.int64)
    args = (q, v, coef, None, None, seed, 0.5, True, 0.2, True, S, True, "cpu")
    torch.library.opcheck(ops.attention_fwd, args)
    residual = ops.attention_fwd(*(x.detach() if isinstance(x, torch.Tensor) else x for x in args))[2]
    # Only heads over the whole-head length take delta from the output (and its residual).
    assert residual.shape == ((1, S, 2, 3) if dtype == torch.bfloat16 and S > 512 else (0,))


def test_whole_head_length_is_the_kernels():
    """backends.registry keeps the kernels' whole-head length for the fake functions, which must
    not load the extension: it must be csrc/cpu/attention_tiling.h's kWholeHead."""
    header = (extensions.source_root() / "cpu" / "attention_tiling.h").read_text()
    assert f"constexpr int64_t kWholeHead = {registry.CPU_WHOLE_HEAD_TOKENS};" in header


@pytest.mark.slow
def test_torch_compile_fullgraph_on_cpu_backend():
    q, v, coef = make_inputs(B=2, S=12, H=2, D=8, Dv=8, coef_mode="diag", shared=False, dtype=torch.float32)
    mask = padding_mask(2, 12, "partial")

    def step(q, v, coef):
        out = sk.symmetric_attention(q, v, coef=coef, causal=True, key_padding_mask=mask, backend="cpu")
        return out.square().sum() + sk.shared_attention(q, key_padding_mask=mask, backend="cpu").sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    eager = torch.autograd.grad(step(q, v, coef), (q, v, coef))
    got = torch.autograd.grad(compiled(q, v, coef), (q, v, coef))
    for name, a, b in zip(["dq", "dv", "dcoef"], got, eager):
        assert_close(a, b, atol=1e-5, name=name)


# A fresh process whose first call is a compiled one: the backend probe (imports, extension load)
# runs at trace time; varlen's offsets are checked by the graph when it runs; with inductor's
# fallback_random the dropout seed is drawn as in eager, so the same torch seed gives the same mask.
_FIRST_CALL_COMPILED = r"""
import torch, symattn_kernels as sk
import torch._inductor.config as inductor_config
inductor_config.fallback_random = True
q = torch.randn(2, 9, 2, 8)
cu = torch.tensor([0, 4, 9], dtype=torch.int32)

def step(q, cu):
    return sk.shared_attention(q, dropout_p=0.3), sk.symmetric_attention_varlen(q[0], None, cu, 5, causal=True)

compiled = torch.compile(step, fullgraph=True, backend="inductor")
torch.manual_seed(3)
got = compiled(q, cu)
torch.manual_seed(3)
want = step(q, cu)
assert all(torch.equal(a, b) for a, b in zip(got, want)), "compiled results differ from eager"
try:
    compiled(q, torch.tensor([0, 10, 9], dtype=torch.int32))
except RuntimeError as err:
    assert "cu_seqlens must rise" in str(err), err
else:
    raise AssertionError("falling cu_seqlens were accepted")
print("ok")
"""


@pytest.mark.slow
def test_first_call_of_a_process_may_be_compiled():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.split()[-1] == "ok", result.stdout[-4000:] + result.stderr[-4000:]
