// Row primitives of the fused CPU attention kernels: exponentials, maxima, dropout keep bits,
// row loads and stores, and the transposes that mirror symmetric score tiles.
#pragma once

#include "attention_gemm.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Row primitives on fp32, vectorised with masked tails so every element takes the same path.

// exp(x) for the backward's softmax arguments (x - lse: at most 0 up to rounding; the forward
// takes exp2_vec), within 1 ulp of the correctly rounded result (measured against double).
// Cody-Waite reduction
// x = n ln2 + r, n = rint(x log2(e)) from one FMA with the 1.5 * 2^23 shifter (its rounding is the
// rint), and exp(r) = 1 + r (1 + r q(r)) with q a degree-4 minimax fit of (exp(r) - 1 - r) / r^2 on
// |r| <= ln2 / 2: 13 vector operations, where at::vec's exp_u20 is cheaper still but its error
// fails flash-attn's rule on fp32 gradients. Results under e^-87 flush to zero, so
// exp(-inf) = 0 exactly and no denormal reaches the products; NaN stays NaN, and large x give
// +inf (+inf itself, which no softmax argument is, gives NaN).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kShifter = 12582912.f;  // 1.5 * 2^23: x + kShifter rounds x to an integer
constexpr float kLn2Hi = 0.693359375f;  // ln 2 in 9 bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpFlush = -87.f;  // e^-87 > FLT_MIN

// c[0] r^(N-1) + c[1] r^(N-2) + ... + c[N-1] by Horner's rule, one FMA per step.
template <size_t N>
inline Vec horner(const Vec& r, const float (&c)[N]) {
  Vec q(c[0]);
  for (size_t i = 1; i < N; ++i) q = at::vec::fmadd(q, r, Vec(c[i]));
  return q;
}

inline Vec exp_poly(const Vec& r) {
  return horner(r, {1.38145988e-3f, 8.36871658e-3f, 4.16683890e-2f, 1.66665211e-1f, 4.99999940e-1f, 1.f, 1.f});
}

#if defined(CPU_CAPABILITY_AVX512)
inline Vec exp_vec(const Vec& x) {
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kShifter)),
                                 _mm512_set1_ps(kShifter));
  const Vec r = at::vec::fmadd(Vec(n), Vec(-kLn2Lo), at::vec::fmadd(Vec(n), Vec(-kLn2Hi), x));
  // 2^n scaling in one instruction; lanes under the flush bound (-inf included: its r is NaN) are
  // zeroed by the mask, NaN lanes compare unordered and stay NaN.
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFlush), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, exp_poly(r), n);
}

#else
// The same reduction and polynomial; 2^n from the shifter's integer bits, for x clamped to
// [-88, ln(FLT_MAX)] so that n + 127 stays in [0, 254].
inline Vec exp_vec(const Vec& x) {
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec xc = at::vec::clamp_max(at::vec::clamp_min(x, Vec(-88.f)), Vec(88.37626f));  // ln(FLT_MAX)
  const Vec t = at::vec::fmadd(xc, Vec(kLog2e), Vec(kShifter));
  const Vec n = t - Vec(kShifter);
  const Vec r = at::vec::fmadd(n, Vec(-kLn2Lo), at::vec::fmadd(n, Vec(-kLn2Hi), xc));
  const IVec biased = at::vec::cast<int32_t>(t) - IVec(0x4B400000 - 127);  // n + 127
  const Vec p = exp_poly(r) * at::vec::cast<float>(biased << IVec(23));
  return Vec::blendv(p, Vec(0.f), xc < Vec(kExpFlush));
}
#endif

// The forward's exponentials are taken in base 2: exp(s - m) = 2^y with y = (s - m) log2(e)
// (exp2_arg), after which the reduction y = n + r, n = rint(y), needs no Cody-Waite step: r = y - n
// is exact. The difference comes first, so the row's max gives y = 0 exactly and no y exceeds 0
// at any magnitude of the scores. (Taking y = s log2(e) - m log2(e) in one FMA saves an operation,
// but the shift m log2(e), rounded on its own, is off by up to half its ulp, which passes 2^7 for
// scores near 1.5e9: 2^y then overflowed to inf, or the whole row flushed to 0.)
//
// y for the scores x and their row's max m, in each lane. log2(e) in two parts: kLog2e alone
// (1.3e-8 relative below it) would take every exponential at a temperature off by that much, and
// the backward's P = exp(s - lse) would then sum to 1 - 1.3e-8 times the row's mean score, a bias
// shared by all of a head's gradient terms (measured: dcoef's error rose from 0.6 to 1.1 of
// flash-attn's bound at 512 tokens).
constexpr float kLog2eLo = 1.925963e-8f;  // log2(e) - kLog2e
inline Vec exp2_arg(const Vec& x, const Vec& m) {
  const Vec d = x - m;
  return at::vec::fmadd(d, Vec(kLog2e), d * Vec(kLog2eLo));
}

// lse[r * stride] of n rows whose exponentials of max m[r] sum to sum[r]: m + log(sum) in double,
// -inf for a row that sums to 0 (no allowed key), a vector of rows per log (one scalar log per row
// had taken 2.4 % of the bf16 forward's samples at 512 tokens).
inline void row_lses(const float* m, const float* sum, int64_t n, float* lse, int64_t stride) {
  using DVec = at::vec::Vectorized<double>;
  constexpr int64_t kLanes = DVec::size();
  alignas(64) double logs[kLanes];
  for (int64_t r0 = 0; r0 < n; r0 += kLanes) {
    const int64_t k = std::min(kLanes, n - r0);
    for (int64_t r = 0; r < kLanes; ++r) logs[r] = r < k ? static_cast<double>(sum[r0 + r]) : 1.0;
    DVec::loadu(logs).log().store(logs);
    for (int64_t r = 0; r < k; ++r) {
      lse[(r0 + r) * stride] = static_cast<float>(static_cast<double>(m[r0 + r]) + logs[r]);
    }
  }
}

// exp(m_old - m_new) for a running sum whose max grows.
inline float rescale_factor(float m_old, float m_new) {
  return static_cast<float>(std::exp(static_cast<double>(m_old) - m_new));
}

// 2^y for y = exp2_arg(..) (at most 0), within 1 ulp of the correctly rounded result (0.80 ulp
// at most, measured against double for every float in [-125, 0]): n = rint(y) from the shifter,
// r = y - n, and 2^r = 1 + r q(r) with q a degree-5 minimax fit of (2^r - 1) / r on |r| <= 1/2 (its
// linear coefficient, ln 2, rounded first and the rest fitted to it). Results under 2^-125 flush
// to zero, so 2^-inf = 0 exactly and no denormal reaches the products; NaN stays NaN. On AVX2, 16
// vector operations per 8 scores (exp2_arg's three included) to 18 for exp_vec(x - m): no clamps,
// no Cody-Waite step, the exponent bias folded into the shifter. An isolated loop of a row's
// exponential pass (load, exponential, sum, store) took 0.77 of exp_vec's time with the argument
// in two FMAs, before it became a difference (0.83 for exp_vec without its clamps).
constexpr float kExp2Flush = -125.f;  // 2^-125 > FLT_MIN, and 2^n stays normal for n >= -126

inline Vec exp2_poly(const Vec& r) {
  return horner(r, {1.532646274e-4f, 1.339080627e-3f, 9.618505836e-3f, 5.550359935e-2f, 2.402264774e-1f,
                    6.931471825e-1f, 1.f});
}

// The same arithmetic in every build (at::vec); AVX-512 only takes the flush mask in its own register.
C10_ALWAYS_INLINE Vec exp2_vec(const Vec& y) {
  using IVec = at::vec::Vectorized<int32_t>;
  // t's low mantissa bits hold n + 127 (plus the shifter's 2^22, which the shift by 23 drops).
  constexpr float kBiasedShifter = kShifter + 127.f;
  const Vec t = y + Vec(kBiasedShifter);
  const Vec r = y - (t - Vec(kBiasedShifter));
  const Vec p = exp2_poly(r) * at::vec::cast<float>(at::vec::cast<int32_t>(t) << IVec(23));
#if defined(CPU_CAPABILITY_AVX512)
  // The same lanes zeroed as the blend below, from the compare's mask register: at::vec's compare
  // widens its mask to a vector and its blend narrows it back, two more operations per vector.
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_set1_ps(kExp2Flush), _CMP_NLT_UQ), p);
#else
  return Vec::blendv(p, Vec(0.f), y < Vec(kExp2Flush));
#endif
}

// One exponential per score for both roles of a symmetric score tile: a score s of row r and
// column c gives exp(s - m_c) = exp(s - m_r) * exp(m_r - hi) / exp(m_c - hi), a factor per row and
// one per column, with hi the greatest of the tile's m. Taken only where the m lie within
// kSharedSpread of each other: an exponential that the row's side flushes (y < -125 in base 2,
// below e^-86.6) is then below e^-(86.6 - kSharedSpread) on the column's side, far under an fp32
// ulp of that column's sum (or of its probabilities' sum, 1), and the factors stay normal. Column
// values under FLT_MIN stay denormal where their own exponential would flush them; only scores
// over 87 below their column's m reach them.
constexpr float kSharedSpread = 40.f;

// out[k] = exp(m[k] - hi), or its reciprocal where invert, for k < n (out may be m).
void spread_factors(const float* m, int64_t n, float hi, bool invert, float* out) {
  const Vec vhi(hi);
  for (int64_t k = 0; k < n; k += kVec) {
    const int64_t count = std::min(kVec, n - k);
    const Vec e = exp2_vec(exp2_arg(Vec::loadu(m + k, count), vhi));
    (invert ? Vec(1.f) / e : e).store(out + k, count);
  }
}

// Lane-wise max(a, x) for a running maximum a: one instruction where the ISA has one. A NaN in x
// may be dropped (vmaxps returns its second operand, a, when either is NaN): the exponentials of
// those scores carry the NaN into the row's sum instead.
inline Vec max_running(const Vec& a, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(x, a);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(x, a);
#else
  return at::vec::maximum(a, x);
#endif
}

// max(a, b) that keeps a NaN from either side (std::max keeps its first argument against NaN).
inline float max_nan(float a, float b) { return std::isnan(a) || a > b ? a : b; }

// The maximum of x[0, n): -inf for none, NaN where the NaN-less maximum is -inf but x holds NaN
// (where it is finite, the NaN reaches the row's sum of exponentials).
float row_max(const float* x, int64_t n) {
  // Four independent maxima: one would wait on the latency of each max before the next.
  Vec acc[4] = {Vec(kNegInf), Vec(kNegInf), Vec(kNegInf), Vec(kNegInf)};
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    for (int u = 0; u < 4; ++u) acc[u] = max_running(acc[u], Vec::loadu(x + j + u * kVec));
  }
  for (; j + kVec <= n; j += kVec) acc[0] = max_running(acc[0], Vec::loadu(x + j));
  if (j < n) acc[1] = max_running(acc[1], Vec::set(Vec(kNegInf), Vec::loadu(x + j, n - j), n - j));
  const Vec m = max_running(max_running(acc[0], acc[1]), max_running(acc[2], acc[3]));
  const float out = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return max_running(a, b); }, m);
  if (out == kNegInf && std::any_of(x, x + n, [](float v) { return std::isnan(v); })) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  return out;
}

// A row's dropout multipliers as keep bits (draw_keep_bits): scale where bit j is set, else 0.
struct KeepBits {
  const uint64_t* bits;
  float scale;
};

// x times the dropout multipliers of elements [j, j + kVec), j a multiple of kVec: the bits
// select lanes, no multiplier row is stored.
Vec apply_keep(const Vec& x, const KeepBits& keep, int64_t j) {
  const uint64_t lanes = keep.bits[j / 64] >> (j % 64);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(lanes), x, _mm512_set1_ps(keep.scale));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_and_ps(keep_lanes(lanes), _mm256_mul_ps(x, _mm256_set1_ps(keep.scale)));
#else
  alignas(64) float multiplier[kVec];
  for (int64_t i = 0; i < kVec; ++i) multiplier[i] = (lanes >> i) & 1 ? keep.scale : 0.f;
  return x * Vec::loadu(multiplier);
#endif
}

#if defined(SYMATTN_BF16_PAIRS_ON_AVX2)
// The check build (isa.h) checks the bf16 data path, not this approximation: the fp32 one.
inline Vec exp2_for_bf16(const Vec& x) { return exp2_vec(x); }
#elif defined(SYMATTN_BF16_DOT)
// 2^x for x <= 0 (or NaN), within 3e-6 relative (measured against double): x = n + r with
// n = round(x), a degree-4 polynomial of r in [-1/2, 1/2] fitted to 2^r with p(0) = 1, and
// vscalefps for 2^n. Only for probabilities about to be rounded to bf16 (half an ulp is 2e-3),
// whose row sums stay fp32: about half of exp_vec's operations. Inputs below -200 (masked scores
// are -inf) give 2^-200 = +0 exactly; NaN stays NaN (vmaxps returns its second operand).
inline Vec exp2_for_bf16(const Vec& x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.f), static_cast<__m512>(x));
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.582818e-3f), r, _mm512_set1_ps(5.590637e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4024099e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931242e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return Vec(_mm512_scalef_ps(p, n));
}
#endif

// dst[j] = exp(x[j] - shift) in base 2 (2^exp2_arg), times the dropout multiplier where keep is
// given, for j < n, as fp32 (dst may be x) or bf16; returns the sum of the exponentials, whose lse
// is row_lses(shift, sum). For bf16 (which the products see rounded anyway) the exponentials come
// from exp2_for_bf16.
template <typename Word>
float exp_sum_store(const float* x, int64_t n, float shift, const KeepBits* keep, Word* dst) {
  const Vec vshift(shift);
  auto exp_shifted = [&](const Vec& v) {
#if defined(SYMATTN_BF16_DOT)
    if constexpr (std::is_same_v<Word, uint32_t>) return exp2_for_bf16(exp2_arg(v, vshift));
#endif
    return exp2_vec(exp2_arg(v, vshift));
  };
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    Vec e = exp_shifted(Vec::loadu(x + j));
    acc = acc + e;
    if (keep != nullptr) e = apply_keep(e, *keep, j);
    store_elems(dst, j, e, kVec);
  }
  if (j < n) {
    Vec e = Vec::set(Vec(0.f), exp_shifted(Vec::loadu(x + j, n - j)), n - j);
    acc = acc + e;
    if (keep != nullptr) e = apply_keep(e, *keep, j);
    store_elems(dst, j, e, n - j);
  }
  return at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
}

void scale_inplace(float* x, int64_t n, float s) {
  const Vec vs(s);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) * vs).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) * vs).store(x + j, n - j);
}

// x[j] = -inf where bias[j] is -inf (a padded key; bias holds 0 elsewhere), whatever x[j] holds:
// adding the bias would turn a score that overflowed to +inf (a padded row of huge finite
// values against itself) into NaN.
void mask_inplace(float* x, const float* bias, int64_t n) {
  const Vec neg_inf(kNegInf), zero(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    Vec::blendv(Vec::loadu(x + j), neg_inf, Vec::loadu(bias + j) != zero).store(x + j);
  }
  if (j < n) Vec::blendv(Vec::loadu(x + j, n - j), neg_inf, Vec::loadu(bias + j, n - j) != zero).store(x + j, n - j);
}

void add_inplace(float* x, const float* y, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) + Vec::loadu(y + j)).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) + Vec::loadu(y + j, n - j)).store(x + j, n - j);
}

void fill(float* x, int64_t n, float value) { std::fill(x, x + n, value); }

// Asks for rows [0, rows) of a strided panel up front: a head's rows sit a whole token apart in
// memory, and requesting them all at once overlaps the cache misses its first pass would
// otherwise take one row at a time.
void prefetch_rows(const void* data, int64_t row_stride_bytes, int64_t rows, int64_t row_bytes) {
#if defined(__GNUC__)
  const char* base = static_cast<const char*>(data);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t x = 0; x < row_bytes; x += 64) __builtin_prefetch(base + i * row_stride_bytes + x, 0, 3);
  }
#endif
}

template <typename T>
void store_row(T* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[j] = src[j] * s as T, for j < n: the same values as scale_inplace then store_row, in one
// pass.
template <typename T>
void store_row_scaled(T* dst, const float* src, int64_t n, float s) {
  const Vec vs(s);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) (Vec::loadu(src + j) * vs).store(dst + j);
    if (j < n) (Vec::loadu(src + j, n - j) * vs).store(dst + j, n - j);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * kVec, "a vector of T holds two of float");
    for (; j + 2 * kVec <= n; j += 2 * kVec) {
      at::vec::convert_from_float<T>(Vec::loadu(src + j) * vs, Vec::loadu(src + j + kVec) * vs).store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * s);
  }
}

template <typename T>
void load_row(float* dst, const T* src, int64_t n);

// res[j] = exact - rounded[j], rounded to T, for j < n <= kMaxHeadDim: what storing exact as T
// lost (exact in fp32 for bf16 / fp16, whose rounding error has fewer significant bits).
constexpr int64_t kMaxHeadDim = 256;
template <typename T>
void store_residual(T* res, const float* exact, const T* rounded, int64_t n) {
  alignas(64) float lost[kMaxHeadDim];
  load_row(lost, rounded, n);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(exact + j) - Vec::loadu(lost + j)).store(lost + j);
  if (j < n) (Vec::loadu(exact + j, n - j) - Vec::loadu(lost + j, n - j)).store(lost + j, n - j);
  store_row(res, lost, n);
}

template <typename T>
void load_row(float* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      Vec x;
      at::vec::load_to_float<T>(src + j, x);
      x.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst [rows, n] at row stride ldd <- src [rows, n] at row stride ld, widened to fp32.
template <typename T>
void load_rows(float* dst, int64_t ldd, const T* src, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) load_row(dst + i * ldd, src + i * ld, n);
}

// kVec elements of src (count of them, zeros after) widened to fp32.
template <typename T>
Vec load_float(const T* src, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(src, count);
  } else {
    if (count >= kVec) {
      Vec x;
      at::vec::load_to_float<T>(src, x);
      return x;
    }
    float tail[kVec] = {};
    for (int64_t j = 0; j < count; ++j) tail[j] = static_cast<float>(src[j]);
    return Vec::loadu(tail);
  }
}

// sum_j a[j] * b[j] in fp32, vector lanes first (a fixed order).
template <typename T>
float dot_row(const T* a, const T* b, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    acc = at::vec::fmadd(load_float(a + j, count), load_float(b + j, count), acc);
  }
  return at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
}

// Whether x[0, n) holds neither NaN nor Inf (x * 0 is NaN exactly for those).
template <typename T>
bool finite_row(const T* x, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kVec) acc = at::vec::fmadd(load_float(x + j, std::min(kVec, n - j)), Vec(0.f), acc);
  return !std::isnan(at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc));
}

#if defined(CPU_CAPABILITY_AVX512)
// GCC's unpack and shuffle intrinsics start from a self-initialised undefined vector, which -Wall
// reports as uninitialized where they are inlined (as in philox_vec.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// a[j] <- column j of the 16 x 16 block whose rows a holds, in registers: 32-bit, then 64-bit
// elements of row pairs interleaved, then 128-bit lanes of row quads, then of row octets.
// (at::vec's transpose keeps the block in a stack array handed to an out-of-line call.)
C10_ALWAYS_INLINE void transpose16_regs(__m512 a[16]) {
  __m512 b[16];
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  auto lo64 = [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); };
  auto hi64 = [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); };
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 4) {
    a[i] = lo64(b[i], b[i + 2]);
    a[i + 1] = hi64(b[i], b[i + 2]);
    a[i + 2] = lo64(b[i + 1], b[i + 3]);
    a[i + 3] = hi64(b[i + 1], b[i + 3]);
  }
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 8) {
    SYMATTN_UNROLL for (int j = 0; j < 4; ++j) {
      b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
      b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
    }
  }
  SYMATTN_UNROLL for (int j = 0; j < 8; ++j) {
    a[j] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0x88);
    a[j + 8] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0xdd);
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for a whole 16 x 16 block.
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 a[16];
  SYMATTN_UNROLL for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * ld_src);
  transpose16_regs(a);
  SYMATTN_UNROLL for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * ld_dst, a[j]);
}

// lower <- lower + upper^T and upper <- lower^T (the new lower) for two 16 x 16 blocks of one
// matrix, in one pass through registers; lower == upper (a diagonal block) is allowed.
inline void add_transpose16(float* lower, float* upper, int64_t ld) {
  __m512 a[16];
  SYMATTN_UNROLL for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(upper + i * ld);
  transpose16_regs(a);
  SYMATTN_UNROLL for (int i = 0; i < 16; ++i) {
    a[i] = _mm512_add_ps(_mm512_loadu_ps(lower + i * ld), a[i]);
    _mm512_storeu_ps(lower + i * ld, a[i]);
  }
  transpose16_regs(a);
  SYMATTN_UNROLL for (int j = 0; j < 16; ++j) _mm512_storeu_ps(upper + j * ld, a[j]);
}
#pragma GCC diagnostic pop
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n: register-blocked where at::vec has
// a transpose for this instruction set.
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t m, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kTile = 16;
  for (int64_t i = 0; i < m; i += kTile) {
    for (int64_t j = 0; j < n; j += kTile) {
      if (i + kTile <= m && j + kTile <= n) {
        transpose16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      } else {
        at::vec::transpose_mxn<float>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                      static_cast<int>(std::min(kTile, m - i)), static_cast<int>(std::min(kTile, n - j)));
      }
    }
  }
#else
  constexpr int64_t kTile = 8;
  for (int64_t i = 0; i < m; i += kTile) {
    const int64_t rows = std::min(kTile, m - i);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
    if (rows == kTile) {
      for (; j + kTile <= n; j += kTile) {
        at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      }
    }
#endif
    for (; j < n; ++j) {
      for (int64_t r = 0; r < rows; ++r) dst[j * ld_dst + i + r] = src[(i + r) * ld_src + j];
    }
  }
#endif
}

// Lower tile triangle -> upper: a[j][i] = a[i][j] for tiles (I, J) with J < I.
void mirror_lower_tiles(float* a, int64_t lda, int64_t n) {
  for (int64_t t0 = kSymTile; t0 < n; t0 += kSymTile) {
    transpose(a + t0 * lda, lda, a + t0, lda, std::min(kSymTile, n - t0), t0);
  }
}

// a <- a + a^T over the full [n, n] square, in place; scratch holds kSymTile^2 floats.
void symmetrize(float* a, int64_t lda, int64_t n, float* scratch) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n % 16 == 0) {  // every 16 x 16 block pair in one pass (a diagonal block with itself)
    for (int64_t i = 0; i < n; i += 16) {
      for (int64_t j = 0; j <= i; j += 16) add_transpose16(a + i * lda + j, a + j * lda + i, lda);
    }
    return;
  }
#endif
  for (int64_t t0 = 0; t0 < n; t0 += kSymTile) {
    const int64_t tr = std::min(kSymTile, n - t0);
    for (int64_t u0 = 0; u0 <= t0; u0 += kSymTile) {
      const int64_t ur = std::min(kSymTile, n - u0);
      float* lower = a + t0 * lda + u0;  // tile (I, J), [tr, ur]
      float* upper = a + u0 * lda + t0;  // tile (J, I), [ur, tr]
      transpose(upper, lda, scratch, kSymTile, ur, tr);
      for (int64_t i = 0; i < tr; ++i) add_inplace(lower + i * lda, scratch + i * kSymTile, ur);
      if (u0 != t0) transpose(lower, lda, upper, lda, tr, ur);
    }
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
