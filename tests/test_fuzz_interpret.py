"""The fuzz campaign's reference check on the Triton backend, under the interpreter (own process:
``TRITON_INTERPRET=1 pytest -m interpret``): fp32 and fp16 (the interpreter's bf16 tl.dot is
wrong). CI draws 1000 examples, the ``long`` profile 20 times as many. The interpreter runs each
program of a launch in Python (about 0.25 s for a backward program), so the triton cases keep to
at most two sequences and two heads (``attention_cases``): a few programs per launch, about
0.4 s per example on two busy cores."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

from tests.fuzzing import SCALE, attention_cases, check_against_reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (own process)"),
]


@settings(max_examples=1000 * SCALE)
@given(case=attention_cases("triton"))
def test_fuzz_against_reference(case):
    check_against_reference(case)
