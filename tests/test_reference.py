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


def test_dropout_words_take_four_elements_per_philox_call():
    """Element offset e draws word e % 4 of the counter e // 4, whatever the mask's shape: a row
    of an odd key stride starts in the middle of a counter, and offsets cross 2^34 (the counters'
    high word changes)."""
    seed = 2**40 + 9
    for first in (0, 3, 2**34 - 5, 2**62 - 10):
        elements = first + torch.arange(11, dtype=torch.int64)
        want = [_philox4x32_10(seed, e // 4)[e % 4] for e in elements.tolist()]
        assert R.dropout_random_words(seed, elements).tolist() == want
    # keep mask element (b, h, i, j) at offset (h * n_rows + row_ids[b, i]) * key_stride + j
    rows, key_stride, n_rows, p = torch.tensor([[2, 5, 6]]), 7, 9, 0.4
    keep = R.dropout_keep_mask(seed, p, rows, n_rows, 2, key_stride, 6)  # [1, 2, 3, 6]
    for h in range(2):
        for i, row in enumerate(rows[0].tolist()):
            for j in range(6):
                e = (h * n_rows + row) * key_stride + j
                word = _philox4x32_10(seed, e // 4)[e % 4]
                assert bool(keep[0, h, i, j]) == ((word >> 1) >= int(p * 2**31)), (h, i, j)


def test_dropout_keep_rate_per_word():
    """Each of the four words of a counter is a fair draw, and two of them are independent: keep
    rate 1 - p at every offset residue modulo 4 and (1 - p)^2 for two words of one counter, within
    5 standard deviations over 2^17 counters."""
    p, counters = 0.3, 2**17
    words = R.dropout_random_words(5, 4 * 999 + torch.arange(4 * counters, dtype=torch.int64))
    keep = ((words >> 1) >= R.dropout_threshold(p)).view(counters, 4)
    sigma = (p * (1 - p) / counters) ** 0.5
    for word in range(4):
        assert abs(keep[:, word].float().mean().item() - (1 - p)) < 5 * sigma, f"word {word}"
    q = (1 - p) ** 2
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (keep[:, a] & keep[:, b]).float().mean().item()
        assert abs(both - q) < 5 * (q * (1 - q) / counters) ** 0.5, f"words {a}, {b}"


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
    keep = R.dropout_keep_mask(99, 0.25, rows, 8, 2, 8, 8)
    out = R.shared_attention(y, dropout_p=0.25, dropout_seed=99)
    probs = torch.softmax(bhsd(y) @ bhsd(y).transpose(-1, -2) / 2.0, dim=-1)
    assert_close(out, bhsd(probs * keep / 0.75 @ bhsd(y)), atol=1e-12, name="out")


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
