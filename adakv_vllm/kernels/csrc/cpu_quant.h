// The page quantizer, step for step as the oracle (quant/reference.py) rounds it; shared by
// cpu_seal.cpp (the page encoder) and cpu_qerr.cpp (the error feature). The decode kernel reads the
// same Codebooks and uses fwht() to rotate its query and its value accumulator.
//
//   y = FWHT(clamp(x)) * 2**-k            exact butterflies (rotation.py), then a power of two
//   per group of group_size elements of y, a = max |y|:
//     for f in CLIP_FACTORS (in order): s = fp16_rne(fp32(a * f) / top level)
//       code_i = #{THRESHOLDS < fp32(y_i / s)};  err = sum_i (y_i - fp32(LEVELS[code_i] * s))^2
//       in fp64, in element order;  the least err wins, the earliest f on ties (strict <)
//     no f with s > 0 (a == 0, or a scale that rounds to 0): scale 0 and zero_code everywhere
//   codes: a little-endian bit stream, element i at bits [i*bits, (i+1)*bits) (format.py)
//
// How this file gets the same bits faster than the oracle's 13 passes over torch tensors:
//   * codes: a branchless binary search over the <= 16-entry codebooks held in one register (the
//     8-bit grid: an interpolation guess corrected against its table), and y / s as Markstein's
//     FMA-corrected product with 1 / s -- the correctly rounded quotient, checked where it could
//     underflow (quotient());
//   * the clip search (search_clip_factors): every candidate's error in fp32 first, one lane per
//     element, from the codes of |y| in the codebook's positive half found with y * (1 / s) (a
//     symmetric codebook: the same squared errors, but for rounding where y / s sits on a
//     threshold); when the best is ahead of the rest by more than that sum's error bound, it is the
//     oracle's winner. Near-ties (rare) are decided by the oracle's own arithmetic: fp64, element
//     order, one lane per clip factor, each lane its own sequential sum (exact_errors).
// Every other fp32 step is one IEEE-rounded operation as in torch: the library builds with
// -ffp-contract=off, so no product is contracted into an FMA behind the source's back.
//
// The tables (quant/levels.py) arrive from cpu.py as fp32 numbers in `Codebooks`: this file holds no
// level, threshold or clip factor of its own. Header-only and free of torch headers (cpu.py: build time).

#pragma once

#if defined(__AVX512F__) || defined(__BMI2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace adakv {

constexpr int kQuantizedCodes = 4;  // precision codes 0..3: 2, 3, 4, 8 bits
constexpr int kMaxLevels = 256;
constexpr int kMaxClipFactors = 16;  // one SIMD lane each
constexpr int kLaneLevels = 16;      // codebooks up to this size live in one register
constexpr int kPruneBatch = 4;       // clip candidates measured between two tests of the bound

// One quantized precision's codebook. Mirror: library.py's Codebook, field by field.
struct Codebook {
  int64_t num_levels, num_clip_factors, zero_code;
  float levels[kMaxLevels];              // LEVELS[bits], ascending; padded with zeros
  float thresholds[kMaxLevels];          // THRESHOLDS[bits] (num_levels - 1 of them); padded with +inf
  float clip_factors[kMaxClipFactors];   // CLIP_FACTORS[bits], in search order
};

struct Codebooks {
  Codebook code[kQuantizedCodes];  // by precision code
};

// What the clip search's fp32 pass (approximate_errors) assumes of a codebook: symmetric (level j ==
// -level[n-1-j], threshold j == -threshold[n-2-j]), 0 its middle threshold, and every positive
// threshold t normal and within 16 level gaps g of zero (t <= 16 g: then reading y / s a few ulps
// off moves a squared error by at most 2**-15 of itself; quant/levels.py's tables: t <= 4.1 g).
inline bool symmetric_search_ok(const Codebook& cb) {
  const int n = static_cast<int>(cb.num_levels), half = n / 2;
  if (n < 2 || n % 2 || cb.thresholds[half - 1] != 0.f) return false;
  for (int j = 0; j < n; ++j) {
    if (!(cb.levels[j] == -cb.levels[n - 1 - j]) || (j > 0 && !(cb.levels[j - 1] < cb.levels[j]))) return false;
    if (j < n - 1 && !(cb.thresholds[j] == -cb.thresholds[n - 2 - j])) return false;
  }
  for (int j = half; j < n - 1; ++j) {
    const float t = cb.thresholds[j], gap = cb.levels[j + 1] - cb.levels[j];
    if (!(t >= 0x1p-64f && t <= 16.f * gap)) return false;
  }
  return true;
}

// What this file assumes of the tables (cpu.py: codebooks checks the same): 2**bits levels, 1..16
// clip factors, and a clip search only over symmetric codebooks of <= 16 levels.
inline bool codebook_ok(const Codebook& cb, int bits) {
  return bits >= 1 && bits <= 8 && cb.num_levels == (int64_t{1} << bits) && cb.num_clip_factors >= 1 &&
         cb.num_clip_factors <= kMaxClipFactors &&
         (cb.num_clip_factors == 1 || (cb.num_levels <= kLaneLevels && symmetric_search_ok(cb))) &&
         cb.zero_code >= 0 && cb.zero_code < cb.num_levels;
}

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline v8d splat(double x) { return v8d{x, x, x, x, x, x, x, x}; }
inline v16f abs16(v16f x) { return reinterpret_cast<v16f>(reinterpret_cast<v16i>(x) & 0x7FFFFFFF); }

// The sum and the max of the 16 lanes, by halving (lanes j and j + 8, then j and j + 4, ...).
inline float sum16(v16f v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return v[0] + v[1];
}

inline float max16(v16f v) {
  v16f w = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = w > v ? w : v;
  w = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  v = w > v ? w : v;
  w = __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  v = w > v ? w : v;
  return std::fmax(v[0], v[1]);
}

// ---- rotation ---------------------------------------------------------------------------------

// One butterfly stage of span H < 16 inside a vector: lane i (bit H clear) -> v[i] + v[i + H], lane
// i + H -> v[i] - v[i + H], the very operations of rotation.fwht.
template <int H>
inline v16f butterfly(v16f v) {
  constexpr v16i swap = {0 ^ H, 1 ^ H, 2 ^ H, 3 ^ H, 4 ^ H, 5 ^ H, 6 ^ H, 7 ^ H,
                         8 ^ H, 9 ^ H, 10 ^ H, 11 ^ H, 12 ^ H, 13 ^ H, 14 ^ H, 15 ^ H};
  constexpr v16i upper = {0 & H, 1 & H, 2 & H, 3 & H, 4 & H, 5 & H, 6 & H, 7 & H,
                          8 & H, 9 & H, 10 & H, 11 & H, 12 & H, 13 & H, 14 & H, 15 & H};
  const v16f p = __builtin_shuffle(v, swap);
  return upper != 0 ? p - v : v + p;
}

// rotation.fwht in place: x: [d] fp32, blocks of 2**log2_block channels (>= 16: d is a multiple of 16).
inline void fwht(float* x, int d, int log2_block) {
  for (int c = 0; c < d; c += 16)
    store16(x + c, butterfly<8>(butterfly<4>(butterfly<2>(butterfly<1>(load16(x + c))))));
  for (int h = 16; h < (1 << log2_block); h *= 2)
    for (int run = 0; run < d; run += 2 * h)
      for (int i = run; i < run + h; i += 16) {
        const v16f a = load16(x + i), b = load16(x + i + h);
        store16(x + i, a + b);
        store16(x + i + h, a - b);
      }
}

// x *= 2**shift, exactly (a power of two), over d elements.
inline void scale_pow2(float* x, int d, int shift) {
  const float f = std::ldexp(1.0f, shift);
  for (int i = 0; i < d; ++i) x[i] *= f;
}

// ---- codes ------------------------------------------------------------------------------------

// #{thresholds < r} per lane for a codebook of <= 16 levels: a branchless binary search over its
// num_levels - 1 sorted thresholds. The pivots of each step come from the thresholds shifted by
// step - 1, so that a step is one permute, one compare and one masked add.
struct LaneSearch {
  int num_levels;
  float first;     // the first step's pivot, thresholds[num_levels / 2 - 1]
  v16f pivots[3];  // step num_levels / 4, / 8, ...: pivots[k][j] = thresholds[j + step - 1]
  explicit LaneSearch(const Codebook& cb) : LaneSearch(cb.thresholds, static_cast<int>(cb.num_levels)) {}
  // thresholds: levels - 1 ascending values, then +inf (Codebook's padding) up to levels / 4 + 15
  LaneSearch(const float* thresholds, int levels) : num_levels(levels) {
    first = thresholds[num_levels / 2 - 1];
    int k = 0;
    for (int step = num_levels / 4; step >= 1; step /= 2, ++k)  // codebook_ok: <= 16 levels, 3 steps
      for (int j = 0; j < 16; ++j) pivots[k][j] = thresholds[j + step - 1];
  }
  // kLevels: num_levels when known at compile time (the loop unrolls), else 0.
  template <int kLevels = 0>
  v16i count(v16f r) const {
    const int n = kLevels ? kLevels : num_levels;
    v16i c = (splat(first) < r) & (n / 2);
    int k = 0;
    for (int step = n / 4; step >= 1; step /= 2, ++k) c = __builtin_shuffle(pivots[k], c) < r ? c + step : c;
    return c;
  }
};

inline v16f gather16(const float* table, v16i index) {
#ifdef __AVX512F__
  return reinterpret_cast<v16f>(_mm512_i32gather_ps(reinterpret_cast<__m512i>(index), table, 4));
#else
  v16f out;
  for (int i = 0; i < 16; ++i) out[i] = table[index[i]];
  return out;
#endif
}

inline bool any16(v16i mask) {
#ifdef __AVX512F__
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(mask), reinterpret_cast<__m512i>(mask)) != 0;
#else
  for (int i = 0; i < 16; ++i)
    if (mask[i]) return true;
  return false;
#endif
}

// #{thresholds < r} per lane for any sorted table (the 8-bit codebook's 255): an interpolation guess,
// then correction steps until exact -- none or one for a uniform table such as the 8-bit grid.
struct ThresholdSearch {
  const float* t;
  int n;  // thresholds
  float t0, inv_step;
  explicit ThresholdSearch(const Codebook& cb)
      : t(cb.thresholds), n(static_cast<int>(cb.num_levels) - 1), t0(cb.thresholds[0]),
        inv_step(n > 1 ? static_cast<float>(n - 1) / (cb.thresholds[n - 1] - cb.thresholds[0]) : 0.f) {}
  v16i operator()(v16f r) const {
    v16f guess = (r - t0) * inv_step + 1.f;
    guess = guess > 0.f ? guess : splat(0.f);
    guess = guess < static_cast<float>(n) ? guess : splat(static_cast<float>(n));
    v16i c = __builtin_convertvector(guess, v16i);
    for (;;) {  // up while t[c] < r
      const v16i up = (c < n) & (gather16(t, c < n ? c : n - 1) < r);
      if (!any16(up)) break;
      c -= up;
    }
    for (;;) {  // down while t[c - 1] >= r
      const v16i down = (c > 0) & !(gather16(t, c > 0 ? c - 1 : 0) < r);
      if (!any16(down)) break;
      c += down;
    }
    return c;
  }
};

// codes[i] = #{thresholds < fp32(y[i] / s)} for i < n (n a multiple of 16), s > 0.
template <class Search>
inline void group_codes(const float* y, int n, float s, const Search& search, uint8_t* codes) {
  for (int i = 0; i < n; i += 16) {
    const v16u8 c = __builtin_convertvector(search(load16(y + i) / s), v16u8);
    std::memcpy(codes + i, &c, sizeof c);
  }
}

inline void group_codes(const float* y, int n, float s, const Codebook& cb, uint8_t* codes) {
  if (cb.num_levels <= kLaneLevels)
    group_codes(y, n, s, [lanes = LaneSearch(cb)](v16f q) { return lanes.count(q); }, codes);
  else
    group_codes(y, n, s, ThresholdSearch(cb), codes);
}

// sum_i (y_i - fp32(LEVELS[code_i] * s))^2 in fp64, summed in 8 interleaved partial sums.
inline double group_error(const float* y, const uint8_t* codes, int n, float s, const Codebook& cb) {
  double part[8] = {};
  for (int i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double e = static_cast<double>(y[i + j]) - static_cast<double>(cb.levels[codes[i + j]] * s);
      part[j] += e * e;
    }
  double err = 0.0;
  for (double p : part) err += p;
  return err;
}

inline v16f fma16(v16f a, v16f b, v16f c) {
#ifdef __AVX512F__
  return reinterpret_cast<v16f>(
      _mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#else
  v16f out;
  for (int i = 0; i < 16; ++i) out[i] = std::fma(a[i], b[i], c[i]);
  return out;
#endif
}

// Every lane rounded to fp16 (round to nearest even, as torch's .to(float16)) and back.
inline v16f round_to_half(v16f x) {
#ifdef __AVX512F__
  const __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return reinterpret_cast<v16f>(_mm512_cvtph_ps(h));
#else
  for (int i = 0; i < 16; ++i) x[i] = static_cast<float>(static_cast<_Float16>(x[i]));
  return x;
#endif
}

// v -> fp64 lanes 0..7 and 8..15.
inline void to_double(v16f v, v8d& lo, v8d& hi) {
#ifdef __AVX512F__
  const __m512 x = reinterpret_cast<__m512>(v);
  lo = reinterpret_cast<v8d>(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  hi = reinterpret_cast<v8d>(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
#else
  for (int i = 0; i < 8; ++i) lo[i] = v[i], hi[i] = v[i + 8];
#endif
}

// fp32(y / s) without a division (whose throughput would bound the clip search): Markstein's
// correction of q0 = y * RN(1/s) by the exact residual y - q0 s is the correctly rounded quotient as
// long as no step underflows -- which holds for fp16 scales (2**-24 <= s <= 65504) and
// |y| >= kMinMarkstein, or y == 0 (then the quotient is +-0, which every threshold compares alike).
constexpr float kMinMarkstein = 0x1p-60f;
inline v16f quotient(v16f y, v16f s, v16f inv_s) {
  const v16f q0 = y * inv_s;
  return fma16(fma16(-q0, s, y), inv_s, q0);
}

// A group's candidate scales, one lane per clip factor: fp16(fp32(a * f) / top level), 0 (unusable)
// past the codebook's factors.
struct Candidates {
  v16f s, safe, inv;  // safe: s, or 1 where s == 0; inv = fp32(1 / safe)
  v16i usable;        // s > 0
  int nf;
  Candidates(float a, const Codebook& cb) : nf(static_cast<int>(cb.num_clip_factors)) {
    s = round_to_half(a * load16(cb.clip_factors) / cb.levels[cb.num_levels - 1]);
    usable = s > 0.f;
    safe = usable != 0 ? s : splat(1.f);
    inv = splat(1.f) / safe;
  }
};

// Every candidate's error sum_i (y_i - fp32(LEVELS[code_i] * s))^2, approximately. A symmetric
// codebook (symmetric_search_ok) gives y and -y mirrored codes, so the squared error is that of |y|
// in the positive half, |y| - fp32(LEVELS * s) being exactly the oracle's y - decoded up to sign.
// Its code is searched with |y| * fp32(1 / s) (within 2**-22 of the oracle's rounded quotient, and
// below the first positive threshold whenever it underflows): it differs from the oracle's only
// when that quotient lies within 2**-22 of a threshold t, where the two neighbouring levels are
// nearly equidistant from y and the squared errors differ by at most 4 (t / g) 2**-22 <= 2**-15 of
// the element's own. Summed in fp32 with FMAs, one lane per element: within 2**-15 + (n / 16 + 20)
// 2**-24 of the oracle's error (relative) plus n 2**-149 (absolute). kLevels: the codebook's size
// when known at compile time, else 0.
//
// Pruning: the candidates' scales never grow along the search order, so the error of the elements
// beyond the top level alone -- sum of (|y| - fp32(top * s))^2 over them, their exact error -- is a
// lower bound of a candidate's error that never decreases along the order. Once it exceeds the
// best error measured so far by 2**-12 (far above both sums' rounding), neither that candidate nor
// a later one can win or tie (a tie goes to the earlier one anyway): the pass stops. Candidates are
// measured kPruneBatch at a time, the bound tested between batches only (a test after every one
// serialises them: slower where little is pruned). Returns how many candidates it measured (err[f]
// for f below that); Gaussian 4-bit groups usually stop after the first batch.
template <int kLevels>
inline int approximate_errors(const float* y, int n, const Candidates& c, const Codebook& cb, float* err) {
  const int half = static_cast<int>(cb.num_levels) / 2;
  const LaneSearch search(cb.thresholds + half, half);  // the positive thresholds, then +inf
  const v16f levels = load16(cb.levels + half);         // the positive levels (lanes past them unread)
  const float top = cb.levels[cb.num_levels - 1];
  alignas(64) float ay[kMaxLevels];                     // |y| (n <= 256)
  for (int i = 0; i < n; i += 16) store16(ay + i, abs16(load16(y + i)));
  alignas(64) float s[kMaxClipFactors], inv[kMaxClipFactors];
  int usable[kMaxClipFactors];
  store16(s, c.safe), store16(inv, c.inv);
  for (int f = 0; f < kMaxClipFactors; ++f) usable[f] = c.usable[f] != 0;
  float best = INFINITY;
  for (int f0 = 0; f0 < c.nf; f0 += kPruneBatch) {
    if (f0 > 0 && best < INFINITY) {  // the bound of the batch's first candidate bounds the rest
      const v16f top_s = splat(top * s[f0]);
      v16f acc = {};
      for (int i = 0; i < n; i += 16) {
        const v16f over = load16(ay + i) - top_s;
        const v16f clipped = over > 0.f ? over : splat(0.f);
        acc = fma16(clipped, clipped, acc);
      }
      if (sum16(acc) > best * (1.f + 0x1p-12f) + 0x1p-120f) return f0;
    }
    const int f1 = std::min(f0 + kPruneBatch, static_cast<int>(c.nf));
    for (int f = f0; f < f1; ++f) {  // independent of each other: no test between them
      const v16f invs = splat(inv[f]), decoded = levels * s[f];  // fp32(LEVELS * s), as decoded
      v16f acc = {};
      for (int i = 0; i < n; i += 16) {
        const v16f a = load16(ay + i);
        const v16f e = a - __builtin_shuffle(decoded, search.count<kLevels / 2>(a * invs));
        acc = fma16(e, e, acc);
      }
      err[f] = sum16(acc);
    }
    for (int f = f0; f < f1; ++f)
      if (usable[f]) best = std::min(best, err[f]);
  }
  return c.nf;
}

// Every candidate's error exactly as the oracle computes it: y_i - decoded_i and its square in fp64,
// summed in element order (one lane per clip factor, each lane its own sequential sum).
template <int kLevels, bool kMarkstein>
inline void exact_errors(const float* y, int n, const Candidates& c, const Codebook& cb, double* err) {
  const LaneSearch search(cb);
  const v16f levels = load16(cb.levels);
  double yd[kMaxLevels];  // y in fp64, broadcast from memory below (n <= 256)
  for (int i = 0; i < n; ++i) yd[i] = y[i];
  v8d err_lo = {}, err_hi = {};
  for (int i = 0; i < n; ++i) {
    const v16f q = kMarkstein ? quotient(splat(y[i]), c.safe, c.inv) : splat(y[i]) / c.safe;
    v8d lo, hi;
    to_double(__builtin_shuffle(levels, search.count<kLevels>(q)) * c.s, lo, hi);
    const v8d e_lo = lo - yd[i], e_hi = hi - yd[i];  // the oracle's y - decoded, negated: same square
    err_lo += e_lo * e_lo;
    err_hi += e_hi * e_hi;
  }
  for (int f = 0; f < 8; ++f) err[f] = err_lo[f], err[f + 8] = err_hi[f];
}

// The clip search (codebooks of <= 16 levels): the usable candidate with the least exact error, the
// earliest on ties, or -1 when none is usable; *err: the winner's error (fp32 or exact). The fp32
// errors decide when the best is ahead of every other by more than their error bound (2**-14 of
// the two errors' sum, 2**-120 absolute: above approximate_errors' 2**-15 + (n / 16 + 20) 2**-24
// relative, n 2**-149 absolute), the exact errors otherwise (rarely: near-ties).
// kMarkstein: every nonzero |y| >= kMinMarkstein.
template <int kLevels, bool kMarkstein>
inline int search_clip_factors(const float* y, int n, const Candidates& c, const Codebook& cb, double* err) {
  float approx[kMaxClipFactors];
  const int measured = approximate_errors<kLevels>(y, n, c, cb, approx);  // the rest cannot win
  int best = -1, second = -1;
  for (int f = 0; f < measured; ++f) {
    if (!c.usable[f]) continue;
    if (best < 0 || approx[f] < approx[best])
      second = best, best = f;
    else if (second < 0 || approx[f] < approx[second])
      second = f;
  }
  if (best < 0) return best;
  if (second < 0 || approx[second] - approx[best] > 0x1p-14f * (approx[best] + approx[second]) + 0x1p-120f) {
    *err = approx[best];
    return best;
  }
  double exact[kMaxClipFactors];
  exact_errors<kLevels, kMarkstein>(y, n, c, cb, exact);
  best = -1;
  for (int f = 0; f < c.nf; ++f)
    if (c.usable[f] && (best < 0 || exact[f] < exact[best])) best = f;
  *err = exact[best];
  return best;
}

template <int kLevels>
inline int search_clip_factors(const float* y, int n, const Candidates& c, bool markstein, const Codebook& cb,
                               double* err) {
  return markstein ? search_clip_factors<kLevels, true>(y, n, c, cb, err)
                   : search_clip_factors<kLevels, false>(y, n, c, cb, err);
}

// Quantize one group of a rotated record: y: [n] fp32, finite, |y| <= MAX_ROTATED_ABS (n a multiple
// of 16). Returns the stored fp16 scale and writes codes [n] (unpacked); with err2, also
// sum (y - decoded)^2 (the error feature: as the clip search measured it, else in fp64), and codes
// may then be null.
inline _Float16 quantize_group(const float* y, int n, const Codebook& cb, uint8_t* codes, double* err2) {
  v16f amax = {};
  v16i tiny = {};  // a nonzero |y| below kMinMarkstein
  for (int i = 0; i < n; i += 16) {
    const v16f m = abs16(load16(y + i));
    amax = m > amax ? m : amax;
    tiny |= (m > 0.f) & (m < kMinMarkstein);
  }
  float a = 0.f;  // |y| >= 0 and no NaN: the max in any order
  bool any_tiny = false;
  for (int j = 0; j < 16; ++j) a = std::max(a, amax[j]), any_tiny |= tiny[j] != 0;
  const float top = cb.levels[cb.num_levels - 1];
  _Float16 scale = 0;
  double err = NAN;  // the chosen scale's error, when the search measured it
  if (cb.num_clip_factors == 1) {  // nothing to search: the one candidate, if it is usable
    scale = static_cast<_Float16>((a * cb.clip_factors[0]) / top);
  } else {
    const Candidates c(a, cb);
    int best;
    switch (cb.num_levels) {  // the usual codebooks with their binary search unrolled
      case 4: best = search_clip_factors<4>(y, n, c, !any_tiny, cb, &err); break;
      case 8: best = search_clip_factors<8>(y, n, c, !any_tiny, cb, &err); break;
      case 16: best = search_clip_factors<16>(y, n, c, !any_tiny, cb, &err); break;
      default: best = search_clip_factors<0>(y, n, c, !any_tiny, cb, &err); break;
    }
    if (best >= 0) scale = static_cast<_Float16>(c.s[best]);
  }
  if (!(static_cast<float>(scale) > 0.f)) scale = 0, err = NAN;  // never -0
  if (!codes && !std::isnan(err)) {  // the error feature, and the search measured it already
    *err2 = err;
    return scale;
  }
  alignas(64) uint8_t local[kMaxLevels];  // codes for the error alone (n <= 256)
  uint8_t* out = codes ? codes : local;
  if (scale > 0)
    group_codes(y, n, static_cast<float>(scale), cb, out);
  else
    std::fill(out, out + n, static_cast<uint8_t>(cb.zero_code));
  if (err2) *err2 = std::isnan(err) ? group_error(y, out, n, static_cast<float>(scale), cb) : err;
  return scale;
}

// codes [n] (n a multiple of 8) -> the bit stream: 8 codes fill exactly kBits bytes.
template <int kBits>
inline void pack_codes(const uint8_t* codes, int n, uint8_t* out) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "packed words are stored little-endian");
  for (int i = 0; i < n; i += 8) {
    uint64_t word;
    std::memcpy(&word, codes + i, 8);  // code j in byte j
#ifdef __BMI2__
    word = _pext_u64(word, 0x0101010101010101ull * ((1u << kBits) - 1));  // the low kBits of each byte
#else
    uint64_t packed = 0;
    for (int j = 0; j < 8; ++j) packed |= ((word >> (8 * j)) & ((1u << kBits) - 1)) << (j * kBits);
    word = packed;
#endif
    std::memcpy(out + i / 8 * kBits, &word, kBits);
  }
}

inline void pack_codes(const uint8_t* codes, int n, int bits, uint8_t* out) {
  switch (bits) {
    case 2: pack_codes<2>(codes, n, out); break;
    case 3: pack_codes<3>(codes, n, out); break;
    case 4: pack_codes<4>(codes, n, out); break;
    default: pack_codes<8>(codes, n, out); break;
  }
}

// ---- 16-bit inputs ----------------------------------------------------------------------------

inline uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

// [n] bf16 or fp16 bits -> fp32, exactly.
template <bool kBf16>
inline void to_float(const uint16_t* src, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    if constexpr (kBf16) {
      const uint32_t f = static_cast<uint32_t>(src[i]) << 16;  // bf16 is the top half of an fp32
      std::memcpy(out + i, &f, sizeof f);
    } else {
      _Float16 h;
      std::memcpy(&h, src + i, sizeof h);
      out[i] = static_cast<float>(h);
    }
  }
}

// The dtype codes of library.py's DTYPE_CODES.
enum Dtype : int64_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// out[0..n) = base[index .. index + n) in `dtype` (a Dtype code), widened to fp32 exactly.
inline void widen(int64_t dtype, const void* base, int64_t index, int n, float* out) {
  if (dtype == kF32) {
    std::memcpy(out, static_cast<const float*>(base) + index, sizeof(float) * n);
  } else if (dtype == kBF16) {
    to_float<true>(static_cast<const uint16_t*>(base) + index, n, out);
  } else {
    to_float<false>(static_cast<const uint16_t*>(base) + index, n, out);
  }
}

// The in-block attention measurement's step for one query head (kernels/block_attention.py):
// out[j] += softmax(s[0..n))[j]. tmp (n floats, may be s itself) receives exp(s[j] - max s).
inline void add_softmax(const float* s, int n, float* tmp, float* out) {
  float top = s[0];
  for (int j = 1; j < n; ++j) top = std::fmax(top, s[j]);
  float total = 0.f;
  for (int j = 0; j < n; ++j) total += (tmp[j] = std::exp(s[j] - top));
  for (int j = 0; j < n; ++j) out[j] += tmp[j] / total;
}

}  // namespace adakv
