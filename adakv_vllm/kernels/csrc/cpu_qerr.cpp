// The store's per-step quantization-error feature, fused: for every row x (one token in one KV head),
// the relative L2 error ||y - q_p(y)|| / max(||y||, 1e-6) at each precision p, where y is the rotated
// row, clamped first (rotation.py scales norms by a power of two, so the ratio is the error of the
// stored vector) and q_p is the page quantizer (cpu_quant.h, shared with the page encoder: the same
// rotation by butterflies, codebooks and clip search, hence the very codes a sealed page stores).
// Oracle: quant/reference.py::relative_errors, which the launcher (cpu.py) completes with the mean
// over heads. The codes and scales are the oracle's; the sums differ by rounding only (the oracle's
// norms sum in fp32, here in fp64, the errors as the clip search measured them: quantize_group).

#include <omp.h>

#include <cmath>
#include <cstdint>

#include "cpu_quant.h"

namespace {

constexpr int kMaxPrecisions = adakv::kQuantizedCodes;
constexpr int kMaxHeadSize = 256;

enum Status { kOk = 0, kBadArgs = 1, kNonFinite = 5, kTooLarge = 6 };  // as cpu_seal.cpp's
// Value errors as bit flags: a NaN anywhere wins, as the oracle checks the whole batch for NaN first.
enum ValueError { kFine = 0, kHasNaN = 1, kHasTooLarge = 2 };

// Mirror of library.py's QerrArgs, field by field.
struct QerrArgs {
  const adakv::Codebooks* codebooks;  // cpu.py: codebooks (quant/levels.py's tables)
  const void* x;                      // [rows, head_size], contiguous, in dtype
  int64_t dtype, rows, head_size, group_size;
  int64_t rotate_shift, hadamard_log2;  // rotation.scale_exponents(head_size)
  const int64_t* codes;                 // [num_precisions] quantized precision codes
  const int64_t* bits;                  // [num_precisions] their bits
  int64_t num_precisions;
  double quantized_abs;  // reference.MAX_QUANTIZED_ABS: inputs are clamped to it
  double rotated_abs;    // reference.MAX_ROTATED_ABS: a larger rotated value is an error
  float* out;            // [rows, num_precisions]
  int64_t num_threads;
};

// One row: out[p] for every precision; returns the ValueError flag of a value the oracle refuses. As
// the oracle clamps before it checks, an inf is clamped (and may then rotate out of range); a NaN is
// an error.
int row_errors(const QerrArgs& a, int64_t r) {
  const int d = static_cast<int>(a.head_size), g_size = static_cast<int>(a.group_size);
  alignas(64) float y[kMaxHeadSize];
  adakv::widen(a.dtype, a.x, r * a.head_size, static_cast<int>(a.head_size), y);
  const float limit = static_cast<float>(a.quantized_abs);
  int nan = 0;
  for (int i = 0; i < d; ++i) {
    nan |= std::isnan(y[i]);
    y[i] = y[i] > limit ? limit : (y[i] < -limit ? -limit : y[i]);  // torch.clamp
  }
  if (nan) return kHasNaN;
  adakv::fwht(y, d, static_cast<int>(a.hadamard_log2));
  adakv::scale_pow2(y, d, -static_cast<int>(a.rotate_shift));
  const float rotated_abs = static_cast<float>(a.rotated_abs);
  double part[8] = {};  // the norm, in 8 interleaved partial sums
  int too_large = 0;
  for (int i = 0; i < d; i += 8)
    for (int j = 0; j < 8; ++j) {
      too_large |= std::fabs(y[i + j]) > rotated_abs;
      part[j] += static_cast<double>(y[i + j]) * y[i + j];
    }
  if (too_large) return kHasTooLarge;
  double norm2 = 0.0;
  for (double p : part) norm2 += p;
  const float norm = std::fmax(static_cast<float>(std::sqrt(norm2)), 1e-6f);
  for (int p = 0; p < a.num_precisions; ++p) {
    const adakv::Codebook& cb = a.codebooks->code[a.codes[p]];
    double err2 = 0.0;
    for (int g0 = 0; g0 < d; g0 += g_size) {
      double group_err2;
      adakv::quantize_group(y + g0, g_size, cb, nullptr, &group_err2);
      err2 += group_err2;
    }
    a.out[r * a.num_precisions + p] = static_cast<float>(std::sqrt(err2)) / norm;
  }
  return kFine;
}

int relative_errors(const QerrArgs& a) {
  if (!a.codebooks || a.rows < 0 || a.head_size <= 0 || a.head_size > kMaxHeadSize || a.head_size % 16 ||
      a.group_size < 16 || a.group_size % 16 || a.head_size % a.group_size || a.hadamard_log2 < 4 ||
      a.head_size % (int64_t{1} << a.hadamard_log2) || a.num_precisions <= 0 || a.num_precisions > kMaxPrecisions ||
      (a.dtype != adakv::kF32 && a.dtype != adakv::kBF16 && a.dtype != adakv::kF16))
    return kBadArgs;
  for (int64_t p = 0; p < a.num_precisions; ++p)
    if (a.codes[p] < 0 || a.codes[p] >= adakv::kQuantizedCodes ||
        !adakv::codebook_ok(a.codebooks->code[a.codes[p]], a.bits[p]))
      return kBadArgs;
  const int team = static_cast<int>(a.num_threads > 0 ? a.num_threads : 1);
  int errors = kFine;
#pragma omp parallel for num_threads(team) schedule(static) reduction(| : errors)
  for (int64_t r = 0; r < a.rows; ++r) errors |= row_errors(a, r);
  return errors & kHasNaN ? kNonFinite : (errors & kHasTooLarge ? kTooLarge : kOk);
}

}  // namespace

extern "C" {

// 0 = ok; 1 = inconsistent arguments; 5 = a NaN; 6 = a rotated value beyond rotated_abs.
int adakv_relative_errors(const QerrArgs* args) { return relative_errors(*args); }

int64_t adakv_qerr_args_size() { return static_cast<int64_t>(sizeof(QerrArgs)); }

}  // extern "C"
