"""The ``cpu`` backend's LAMA path (``symattn_kernels.backends.cpu_lowrank``) against the fp64 reference.

Same cases and pass rule as the Triton kernels (tests/test_lama_triton.py: flash-attn's rule
for pooled, attn and every gradient), plus bf16 and fp64, gradcheck through the public
function, the routing of ``backend="cpu"`` / ``"auto"`` with and without the compiled extension,
and the memory bound the path exists for: at most one [B, m, T]-sized intermediate.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import symattn_kernels as sk
from symattn_kernels import backends, ops
from symattn_kernels.backends import cpu_lowrank, registry
from symattn_kernels.backends import torch as torch_backend
from symattn_kernels import reference as R
from tests.test_lama_triton import BF16, CASES, F32, F64, Case, check_case, make_inputs

FLAG_CASES = CASES[: len(CASES) - 3]  # every flag combination once, fp32
CPU_CASES = CASES + [dataclasses.replace(c, dtype=BF16) for c in FLAG_CASES] + [
    Case(3, 40, 8, 4, padded=True, with_u=True, dtype=F64),
    Case(3, 7, 4, 1, "none", False, padded=True, per_sequence=True, dtype=F64),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.id for c in CPU_CASES])
def test_forward_backward_matches_reference(case):
    check_case(case, cpu_lowrank)


@pytest.mark.parametrize("head_norm,token_softmax", list(itertools.product(["l2", None], [True, False])))
@pytest.mark.parametrize("with_u", [False, True], ids=["u=h", "u"])
def test_gradcheck_public_api(head_norm, token_softmax, with_u):
    case = Case(3, 7, 5, 4, padded=True, with_u=with_u, per_sequence=with_u, dtype=F64)
    h, context, p, q, u, mask = make_inputs(case)
    leaves = [t.requires_grad_() for t in (h, context, p, q, u) if t is not None]

    def fn(h, context, p, q, *rest):
        return sk.lowrank_context_attention(h, context, p, q, u=rest[0] if rest else None, key_padding_mask=mask,
                                            head_norm=head_norm, token_softmax=token_softmax, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_public_api_matches_torch_backend(dtype):
    case = Case(3, 40, 8, 4, padded=True, with_u=True, dtype=dtype)
    inputs = make_inputs(case)
    results = []
    for backend in ("cpu", "torch"):
        h, context, p, q, u = (t.detach().clone().requires_grad_() for t in inputs[:5])
        pooled, attn = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=inputs[5],
                                                    backend=backend)
        grads = torch.autograd.grad(pooled.float().square().sum(), (h, context, p, q, u))
        results.append((pooled, attn, *grads))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == F32 else dict(atol=5e-2, rtol=5e-2)
    for name, a, b in zip(("pooled", "attn", "dh", "dcontext", "dp", "dq", "du"), *results):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_auto_routes_lowrank_to_the_cpu_path():
    for dtype in (F32, BF16, F64):
        assert backends.resolve("auto", torch.device("cpu"), dtype, op="lowrank") == "cpu"
    assert backends.load("cpu").lowrank_forward is cpu_lowrank.lowrank_forward
    with pytest.raises(TypeError, match="float64 inputs run on backend='torch' only"):
        backends.resolve("cpu", torch.device("cpu"), F64, op="attention")


def test_cpu_lowrank_needs_no_extension(monkeypatch):
    # Where _C is not built the cpu backend is unusable for attention, yet LAMA still runs there.
    missing = backends.BackendStatus("cpu", False, "extension symattn_kernels._C is not built", ("cpu",))
    monkeypatch.setitem(registry._STATUS_CACHE, ("cpu", backends.triton_interpreting()), missing)
    assert backends.resolve("auto", torch.device("cpu"), F32, op="lowrank") == "cpu"
    assert backends.resolve("auto", torch.device("cpu"), F32) == "torch"
    with pytest.raises(ValueError, match="not built"):
        backends.resolve("cpu", torch.device("cpu"), F32)
    assert backends.load("cpu") is cpu_lowrank
    h, context, p, q, u, mask = make_inputs(Case(3, 7, 8, 4, padded=True))
    got = sk.lowrank_context_attention(h, context, p, q, key_padding_mask=mask, backend="cpu")
    want = sk.lowrank_context_attention(h, context, p, q, key_padding_mask=mask, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_opcheck():
    h, context, p, q, u, mask = make_inputs(Case(2, 7, 6, 3, padded=True, with_u=True))
    for t in (h, context, p, q, u):
        t.requires_grad_()
    torch.library.opcheck(ops.lowrank_fwd, (h, context, p, q, u, mask, "l2", True, 1e-12, "cpu"))


class _FullSizeAllocations(TorchDispatchMode):
    """Records each new tensor with `numel` elements that an op returns: not a view, in-place
    or out= result of its inputs (those share an input's storage)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.storages: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:
                    self.storages.append(ptr)
        return out


def _full_size_intermediates(backend, case, token_softmax):
    """How many [B, m, T]-sized tensors backend's forward (besides the returned attn) and
    backward allocate."""
    h, context, p, q, u, mask = make_inputs(dataclasses.replace(case, token_softmax=token_softmax))
    numel = case.batch * case.heads * case.seqlen
    dpooled = torch.randn(case.batch, case.heads, case.dim).to(case.dtype)
    dattn = torch.randn(case.batch, case.heads, case.seqlen).to(case.dtype)
    grads = [torch.empty_like(t) for t in (h, context, p, q, u)]
    with _FullSizeAllocations(numel) as forward:
        _, attn = backend.lowrank_forward(h, context, p, q, u, mask, "l2", token_softmax, 1e-12)
    with _FullSizeAllocations(numel) as backward:
        backend.lowrank_backward(dpooled, dattn, h, context, p, q, u, mask, "l2", token_softmax, 1e-12, *grads)
    forward_extra = [ptr for ptr in forward.storages if ptr != attn.untyped_storage().data_ptr()]
    return len(forward_extra), len(backward.storages)


@pytest.mark.parametrize("token_softmax", [True, False], ids=["softmax", "raw"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_at_most_one_full_size_intermediate(dtype, token_softmax):
    # B*m*T = 2*4*64 is no other tensor's size here (E = 24): every [B, m, T] / [B, T, m] tensor counts.
    case = Case(2, 64, 24, 4, padded=True, with_u=True, dtype=dtype)
    forward, backward = _full_size_intermediates(cpu_lowrank, case, token_softmax)
    # fp32: the scores are computed in the returned attn itself; bf16: in one fp32 buffer.
    assert forward == (0 if dtype == F32 else 1)
    assert backward == 1  # f; dA is computed a token slice at a time
    # The count is a real bound: the composite path materialises many.
    composite_forward, composite_backward = _full_size_intermediates(torch_backend, case, token_softmax)
    assert composite_forward > 1 and composite_backward > 1


def test_backward_token_slices_cover_every_token():
    for seqlen in (1, 2, 3, 4, 5, 7, 40, 41):
        slices = cpu_lowrank._token_slices(seqlen)
        covered = torch.cat([torch.arange(seqlen)[s] for s in slices])
        assert torch.equal(covered, torch.arange(seqlen)) and len(slices) <= cpu_lowrank._CHUNKS


def test_fully_padded_batch_gives_zeros_not_nan():
    h, context, p, q, u, _ = make_inputs(Case(2, 5, 4, 3, with_u=True))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    leaves = [t.requires_grad_() for t in (h, context, p, q, u)]
    for token_softmax in (True, False):
        pooled, attn = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask,
                                                    token_softmax=token_softmax, backend="cpu")
        grads = torch.autograd.grad((pooled.sum() + attn.sum()), leaves)
        for t in (pooled, attn, *grads):
            assert not torch.isnan(t).any() and torch.all(t == 0)
    want = R.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask)
    assert torch.all(want[0] == 0)
