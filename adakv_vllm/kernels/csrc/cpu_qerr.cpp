// The store's per-step quantization-error feature, fused: for every row of y, the relative L2 error
// ||y - q_p(y)|| / max(||y||, 1e-6) at each precision p, with the page quantizer (asymmetric
// round-to-nearest per group, fp16 min rounded down and fp16 scale rounded up, widened once more
// when min + scale * top falls short of the max: cpu_quant.h, shared with the page encoder).
// Oracle: quant/reference.py::relative_errors, which computes the same thing with ~8 full-size
// torch temporaries per precision; here one pass per row keeps the group in registers (~10x less
// time for a 512-token prefill step).
//
// The caller clamps and rotates y (a GEMM torch does well); this file does the rest. Products are
// not contracted into FMAs (fp-contract=off), so every step rounds as the oracle's torch ops do.

#include <omp.h>

#include <cmath>
#include <cstdint>

#include "cpu_quant.h"

namespace {

constexpr int kMaxPrecisions = 8;
constexpr int64_t kMaxGroup = 512;
constexpr int kLanes = 16;

// Sum of v[0, n) in a fixed order: kLanes running partial sums, folded pairwise (16 -> 8 -> 4 ->
// 2 -> 1), then any tail. Without -ffast-math a plain `s += v[i]` loop is one serial chain the
// compiler may not reorder; this order vectorises, and is just as deterministic.
ADAKV_EXACT float lane_sum(const float* v, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += v[i + j];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) part[j] += part[j + width];
  float s = part[0];
  for (; i < n; ++i) s += v[i];
  return s;
}

ADAKV_EXACT void row_errors(const float* y, int64_t d, int64_t group, const int64_t* tops, int num_p, float* out) {
  float err2[kMaxPrecisions] = {};
  float sq[kMaxGroup];  // per-element squares of one group, summed by lane_sum
  float norm2 = 0.f;
  for (int64_t g0 = 0; g0 < d; g0 += group) {
    const float* x = y + g0;
    float lo = x[0], hi = x[0];
    for (int64_t i = 0; i < group; ++i) sq[i] = x[i] * x[i];
    for (int64_t i = 0; i < group; ++i) {  // min/max are exact: any order gives the same result
      lo = x[i] < lo ? x[i] : lo;
      hi = x[i] > hi ? x[i] : hi;
    }
    norm2 += lane_sum(sq, group);
    const float low = static_cast<float>(adakv::group_min(lo));
    for (int p = 0; p < num_p; ++p) {
      const float top = static_cast<float>(tops[p]);
      const float scale = static_cast<float>(adakv::group_scale(hi, low, top));
      const float safe = scale > 0.f ? scale : 1.f;
      for (int64_t i = 0; i < group; ++i) {
        const float e = adakv::group_code(x[i], low, safe, top) * scale + low - x[i];
        sq[i] = e * e;
      }
      err2[p] += lane_sum(sq, group);
    }
  }
  const float norm = std::fmax(std::sqrt(norm2), 1e-6f);
  for (int p = 0; p < num_p; ++p) out[p] = std::sqrt(err2[p]) / norm;
}

}  // namespace

extern "C" {

// y: [rows, d] fp32 contiguous; tops: [num_p] (2**bits - 1); out: [rows, num_p] fp32.
// Returns 0, or 1 on inconsistent arguments.
int adakv_relative_errors(const float* y, int64_t rows, int64_t d, int64_t group, const int64_t* tops,
                          int64_t num_p, float* out, int64_t num_threads) {
  if (rows < 0 || d <= 0 || group <= 0 || group > kMaxGroup || d % group || num_p <= 0 ||
      num_p > kMaxPrecisions)
    return 1;
  const int team = static_cast<int>(num_threads > 0 ? num_threads : 1);
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t r = 0; r < rows; ++r) row_errors(y + r * d, d, group, tops, static_cast<int>(num_p), out + r * num_p);
  return 0;
}

}  // extern "C"
