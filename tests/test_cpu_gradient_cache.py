"""The gradient buffers of the fused CPU backward passes, attention's and LAMA's
(``backends.cpu.empty_gradient``, csrc/cpu/gradient_cache.h): blocks of freed gradients are
handed out again with their pages mapped (no page faults where a fresh block faults on every
page), results through reused blocks are those of fresh ones (every element written, whatever the
block held), the cache stays within its bound, the profiler sees every buffer, and torch.compile
traces the backward that takes them.
"""

from __future__ import annotations

import ctypes
import importlib
import resource

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import extensions
from symattn_kernels import reference as R
from tests.attention_checks import with_threads
from tests.test_lama_triton import BF16, F32, F64, Case, make_inputs

FUSED = None if extensions.state("cpu").how == extensions.ABSENT else importlib.import_module(
    "symattn_kernels.backends.cpu")
pytestmark = pytest.mark.skipif(FUSED is None, reason=f"the cpu extension is absent: {extensions.state('cpu').detail}")

MIB = 1 << 20
PAGE = resource.getpagesize()


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _trim_c_heap() -> None:
    """Has glibc give every free page back to the system (what its heap does by itself when the
    free top grows past the trim threshold)."""
    ctypes.CDLL(None).malloc_trim(0)


@pytest.fixture(autouse=True)
def empty_cache():
    FUSED.release_gradient_cache()
    yield
    FUSED.release_gradient_cache()


def _faults_writing_a_buffer_after_one_was_freed(empty) -> tuple[int, bool]:
    """Page faults of writing an 8 MiB buffer from `empty` right after an earlier one of the same
    size was written, freed and the C heap trimmed; and whether it got the earlier one's block."""
    like = torch.empty(2 * MIB)  # 8 MiB
    first = empty(like)
    first.fill_(1.0)
    address = first.data_ptr()
    del first
    _trim_c_heap()
    second = empty(like)
    before = _faults()
    second.fill_(2.0)
    return _faults() - before, second.data_ptr() == address


def test_freed_gradient_block_is_reused_without_page_faults(monkeypatch):
    # Uninitialised buffers, as outside the tests (a NaN fill would fault the pages in before the count).
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    pages = 8 * MIB // PAGE
    faults, same_block = _faults_writing_a_buffer_after_one_was_freed(FUSED.empty_gradient)
    assert same_block and faults < pages // 32, f"{faults} page faults writing a reused 8 MiB buffer"
    # The scenario is real: torch's allocator hands out pages the system must fault in again.
    fresh_faults, _ = _faults_writing_a_buffer_after_one_was_freed(torch.empty_like)
    assert fresh_faults > pages // 2, f"only {fresh_faults} faults writing a fresh 8 MiB buffer"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_buffers_are_nan_filled_like_torch_empty_under_fill_uninitialized_memory(dtype):
    # The test session sets torch.utils.deterministic.fill_uninitialized_memory (conftest).
    like = torch.empty(MIB, dtype=dtype)
    first = FUSED.empty_gradient(like)
    assert torch.isnan(first).all()
    first.fill_(1.0)
    address = first.data_ptr()
    del first
    reused = FUSED.empty_gradient(like)
    assert reused.data_ptr() == address and torch.isnan(reused).all()


def test_buffer_layout_and_small_or_strided_likes():
    for like in (torch.empty(3, 1024, 129), torch.empty(300, 1024, dtype=torch.bfloat16)):
        buf = FUSED.empty_gradient(like)
        assert buf.shape == like.shape and buf.dtype == like.dtype and buf.is_contiguous()
    FUSED.release_gradient_cache()
    FUSED.empty_gradient(torch.empty(3, 5)).fill_(0.0)
    assert FUSED.gradient_cache_bytes() == 0  # below 1 MiB: torch's allocator, not the cache
    strided = torch.empty(1024, 600).t()
    assert FUSED.empty_gradient(strided).stride() == torch.empty_like(strided).stride()


def test_cache_stays_within_its_bound_and_is_released():
    block = 24 * MIB
    buffers = [FUSED.empty_gradient(torch.empty(block // 4)) for _ in range(3)]
    assert FUSED.gradient_cache_bytes() == 0  # in use, not cached
    del buffers
    assert FUSED.gradient_cache_bytes() == 2 * block  # 64 MiB at most: the oldest block was freed
    FUSED.empty_gradient(torch.empty(65 * MIB // 4)).fill_(0.0)
    assert FUSED.gradient_cache_bytes() <= 64 * MIB
    FUSED.release_gradient_cache()
    assert FUSED.gradient_cache_bytes() == 0


def test_a_block_serves_sizes_up_to_a_quarter_smaller_only():
    big = FUSED.empty_gradient(torch.empty(MIB))  # 4 MiB
    address = big.data_ptr()
    del big
    assert FUSED.empty_gradient(torch.empty(MIB // 2)).data_ptr() != address  # 2 MiB: a fresh block
    taken = FUSED.empty_gradient(torch.empty(MIB * 7 // 8))  # 3.5 MiB
    assert taken.data_ptr() == address


def test_profiler_sees_reused_buffers():
    from bench.timing import peak_memory_mib

    like = torch.empty(MIB)  # 4 MiB
    FUSED.empty_gradient(like).fill_(0.0)  # cached after this line
    assert FUSED.gradient_cache_bytes() == 4 * MIB
    assert peak_memory_mib(lambda: FUSED.empty_gradient(like).fill_(1.0), "cpu") == pytest.approx(4.0)


# dh and du of 1.2 MiB: in the cache's range. B, T and dtype differ with the same byte count, so
# each call takes the blocks of the one before.
REUSE_CASES = [
    Case(4, 600, 128, 4, padded=True, with_u=True),
    Case(6, 400, 128, 8, "none", padded=True, with_u=True, per_sequence=True),
    Case(4, 1200, 128, 4, padded=True, with_u=True, dtype=BF16),
    Case(3, 800, 128, 5, token_softmax=False, with_u=True),
]


def _step(case, threads):
    """pooled, attn and the five gradients of one public call with backend="cpu"."""
    h, context, p, q, u, mask = make_inputs(case)
    leaves = [t.requires_grad_() for t in (h, context, p, q, u)]
    gen = torch.Generator().manual_seed(3)
    dpooled = torch.randn(case.batch, case.heads, case.dim, generator=gen).to(case.dtype)

    def run():
        pooled, attn = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask,
                                                    head_norm=None if case.head_norm == "none" else "l2",
                                                    token_softmax=case.token_softmax, backend="cpu")
        return [pooled.detach(), attn.detach(), *torch.autograd.grad(pooled, leaves, dpooled)]

    return with_threads(threads, run)


def _reference_grads(case):
    h, context, p, q, u, mask = (None if t is None else t.to(F64) for t in make_inputs(case))
    mask = make_inputs(case)[-1]
    leaves = [t.requires_grad_() for t in (h, context, p, q, u)]
    gen = torch.Generator().manual_seed(3)
    dpooled = torch.randn(case.batch, case.heads, case.dim, generator=gen).to(case.dtype).to(F64)
    pooled, _ = R.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask,
                                            head_norm=None if case.head_norm == "none" else "l2",
                                            token_softmax=case.token_softmax)
    return torch.autograd.grad(pooled, leaves, dpooled)


LAMA_RESULTS = ("pooled", "attn", "dh", "dcontext", "dp", "dq", "du")
ATTENTION_RESULTS = ("out", "dq", "dv")


def _assert_equal(got, want, label, names=LAMA_RESULTS):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), f"{label}: {name} differs from a fresh call"


def test_results_through_reused_blocks_equal_fresh_ones(monkeypatch):
    # Blocks reach the kernels holding what the last user left there (NaN below), not a fill.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    fresh = {}
    for i, case in enumerate(REUSE_CASES):
        FUSED.release_gradient_cache()
        fresh[i] = _step(case, threads=2)
    FUSED.release_gradient_cache()
    served = 0
    returned = set()
    for i, threads in [(0, 2), (2, 1), (1, 2), (3, 1), (0, 1), (3, 2), (2, 2), (1, 1)]:
        got = _step(REUSE_CASES[i], threads)
        served += (got[2].data_ptr() in returned) + (got[6].data_ptr() in returned)
        _assert_equal(got, fresh[i], f"{REUSE_CASES[i].id}, {threads} threads")
        # dh and du go back holding NaN: the next call must write every element it returns.
        returned = {got[2].data_ptr(), got[6].data_ptr()}
        got[2].fill_(float("nan"))
        got[6].fill_(float("nan"))
        del got
    assert served == 14, f"{served} of 14 gradient buffers came from reused blocks"


@pytest.mark.parametrize("case", [REUSE_CASES[0], REUSE_CASES[2]], ids=["fp32", "bf16"])
def test_reused_blocks_hold_gradients_of_the_fp64_reference(case):
    _step(case, threads=2)  # its dh and du return to the cache
    got = _step(case, threads=2)[2:]
    want = _reference_grads(case)
    tolerance = {F32: 1e-4, BF16: 3e-2}[case.dtype]
    for name, a, b in zip(("dh", "dcontext", "dp", "dq", "du"), got, want):
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= tolerance * scale, name


def test_torch_compile_traces_the_backward_with_cached_buffers():
    case = REUSE_CASES[0]
    h, context, p, q, u, mask = make_inputs(case)
    leaves = [t.requires_grad_() for t in (h, context, p, q, u)]

    def loss(h, context, p, q, u):
        pooled, attn = sk.lowrank_context_attention(h, context, p, q, u=u, key_padding_mask=mask, backend="cpu")
        return pooled.square().sum() + attn.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(loss(*leaves), leaves)
    for _ in range(2):  # the second call takes the first one's blocks
        got = torch.autograd.grad(compiled(*leaves), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# Attention calls whose dq (and dv) are 1.25 MiB each: the same byte count in fp32 and bf16,
# padded, causal, varlen with an empty sequence, without self, a head over 512 tokens (the tiled
# backward), so that each call takes the blocks the one before gave back.
ATTENTION_CASES = {
    "shared-padded": dict(shape=(2, 320, 8, 64), padded=True),
    "values-causal": dict(shape=(4, 160, 8, 64), values=True, causal=True),
    "varlen-empty": dict(shape=(1, 640, 8, 64), cu_seqlens=[0, 300, 300, 640]),
    "bf16-no-self": dict(shape=(2, 640, 8, 64), dtype=BF16, exclude_self=True),
    "long-head": dict(shape=(1, 640, 8, 64), values=True),
}


def _attention_step(name, threads):
    """out and the gradients of q (and v) of one public attention call with backend="cpu"."""
    case = ATTENTION_CASES[name]
    B, S, H, D = case["shape"]
    dtype = case.get("dtype", F32)
    shape = (B * S, H, D) if "cu_seqlens" in case else (B, S, H, D)  # varlen: packed tokens
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(shape, generator=gen).to(dtype).requires_grad_() if case.get("values") else None
    dout = torch.randn(shape, generator=gen).to(dtype)
    options = dict(causal=case.get("causal", False), exclude_self=case.get("exclude_self", False), backend="cpu")
    leaves = [q] if v is None else [q, v]

    def run():
        if "cu_seqlens" in case:
            cu = torch.tensor(case["cu_seqlens"], dtype=torch.int32)
            out = sk.symmetric_attention_varlen(q, v, cu, S, **options)
        else:
            mask = None
            if case.get("padded"):
                mask = torch.ones(B, S, dtype=torch.bool)
                mask[0, S // 3:] = False
                mask[1:] = False  # fully padded sequences: their rows attend nothing
            out = sk.symmetric_attention(q, v, key_padding_mask=mask, **options)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    return with_threads(threads, run)


def test_attention_results_through_reused_blocks_equal_fresh_ones(monkeypatch):
    # Blocks reach the kernels holding what the last user left there (NaN below), not a fill.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    fresh = {}
    for name in ATTENTION_CASES:
        FUSED.release_gradient_cache()
        fresh[name] = _attention_step(name, threads=2)
        assert all(g.numel() * g.element_size() >= MIB for g in fresh[name][1:])
    FUSED.release_gradient_cache()
    served = wanted = 0
    returned = set()
    order = ["shared-padded", "values-causal", "varlen-empty", "long-head", "bf16-no-self", "values-causal",
             "shared-padded", "long-head", "varlen-empty", "bf16-no-self"]
    for i, name in enumerate(order):
        got = _attention_step(name, threads=1 + i % 2)
        if returned:
            wanted += len(got) - 1
            served += sum(g.data_ptr() in returned for g in got[1:])  # a block handed out before
        _assert_equal(got, fresh[name], f"{name}, {1 + i % 2} threads", ATTENTION_RESULTS)
        # The gradients go back holding NaN: the next call must write every element it returns.
        returned |= {g.data_ptr() for g in got[1:]}
        for g in got[1:]:
            g.fill_(float("nan"))
        del got, g  # the last references to the blocks, which go back to the cache
    # Only the second call, the first to want two buffers, takes a fresh block for one of them.
    assert served == wanted - 1, f"{served} of {wanted} gradient buffers came from reused blocks"


def test_attention_gradient_takes_the_block_of_the_freed_one():
    q = torch.randn(4, 256, 8, 64, requires_grad=True)  # dq: 2 MiB
    dout = torch.randn_like(q)

    def grad():
        return torch.autograd.grad(sk.shared_attention(q, backend="cpu"), q, dout)[0]

    first = grad()
    address = first.data_ptr()
    del first
    _trim_c_heap()
    assert FUSED.gradient_cache_bytes() == 2 * MIB
    second = grad()
    assert second.data_ptr() == address
    assert FUSED.gradient_cache_bytes() == 0
