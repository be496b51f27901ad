"""The forward of heads longer than 512 tokens on the fused CPU kernels: where the scores are
symmetric, score tiles serve two query blocks (one read across, one read down), with the
running softmax states of a head's row groups folded in a fixed order as tasks finish; with dropout, the keep mask is
drawn tile by tile. Checked against the fp64 reference under flash-attn's rule at odd lengths,
with padding, exclude_self and row maxima that grow from tile to tile; masks equal to the
reference's; results bit-equal at 1, 2 and 3 threads; and all of it again in each kernel build."""
import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels.backends import cpu as cpu_backend

from .attention_checks import (F64, assert_close, assert_flash_rule, kernel_dropout_seed, make_inputs, mirrored_groups,
                      peak_allocated_bytes, pytest_on_kernel_build, reference, run, with_threads)

ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}
LENGTHS = [513, 1025, 2049]


def cpu(q, v, **kw):
    return sk.symmetric_attention(q, v, backend="cpu", **kw)


def growing(inputs, S):
    """Scales token t by 1 + 3 t / S: a row's largest score lies in a later tile than its first,
    and in a later tile than the first one that reads it down the columns."""
    ramp = (1 + 3 * torch.arange(S, dtype=F64) / S)[None, :, None, None]
    q, v, coef = inputs
    return q * ramp, None if v is None else v * ramp, coef


def padding(S, kind):
    if kind is None:
        return None
    lengths = {"tail": [S, S - S // 8], "empty": [S, 0], "heavy": [S, S // 3]}[kind]
    mask = torch.arange(S).expand(2, S) < torch.tensor(lengths)[:, None]
    if kind == "tail":
        mask[0, S // 2] = False  # a hole: a padded key inside the tiles read both ways
    return mask


def forward(fn, inputs, dtype, **kw):
    """out and lse of fn, with q and v in dtype and the coefficient in fp32 (fp64 for fp64)."""
    coef_dtype = F64 if dtype == F64 else torch.float32
    q, v, coef = (None if t is None else t.detach().to(dtype if t.dim() == 4 else coef_dtype) for t in inputs)
    return fn(q, v, coef=coef, return_lse=True, **kw)


def check_forward(inputs, dtype, **kw):
    want = forward(reference, inputs, F64, **kw)
    want_lowp = forward(reference, inputs, dtype, **kw)
    got = forward(cpu, inputs, dtype, **kw)
    for name, a, r64, rl in zip(["out", "lse"], got, want, want_lowp):
        assert not a.isnan().any(), f"{name} has NaN"
        assert_flash_rule(name, a, r64, rl, ATOL[dtype])


CASES = {
    # name: (make_inputs arguments, padding kind, call options)
    "shared": (dict(), None, dict()),
    "shared-tail-noself": (dict(), "tail", dict(exclude_self=True)),
    "shared-empty-sequence": (dict(), "empty", dict()),
    "diag-v-tail": (dict(coef_mode="diag", shared=False), "tail", dict()),
    "v-heavy-padding": (dict(shared=False), "heavy", dict()),  # rows against the real keys instead
    "diag-noself": (dict(coef_mode="diag"), None, dict(exclude_self=True)),
}


@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("case", list(CASES))
def test_long_forward_fp32(case, S):
    shape, kind, kw = CASES[case]
    inputs = growing(make_inputs(B=2, S=S, H=1, D=24, Dv=20, **shape), S)
    check_forward(inputs, torch.float32, key_padding_mask=padding(S, kind), **kw)


@pytest.mark.parametrize("case", ["shared-tail-noself", "diag-v-tail"])
def test_long_forward_bf16(case):
    shape, kind, kw = CASES[case]
    S = 1025
    inputs = growing(make_inputs(B=2, S=S, H=1, D=24, Dv=20, **shape), S)
    check_forward(inputs, torch.bfloat16, key_padding_mask=padding(S, kind), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mirrored_forward_with_row_maxima_far_apart(dtype):
    """Every fifth token 8x longer: the running maxima of a score tile's rows and columns lie
    hundreds apart, so a tile read both ways cannot take one side's probabilities from the
    other's (P_JI = P_IJ exp(m_i - m_j) overflows fp32) and exponentiates both ways; every row
    stays within flash-attn's rule."""
    S = 1025
    q, v, coef = make_inputs(B=2, S=S, H=1, D=24, Dv=20, shared=False)
    long_tokens = (1 + 7 * (torch.arange(S) % 5 == 0).to(F64))[None, :, None, None]
    check_forward((q * long_tokens, v, coef), dtype)


@pytest.mark.parametrize("stretch", [1.5, 2.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mirrored_forward_shares_exponentials_across_spreads(dtype, stretch):
    """Every fifth token `stretch` times longer: the final row maxima of a pair of 256-token
    groups span up to about 26, 30-48 and 75. A tile read both ways takes one exponential per
    score, and the other side's as its product by exp(m_r - m_c), where its rows' and columns'
    maxima lie within 40 of each other (factors up to e^40), and the two passes elsewhere; at
    2.0 both kinds of tile meet in one head. Every row stays within flash-attn's rule, also with
    a padded hole and tail (whose tiles take the two passes)."""
    S = 1025
    q, v, coef = make_inputs(B=2, S=S, H=1, D=24, Dv=20)
    long_tokens = (1 + (stretch - 1) * (torch.arange(S) % 5 == 0).to(F64))[None, :, None, None]
    check_forward((q * long_tokens, v, coef), dtype)
    check_forward((q * long_tokens, v, coef), dtype, key_padding_mask=padding(S, "tail"))


@pytest.mark.parametrize("S", [300, 1025])
@pytest.mark.parametrize("causal", [False, True], ids=["symmetric", "causal"])
def test_forward_with_scores_of_large_magnitude_fp32(S, causal):
    """Queries 3x longer and growing along the sequence: scores in the hundreds, row maxima that
    grow from tile to tile. The forward takes its exponentials in base 2 from a shift rounded
    once per row max, which scales them all by up to half an ulp of the max times log2(e); lse,
    the rescales of running sums and the merge of row groups take the same rounded shift, and
    scores more than 87 below their row's max give P = 0. Whole heads at 300 tokens (the
    symmetric schedule; causal rows), mirrored and tiled ones at 1025, with a padded tail."""
    q, v, coef = make_inputs(B=2, S=S, H=1, D=24, Dv=20, shared=False)
    check_forward(growing((q * 3, v, coef), S), torch.float32, causal=causal,
                  key_padding_mask=padding(S, "tail"), exclude_self=True)


def test_mirrored_gradients_fp32():
    """Forward and every gradient of a mirrored head (the backward reads the merged lse)."""
    S = 1025
    inputs = make_inputs(B=2, S=S, H=1, D=16, Dv=8, coef_mode="diag", shared=False)
    kw = dict(key_padding_mask=padding(S, "tail"), exclude_self=True)
    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    want, want_fp32 = run(reference, *inputs, **kw), run(reference, *fp32, **kw)
    got = run(cpu, *fp32, **kw)
    for name, a, r64, r32 in zip(["out", "lse", "dq", "dv", "dcoef"], got, want, want_fp32):
        assert_flash_rule(name, a, r64, r32, 2e-6)



@pytest.mark.parametrize("causal", [False, True], ids=["mirrored", "causal"])
def test_nan_in_a_real_token_reaches_every_row_that_attends_to_it(causal):
    """A NaN query / key element makes each row that sees the token NaN, as in the reference, also
    where that token's scores are a whole tile's maximum (every score of a NaN token is NaN)."""
    S, t = 1025, 7
    q, v, coef = make_inputs(B=2, S=S, H=2, D=16, Dv=8, coef_mode="diag")
    q = q.detach().clone()
    q[0, t, 1, 3] = float("nan")
    fp32 = [None if x is None else x.detach().float().requires_grad_() for x in (q, v, coef)]
    got = run(cpu, *fp32, causal=causal)
    want = run(reference, q.requires_grad_(), v, coef.detach().requires_grad_(), causal=causal)
    names = ["out", "lse", "dq", "dcoef"]
    if causal:  # the reference's earlier rows also take the NaN value row, times P = 0: skip out
        names, got, want = names[1:], got[1:], want[1:]
        assert got[0][0, t:, 1].isnan().all() and not got[0][0, :t, 1].isnan().any()
    for name, a, b in zip(names, got, want):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: {int(a.isnan().sum())} NaN, reference {int(b.isnan().sum())}"

def mirrored_tasks(S, batch_heads):
    """Tasks of one mirrored head: one per pair of its row groups."""
    groups, _ = mirrored_groups(S, batch_heads)
    return groups * (groups + 1) // 2


@pytest.mark.parametrize("S,H", [(1025, 1), (2049, 1), (4096, 2)])
def test_symmetric_heads_take_the_mirrored_tasks(S, H):
    """Non-causal symmetric heads run as group pairs; causal ones as query-row tasks."""
    q = torch.randn(1, S, H, 16)
    cpu(q, None)
    assert cpu_backend.last_schedule(False)[:, 0].sum().item() == H * mirrored_tasks(S, H)
    cpu(q, None, causal=True)
    assert cpu_backend.last_schedule(False)[:, 1].sum().item() == H * S


@pytest.mark.parametrize("S,H,copies", [(8192, 1, 3.5), (2048, 12, 2)])
def test_mirrored_forward_folds_its_states_as_tasks_finish(S, H, copies):
    """Each row group folds its tasks' running states as they finish, a head's tasks run
    together, and a task packs its two groups' rows alone. One 8192-token head (8 groups, 36
    tasks): the output, the head's group states (about one more output), a running task's states,
    tiles and its groups' panels, within 3.5 copies of the input (a state per task and group,
    merged at the end, took 11.5; panels of the whole head 4.2). Twelve 2048-token heads (2
    groups, 3 tasks each): the output and about one head's states, within 2 copies (3.3 before).
    One thread: the profiler records the calling thread's allocations only."""
    y = torch.randn(1, S, H, 64)
    peak = peak_allocated_bytes(lambda: cpu(y, None), threads=1)
    assert peak <= copies * y.numel() * 4, f"forward peak {peak / 2**20:.2f} MiB"


# Dropout: the tiled forward draws each tile's part of a row's mask, the mirrored one also the
# masks of the tiles read down their columns; the result equals the reference's under the same seed.
@pytest.mark.parametrize("coef_mode", [None, "diag"])
@pytest.mark.parametrize("S,causal,kind", [(513, False, None), (1025, True, "tail"), (1025, False, "heavy")])
def test_long_forward_dropout_matches_reference(S, causal, kind, coef_mode):
    q, v, coef = make_inputs(B=2, S=S, H=2, D=16, Dv=8, coef_mode=coef_mode, shared=False)
    kw = dict(dropout_p=0.2, causal=causal, key_padding_mask=padding(S, kind))
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in (q, v, coef)]
    torch.manual_seed(S)
    got = run(cpu, *leaves, **kw)
    want = run(reference, q, v, coef, dropout_seed=kernel_dropout_seed(S), **kw)
    # Two heads per sequence: mirrored group pairs where the scores are symmetric to the bit (not
    # causal, no coefficient; the heavily padded second sequence not), else 128-row tasks.
    mirrored = 0 if causal or coef_mode else (1 if kind == "heavy" else 2)
    tasks = 2 * (mirrored * mirrored_tasks(S, 4) + (2 - mirrored) * -(-S // 128))
    assert cpu_backend.last_schedule(False)[:, 0].sum().item() == tasks
    for name, a, b in zip(["out", "lse", "dq", "dv", "dcoef"], got, want):
        assert_close(a, b, atol=2e-4, rtol=2e-4, name=name)


# Causal heads: a task reads only the keys up to its last query row, and a call with many heads
# cuts each into slices of several query blocks (1025 tokens, 16 heads: 3 slices of up to 384
# rows), each key tile packed once for all of a slice's blocks.
CAUSAL_SLICES = {
    "fp32-v-diag-tail-noself": (dict(shared=False, coef_mode="diag"), torch.float32, "tail", dict(exclude_self=True)),
    "bf16-shared-tail": (dict(), torch.bfloat16, "tail", dict()),
    "fp16-v": (dict(shared=False), torch.float16, None, dict()),
}


@pytest.mark.parametrize("case", list(CAUSAL_SLICES))
def test_causal_heads_take_slices_of_blocks(case):
    shape, dtype, kind, kw = CAUSAL_SLICES[case]
    S, B, H = 1025, 2, 8
    inputs = growing(make_inputs(B=B, S=S, H=H, D=16, Dv=8, **shape), S)
    kw = dict(causal=True, key_padding_mask=padding(S, kind), **kw)
    results = {threads: with_threads(threads, lambda: forward(cpu, inputs, dtype, **kw)) for threads in (1, 2, 3)}
    assert cpu_backend.last_schedule(False)[:, 0].sum().item() == B * H * 3
    assert cpu_backend.last_schedule(False)[:, 1].sum().item() == B * H * S
    want, want_lowp = forward(reference, inputs, F64, **kw), forward(reference, inputs, dtype, **kw)
    for name, a, r64, rl in zip(["out", "lse"], results[1], want, want_lowp):
        assert_flash_rule(name, a, r64, rl, ATOL.get(dtype, 1e-3))
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_whole_head_tasks_go_in_chunks(dtype):
    """64 causal heads: each task takes a whole head of 1025 rows, which goes in chunks of 512,
    512 and 1 rows, each packing the key tiles it reads and keeping its rows' running states."""
    S, B, H = 1025, 2, 32
    inputs = growing(make_inputs(B=B, S=S, H=H, D=16, Dv=8, shared=False), S)
    kw = dict(causal=True, key_padding_mask=padding(S, "tail"))
    results = {threads: with_threads(threads, lambda: forward(cpu, inputs, dtype, **kw)) for threads in (1, 2)}
    assert cpu_backend.last_schedule(False)[:, 0].sum().item() == B * H
    want, want_lowp = forward(reference, inputs, F64, **kw), forward(reference, inputs, dtype, **kw)
    for name, a, r64, rl in zip(["out", "lse"], results[1], want, want_lowp):
        assert_flash_rule(name, a, r64, rl, ATOL[dtype])
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("coef_mode", ["none", "full"])
def test_tiled_forward_packs_one_key_tile_at_a_time(coef_mode):
    """The forward of heads that do not mirror (causal here, or a full coefficient) holds one key
    tile's panels and a chunk's states: the output and lse, and about 0.6 MiB, within 1.5 copies
    of the input at 8192 tokens (1.2 and 1.3; panels of the whole head's keys and values took 3.1
    and 4.1)."""
    y = torch.randn(1, 8192, 1, 64)
    coef = torch.randn(1, 64, 64) * 0.1 if coef_mode == "full" else None
    peak = peak_allocated_bytes(lambda: sk.symmetric_attention(y, coef=coef, causal=coef is None, backend="cpu"),
                                threads=1)
    assert peak <= 1.5 * y.numel() * 4, f"forward peak {peak / 2**20:.2f} MiB"


BIT_EQUAL = {
    "fp32-shared-tail": (dict(shared=True), dict(key_padding_mask=padding(1500, "tail"))),
    "fp32-diag-v": (dict(shared=False, coef_mode="diag"), dict(exclude_self=True)),
    "bf16-shared": (dict(shared=True, dtype=torch.bfloat16), dict()),
    "fp32-dropout": (dict(shared=False), dict(dropout_p=0.3)),
}


@pytest.mark.parametrize("case", list(BIT_EQUAL))
def test_long_forward_bit_equal_across_thread_counts(case):
    shape, kw = BIT_EQUAL[case]
    q, v, coef = make_inputs(B=2, S=1500, H=2, D=16, Dv=16, **{"dtype": torch.float32, **shape})

    def fn():
        torch.manual_seed(0)
        return cpu(q, v, coef=coef, return_lse=True, **kw)

    results = {threads: with_threads(threads, fn) for threads in (1, 2, 3)}
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert torch.equal(a, b), threads


# All of the above (but the longest heads) in a process capped at each kernel build.
@pytest.mark.slow
@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_long_forward_on_every_instruction_set_build(isa):
    pytest_on_kernel_build(isa, ["tests/test_cpu_long_forward.py", "-k",
                                 "not instruction_set and not 2049 and not 4096"], timeout=900)
