"""Each bfloat16 product path of the ``cpu`` backend, forced in its own process: AMX tiles
(``AVX512_AMX``) and vdpbf16ps (``AVX512_BF16``), and both on AVX2 in the check builds
``AVX2_AMX_EMULATED`` (an emulated tile unit) and ``AVX2_BF16_PAIRS``, which run wherever AVX2
does. Each must meet flash-attn's error rule against
the fp64 reference on out, lse and every gradient (whole tiles, ragged sizes that take padded
copies, causal bands, long heads in row blocks, padding, dropout), and give bit-equal results
with 1, 2 and 3 threads."""

import json

import pytest

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

from tests.attention_checks import run_on_instruction_set

# Runs in a child process (the kernel set is chosen once per process); prints a JSON report.
_SCRIPT = """
import json
import torch
import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend
from tests.attention_checks import make_inputs, max_error, padding_mask, reference, run, with_threads

def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)

def lowp(tensors):
    return [None if t is None else t.detach().to(torch.bfloat16).requires_grad_() for t in tensors]

torch.manual_seed(5)
SEED = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # the kernels' draw after manual_seed(5)

def seeded(fn, inputs, kw):
    def call():
        torch.manual_seed(5)
        extra = {"dropout_seed": SEED} if fn is reference and kw.get("dropout_p") else {}
        return run(fn, *inputs, **kw, **extra)
    return call

CASES = {
    "S128-D64-shared": (dict(B=2, S=128, H=2, D=64), {}),
    "S97-D40-Dv24-diag": (dict(B=1, S=97, H=2, D=40, Dv=24, coef_mode="diag", shared=False), {}),
    "S200-D64-causal": (dict(B=1, S=200, H=2, D=64), dict(causal=True)),
    "S130-D64-padded-noself": (dict(B=2, S=130, H=1, D=64), dict(padding="partial", exclude_self=True)),
    "S600-D64-full-v": (dict(B=1, S=600, H=1, D=64, Dv=64, coef_mode="full", shared=False), {}),
    "S600-D32-causal": (dict(B=1, S=600, H=1, D=32), dict(causal=True)),
    "S160-D64-dropout": (dict(B=1, S=160, H=2, D=64), dict(dropout_p=0.2)),
    # Over 512 tokens with dropout: the tiled backward's delta needs an O that is not rounded.
    "S513-D254-Dv24-dropout-causal": (dict(B=1, S=513, H=1, D=254, Dv=24, shared=False),
                                      dict(causal=True, dropout_p=0.17)),
}
report = {"isa": cpu_backend.kernel_isa(), "errors": [], "thread_mismatch": []}
for name, (shape, opts) in CASES.items():
    inputs = make_inputs(**shape)
    kw = dict(opts)
    if "padding" in kw:
        kw["key_padding_mask"] = padding_mask(shape["B"], shape["S"], kw.pop("padding"))
    ref64 = seeded(reference, inputs, kw)()
    ref_bf16 = seeded(reference, lowp(inputs), kw)()
    got = seeded(cpu, lowp(inputs), kw)()
    for part, a, r64, rl in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], got, ref64, ref_bf16):
        err, bound = max_error(a, r64), 2 * max_error(rl, r64) + 1e-2
        if not err <= bound:
            report["errors"].append(f"{name} {part}: max error {err:.3g} > bound {bound:.3g}")
    bf16_inputs = lowp(inputs)
    runs = [with_threads(t, seeded(cpu, bf16_inputs, kw)) for t in (1, 2, 3)]
    for t, other in zip((2, 3), runs[1:]):
        for part, a, b in zip(["out", "lse", "dq", "dv/dcoef", "dcoef"], runs[0], other):
            if not torch.equal(a, b):
                report["thread_mismatch"].append(f"{name} {part}: 1 vs {t} threads")
print(json.dumps(report))
"""

# The check builds (backends.cpu.CHECK_BUILDS) run the AVX512_BF16 and AVX512_AMX kernels' paths on
# any AVX2 CPU.
_PATHS = ["avx512_amx", "avx512_bf16", "avx2_bf16_pairs", "avx2_amx_emulated"]


@pytest.mark.parametrize("isa", _PATHS)
def test_bf16_path_matches_reference_and_is_thread_independent(isa):
    report = json.loads(run_on_instruction_set(isa, _SCRIPT).strip().splitlines()[-1])
    assert report["isa"] == isa.upper()
    assert not report["errors"], report["errors"]
    assert not report["thread_mismatch"], report["thread_mismatch"]


# The AMX build's bf16 forward cuts a call into about 64 tasks, each up to a whole head (so a
# head's keys are packed once per task): whole heads of 512 tokens (64-row blocks) at B*H = 64,
# and 5 tasks of 256 rows per 1100-token head at B*H = 12 (the tiled 128-row tasks would be 9).
_TASKS_SCRIPT = """
import json
import torch
import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend
from tests.attention_checks import make_inputs, max_error, reference, with_threads

report = {"isa": cpu_backend.kernel_isa(), "tasks": {}, "errors": [], "thread_mismatch": []}
for name, shape in {"S512-BH64": dict(B=8, S=512, H=8, D=64), "S1100-BH12": dict(B=1, S=1100, H=12, D=64)}.items():
    q, _, _ = make_inputs(**shape)
    q = q.detach()
    r64 = reference(q, None, return_lse=True)
    rl = reference(q.bfloat16(), None, return_lse=True)
    runs = [with_threads(t, lambda: sk.shared_attention(q.bfloat16(), return_lse=True, backend="cpu")) for t in (1, 2, 3)]
    report["tasks"][name] = cpu_backend.last_schedule(False)[:, 0].sum().item()
    for part, a, x64, xl in zip(["out", "lse"], runs[0], r64, rl):
        err, bound = max_error(a, x64), 2 * max_error(xl, x64) + 1e-2
        if not err <= bound:
            report["errors"].append(f"{name} {part}: max error {err:.3g} > bound {bound:.3g}")
    for t, other in zip((2, 3), runs[1:]):
        for part, a, b in zip(["out", "lse"], runs[0], other):
            if not torch.equal(a, b):
                report["thread_mismatch"].append(f"{name} {part}: 1 vs {t} threads")
print(json.dumps(report))
"""


@pytest.mark.parametrize("isa", ["avx512_amx", "avx2_amx_emulated"])
def test_amx_forward_takes_whole_heads_while_the_call_has_enough_tasks(isa):
    report = json.loads(run_on_instruction_set(isa, _TASKS_SCRIPT).strip().splitlines()[-1])
    assert report["isa"] == isa.upper()
    assert report["tasks"] == {"S512-BH64": 64, "S1100-BH12": 12 * 5}
    assert not report["errors"], report["errors"]
    assert not report["thread_mismatch"], report["thread_mismatch"]
