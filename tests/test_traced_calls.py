"""Calls under a caller's autocast and torch.compile: the ops keep their inputs' precision,
compiled calls take what eager calls take (a changing scale, a max_seqlen read from a tensor),
refuse what eager calls refuse (forward-mode derivatives), and compile once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import symattn_kernels as sk
from symattn_kernels import extensions
from symattn_kernels import reference as R
from tests.attention_checks import F64, assert_close


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_backend_keeps_fp32_under_autocast(autocast_dtype):
    """A custom op has no Autocast kernel, so the caller's autocast reached the composite
    backend inside it: its fp32 products ran in bf16 (error 4e-3, against 1.5e-7), and fp16
    scores of 40-sized entries overflowed to inf: NaN out and dq."""
    torch.manual_seed(0)
    q = (40 * torch.rand(1, 6, 2, 64) - 20).requires_grad_()
    expected = R.symmetric_attention(q.detach().double(), causal=True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = sk.shared_attention(q, causal=True, backend="torch")
        (dq,) = torch.autograd.grad(out.sum(), q)
    assert out.dtype == torch.float32 and torch.isfinite(dq).all()
    assert_close(out, expected, atol=1e-5, name="out under autocast")
    leaf = q.detach().double().requires_grad_()
    (dq_ref,) = torch.autograd.grad(R.symmetric_attention(leaf, causal=True).sum(), leaf)
    assert_close(dq, dq_ref, atol=1e-4, name="dq under autocast")


def test_lama_and_second_order_keep_fp32_under_autocast():
    torch.manual_seed(1)
    h, ctx, p, q = torch.randn(2, 7, 6), torch.randn(6), torch.randn(6, 3), torch.randn(6, 3)
    expected = R.lowrank_context_attention(h.double(), ctx.double(), p.double(), q.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, attn = sk.lowrank_context_attention(h, ctx, p, q, backend="torch")
    assert_close(pooled, expected[0], atol=1e-5, name="pooled under autocast")
    assert_close(attn, expected[1], atol=1e-6, name="attn under autocast")
    # The gradient-penalty path differentiates the composite forward again, inside the backward.
    y = torch.randn(1, 5, 2, 16, requires_grad=True)
    y64 = y.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g,) = torch.autograd.grad(sk.shared_attention(y, backend="torch").square().sum(), y, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), y)  # outside: autocast would round this backward's own products
    (g64,) = torch.autograd.grad(R.symmetric_attention(y64).square().sum(), y64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.square().sum(), y64)
    assert_close(gg, gg64, atol=1e-4, rtol=1e-4, name="second-order gradient under autocast")


@pytest.mark.slow
def test_a_changing_scale_compiles_with_fullgraph():
    """A float that changes between calls becomes a SymFloat; math.isfinite on it broke the
    trace (Unsupported: isfinite)."""
    q = torch.randn(2, 9, 2, 16)
    compiled = torch.compile(lambda q, scale: sk.shared_attention(q, scale=scale), fullgraph=True, backend="eager")
    for scale in (0.1, 0.2, 0.3, 5.0):
        assert_close(compiled(q, scale), R.symmetric_attention(q.double(), scale=scale), atol=1e-5,
                     name=f"scale {scale}")
    with pytest.raises(ValueError, match="scale must be a finite float"):
        sk.shared_attention(q, scale=float("nan"))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", ["jvp", "dual"])
def test_compiled_calls_refuse_forward_mode(compiler, mode):
    """A compiled call skipped the refusal: jvp's tangent came back 0 (true max 3.9), a dual
    input's None, silently."""
    torch._dynamo.reset()
    q = torch.randn(1, 5, 2, 16, dtype=F64)
    compiled = torch.compile(lambda q: sk.shared_attention(q, causal=True, backend="torch"), backend=compiler)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        if mode == "jvp":
            torch.func.jvp(compiled, (q,), (torch.randn_like(q),))
        else:
            with fwAD.dual_level():
                compiled(fwAD.make_dual(q, torch.randn_like(q)))
    leaf = q.clone().requires_grad_()
    compiled(leaf).sum().backward()  # reverse mode still compiles
    assert leaf.grad is not None and leaf.grad.abs().max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_varlen_max_seqlen_read_in_the_graph(backend):
    """flash-attn's habit, max_seqlen = int(lengths.max()) inside the compiled function, failed on
    the package's own `max_seqlen < 1` (a data-dependent guard), and on the cpu backend as soon as
    the total was symbolic (the second call) or over 512 tokens: the residual's table read the
    bound (`Min(total, u0) <= 512`) for fp32 too, which never keeps one."""
    torch._dynamo.reset()

    def call(q, cu):
        return sk.symmetric_attention_varlen(q, None, cu, int(cu.diff().max().item()), causal=True, backend=backend)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for offsets in ([0, 4, 9], [0, 3, 10, 20], [0, 300, 600]):
            cu = torch.tensor(offsets, dtype=torch.int32)
            q = torch.randn(offsets[-1], 2, 8)
            torch.testing.assert_close(compiled(q, cu), call(q, cu), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(extensions.state("cpu").how == extensions.ABSENT, reason="needs the cpu extension")
def test_varlen_bound_read_in_the_graph_is_refused_where_it_picks_the_kernel():
    # fp16 on the cpu kernels keeps an output residual only for heads over 512 tokens: a bound
    # known only when the graph runs cannot pick it, so tracing says what to pass instead.
    torch._dynamo.reset()

    def call(q, cu):
        return sk.symmetric_attention_varlen(q, None, cu, int(cu.diff().max().item()), backend="cpu")

    cu = torch.tensor([0, 300, 600], dtype=torch.int32)
    q = torch.randn(600, 2, 8, dtype=torch.float16)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), pytest.raises(Exception, match="pass a Python int"):
        torch.compile(call, fullgraph=True, backend="aot_eager")(q, cu)
    bounded = torch.compile(lambda q, cu: sk.symmetric_attention_varlen(q, None, cu, 300, backend="cpu"),
                            fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(bounded(q, cu), call(q, cu), rtol=0, atol=0)


@pytest.mark.slow
def test_export_keeps_any_sequence_length_for_fp32():
    """A dynamic sequence axis exported from an fp32 module had a hidden S <= 512 (the residual's
    table read the bound for every dtype): Dim(max=4096) was refused and Dim.AUTO narrowed to 512."""
    from symattn_kernels.modules import SymmetricSelfAttention

    torch.manual_seed(0)
    module = SymmetricSelfAttention(32, 2).eval()
    x, mask = torch.randn(2, 40, 32), torch.ones(2, 40, dtype=torch.bool)
    seq = torch.export.Dim("seq", max=4096)
    program = torch.export.export(module, (x, mask), dynamic_shapes=({1: seq}, {1: seq}))
    x, mask = torch.randn(2, 600, 32), torch.ones(2, 600, dtype=torch.bool)
    mask[1, 450:] = False
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, mask), module(x, mask), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("example", [[0, 12], [0, 5, 12]], ids=["one-sequence-example", "two-sequence-example"])
def test_exported_varlen_takes_any_number_of_sequences(example):
    """With offsets of dynamic size, the exported program refused a batch of one sequence when
    exported from several (guard cu.size()[0] >= 3), and every other batch when exported from one:
    the checks' lengths = diff(offsets) have n - 1 entries, which export specialises against 1."""

    class Packed(torch.nn.Module):
        def forward(self, q, cu):
            return sk.symmetric_attention_varlen(q, None, cu, 12, causal=True, backend="cpu")

    q = torch.randn(12, 2, 16)
    dims = ({0: torch.export.Dim("total", min=2, max=1024)}, {0: torch.export.Dim("offsets", min=2, max=64)})
    program = torch.export.export(Packed(), (q, torch.tensor(example, dtype=torch.int32)), dynamic_shapes=dims)
    for offsets in ([0, 12], [0, 5, 12], [0, 1, 2, 12]):
        cu = torch.tensor(offsets, dtype=torch.int32)
        torch.testing.assert_close(program.module()(q, cu), Packed()(q, cu), rtol=0, atol=0)


_COMPILES_ONCE = r"""
import torch, symattn_kernels as sk
from torch._dynamo.utils import counters
compiled = torch.compile(lambda q: sk.shared_attention(q), fullgraph=True, backend="eager")
q = torch.randn(2, 5, 2, 16)
for _ in range(3):
    compiled(q)
print(counters["stats"]["unique_graphs"])
"""


@pytest.mark.slow
def test_a_fresh_process_compiles_a_call_once():
    """The first trace guarded on the backend status cache, which that call then filled: every
    process compiled its second call again."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILES_ONCE], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-1] == "1", result.stdout[-2000:]


_FIRST_TRACES = r"""
import sys
import torch
import symattn_kernels as sk
from symattn_kernels.modules import SymmetricSelfAttention
assert "torch._dynamo" not in sys.modules, "import symattn_kernels loaded torch._dynamo"
layer = SymmetricSelfAttention(16, 2).eval()
try:
    torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(2, 5, 16), torch.ones(2, 5))
except Exception as error:
    print("mask:", str(error).replace("\n", " "))
q = torch.randn(1, 5, 2, 16, dtype=torch.float64)
compiled = torch.compile(lambda q: sk.shared_attention(q, backend="torch"), backend="eager")
try:
    torch.func.jvp(compiled, (q,), (torch.randn_like(q),))
except NotImplementedError as error:
    print("jvp:", error)
"""


@pytest.mark.slow
def test_import_leaves_dynamo_out_and_first_traces_keep_the_reasons():
    """`import symattn_kernels` took 1.1-2 s beyond torch's own, loading torch._dynamo for three
    compiler wrappers (symattn_kernels/compiler_wrappers.py): they are now built at the first
    traced call, which must still stop a full-graph compile with the mask's reason and refuse
    forward mode, also when it is the process's first call."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _FIRST_TRACES], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "read by value" in result.stdout and "pass a bool or integer [B, S] attention_mask" in result.stdout, \
        result.stdout[-2000:]
    assert "jvp: " in result.stdout and "no forward-mode derivative" in result.stdout, result.stdout[-2000:]
