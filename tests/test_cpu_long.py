"""Heads longer than 512 tokens on the fused CPU kernels: the forward meets the keys one tile at
a time with an online softmax, and the backward (no or a diagonal coefficient) computes each
score tile once for both of its roles, in rounds of block pairs. Checked against the fp64 reference under flash-attn's
rule, with lengths that leave a ragged last tile, row maxima that grow from tile to tile, every
mask kind, and a backward that allocates no per-task copies of the head's gradient."""
import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk

from .attention_checks import F64, assert_flash_rule, make_inputs, peak_allocated_bytes, reference, run

ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NAMES = ["out", "lse", "dq", "dv/dcoef", "dcoef"]
# Four 256-key tiles and a ragged fifth; eight 128-row query tasks and a ragged ninth.
S = 1100


def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)


def growing(inputs):
    """Scales token t by 1 + 3 t / S: each row's largest score sits in a later key tile than its
    first, so the online softmax must rescale what it has summed so far."""
    ramp = (1 + 3 * torch.arange(S, dtype=F64) / S)[None, :, None, None]
    q, v, coef = inputs
    return [(q.detach() * ramp).requires_grad_(), None if v is None else (v.detach() * ramp).requires_grad_(), coef]


def check(inputs, dtype, **kw):
    lowp = [None if t is None else t.detach().to(dtype if t.dim() == 4 else torch.float32).requires_grad_()
            for t in inputs]
    ref64 = run(reference, *inputs, **kw)
    ref_lowp = run(reference, *lowp, **kw)
    got = run(cpu, *lowp, **kw)
    for name, a, r64, rl in zip(NAMES, got, ref64, ref_lowp):
        assert not a.isnan().any(), f"{name} has NaN"
        assert_flash_rule(name, a, r64, rl, ATOL[dtype])


def mask(kind):
    if kind is None:
        return None
    lengths = {"partial": [[S], [S - 300]], "with-empty-row": [[S], [0]]}[kind]
    return torch.arange(S).expand(2, S) < torch.tensor(lengths)


CASES = {
    # name: (make_inputs arguments, call options)
    "shared": (dict(), dict()),
    "shared-padding-noself": (dict(), dict(key_padding_mask=mask("partial"), exclude_self=True)),
    "shared-empty-sequence": (dict(), dict(key_padding_mask=mask("with-empty-row"))),
    "v-padding": (dict(shared=False), dict(key_padding_mask=mask("partial"))),
    "diag": (dict(coef_mode="diag"), dict()),
    "diag-v-padding-noself": (dict(coef_mode="diag", shared=False),
                              dict(key_padding_mask=mask("partial"), exclude_self=True)),
    "causal-noself": (dict(), dict(causal=True, exclude_self=True)),
    "diag-causal-padding": (dict(coef_mode="diag"), dict(causal=True, key_padding_mask=mask("partial"))),
    "full-v": (dict(coef_mode="full", shared=False), dict()),
}


@pytest.mark.parametrize("ramp", [False, True], ids=["random", "growing-max"])
@pytest.mark.parametrize("case", list(CASES))
def test_long_heads_fp32(case, ramp):
    shape, kw = CASES[case]
    inputs = make_inputs(B=2, S=S, H=1, D=24, Dv=20, **shape)
    check(growing(inputs) if ramp else inputs, torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["shared-padding-noself", "causal-noself", "v-padding"])
def test_long_heads_half_precision(case, dtype):
    shape, kw = CASES[case]
    check(growing(make_inputs(B=2, S=S, H=1, D=24, Dv=20, **shape)), dtype, **kw)


def test_tiled_backward_allocates_no_head_sized_accumulators():
    """One 4096-token head on 2 threads: the backward's allocations (the gradient, the head's two
    transposed panels and fp32 accumulator, per worker a few tiles) stay within 12 copies of the
    input; per-task fp32 copies of the head's gradient, summed afterwards, would take 32."""
    y = torch.randn(1, 4096, 1, 64, requires_grad=True)
    grad_out = torch.randn_like(y)
    out = cpu(y, None)
    peak = peak_allocated_bytes(lambda: torch.autograd.grad(out, y, grad_out))
    assert peak <= 12 * y.numel() * 4, f"backward peak {peak / 2**20:.2f} MiB"
