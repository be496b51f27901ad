"""How the fused CPU kernels spread a call over threads: every worker gets a fair share at any
batch x heads (one head splits into query-row tasks), and no result depends on
the thread count. Thread counts above this machine's core count are deliberate: the deal of
tasks to workers is fixed before any runs, so it can be checked on any machine."""
import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend

from .attention_checks import assert_flash_rule, make_inputs, mirrored_groups, reference, run, with_threads

# Heads longer than 512 tokens whose forward is not mirrored run it in tasks of 128 query rows; at
# S = 1024 that is 8 tasks per head.
S_SPLIT = 1024
TASK_ROWS_MAX = 128
# Their backward (M none or diagonal) runs score tiles of 64-row blocks in rounds of block pairs:
# at S = 1024, 16 blocks, 15 rounds of 8 tasks, 16 * 17 / 2 tiles per head; a task of the first
# round also takes its two blocks' diagonal tiles.
BLOCKS = 16
TILES_PER_TASK_MAX = 3
# The other backward (here: with a full coefficient) cuts heads into slices of whole query
# blocks, which at S = 1024 are 126 rows; at B*H >= 1 a slice holds at most three of them.
BWD_SLICE_ROWS_MAX = 3 * 126


def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)


@pytest.mark.parametrize("coef_mode", [None, "full"], ids=["tiled", "sliced"])
@pytest.mark.parametrize("threads", [2, 8, 16])
@pytest.mark.parametrize("batch,heads", [(1, 1), (1, 2), (1, 12), (4, 12)], ids=["BH1", "BH2", "BH12", "BH48"])
def test_every_worker_gets_a_fair_share(batch, heads, threads, coef_mode):
    q, _, coef = make_inputs(B=batch, S=S_SPLIT, H=heads, D=16, coef_mode=coef_mode, dtype=torch.float32)
    q = q.detach().requires_grad_()
    coef = None if coef is None else coef.detach().float()

    def fwd_bwd():
        out = cpu(q, None, coef=coef)
        forward = cpu_backend.last_schedule(False)
        out.backward(torch.ones_like(out))
        return forward, cpu_backend.last_schedule(True)

    forward, backward = with_threads(threads, fwd_bwd)
    if coef_mode is None:
        # Forward, scores symmetric: a task per pair of a head's row groups. A task counts the
        # rows of both its groups (of one, for a group with itself), which is in proportion to its
        # work, so each head's rows are counted once per group.
        groups, rows = mirrored_groups(S_SPLIT, batch * heads)
        assert forward[:, 0].sum().item() == batch * heads * groups * (groups + 1) // 2
        assert_fair(forward, batch * heads * groups, threads, 2 * rows)
    else:
        # Forward: query-row tasks of TASK_ROWS_MAX rows.
        assert forward[:, 0].sum().item() == batch * heads * S_SPLIT // TASK_ROWS_MAX
        assert_fair(forward, batch * heads, threads, TASK_ROWS_MAX)
    bwd_tasks = backward[:, 0].sum().item()
    if coef_mode is None:
        assert_fair_tiles(backward, batch * heads, threads)
        return
    # Sliced: heads cut into slices until there are about 32 tasks (whole heads from B*H = 32).
    if batch * heads >= 32:
        assert bwd_tasks == batch * heads
    else:
        assert bwd_tasks > batch * heads
    assert_fair(backward, batch * heads, threads, S_SPLIT if bwd_tasks == batch * heads else BWD_SLICE_ROWS_MAX)


def assert_fair_tiles(schedule, n_heads, threads):
    """Every tile run once, as many workers busy as a round has tasks, each worker's tiles
    within one task of the mean."""
    tasks, tiles = schedule[:, 0], schedule[:, 1]
    assert tasks.sum().item() == n_heads * (BLOCKS - 1) * BLOCKS // 2
    assert tiles.sum().item() == n_heads * BLOCKS * (BLOCKS + 1) // 2
    assert len(schedule) == min(threads, n_heads * BLOCKS // 2)
    assert (tasks > 0).all()
    mean = tiles.double().mean().item()
    assert (tiles.double() - mean).abs().max().item() <= TILES_PER_TASK_MAX


def assert_fair(schedule, n_heads, threads, task_rows_max):
    """Every query row run once, every worker busy, each worker's rows within one task of the mean."""
    tasks, rows = schedule[:, 0], schedule[:, 1]
    assert rows.sum().item() == n_heads * S_SPLIT
    assert len(schedule) == min(threads, tasks.sum().item())
    assert (tasks > 0).all()
    mean = rows.double().mean().item()
    assert (rows.double() - mean).abs().max().item() <= task_rows_max


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_two_heads_on_two_threads_use_both(backward):
    """A worker never takes a second head while another worker has none."""
    q, _, _ = make_inputs(B=1, S=64, H=2, D=16, dtype=torch.float32)
    q = q.detach().requires_grad_()

    def call():
        out = cpu(q, None)
        out.backward(torch.ones_like(out))
        return cpu_backend.last_schedule(backward)

    assert with_threads(2, call)[:, :2].tolist() == [[1, 64], [1, 64]]


def test_backward_slices_sum_to_the_whole_head():
    """One long head's backward in slices on several workers against fp64 autograd."""
    inputs = make_inputs(B=1, S=S_SPLIT, H=1, D=16, Dv=16, coef_mode="full", shared=False)
    kw = dict(causal=True, key_padding_mask=torch.arange(S_SPLIT)[None] < 1000)
    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    want, want_fp32 = run(reference, *inputs, **kw), run(reference, *fp32, **kw)
    got = with_threads(4, lambda: run(cpu, *fp32, **kw))
    assert cpu_backend.last_schedule(True)[:, 0].sum().item() > 1
    for name, a, r64, r32 in zip(["out", "lse", "dq", "dv", "dcoef"], got, want, want_fp32):
        assert_flash_rule(name, a, r64, r32, 2e-6)


def test_varlen_deals_longest_first():
    """Whole-head tasks, longest sequence first, each to the least-loaded worker."""
    lengths = [40, 200, 10, 120]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 1, 16)
    with_threads(2, lambda: sk.symmetric_attention_varlen(q, None, cu, max(lengths), backend="cpu"))
    # 200 -> worker 0, 120 -> 1, 40 -> 1 (120 < 200), 10 -> 1 (160 < 200).
    assert cpu_backend.last_schedule(False)[:, :2].tolist() == [[1, 200], [3, 170]]


CASES = {
    "fp32-shared": (dict(B=1, S=S_SPLIT, H=2, shared=True), dict()),
    "fp32-v-padding-noself": (dict(B=2, S=1100, H=1, shared=False),
                              dict(exclude_self=True,
                                   key_padding_mask=torch.arange(1100).expand(2, 1100) < torch.tensor([[1100], [900]]))),
    "fp32-full-causal-dropout": (dict(B=1, S=S_SPLIT, H=1, shared=False, coef_mode="full"),
                                 dict(causal=True, dropout_p=0.2)),
    "bf16-diag-padding": (dict(B=2, S=700, H=1, shared=True, coef_mode="diag", dtype=torch.bfloat16),
                          dict(key_padding_mask=torch.arange(700).expand(2, 700) < torch.tensor([[700], [500]]))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bit_equal_across_thread_counts(case):
    shape, kw = CASES[case]
    q, v, coef = make_inputs(D=16, Dv=16, **{"dtype": torch.float32, **shape})

    def fn():
        torch.manual_seed(0)
        return run(cpu, q, v, coef, **kw)

    results = {threads: with_threads(threads, fn) for threads in (1, 2, 8, 16)}
    for threads in (2, 8, 16):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b), threads


@pytest.mark.parametrize("coef_mode", [None, "full"], ids=["mirrored-fwd-tiled-bwd", "sliced"])
def test_workers_take_tasks_others_have_not_reached(coef_mode):
    """With 16 threads on this machine's few cores, workers whose threads wait for a core leave
    their dealt tasks to workers that have run theirs: over a few calls some tasks are taken, and
    every call's results stay bit-equal to one thread's."""
    q, _, coef = make_inputs(B=1, S=S_SPLIT, H=2, D=16, coef_mode=coef_mode, dtype=torch.float32)
    coef = None if coef is None else coef.detach().float()

    def call():
        leaf = q.detach().requires_grad_()
        out = cpu(leaf, None, coef=coef)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        return out, grad, cpu_backend.last_schedule(False), cpu_backend.last_schedule(True)

    want_out, want_grad, _, _ = with_threads(1, call)
    taken_fwd = taken_bwd = 0
    for _ in range(8):
        out, grad, forward, backward = with_threads(16, call)
        assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
        assert (forward[:, 2] <= forward[:, 0].sum()).all()
        assert (backward[:, 2] <= backward[:, 0].sum()).all()
        taken_fwd += forward[:, 2].sum().item()
        taken_bwd += backward[:, 2].sum().item()
    assert taken_fwd > 0 and taken_bwd > 0
