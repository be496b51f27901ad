"""Standing fuzz campaign: hypothesis draws shapes x modes x masks x dtypes x options for every CPU
backend and checks the output, lse and every gradient against the fp64 reference, plus
properties the reference need not be trusted for: permutation equivariance (no causal, no
padding, no dropout), invariance of real rows to whatever padded tokens hold, and linearity in V.

The reference check draws 1000 examples per backend in the ``ci`` profile (tests/fuzzing.py
holds the profiles and strategies); the Triton backend's share runs under the interpreter in
tests/test_fuzz_interpret.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import symattn_kernels as sk
from symattn_kernels import backends
from tests.fuzzing import SCALE, attention_cases, check_against_reference

BACKENDS = [name for name in ("torch", "cpu") if backends.status(name).usable]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_reference(backend):
    @settings(max_examples=1000 * SCALE)
    @given(case=attention_cases(backend))
    def check(case):
        check_against_reference(case)

    check()


@st.composite
def dense_cases(draw):
    return dict(batch=draw(st.integers(1, 2)), seqlen=draw(st.integers(1, 12)), heads=draw(st.integers(1, 2)),
                dim=draw(st.integers(1, 16)), dim_v=draw(st.integers(1, 16)),
                coef=draw(st.sampled_from([None, "diag", "full"])), seed=draw(st.integers(0, 2**16)))


def _dense(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, s, h = case["batch"], case["seqlen"], case["heads"]
    q = torch.randn(b, s, h, case["dim"], generator=gen)
    v = torch.randn(b, s, h, case["dim_v"], generator=gen)
    coef = {None: None, "diag": torch.rand(h, case["dim"], generator=gen) + 0.5,
            "full": torch.randn(h, case["dim"], case["dim"], generator=gen) / case["dim"] ** 0.5}[case["coef"]]
    return q, v, coef, gen


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_permutation_equivariance(backend):
    @settings(max_examples=200 * SCALE)
    @given(case=dense_cases(), exclude_self=st.booleans())
    def check(case, exclude_self):
        q, v, coef, gen = _dense(case)
        perm = torch.randperm(case["seqlen"], generator=gen)
        out = sk.symmetric_attention(q, v, coef=coef, exclude_self=exclude_self, backend=backend)
        permuted = sk.symmetric_attention(q[:, perm], v[:, perm], coef=coef, exclude_self=exclude_self,
                                          backend=backend)
        torch.testing.assert_close(permuted, out[:, perm], rtol=1e-5, atol=1e-5)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_padding_invariance(backend):
    @settings(max_examples=200 * SCALE)
    @given(case=dense_cases(), causal=st.booleans(), junk=st.sampled_from([0.0, 1e4, float("nan"), float("inf")]),
           data=st.data())
    def check(case, causal, junk, data):
        q, v, coef, _ = _dense(case)
        mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=case["seqlen"],
                                                        max_size=case["seqlen"]),
                                               min_size=case["batch"], max_size=case["batch"])))
        pad = ~mask[..., None, None]
        out = sk.symmetric_attention(q, v, coef=coef, causal=causal, key_padding_mask=mask, backend=backend)
        other = sk.symmetric_attention(q.masked_fill(pad, junk), v.masked_fill(pad, junk), coef=coef, causal=causal,
                                       key_padding_mask=mask, backend=backend)
        torch.testing.assert_close(other[mask], out[mask], rtol=1e-5, atol=1e-5)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_linearity_in_v(backend):
    @settings(max_examples=200 * SCALE)
    @given(case=dense_cases(), causal=st.booleans(), a=st.floats(-3, 3), b=st.floats(-3, 3))
    def check(case, causal, a, b):
        q, v, coef, gen = _dense(case)
        w = torch.randn(v.shape, generator=gen)
        kw = dict(coef=coef, causal=causal, backend=backend)
        mixed = sk.symmetric_attention(q, a * v + b * w, **kw)
        expected = a * sk.symmetric_attention(q, v, **kw) + b * sk.symmetric_attention(q, w, **kw)
        torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)

    check()
