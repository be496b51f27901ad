"""The fuzz campaign's hypothesis profiles, input strategies and reference check, shared by
tests/test_fuzz.py (CPU backends) and tests/test_fuzz_interpret.py (Triton, interpreted).

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
    mask = None if case["padding"] is None else torch.tensor(case["padding"], dtype=torch.bool).view(
        case["batch"], case["seqlen"])
    return fn.symmetric_attention(q, v, key_padding_mask=mask, **kw)


def _results(fn, case, dtype, q64, v64, c64, dout, dlse, seed):
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (q64, v64, c64)]
    out, lse = _call(fn, case, *leaves, seed)
    finite = torch.isfinite(lse)
    loss = (out * dout.to(out.dtype)).sum() + (lse.where(finite, 0) * dlse.to(lse.dtype)).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
    return [out, lse, *grads]


def check_against_reference(case):
    q64, v64, c64 = _inputs(case)
    torch.manual_seed(case["seed"])
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    out_shape = (*q64.shape[:-1], (q64 if v64 is None else v64).shape[-1])
    dout = torch.randn(out_shape, generator=gen, dtype=F64)
    lse_shape = (q64.shape[1], q64.shape[0]) if case["lengths"] is not None else (q64.shape[0], q64.shape[2], q64.shape[1])
    dlse = torch.randn(lse_shape, generator=gen, dtype=F64)
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
