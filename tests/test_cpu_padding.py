"""NaN and Inf stored in padded tokens on the fused CPU kernels: the kernels read those elements
as zero, so every result (output, lse, every gradient, padded rows included) is bit for bit that
of the same call with zeros stored there. Checked on every instruction-set build, on short heads
(symmetric and row schedules), long tiled heads, causal, dropout, every coefficient mode, shared
and separate values, in every dtype; and the backend makes no host-side copy of its inputs."""
import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend

from .attention_checks import make_inputs, run, run_on_instruction_set

NAMES = ["out", "lse", "dq", "dv/dcoef", "dcoef"]
POISONS = (float("nan"), float("inf"), float("-inf"))

# name: (seqlen, padded positions of sequence 1). Sequence 0 is unpadded.
LAYOUTS = {
    # Three trailing padded keys and one inside: the symmetric whole-head schedule.
    "short-light": (40, [5, 37, 38, 39]),
    # Half the keys padded: the row schedule, which stops at the last real key.
    "short-heavy": (40, [1] + list(range(20, 40))),
    # Over 512 tokens: query blocks against key tiles (and its own backward where it applies).
    "long": (600, [3] + list(range(450, 600))),
}
# name: (make_inputs arguments, call options)
OPTIONS = {
    "shared": (dict(), dict()),
    "v-diag": (dict(shared=False, coef_mode="diag"), dict()),
    "full-v-noself": (dict(shared=False, coef_mode="full"), dict(exclude_self=True)),
    "causal-diag": (dict(coef_mode="diag"), dict(causal=True)),
    "dropout-v": (dict(shared=False), dict(dropout_p=0.17)),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mask(seqlen, padded):
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[1, padded] = False
    return mask


def _clean_and_dirty(x, mask, gen):
    """x with zeros at random elements of its padded tokens, and the same with NaN / Inf / -Inf
    stored at those elements instead (every padded token gets at least one)."""
    if x is None:
        return None, None
    pad = ~mask[:, :, None, None].expand(x.shape)
    spots = pad & (torch.rand(x.shape, generator=gen) < 0.3)
    spots[..., 0] |= pad[..., 0]
    poison = torch.tensor(POISONS, dtype=x.dtype)[torch.randint(0, 3, x.shape, generator=gen)]
    clean = x.detach().masked_fill(spots, 0)
    dirty = torch.where(spots, poison, clean)
    return clean.requires_grad_(), dirty.requires_grad_()


def mismatches(layouts=LAYOUTS, options=OPTIONS, dtypes=DTYPES):
    """Every (layout, option set, dtype) whose results with dirty padding differ from those with
    clean padding, as readable lines."""
    failures = []
    for layout, (seqlen, padded) in layouts.items():
        mask = _mask(seqlen, padded)
        for option, (shape, kw) in options.items():
            for dtype in dtypes:
                gen = torch.Generator().manual_seed(seqlen)
                q, v, coef = make_inputs(B=2, S=seqlen, H=2, D=12, Dv=7, dtype=dtype, **shape)
                clean_q, dirty_q = _clean_and_dirty(q, mask, gen)
                clean_v, dirty_v = _clean_and_dirty(v, mask, gen)
                call = dict(key_padding_mask=mask, backend="cpu", **kw)
                if "dropout_p" in kw:
                    torch.manual_seed(5)
                clean = run(sk.symmetric_attention, clean_q, clean_v, coef, **call)
                if "dropout_p" in kw:
                    torch.manual_seed(5)
                dirty = run(sk.symmetric_attention, dirty_q, dirty_v, coef, **call)
                for name, a, b in zip(NAMES, dirty, clean):
                    if not torch.equal(a, b):
                        failures.append(f"{layout} {option} {dtype}: {name} differs "
                                        f"({int(a.isnan().sum())} NaN of {a.numel()})")
    return failures


_ISA_SCRIPT = """
from symattn_kernels.backends import cpu
from tests.test_cpu_padding import mismatches
print(cpu.kernel_isa())
print("\\n".join(mismatches()))
"""

@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_padded_nan_and_inf_are_read_as_zero_on_every_build(isa):
    used, *failures = run_on_instruction_set(isa, _ISA_SCRIPT).strip().split("\n")
    assert used == isa.upper()
    assert not [line for line in failures if line], "\n".join(failures)


def test_padded_nan_and_inf_are_read_as_zero_here():
    # The widest build, in this process (the per-build test above runs each in its own).
    failures = mismatches(dtypes=(torch.float32,))
    assert not failures, "\n".join(failures)


def test_other_sequences_never_reach_a_varlen_sequence():
    # Sequence 1 of a varlen call holds NaN and Inf; sequence 0, stored right before it, is
    # unchanged bit for bit, in forward and backward, including the long (tiled) case.
    for lengths in ([7, 13], [530, 20]):
        total = sum(lengths)
        cu = torch.tensor([0, lengths[0], total], dtype=torch.int32)
        q = torch.randn(total, 2, 12)
        dirty = q.clone()
        dirty[lengths[0]:, :, 0] = float("nan")
        dirty[lengths[0]:, :, 1] = float("inf")
        results = []
        for x in (q, dirty):
            x = x.clone().requires_grad_()
            out, lse = sk.symmetric_attention_varlen(x, None, cu, max(lengths), return_lse=True, backend="cpu")
            (dq,) = torch.autograd.grad((out[:lengths[0]] * 1.5).sum() + lse[:, :lengths[0]].sum(), x)
            results.append((out[:lengths[0]], lse[:, :lengths[0]], dq[:lengths[0]]))
        for name, a, b in zip(("out", "lse", "dq"), *results):
            assert torch.equal(a, b), f"lengths {lengths}: {name} of sequence 0 changed"


_COPYING_OPS = ("masked_fill", "isfinite", "index", "where", "clone", "copy_", "contiguous", "nan_to_num")


def _copies(prof, *inputs):
    """The copying, gathering or scanning ops a profiled call ran on a tensor shaped like one of
    inputs (their gradients' buffers are other shapes, or made by the kernel ops)."""
    shapes = [list(t.shape) for t in inputs]
    return sorted({event.name for event in prof.events()
                   if any(event.name.startswith(f"aten::{op}") for op in _COPYING_OPS)
                   and any(shape in shapes for shape in event.input_shapes)})


def test_backend_makes_no_host_copy_of_its_inputs():
    # The padding guard lives in the kernels: a call with NaN in its padding dispatches the two
    # kernel ops and nothing that copies, gathers or scans q or v.
    q, v, _ = make_inputs(B=2, S=40, H=2, D=12, Dv=7, shared=False, dtype=torch.float32)
    mask = _mask(40, [5, 38, 39])
    q, v = q.detach().masked_fill(~mask[..., None, None], float("nan")), v.detach()
    v[1, 39] = float("inf")
    q.requires_grad_(), v.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = sk.symmetric_attention(q, v, key_padding_mask=mask, backend="cpu")
        out.backward(torch.randn_like(out))
    assert {"symattn::attention_fwd_cpu", "symattn::attention_bwd_cpu"} <= {event.name for event in prof.events()}
    assert not _copies(prof, q, v), f"host-side copies of the inputs: {_copies(prof, q, v)}"
    assert torch.isfinite(out[mask]).all() and torch.isfinite(q.grad[mask]).all()
    assert torch.isfinite(v.grad[mask]).all()


def test_lama_makes_no_host_copy_of_its_inputs():
    # The fused LAMA kernels walk real tokens only: NaN / Inf in padded tokens of h and u is never
    # read, and no host-side op copies or scans them.
    h, u = torch.randn(2, 9, 6), torch.randn(2, 9, 6)
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [5]])
    h[1, 5:], u[1, 6:] = float("nan"), float("inf")
    leaves = [h.requires_grad_(), torch.randn(6, requires_grad=True), torch.randn(6, 3, requires_grad=True),
              torch.randn(6, 3, requires_grad=True), u.requires_grad_()]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        pooled, attn = sk.lowrank_context_attention(*leaves[:4], u=leaves[4], key_padding_mask=mask, backend="cpu")
        grads = torch.autograd.grad(pooled.sum() + attn.sum(), leaves)
    assert {"symattn::lowrank_fwd_cpu", "symattn::lowrank_bwd_cpu"} <= {event.name for event in prof.events()}
    assert not _copies(prof, h, u), f"host-side copies of the inputs: {_copies(prof, h, u)}"
    assert torch.isfinite(pooled).all() and torch.isfinite(attn).all()
    assert torch.isfinite(grads[0][mask]).all() and all(torch.isfinite(g).all() for g in grads[1:4])
