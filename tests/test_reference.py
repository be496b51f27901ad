"""The reference (the spec in code) against independent facts: torch's SDPA, gradcheck,
hand-derived masks and per-sequence computation."""

import pytest
import torch
import torch.nn.functional as F

from symattn_kernels import reference as R

from .attention_checks import assert_close

F64 = torch.float64


def bhsd(x):
    return x.transpose(1, 2)


def randn(*shape, grad=True):
    return torch.randn(*shape, dtype=F64, requires_grad=grad)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shared_equals_sdpa_of_duplicated_input(causal):
    torch.manual_seed(0)
    y = randn(2, 37, 3, 16)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    out = R.shared_attention(y, causal=causal, key_padding_mask=mask)
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(37, 37, dtype=torch.bool).tril()
    sdpa = F.scaled_dot_product_attention(bhsd(y), bhsd(y), bhsd(y), attn_mask=allowed)
    assert_close(out, bhsd(sdpa), atol=1e-12, name="out")


@pytest.mark.parametrize("coef_mode", [None, "diag", "full"])
def test_pairwise_scores_equal_sdpa_with_transformed_query(coef_mode):
    torch.manual_seed(1)
    q, v = randn(2, 11, 3, 8), randn(2, 11, 3, 5)
    coef = {None: None, "diag": randn(3, 8), "full": randn(3, 8, 8)}[coef_mode]
    query = bhsd(q) if coef is None else (bhsd(q) * coef[:, None] if coef.dim() == 2 else bhsd(q) @ coef[None])
    sdpa = F.scaled_dot_product_attention(query, bhsd(q), bhsd(v), scale=8**-0.5)
    assert_close(R.symmetric_attention(q, v, coef=coef), bhsd(sdpa), atol=1e-12, name="out")


def test_exclude_self_mask_follows_its_definition():
    allowed = R.attention_mask(1, 4, causal=True, exclude_self=True)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    padded = R.attention_mask(1, 3, key_padding_mask=torch.tensor([[True, False, False]]), exclude_self=True)
    # Row 0's only allowed key is itself; rows 1 and 2 see token 0.
    assert padded[0, 0].tolist() == [[True, False, False]] * 3


def test_key_padding_mask_is_huggingface_convention():
    torch.manual_seed(2)
    y = randn(1, 10, 2, 8, grad=False)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    out = R.shared_attention(y, key_padding_mask=mask)
    unpadded = R.shared_attention(y[:, :6])
    assert_close(out[:, :6], unpadded, atol=1e-12, name="real rows")


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    torch.manual_seed(3)
    q, v = randn(2, 5, 2, 4), randn(2, 5, 2, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = R.symmetric_attention(q, v, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    dq, dv = torch.autograd.grad(out.sum(), (q, v))
    assert not dq.isnan().any() and not dv.isnan().any()
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


def test_lse_is_logsumexp_of_scaled_scores():
    torch.manual_seed(4)
    q = randn(1, 6, 1, 4, grad=False)
    _, lse = R.shared_attention(q, scale=0.3, return_lse=True)
    y = q[0, :, 0]
    assert_close(lse[0, 0], torch.logsumexp(0.3 * y @ y.T, dim=-1), atol=1e-12, name="lse")
    assert lse.dtype == F64


MODES = [(c, s) for c in (None, "diag", "full") for s in (True, False)]


@pytest.mark.parametrize("coef_mode,shared", MODES, ids=[f"coef={c}-{'shared' if s else 'v'}" for c, s in MODES])
@pytest.mark.parametrize("causal,exclude_self", [(False, False), (True, True)], ids=["plain", "causal-noself"])
def test_gradcheck(coef_mode, shared, causal, exclude_self):
    torch.manual_seed(5)
    q, v = randn(2, 6, 2, 4), randn(2, 6, 2, 3)
    coef = {None: None, "diag": randn(2, 4), "full": randn(2, 4, 4)}[coef_mode]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    inputs = [t for t in (q, None if shared else v, coef) if t is not None]

    def fn(*args):
        it = iter(args)
        qq = next(it)
        vv = None if shared else next(it)
        cc = None if coef is None else next(it)
        return R.symmetric_attention(
            qq, vv, coef=cc, causal=causal, exclude_self=exclude_self, key_padding_mask=mask, return_lse=True
        )[0]

    assert torch.autograd.gradcheck(fn, inputs)


def _philox4x32_10(seed, counter):
    """Philox-4x32-10 on Python ints, step by step as Salmon et al. (2011) write it."""
    c = [counter & 0xFFFFFFFF, counter >> 32, 0, 0]
    k = [seed & 0xFFFFFFFF, seed >> 32]
    for _ in range(10):
        pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(pb >> 32) ^ c[1] ^ k[0], pb & 0xFFFFFFFF, (pa >> 32) ^ c[3] ^ k[1], pa & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c


def test_philox_known_answer_and_scalar_twin():
    # Random123's known-answer vector for philox4x32-10 with counter and key all zero.
    words = R.philox_randint4x(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    gen = torch.Generator().manual_seed(1)
    counters = torch.cat([torch.arange(5), torch.tensor([2**32 - 1, 2**32, 2**62 - 1]),
                          torch.randint(0, 2**62, (40,), generator=gen)])
    for seed in (0, 7, 2**32 + 5, 2**62 - 3):
        got = torch.stack(R.philox_randint4x(seed, counters), dim=-1).tolist()
        assert got == [_philox4x32_10(seed, c) for c in counters.tolist()], f"seed {seed}"
        assert torch.equal(R.philox_randint(seed, counters), torch.tensor([w[0] for w in got]))


def _dropout_value(seed, e):
    """Element offset e's 16-bit value: half e % 2 (low half first) of word (e // 2) % 4 of the
    counter e // 8."""
    return (_philox4x32_10(seed, e // 8)[(e // 2) % 4] >> (16 * (e % 2))) & 0xFFFF


def test_dropout_values_take_eight_elements_per_philox_call():
    """Element offset e draws half e % 2 of word (e // 2) % 4 of the counter e // 8, whatever the
    mask's shape: a row of an odd key stride starts in the middle of a counter, and offsets cross
    2^35 (the counters' high word changes)."""
    seed = 2**40 + 9
    for first in (0, 3, 2**35 - 5, 2**62 - 10):
        elements = first + torch.arange(19, dtype=torch.int64)
        want = [_dropout_value(seed, e) for e in elements.tolist()]
        assert R.dropout_random16(seed, elements).tolist() == want
    # keep mask element (b, h, i, j) at offset (h * n_rows + row_ids[b, i]) * key_stride + j
    rows, key_stride, n_rows, p = torch.tensor([[2, 5, 6]]), 7, 9, 0.4
    keep = R.dropout_keep_mask(seed, p, rows, n_rows, 2, key_stride, 6)  # [1, 2, 3, 6]
    for h in range(2):
        for i, row in enumerate(rows[0].tolist()):
            for j in range(6):
                e = (h * n_rows + row) * key_stride + j
                assert bool(keep[0, h, i, j]) == (_dropout_value(seed, e) >= 26214), (h, i, j)  # 0.4 * 2^16


# dropout_p -> threshold in steps of 2^-16, rounded to nearest with ties up; 0 < p < 1 never gives
# 0 ("no dropout") nor 2^16 ("drop everything").
THRESHOLDS = [(0.0, 0), (1e-300, 1), (1e-9, 1), (0.5 / 2**16, 1), (1.4 / 2**16, 1), (1.5 / 2**16, 2), (0.1, 6554),
              (0.25, 16384), (0.3, 19661), (0.4, 26214), (0.5, 32768), (0.9, 58982), (1 - 1.5 / 2**16, 65535),
              (1 - 0.5 / 2**16, 65535), (1 - 1e-9, 65535), (1 - 2**-53, 65535)]


@pytest.mark.parametrize("p,threshold", THRESHOLDS, ids=[repr(p) for p, _ in THRESHOLDS])
def test_dropout_threshold_rounds_and_never_turns_dropout_off_or_total(p, threshold):
    assert R.dropout_threshold(p) == threshold
    assert R.dropout_scale(p) == 2**16 / (2**16 - threshold)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_threshold_rejects_probabilities_outside_zero_one(p):
    with pytest.raises(ValueError, match="dropout_p"):
        R.dropout_threshold(p)


@pytest.mark.parametrize("p", [1e-9, 0.1, 0.3, 0.5, 0.77, 1 - 1e-9])
def test_dropout_rule_keeps_one_minus_effective_p_with_unit_expectation(p):
    """Over all 2^16 random values, exactly 2^16 - threshold are kept: the keep probability is
    1 - p_eff with |p_eff - p| <= 2^-17 (or p_eff = 2^-16 / 1 - 2^-16 at the ends), and the
    multiplier's expectation, keep probability times dropout_scale, is 1."""
    values = torch.arange(2**16)
    kept = values >= R.dropout_threshold(p)
    p_eff = 1 - kept.double().mean().item()
    assert abs(p_eff - p) <= 2**-17 or (p < 2**-17 and p_eff == 2**-16) or (p > 1 - 2**-17 and p_eff == 1 - 2**-16)
    assert 0 < kept.sum() < 2**16
    assert (kept.double() * R.dropout_scale(p)).mean().item() == pytest.approx(1.0, abs=1e-12)


def test_dropout_keep_rate_per_value():
    """Each of the eight 16-bit values of a counter is a fair draw, and two of them are
    independent (the two halves of one word, and values of different words): keep rate 1 - p at
    every offset residue modulo 8 and (1 - p)^2 for two values of one counter, within 5 standard
    deviations over 2^17 counters."""
    p, counters = 0.3, 2**17
    keep_p = 1 - R.dropout_threshold(p) / 2**16
    values = R.dropout_random16(5, 8 * 999 + torch.arange(8 * counters, dtype=torch.int64))
    keep = (values >= R.dropout_threshold(p)).view(counters, 8)
    sigma = (keep_p * (1 - keep_p) / counters) ** 0.5
    for slot in range(8):
        assert abs(keep[:, slot].float().mean().item() - keep_p) < 5 * sigma, f"value {slot}"
    q = keep_p**2
    for a, b in [(0, 1), (1, 2), (2, 3), (6, 7), (0, 7), (3, 4)]:
        both = (keep[:, a] & keep[:, b]).float().mean().item()
        assert abs(both - q) < 5 * (q * (1 - q) / counters) ** 0.5, f"values {a}, {b}"


@pytest.mark.parametrize("p", [1e-9, 1 - 1e-9])
def test_dropout_mask_near_zero_and_one_drops_and_keeps_some(p):
    """A tiny dropout_p still drops (at rate 2^-16), one just below 1 still keeps (at 2^-16): over
    2^22 elements both expect 64 exceptions; within 5 standard deviations (40)."""
    rows = torch.arange(1024).view(1, 1024)
    keep = R.dropout_keep_mask(77, p, rows, 1024, 4, 1024, 1024)
    exceptions = int((~keep).sum()) if p < 0.5 else int(keep.sum())
    assert 64 - 40 < exceptions < 64 + 40


def test_dropout_mask_rate_and_zero_probability():
    rows = torch.arange(64).view(1, 64)
    keep = R.dropout_keep_mask(1234, 0.3, rows, 64, 4, 64, 64)
    assert keep.shape == (1, 4, 64, 64)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert R.dropout_keep_mask(1234, 0.0, rows, 64, 4, 64, 64).all()
    assert not torch.equal(keep, R.dropout_keep_mask(1235, 0.3, rows, 64, 4, 64, 64))


def test_dropout_scales_kept_probabilities():
    torch.manual_seed(6)
    y = randn(1, 8, 2, 4, grad=False)
    rows = torch.arange(8).view(1, 8)
    keep = R.dropout_keep_mask(99, 0.3, rows, 8, 2, 8, 8)
    out = R.shared_attention(y, dropout_p=0.3, dropout_seed=99)
    probs = torch.softmax(bhsd(y) @ bhsd(y).transpose(-1, -2) / 2.0, dim=-1)
    # 0.3 is represented as 19661 / 2^16: the multiplier is 1 over the keep probability that gives
    assert_close(out, bhsd(probs * keep * (2**16 / (2**16 - 19661)) @ bhsd(y)), atol=1e-12, name="out")


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_each_sequence_alone(causal):
    torch.manual_seed(7)
    lengths = [5, 1, 9]
    q, v = randn(15, 2, 4, grad=False), randn(15, 2, 6, grad=False)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out, lse = R.symmetric_attention_varlen(q, v, cu, 9, causal=causal, return_lse=True)
    start = 0
    for n in lengths:
        o, l = R.symmetric_attention(q[None, start:start + n], v[None, start:start + n], causal=causal,
                                     return_lse=True)
        assert_close(out[start:start + n], o[0], atol=1e-12, name="out")
        assert_close(lse[:, start:start + n], l[0], atol=1e-12, name="lse")
        start += n


def _lama_inputs(B=2, T=5, E=6, m=3, per_sequence=True, with_u=True):
    torch.manual_seed(8)
    h = randn(B, T, E)
    context = randn(B, E) if per_sequence else randn(E)
    return h, context, randn(E, m), randn(E, m), randn(B, T, E) if with_u else None


@pytest.mark.parametrize("head_norm", ["l2", None])
@pytest.mark.parametrize("token_softmax", [True, False])
def test_lowrank_gradcheck(head_norm, token_softmax):
    h, context, p, q, u = _lama_inputs()
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])

    def fn(h, context, p, q, u):
        pooled, attn = R.lowrank_context_attention(
            h, context, p, q, u=u, key_padding_mask=mask, head_norm=head_norm, token_softmax=token_softmax
        )
        return pooled, attn

    assert torch.autograd.gradcheck(fn, (h, context, p, q, u))


def test_lowrank_follows_the_formula_and_masks():
    h, context, p, q, u = _lama_inputs(with_u=False)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    pooled, attn = R.lowrank_context_attention(h, context, p, q, key_padding_mask=mask)
    feats = torch.tanh((context @ p)[:, None, :] * (h @ q))
    feats = feats / feats.norm(dim=-1, keepdim=True)
    for b, n in enumerate([5, 2]):
        weights = torch.softmax(feats[b, :n].T, dim=-1)  # [m, n]
        assert_close(attn[b, :, :n], weights, atol=1e-12, name="attn")
        assert_close(pooled[b], weights @ h[b, :n], atol=1e-12, name="pooled")
    assert torch.equal(attn[1, :, 2:], torch.zeros_like(attn[1, :, 2:]))


def test_lowrank_empty_sequence_pools_to_zero():
    h, context, p, q, _ = _lama_inputs()
    mask = torch.tensor([[True] * 5, [False] * 5])
    pooled, attn = R.lowrank_context_attention(h, context, p, q, key_padding_mask=mask)
    assert torch.equal(pooled[1], torch.zeros_like(pooled[1])) and not attn.isnan().any()
    grads = torch.autograd.grad(pooled.sum(), (h, context, p, q))
    assert not any(g.isnan().any() for g in grads)
