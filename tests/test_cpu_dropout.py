"""Dropout of the fused C++ ``cpu`` backend: the vectorised Philox generator against the
reference's 16-bit values and the scalar C++ Philox over many element offsets (every offset
modulo 8, counters crossing 2^32, every tail length), its keep rate per value of a counter, the
multipliers' expectation, dropout probabilities near 0 and 1, the kernels' masks
bit-equal to the reference at odd key counts, causal, key padding and varlen (fp32, and bf16 at
a head dim the bf16 products take), forward and gradients against the fp64 reference under
dropout, and all of it again on every instruction-set build."""

import pytest
import torch

from symattn_kernels import extensions

if extensions.state("cpu").how == extensions.ABSENT:
    pytest.skip(f"the cpu backend is absent here: {extensions.state('cpu').detail}", allow_module_level=True)

import symattn_kernels as sk
from symattn_kernels import reference as R
from symattn_kernels.backends import cpu as cpu_backend

from .attention_checks import (assert_close, describe_mismatch, kernel_dropout_seed, make_inputs,
                               pytest_on_kernel_build, reference, run)

# Run lengths around every vector width and step of the generator (4 counters = 32 elements per
# AVX2 register, 8 = 64 per AVX-512 register, steps of 64 and 256 elements) and past them.
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 111, 127, 128, 129, 130, 131,
           255, 256, 257, 511, 512, 513, 1025, 2049]
# First element offsets of every residue modulo 8, and runs whose counters (offset / 8) cross a
# multiple of 2^32 (offsets 2^35, 2^36) or start just past one.
FIRSTS = [0, 1, 2, 3, 4, 5, 6, 7, 2**32 - 1, 2**35 - 20, 2**35 - 3, 2**35 - 2, 2**35 + 1, 2**36 - 130, 2**40 + 3,
          2**62 - 2000]


def _keep_values(p, values):
    """The multipliers the kernels should draw: dropout_scale in fp32 where kept, else 0."""
    kept = values >= R.dropout_threshold(p)
    return torch.where(kept, torch.tensor(R.dropout_scale(p), dtype=torch.float32), torch.tensor(0.0))


def _scalar_values(seed, first, n):
    """Half e % 2 of word (e / 2) % 4 of the counter e / 8, from the C++ scalar Philox (its four
    words per counter)."""
    elements = first + torch.arange(n, dtype=torch.int64)
    words = torch.ops.symattn.philox4x_cpu(elements >> 3, seed)
    word = words.gather(-1, ((elements >> 1) & 3)[:, None])[:, 0]
    return (word >> (16 * (elements & 1))) & 0xFFFF


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.9, 1 - 1e-9])
def test_vector_generator_bit_equal_to_reference_values(p):
    gen = torch.Generator().manual_seed(3)
    firsts = FIRSTS + torch.randint(0, 2**62, (8,), generator=gen).tolist()
    longest = max(LENGTHS)
    for seed in (0, 3, 2**32 + 7, 2**62 - 5):
        for first in firsts:
            values = R.dropout_random16(seed, first + torch.arange(longest, dtype=torch.int64))
            assert torch.equal(_scalar_values(seed, first, longest), values)
            want = _keep_values(p, values)
            for n in LENGTHS:
                got = torch.ops.symattn.dropout_keep_cpu(seed, p, first, n)
                bad = got != want[:n]
                assert not bad.any(), f"seed {seed} first {first} n {n}: {describe_mismatch(got, want[:n], bad)}"


@pytest.mark.parametrize("p", [0.1, 0.3, 0.77])
def test_vector_generator_keep_rate_per_value_and_unit_expectation(p):
    """All eight 16-bit values of a counter are used and each is a fair draw: the keep rate at
    every offset residue modulo 8 is 1 - p (within 2^-17, the threshold's rounding), two values of
    one counter are kept together at rate (1 - p)^2, within 5 standard deviations over 2^18
    counters, and the multipliers average to 1."""
    counters = 2**18
    multipliers = torch.ops.symattn.dropout_keep_cpu(77, p, 8 * 12345, 8 * counters).double()
    keep = multipliers.view(counters, 8) != 0
    sigma = (p * (1 - p) / counters) ** 0.5
    for slot in range(8):
        assert abs(keep[:, slot].double().mean().item() - (1 - p)) < 5 * sigma + 2**-17, f"value {slot}"
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 4), (6, 7), (0, 7)]:
        both = (keep[:, a] & keep[:, b]).double().mean().item()
        q = (1 - p) ** 2
        assert abs(both - q) < 5 * (q * (1 - q) / counters) ** 0.5 + 2**-16, f"values {a}, {b}"
    mean_sigma = (p / (1 - p) / multipliers.numel()) ** 0.5  # the multiplier's variance is p / (1 - p)
    assert abs(multipliers.mean().item() - 1.0) < 5 * mean_sigma


def _kernel_mask(B, S, H, p, seed_state, dtype=torch.float32, D=8, **kw):
    """The kernel's keep mask where attention is allowed, read off its output: q = 0 makes P
    uniform over the allowed keys, v = columns of the identity makes out[b, i, h, j] =
    P_ij * keep_ij * dropout_scale(p) (a call per 256 keys, the widest value, under one seed)."""
    q = torch.zeros(B, S, H, D, dtype=dtype)
    eye = torch.eye(S, dtype=dtype)
    columns = []
    for k0 in range(0, S, 256):
        v = eye[None, :, None, k0:k0 + 256].expand(B, S, H, -1).contiguous()
        torch.manual_seed(seed_state)
        columns.append(sk.symmetric_attention(q, v, dropout_p=p, backend="cpu", **kw))
    return torch.cat(columns, dim=-1).permute(0, 2, 1, 3) != 0  # [B, H, S_q, S_k]


def _padding(B, S, kind):
    if kind == "none":
        return None
    mask = torch.ones(B, S, dtype=torch.bool)
    if kind == "tail":  # a few trailing keys: the symmetric whole-head schedule
        mask[0, S - S // 8:] = False
    elif kind == "heavy":  # most keys: query blocks against the real keys only
        mask[0, S // 3:] = False
    else:  # holes inside the sequence
        mask[:, 1::3] = False
    return mask


# Odd key counts (rows starting at every offset residue modulo 8), past 128 keys, and long heads:
# mirrored ones (each score tile also read down its columns, whose masks are drawn by query and
# bit-transposed; at 1100 tokens in 256 x 256 tiles) and causal ones on the row schedule. Then bf16
# heads whose products the bf16 builds run on their own units (D = 64: vdpbf16ps, or AMX tiles
# where the CPU has them), where the fp32 cases (D = 8) never go: query blocks at every causal
# length, padded rows and keys, heads of several query blocks (512 tokens on AMX tiles) and long
# heads in key tiles.
MASK_CASES = [(S, causal, padding, torch.float32) for S in (1, 37, 130) for causal in (False, True)
              for padding in ("none", "tail", "heavy", "holes")] + [
    (530, False, "none", torch.float32), (530, True, "holes", torch.float32), (1100, False, "tail", torch.float32),
    (1100, False, "holes", torch.float32)] + [
    (S, causal, padding, torch.bfloat16) for S, causal, padding in [
        (37, False, "none"), (130, True, "holes"), (512, False, "tail"), (512, True, "none"), (1100, False, "heavy"),
        (1100, True, "holes")]] + [
    # fp16 rows widened to fp32 on the whole-head symmetric schedule (its output through an fp32 block).
    (S, False, padding, torch.float16) for S, padding in [(130, "tail"), (200, "none")]]
DTYPE_IDS = {torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}


@pytest.mark.parametrize("S,causal,padding,dtype", MASK_CASES,
                         ids=[f"S{S}-{'causal' if c else 'full'}-{pad}{DTYPE_IDS[dt]}" for S, c, pad, dt in MASK_CASES])
def test_kernel_mask_bit_equal_to_reference(S, causal, padding, dtype):
    B, H, p = 2, 2 if S < 512 else 1, 0.3
    key_padding_mask = _padding(B, S, padding)
    got = _kernel_mask(B, S, H, p, seed_state=S, dtype=dtype, D=8 if dtype == torch.float32 else 64, causal=causal,
                       key_padding_mask=key_padding_mask)
    want = R.dropout_keep_mask(kernel_dropout_seed(S), p, torch.arange(B * S).view(B, S), B * S, H, S, S)
    allowed = R.attention_mask(B, S, causal=causal, key_padding_mask=key_padding_mask)  # [B, 1 or H, S, S]
    want = want & allowed
    bad = got != want
    assert not bad.any(), describe_mismatch(got.int(), want.int(), bad)
    if S > 1:
        assert want.any() and (allowed & ~want).any()


@pytest.mark.parametrize("p", [1e-9, 1 - 1e-9], ids=["near-0", "near-1"])
def test_kernel_mask_near_zero_and_one_still_drops_and_keeps(p):
    """dropout_p rounds to a threshold in [1, 65535]: a tiny one still drops 2^-16 of the scores,
    one just below 1 still keeps 2^-16 (about 16 of the 2^20 here), masks bit-equal to the
    reference, outputs finite."""
    got = _kernel_mask(1, 1024, 1, p, seed_state=5)
    want = R.dropout_keep_mask(kernel_dropout_seed(5), p, torch.arange(1024).view(1, 1024), 1024, 1, 1024, 1024)
    bad = got != want
    assert not bad.any(), describe_mismatch(got.int(), want.int(), bad)
    exceptions = int((~want).sum()) if p < 0.5 else int(want.sum())
    assert 0 < exceptions < 64


def test_varlen_kernel_mask_bit_equal_to_reference():
    cu = torch.tensor([0, 1, 18, 18, 51, 84, 213], dtype=torch.int32)
    total, H, p, max_seqlen = int(cu[-1]), 3, 0.4, 200  # max_seqlen only bounds the lengths
    torch.manual_seed(8)
    starts = cu[:-1].repeat_interleave(cu.diff())
    pos = torch.arange(total) - starts
    v = torch.nn.functional.one_hot(pos, max_seqlen).float()[:, None, :].expand(total, H, max_seqlen).contiguous()
    got = sk.symmetric_attention_varlen(torch.zeros(total, H, 8), v, cu, max_seqlen, dropout_p=p,
                                        backend="cpu") != 0  # [total, H, max_seqlen]
    seed = kernel_dropout_seed(8)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end == start:
            continue
        want = R.dropout_keep_mask(seed, p, torch.arange(start, end)[None], total, H, total, end - start)[0]
        mask = got[start:end, :, : end - start].permute(1, 0, 2)  # [H, L, L]
        bad = mask != want
        assert not bad.any(), f"sequence {start}:{end}: {describe_mismatch(mask.int(), want.int(), bad)}"
        assert not got[start:end, :, end - start:].any()


# The backward regenerates the forward's mask: gradients match the reference under one seed.
# "stretched": the first 64 queries' scores scaled up, so that the whole-head symmetric forward's
# tiles below them decline the shared exponential (their rows' maxima lie too far apart) with
# every key real, and take the row and column sides' own exponentials under the transposed bits.
@pytest.mark.parametrize("S,causal,padding", [(37, False, "none"), (37, True, "holes"), (130, False, "tail"),
                                              (130, True, "heavy"), (200, False, "stretched"), (530, False, "none")])
def test_forward_and_gradients_match_reference_under_dropout(S, causal, padding):
    q, v, coef = make_inputs(B=2, S=S, H=2, D=16, Dv=8, coef_mode="diag", shared=False)
    if padding == "stretched":
        with torch.no_grad():
            q[:, :64] *= 6
        padding = "none"
    kw = dict(dropout_p=0.2, causal=causal, key_padding_mask=_padding(2, S, padding))
    leaves = [t.detach().float().requires_grad_() for t in (q, v, coef)]
    torch.manual_seed(S)
    got = run(lambda *a, **k: sk.symmetric_attention(*a, backend="cpu", **k), *leaves, **kw)
    want = run(reference, q, v, coef, dropout_seed=kernel_dropout_seed(S), **kw)
    for name, a, b in zip(["out", "lse", "dq", "dv", "dcoef"], got, want):
        assert_close(a, b, atol=2e-4, rtol=2e-4, name=name)


# The dropout tests of the cpu backend (but the long heads, whose rows draw as any other), re-run
# in a process capped at one kernel build.
@pytest.mark.slow
@pytest.mark.parametrize("isa", cpu_backend.KERNEL_BUILDS)
def test_dropout_on_every_instruction_set_build(isa):
    pytest_on_kernel_build(isa, ["tests/test_cpu_dropout.py", "tests/test_cpu_backend.py", "-k",
                                 "(dropout or philox) and not instruction_set and not 530"], timeout=600)
