"""Fuzz campaign of the fused CPU kernels on long inputs: the schedules that tests/test_fuzz.py
(at most 10 tokens) never reaches. Lengths sit at and around the thresholds where the kernels
switch schedule (csrc/cpu/attention_tiling.h: the whole-head symmetric schedule up to 512 tokens
in 64-square tiles, and only with at most a quarter of trailing padded keys; the flash-style and
mirrored forward beyond; causal slices; the backward's 64- or 128-row pair tiles and its slices
of long heads with a full coefficient; varlen calls of mixed lengths, longest first), with
the same options, rule and profiles as tests/test_fuzz.py (see tests/fuzzing.py): output, lse
and every gradient against the fp64 reference.

The ``ci`` profile draws 60 reference cases (161 s of CPU time on the 2-core dev machine, loaded)
and 30 thread-count cases (seconds);
``HYPOTHESIS_PROFILE=long`` draws 20 times as many, at random, for local hunts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from symattn_kernels import backends
from tests.attention_checks import with_threads
from tests.fuzzing import SCALE, check_against_reference, kernel_results, long_attention_cases

if not backends.status("cpu").usable:
    pytest.skip("the fused CPU kernels are not built here", allow_module_level=True)


@settings(max_examples=60 * SCALE)
@given(case=long_attention_cases())
def test_fuzz_long_against_reference(case):
    check_against_reference(case)


# The tasks are cut and dealt without regard to the thread count, so nothing may depend on it.
@settings(max_examples=30 * SCALE)
@given(case=long_attention_cases(shortest=513))
def test_fuzz_long_thread_count_bit_equal(case):
    one, two = (with_threads(n, lambda: kernel_results(case)) for n in (1, 2))
    for name, a, b in zip(["out", "lse", "grad 0", "grad 1", "grad 2"], one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
