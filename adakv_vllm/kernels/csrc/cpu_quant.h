// The page quantizer's scalar steps, exactly as the oracle (quant/reference.py::quantize) rounds
// them; shared by cpu_qerr.cpp (the error feature) and cpu_seal.cpp (the page encoder).
//
// Per group of group_size elements with range [lo, hi] and top = 2**bits - 1:
//   min   = lo rounded DOWN to fp16;
//   scale = (hi - min) / top rounded UP to fp16, widened by one more fp16 ulp when the fp32
//           min + scale * top still falls short of hi (so every element lies inside the grid);
//   code  = round-half-even((x - min) / safe), safe = scale > 0 ? scale : 1, clamped to [0, top].
// Every fp32 step is one IEEE-rounded operation as in torch: callers that compute with these
// helpers carry ADAKV_EXACT so that no product is contracted into an FMA (and so that these
// helpers, which carry it too, inline into them: GCC inlines only across equal fp-contract modes).
//
// Header-only and free of torch headers (see cpu.py: build time).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define ADAKV_EXACT __attribute__((optimize("fp-contract=off")))

namespace adakv {

inline uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

inline _Float16 from_bits(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, sizeof h);
  return h;
}

// torch.nextafter(h, +-inf) for a finite fp16 h.
inline _Float16 next_half(_Float16 h, bool up) {
  const uint16_t b = half_bits(h);
  const bool negative = b & 0x8000;
  if ((b & 0x7fff) == 0) return from_bits(up ? 0x0001 : 0x8001);  // +-0 -> smallest subnormal
  return from_bits(negative == up ? b - 1 : b + 1);                // toward zero : away from zero
}

// reference._outward_fp16: v rounded to fp16 so that the result is <= v (down) or >= v (up).
ADAKV_EXACT inline _Float16 outward_half(float v, bool up) {
  _Float16 h = static_cast<_Float16>(v);  // round to nearest even
  const float f = static_cast<float>(h);
  if (up ? f < v : f > v) h = next_half(h, up);
  return h;
}

// The group's stored min: its smallest element rounded down to fp16.
ADAKV_EXACT inline _Float16 group_min(float lo) { return outward_half(lo, false); }

// The group's stored scale for range [min, hi] (min already the stored fp16 min) and top levels.
ADAKV_EXACT inline _Float16 group_scale(float hi, float min, float top) {
  _Float16 scale = outward_half((hi - min) / top, true);
  // fp32 rounding of min + scale * top can still land one ulp short of hi: widen once more.
  if (min + static_cast<float>(scale) * top < hi) scale = next_half(scale, true);
  return scale;
}

// The code of x (as fp32, not yet converted to an integer): safe = scale > 0 ? scale : 1. With
// scale == 0 every element equals min, so the quotient is 0 as the oracle's where(s > 0, ..., 0).
ADAKV_EXACT inline float group_code(float x, float min, float safe, float top) {
  // rint: round half to even in the default rounding mode, as torch.round; inlined (roundps)
  const float code = std::rint((x - min) / safe);
  return code < 0.f ? 0.f : (code > top ? top : code);
}

}  // namespace adakv
