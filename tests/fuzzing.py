"""The fuzz campaign's hypothesis profiles, input strategies and reference check, shared by
tests/test_fuzz.py (CPU backends), tests/test_fuzz_long.py (the fused CPU kernels' long-input
schedules) and tests/test_fuzz_interpret.py (Triton, interpreted).

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default: derandomized, so CI is reproducible) and
``long`` (random, ``SCALE`` = 20 times the examples, for local runs).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import symattn_kernels as sk
from symattn_kernels import reference as R
from tests.attention_checks import F64, max_error

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1

DTYPES = {"torch": [torch.float32, F64], "cpu": [torch.float32, torch.bfloat16, torch.float16],
          "triton": [torch.float32, torch.float16]}
# Floor of flash-attn's rule per dtype: the rounding noise of tiny sums near 1.
FLOOR = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@st.composite
def attention_cases(draw, backend):
    # The interpreter runs each (sequence, head) program in Python: fewer of them for triton.
    most = 2 if backend == "triton" else 3
    varlen = draw(st.booleans())
    if varlen:
        lengths = draw(st.lists(st.integers(0, 10), min_size=1, max_size=most + 1))
        batch, seqlen = len(lengths), max(lengths)
    else:
        lengths, batch, seqlen = None, draw(st.integers(0, most)), draw(st.integers(0, 10))
    dim = draw(st.integers(1, 24))
    shared = draw(st.booleans())
    padding = None
    if not varlen and draw(st.booleans()):
        padding = draw(st.lists(st.lists(st.booleans(), min_size=seqlen, max_size=seqlen),
                                min_size=batch, max_size=batch))
    return dict(
        backend=backend, lengths=lengths, batch=batch, seqlen=seqlen, heads=draw(st.integers(1, most)),
        dim=dim, dim_v=None if shared else draw(st.integers(1, 24)),
        coef=draw(st.sampled_from([None, "diag", "full"])), causal=draw(st.booleans()),
        exclude_self=draw(st.booleans()), padding=padding,
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.3])),
        scale=draw(st.sampled_from([None, 0.3, 2.0])), dtype=draw(st.sampled_from(DTYPES[backend])),
        seed=draw(st.integers(0, 2**16)),
    )


# Lengths at and around the fused CPU kernels' schedule thresholds (csrc/cpu/attention_tiling.h):
# kSymTile 64, the backward's 64-row pair tiles, kQueryTile 128, kKeyTile 256, kWholeHead 512,
# the 128-row pair tiles from kPairBlocks * kPairTile = 2048 tokens, and odd tails between them.
LONG_LENGTHS = [1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 383, 384, 385, 511, 512, 513, 640,
                767, 768, 769, 1023, 1024, 1025, 2047, 2048, 2049]
# Keeps the fp64 reference cheap: at most this many score entries (sum of L^2 x heads) per case.
LONG_SCORES = 3 * 2049**2


def _long_length(draw, shortest=1):
    if draw(st.integers(0, 5)) < 5:
        return draw(st.sampled_from([n for n in LONG_LENGTHS if n >= shortest]))
    return draw(st.integers(max(500, shortest), 2100))


def _dim(draw):
    # Small head dims keep the reference cheap; 59 and 64 now and then (a ragged and a whole
    # number of vectors over more than one micro-tile of columns).
    return draw(st.integers(1, 24)) if draw(st.integers(0, 7)) < 7 else draw(st.sampled_from([59, 64]))


def _short_or_long_length(draw, shortest):
    return draw(st.integers(0, 70)) if draw(st.booleans()) else _long_length(draw, shortest)


def _trailing_pads(draw, L):
    # The symmetric and mirrored schedules need at most a quarter of trailing padded keys
    # (4 * key_end > 3 * L): pad counts just under, at and over L / 4, or any.
    quarter = [L // 4 - 1, L // 4, L // 4 + 1, (L + 3) // 4, (L + 3) // 4 + 1]
    pads = draw(st.sampled_from([0, *quarter])) if draw(st.integers(0, 3)) else draw(st.integers(0, L))
    return min(max(pads, 0), L)


@st.composite
def long_attention_cases(draw, backend="cpu", shortest=1):
    """Like attention_cases, for long inputs: lengths near the schedule thresholds (the long ones
    at least `shortest`), varlen mixes of short and long sequences, trailing padding near a
    quarter and random holes. Padding is a spec (see padding_mask) rather than a list of flags,
    so a failing case prints short."""
    varlen = draw(st.booleans())
    padding = None
    if varlen:
        # One long sequence at least, among short ones (cheap, but they raise the call's task
        # count, which sets the causal, mirrored and sliced-backward cuts) in any order.
        others = [_short_or_long_length(draw, shortest) for _ in range(draw(st.integers(0, 4)))]
        lengths = draw(st.permutations([_long_length(draw, shortest), *others]))
        batch, seqlen = len(lengths), max(lengths)
    else:
        lengths, batch, seqlen = None, draw(st.integers(1, 3)), _long_length(draw, shortest)
        if draw(st.booleans()):
            padding = dict(trailing=[_trailing_pads(draw, seqlen) for _ in range(batch)],
                           holes=draw(st.sampled_from([0.0, 0.0, 0.01, 0.3])), seed=draw(st.integers(0, 2**16)))
    squares = sum(n * n for n in lengths) if varlen else batch * seqlen**2
    heads = min(draw(st.integers(1, 3)), max(1, LONG_SCORES // max(1, squares)))
    dim, shared = _dim(draw), draw(st.booleans())
    return dict(
        backend=backend, lengths=lengths, batch=batch, seqlen=seqlen, heads=heads, dim=dim,
        dim_v=None if shared else _dim(draw), coef=draw(st.sampled_from([None, "diag", "full"])),
        causal=draw(st.booleans()), exclude_self=draw(st.booleans()), padding=padding,
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2])), scale=draw(st.sampled_from([None, 0.3, 2.0])),
        dtype=draw(st.sampled_from(DTYPES[backend])), seed=draw(st.integers(0, 2**16)),
    )


def padding_mask(case):
    """The case's key padding mask [batch, seqlen] (True = real), or None: from a list of flags
    (attention_cases) or a spec (long_attention_cases): per row, its last `trailing` keys padded,
    and each other key padded with probability `holes`."""
    padding = case["padding"]
    if padding is None:
        return None
    if not isinstance(padding, dict):
        return torch.tensor(padding, dtype=torch.bool).view(case["batch"], case["seqlen"])
    gen = torch.Generator().manual_seed(padding["seed"])
    mask = torch.rand(case["batch"], case["seqlen"], generator=gen) >= padding["holes"]
    for row, pads in enumerate(padding["trailing"]):
        mask[row, case["seqlen"] - pads:] = False
    return mask


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    rows = sum(case["lengths"]) if case["lengths"] is not None else None
    lead = (rows,) if rows is not None else (case["batch"], case["seqlen"])
    q = torch.randn(*lead, case["heads"], case["dim"], generator=gen, dtype=F64)
    v = None if case["dim_v"] is None else torch.randn(*lead, case["heads"], case["dim_v"], generator=gen, dtype=F64)
    coef = {None: None, "diag": torch.rand(case["heads"], case["dim"], generator=gen, dtype=F64) + 0.5,
            "full": torch.randn(case["heads"], case["dim"], case["dim"], generator=gen, dtype=F64) / case["dim"] ** 0.5
            + torch.eye(case["dim"], dtype=F64)}[case["coef"]]
    return q, v, coef


def _call(fn, case, q, v, coef, seed):
    kw = dict(coef=coef, scale=case["scale"], causal=case["causal"], dropout_p=case["dropout_p"],
              exclude_self=case["exclude_self"], return_lse=True)
    if fn is R:
        kw["dropout_seed"] = seed
    else:
        kw["backend"] = case["backend"]
        torch.manual_seed(case["seed"])  # the kernels draw `seed` from it
    if case["lengths"] is not None:
        cu = torch.tensor([0, *torch.tensor(case["lengths"]).cumsum(0).tolist()], dtype=torch.int32)
        return fn.symmetric_attention_varlen(q, v, cu, max(1, case["seqlen"]) + 3, **kw)
    return fn.symmetric_attention(q, v, key_padding_mask=padding_mask(case), **kw)


def _results(fn, case, dtype, q64, v64, c64, dout, dlse, seed):
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (q64, v64, c64)]
    out, lse = _call(fn, case, *leaves, seed)
    finite = torch.isfinite(lse)
    loss = (out * dout.to(out.dtype)).sum() + (lse.where(finite, 0) * dlse.to(lse.dtype)).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
    return [out, lse, *grads]


def _prepared(case):
    q64, v64, c64 = _inputs(case)
    torch.manual_seed(case["seed"])
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    out_shape = (*q64.shape[:-1], (q64 if v64 is None else v64).shape[-1])
    dout = torch.randn(out_shape, generator=gen, dtype=F64)
    lse_shape = (q64.shape[1], q64.shape[0]) if case["lengths"] is not None else (q64.shape[0], q64.shape[2], q64.shape[1])
    dlse = torch.randn(lse_shape, generator=gen, dtype=F64)
    return q64, v64, c64, dout, dlse, seed


def kernel_results(case):
    """The backend's out, lse and gradients for the case, in its dtype (no reference)."""
    q64, v64, c64, dout, dlse, seed = _prepared(case)
    return _results(sk, case, case["dtype"], q64, v64, c64, dout, dlse, seed)


def check_against_reference(case):
    q64, v64, c64, dout, dlse, seed = _prepared(case)
    dtype = case["dtype"]
    got = _results(sk, case, dtype, q64, v64, c64, dout, dlse, seed)
    ref64 = _results(R, case, F64, q64, v64, c64, dout, dlse, seed)
    low = ref64 if dtype == F64 else _results(R, case, dtype, q64, v64, c64, dout, dlse, seed)
    names = ["out", "lse", "dq"] + ([] if v64 is None else ["dv"]) + ([] if c64 is None else ["dcoef"])
    for name, a, b, c in zip(names, got, ref64, low):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        factor = 2 if name in ("out", "lse") else 3
        scale = max(1.0, b.detach().abs().max().item() if b.numel() else 0.0)
        bound = factor * max_error(c, b) + FLOOR[dtype] * scale
        err = max_error(a, b)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
