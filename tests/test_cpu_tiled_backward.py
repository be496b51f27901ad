"""The backward of heads longer than 512 tokens (coefficient none or diagonal; on AMX tiles, with
no coefficient, from 256 tokens) on the fused CPU kernels: score tiles of block pairs, each
computed once for both of its roles, in rounds. Every
kernel build (``backends.cpu.ISA_CHOICES``, each forced in its own process) against the fp64
reference under flash-attn's rule, for fp32, bf16 and fp16, odd lengths that leave a ragged last
block, padding, varlen, causal heads and dropout (the reference drawing the same masks), with
bit-equal results at 1, 2 and 3 threads; and the backward's peak memory in bf16 as in fp32."""

import json
import pathlib

import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend

from .attention_checks import peak_allocated_bytes, run_on_instruction_set

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a child process (the kernel set is chosen once per process); prints a JSON report.
_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import symattn_kernels as sk
from symattn_kernels import reference as R
from symattn_kernels.backends import cpu as cpu_backend
from tests.attention_checks import make_inputs, max_error, padding_mask, run, with_threads

# flash-attn's rule: error <= FACTOR x the same math in the kernel's dtype + ATOL (out and lse,
# whose low-precision reference is rounded once, keep the looser floor of the other CPU tests).
FACTOR = {torch.float32: 2, torch.float16: 2, torch.bfloat16: 3}
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-5}
ATOL_OUT = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ISA = cpu_backend.kernel_isa()
# The bfloat16-only builds take bf16; fp32 and fp16 run on the AVX512 build there (on the AVX2
# build beside the check builds).
BF16_ONLY = ("AVX512_BF16", "AVX512_AMX", "AVX2_BF16_PAIRS", "AVX2_AMX_EMULATED")
DTYPES = [torch.bfloat16] if ISA in BF16_ONLY else [torch.float32, torch.bfloat16, torch.float16]

torch.manual_seed(5)
SEED = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # the kernels' draw after manual_seed(5)

def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)

def cpu_varlen(q, v, **kw):
    return sk.symmetric_attention_varlen(q, v, backend="cpu", **kw)

def ref_varlen(q, v, **kw):
    return R.symmetric_attention_varlen(q, v, **kw)

def seeded(fn, inputs, kw, reference):
    def call():
        torch.manual_seed(5)
        extra = {"dropout_seed": SEED} if reference and kw.get("dropout_p") else {}
        return run(fn, *inputs, **kw, **extra)
    return call

CU = torch.tensor([0, 700, 710, 1223], dtype=torch.int32)
CASES = {
    "S513-shared": (dict(B=1, S=513, H=2, D=64), {}),
    # Whole heads: tiled on AMX tiles from kTiledBackwardFrom = 256 tokens, the symmetric or the
    # query-block schedule elsewhere.
    "S300-padding-noself": (dict(B=2, S=300, H=2, D=32), dict(padding="partial", exclude_self=True)),
    "S256-v-causal-dropout": (dict(B=1, S=256, H=2, D=16, Dv=8, shared=False), dict(causal=True, dropout_p=0.2)),
    "S1025-diag-v-padding-noself": (dict(B=2, S=1025, H=1, D=24, Dv=20, coef_mode="diag", shared=False),
                                    dict(padding="partial", exclude_self=True)),
    "S1025-causal-noself": (dict(B=1, S=1025, H=1, D=32), dict(causal=True, exclude_self=True)),
    "S2049-diag-causal-padding": (dict(B=2, S=2049, H=1, D=16, coef_mode="diag"),
                                  dict(causal=True, padding="partial")),
    "S700-v-dropout": (dict(B=1, S=700, H=2, D=32, Dv=16, shared=False), dict(dropout_p=0.2)),
    "S600-diag-causal-dropout-padding": (dict(B=2, S=600, H=1, D=16, coef_mode="diag"),
                                         dict(causal=True, dropout_p=0.3, padding="partial")),
    # Every fifth token of the first 400 stretched x 2.5 and of the next 400 x 1.8: lse from 7 to 79,
    # so one head holds tile pairs whose lse lie within kSharedSpread (up to 36 apart: one exponential
    # for both roles) and pairs that take two.
    "S1100-stretched": (dict(B=1, S=1100, H=1, D=24), dict(stretch=True)),
    "S1100-diag-v-stretched-dropout-padding": (dict(B=2, S=1100, H=1, D=24, Dv=16, coef_mode="diag", shared=False),
                                               dict(stretch=True, dropout_p=0.2, padding="partial")),
    "varlen-700-10-513": (dict(B=1, S=int(CU[-1]), H=2, D=24), dict(varlen=True)),
    "varlen-700-10-513-causal-dropout": (dict(B=1, S=int(CU[-1]), H=1, D=24, Dv=8, shared=False),
                                         dict(varlen=True, causal=True, dropout_p=0.25)),
}
report = {"isa": ISA, "errors": [], "thread_mismatch": [], "checked": 0}
for name, (shape, opts) in CASES.items():
    inputs = make_inputs(**shape)
    kw = dict(opts)
    kernel, reference = cpu, R.symmetric_attention
    if kw.pop("stretch", False):
        k = torch.arange(shape["S"])
        factor = torch.ones(shape["S"], dtype=torch.float64)
        factor[(k % 5 == 0) & (k < 400)] = 2.5
        factor[(k % 5 == 0) & (k >= 400) & (k < 800)] = 1.8
        inputs = ((inputs[0] * factor[None, :, None, None]).detach().requires_grad_(), *inputs[1:])
    if kw.pop("varlen", False):
        q, v, coef = inputs
        inputs = [q.detach()[0].requires_grad_(), None if v is None else v.detach()[0].requires_grad_(), coef]
        kernel, reference = cpu_varlen, ref_varlen
        kw.update(cu_seqlens=CU, max_seqlen=int(CU.diff().max()))
    if "padding" in kw:
        kw["key_padding_mask"] = padding_mask(shape["B"], shape["S"], kw.pop("padding"))
    ref64 = seeded(reference, inputs, kw, True)()
    for dtype in DTYPES:
        q, v, coef = inputs  # the coefficient stays fp32, as the modules keep it
        lowp = [None if t is None else t.detach().to(dtype if t is not coef else torch.float32).requires_grad_()
                for t in (q, v, coef)]
        ref_lowp = seeded(reference, lowp, kw, True)()
        runs = [with_threads(t, seeded(kernel, lowp, kw, False)) for t in (1, 2, 3)]
        for part, a, r64, rl in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], runs[1], ref64, ref_lowp):
            atol = ATOL_OUT[dtype] if part in ("out", "lse") else ATOL[dtype]
            err, bound = max_error(a, r64), FACTOR[dtype] * max_error(rl, r64) + atol
            report["checked"] += 1
            if not err <= bound:
                report["errors"].append(f"{name} {dtype} {part}: max error {err:.3g} > bound {bound:.3g}")
        for t, other in zip((2, 3), runs[1:]):
            for part, a, b in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], runs[0], other):
                if not torch.equal(a, b):
                    report["thread_mismatch"].append(f"{name} {dtype} {part}: 1 vs {t} threads")
print(json.dumps(report))
"""


@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_tiled_backward_matches_reference_on_every_build(isa):
    stdout = run_on_instruction_set(isa, _SCRIPT, timeout=900, args=(str(ROOT),))
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["isa"] == isa.upper()
    assert report["checked"] > 0
    assert not report["errors"], report["errors"]
    assert not report["thread_mismatch"], report["thread_mismatch"]


def _backward_peak_bytes(y):
    y = y.requires_grad_()
    out = sk.symmetric_attention(y, None, backend="cpu")
    grad_out = torch.randn_like(out)
    return peak_allocated_bytes(lambda: torch.autograd.grad(out, y, grad_out))


def test_bf16_backward_peak_memory_as_fp32():
    """Twelve 2048-token heads on 2 threads: the bf16 backward keeps fp32 accumulators for the heads
    in flight only (two here), so its peak stays within the fp32 backward's; fp32 per-slice copies of
    every head's gradient, summed afterwards, took twice that."""
    y = torch.randn(1, 2048, 12, 64)
    fp32, bf16 = _backward_peak_bytes(y.clone()), _backward_peak_bytes(y.to(torch.bfloat16))
    assert bf16 <= fp32, f"bf16 backward peak {bf16 / 2**20:.2f} MiB > fp32 {fp32 / 2**20:.2f} MiB"
