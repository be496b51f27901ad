"""CPU unit tests of the __host__ __device__ helpers of csrc/cuda/attention_rules.cuh.

A small driver (below) includes the header as plain host C++ (no nvcc, no GPU) and is built
with g++; it reads cases on stdin and prints results, which are compared with
symattn_kernels.reference: Philox bit-equality (all four words, and the 16-bit dropout value of
an element offset), the dropout threshold and multiplier of a probability, and dropout keep
decisions, per-element masks and tile classification against
reference.attention_mask, the online-softmax step against torch.logsumexp, and the padded /
varlen row offsets.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess

import pytest
import torch

from symattn_kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_DIR = os.path.join(ROOT, "csrc", "cuda")

DRIVER = r"""
#include "attention_rules.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
using namespace symattn;
int main() {
  char cmd[32];
  while (std::scanf("%31s", cmd) == 1) {
    if (!std::strcmp(cmd, "philox")) {
      unsigned long long seed, off; double p; int h; long long n_rows, row, ks; int key;
      std::scanf("%llu %llu %lf %d %lld %lld %lld %d", &seed, &off, &p, &h, &n_rows, &row, &ks, &key);
      uint32_t w[4];
      philox4x(seed, off, w);
      std::printf("%u %u %u %u %u %u %d\n", w[0], w[1], w[2], w[3], dropout_random16(seed, off),
                  (unsigned)philox_randint(seed, off),
                  (int)dropout_keep(seed, dropout_threshold(p), h, n_rows, row, ks, key));
    } else if (!std::strcmp(cmd, "threshold")) {
      double p; std::scanf("%lf", &p);
      const uint32_t t = dropout_threshold(p);
      std::printf("%u %.17g\n", t, dropout_scale(t));
    } else if (!std::strcmp(cmd, "mask")) {
      int S, causal, excl, bm, bn; std::scanf("%d %d %d %d %d", &S, &causal, &excl, &bm, &bn);
      std::vector<int> real(S);
      KeyInfo k{S, 0, S};
      for (int j = 0; j < S; ++j) {
        std::scanf("%d", &real[j]);
        if (real[j]) { if (k.n_real == 0) k.first_real = j; ++k.n_real; }
      }
      for (int i = 0; i < S; ++i)
        for (int j = 0; j < S; ++j)
          std::printf("%d", (int)element_allowed(i, j, causal, excl, k, real[i], real[j]));
      std::printf("\n");
      for (int m0 = 0; m0 < S; m0 += bm)
        for (int n0 = 0; n0 < S + bn; n0 += bn) {
          int all = 1, none = 1;
          for (int j = n0; j < n0 + bn && j < S; ++j) { all &= real[j]; none &= !real[j]; }
          std::printf("%d", classify_tile(m0, bm, n0, bn, causal, excl, S, all, none));
        }
      std::printf("\n");
    } else if (!std::strcmp(cmd, "softmax")) {
      int n, chunk; std::scanf("%d %d", &n, &chunk);
      std::vector<float> s(n);
      for (auto& x : s) { char buf[64]; std::scanf("%63s", buf); x = std::strcmp(buf, "-inf") ? (float)std::atof(buf) : kNegInf; }
      SoftmaxRow row = softmax_init();
      for (int c = 0; c < n; c += chunk) {
        float mx = kNegInf;
        for (int j = c; j < c + chunk && j < n; ++j) mx = s[j] * kLog2e > mx ? s[j] * kLog2e : mx;
        softmax_rescale(row, mx);
        for (int j = c; j < c + chunk && j < n; ++j) row.l += fast_exp2(s[j] * kLog2e - softmax_shift(row.m));
      }
      std::printf("%.9g %.9g\n", softmax_lse(row), softmax_inv_sum(row));
    } else if (!std::strcmp(cmd, "offset")) {
      int varlen, B, S, b, t, h; long long sb, st, sh; std::scanf("%d %d %d %d %d %d %lld %lld %lld", &varlen, &B, &S, &b, &t, &h, &sb, &st, &sh);
      std::vector<int32_t> cu(B + 1);
      for (auto& c : cu) std::scanf("%d", &c);
      const int32_t* cup = varlen ? cu.data() : nullptr;
      SeqInfo si = sequence_info(cup, b, S);
      std::printf("%lld %d %lld\n", (long long)row_offset(RowStrides{sb, st, sh}, b, si, t, h), si.len,
                  (long long)global_row(cup, b, S, t));
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: cannot build the host test driver of csrc/cuda/attention_rules.cuh")
    d = tmp_path_factory.mktemp("cuda_helpers")
    src, exe = d / "driver.cpp", d / "driver"
    src.write_text(DRIVER)
    build = subprocess.run([gxx, "-std=c++17", "-O1", "-Wall", "-x", "c++", "-I", HEADER_DIR, str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr

    def run(text: str) -> list[str]:
        res = subprocess.run([str(exe)], input=text, check=True, capture_output=True, text=True)
        return res.stdout.split("\n")

    return run


def test_philox_and_dropout_keep_match_reference(driver):
    rng = random.Random(0)
    cases = []
    for _ in range(300):
        seed = rng.getrandbits(64) if rng.random() < 0.8 else rng.getrandbits(20)
        p = rng.choice([0.0, 1e-9, 0.1, 0.5, 0.9, 1 - 1e-9])
        h, n_rows, ks = rng.randrange(16), rng.randrange(1, 5000), rng.randrange(1, 600)
        row, key = rng.randrange(n_rows), rng.randrange(ks)
        off = rng.getrandbits(63) if rng.random() < 0.5 else rng.getrandbits(20)
        cases.append((seed, off, p, h, n_rows, row, ks, key))
    lines = driver("".join("philox %d %d %r %d %d %d %d %d\n" % c for c in cases))
    for (seed, off, p, h, n_rows, row, ks, key), line in zip(cases, lines):
        *got_words, got_word, got_first, got_keep = map(int, line.split())
        # int64 offsets: the reference takes signed int64 counters.
        offset = torch.tensor([off], dtype=torch.int64)
        assert got_words == [int(w[0]) for w in reference.philox_randint4x(seed, offset)]
        assert got_first == got_words[0]
        assert got_word == int(reference.dropout_random16(seed, offset)[0])
        keep = reference.dropout_keep_mask(seed, p, torch.tensor([[row]]), n_rows, h + 1, ks, key + 1)
        assert got_keep == int(keep[0, h, 0, key])


def test_dropout_threshold_and_scale_match_reference(driver):
    """Every rounding case: ties of p * 2^16 (which round up), the clamps into [1, 65535] near 0
    and 1, and random probabilities; the multiplier the kernels get is the reference's."""
    rng = random.Random(2)
    ps = [0.0, 1e-300, 1e-9, 0.5 / 2**16, 1.5 / 2**16, 1 - 0.5 / 2**16, 1 - 1.5 / 2**16, 1 - 2**-53, 0.1, 0.3]
    ps += [(k + 0.5) / 2**16 for k in rng.sample(range(2**16 - 1), 50)] + [rng.random() for _ in range(200)]
    lines = driver("".join(f"threshold {p!r}\n" for p in ps))
    for p, line in zip(ps, lines):
        threshold, scale = line.split()
        assert int(threshold) == reference.dropout_threshold(p), f"p {p!r}"
        assert float(scale) == reference.dropout_scale(p), f"p {p!r}"


def _mask_cases():
    rng = random.Random(1)
    for _ in range(120):
        S = rng.randrange(1, 40)
        real = [int(rng.random() < rng.choice([0.0, 0.3, 0.9, 1.0])) for _ in range(S)]
        yield S, rng.random() < 0.5, rng.random() < 0.5, rng.choice([1, 4, 16]), rng.choice([1, 8, 16]), real


def test_mask_and_tile_classification_match_reference(driver):
    cases = list(_mask_cases())
    text = "".join(
        "mask %d %d %d %d %d %s\n" % (S, c, e, bm, bn, " ".join(map(str, real))) for S, c, e, bm, bn, real in cases
    )
    lines = driver(text)
    for idx, (S, causal, excl, bm, bn, real) in enumerate(cases):
        want = reference.attention_mask(
            1, S, causal=causal, key_padding_mask=torch.tensor([real], dtype=torch.bool), exclude_self=excl
        )[0, 0]
        got = torch.tensor([int(ch) for ch in lines[2 * idx]], dtype=torch.bool).view(S, S)
        assert torch.equal(got, want), (S, causal, excl, real)
        classes = iter(int(ch) for ch in lines[2 * idx + 1])
        for m0 in range(0, S, bm):
            for n0 in range(0, S + bn, bn):
                cls = next(classes)
                tile = want[m0:m0 + bm, n0:n0 + bn]
                if cls == 0:  # fully allowed: every key of the tile exists and is allowed
                    assert n0 + bn <= S and bool(tile.all()), (S, causal, excl, real, m0, n0)
                elif cls == 2:
                    assert not bool(tile.any()), (S, causal, excl, real, m0, n0)
        # Without padding or exclude_self the classification is exact for interior tiles.
        if all(real) and not excl:
            classes = iter(int(ch) for ch in lines[2 * idx + 1])
            for m0 in range(0, S, bm):
                for n0 in range(0, S + bn, bn):
                    cls = next(classes)
                    tile = want[m0:m0 + bm, n0:n0 + bn]
                    if n0 + bn <= S and bool(tile.all()):
                        assert cls == 0
                    if not bool(tile.any()):
                        assert cls == 2


def test_online_softmax_matches_logsumexp(driver):
    gen = torch.Generator().manual_seed(2)
    cases = []
    for n in [1, 3, 16, 64, 100, 257]:
        for chunk in [1, 7, 16, 64]:
            s = torch.randn(n, generator=gen, dtype=torch.float64) * 4
            kind = len(cases) % 3
            if kind == 1:
                s[torch.rand(n, generator=gen) < 0.5] = -math.inf
            elif kind == 2 and n > 2:
                s[: n // 2] = -math.inf  # the first chunks are empty
            cases.append((s, chunk))
    cases.append((torch.full((10,), -math.inf, dtype=torch.float64), 4))  # fully masked row
    text = "".join("softmax %d %d %s\n" % (len(s), c, " ".join("-inf" if math.isinf(x) else repr(float(torch.tensor(x, dtype=torch.float32))) for x in s.tolist())) for s, c in cases)
    lines = driver(text)
    for (s, _), line in zip(cases, lines):
        lse, inv = map(float, line.split())
        want = float(torch.logsumexp(s.float().double(), 0))
        if math.isinf(want):
            assert lse == -math.inf and inv == 0.0
        else:
            assert abs(lse - want) <= 1e-5 * max(1.0, abs(want))
            # 1 / l with l relative to the running max: exp(m) / exp(lse).
            assert inv > 0.0


def test_row_offsets_padded_and_varlen(driver):
    B, S, H, D = 3, 7, 4, 8
    padded = torch.empty(B, S, H, D)
    lengths = [3, 0, 5]
    cu = [0, 3, 3, 8]
    varlen = torch.empty(8, H, D)
    cases, wants = [], []
    for b in range(B):
        for t in [0, S - 1]:
            for h in [0, H - 1]:
                sb, st, sh, _ = padded.stride()
                cases.append("offset 0 %d %d %d %d %d %d %d %d %s\n" % (B, S, b, t, h, sb, st, sh, " ".join(map(str, cu))))
                wants.append((b * sb + t * st + h * sh, S, b * S + t))
        for t in range(lengths[b]):
            st, sh, _ = varlen.stride()
            cases.append("offset 1 %d %d %d %d %d %d %d %d %s\n" % (B, 8, b, t, 1, 0, st, sh, " ".join(map(str, cu))))
            wants.append(((cu[b] + t) * st + sh, lengths[b], cu[b] + t))
    lines = driver("".join(cases))
    for want, line in zip(wants, lines):
        assert tuple(map(int, line.split())) == want
