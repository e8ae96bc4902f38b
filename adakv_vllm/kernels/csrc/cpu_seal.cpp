// The page encoder ("seal"), compiled: blocks of 16-bit K/V -> packed mixed-precision pages.
//
// Contract and oracle: kernels/page_codec.py::PageCodec.encode (itself tested against
// quant/reference.py::pack_page); the bytes are identical (one exception below). The layout is
// quant/format.py's, whose sizes arrive in `layout` (cpu.py: layout_numbers); this file applies
// only its documented rules:
//   * page = [bit map: header_bytes][head 0 region][head 1 region]...[zeros up to page_bytes];
//     bit map byte t = key code | value code << 4, padding bytes zero;
//   * a head region holds the key records then the value records, each part ordered by precision
//     code ascending, ties by token position; every region has the same size;
//   * a quantized record is [codes][scales fp16 x G][mins fp16 x G], element j of a code byte at
//     bits [j*bits, (j+1)*bits); a 16-bit record is the storage dtype's bytes verbatim.
// The quantizer is cpu_quant.h's, step for step the oracle's. One difference is left: when a
// group's min (or max) is a zero present with both signs, torch's amin/amax return either sign
// depending on their vector reduction order, and this file's reduction may pick the other; the
// stored fp16 min (or a zero scale) then differs in its sign bit only, and decodes the same.
//
// Inputs are read in place: page i encodes slot slots[i] of key/value ([num_slots, num_tokens,
// num_kv_heads, head_size], e.g. one layer of the store's staging) and is written to row rows[i] of
// `pages` (e.g. one layer of vLLM's KV tensor). With `clamp`, every input is first clamped to
// +-clamp_abs as torch.clamp does (inf -> +-clamp_abs, NaN stays NaN): KVStore.seal's clamp.
//
// Rotation (rotate_keys) stays in torch: quantized key records hold key @ R, and the caller passes
// those rotated rows per precision class, computed exactly as PageCodec.encode computes them (the
// same rows, the same GEMM shape), because torch's matmul may round a row differently depending on
// how many rows share the call. key_rot[c]: [keys of class c * num_kv_heads, head_size] fp32, its
// rows ordered by (page, token, head) -- the order of (key_bits == bits).nonzero().
//
// Work: a serial pass parses every page's bits (codes, class offsets, region size) and checks the
// whole batch -- bits, page budget, source slots, destination rows -- before any byte is written;
// then one OpenMP item per (page, KV head) writes that head's region (head 0 also writes the bit
// map and the zeros around it). A value reference.py refuses to store (NaN/inf, or beyond
// quantizable_abs in a quantized record) is only found while encoding: the call then fails with
// pages partly written (PageCodec.encode raises at that point too, before its pages are stored).
//
// Speed (one thread, SmolLM2 shapes: 3 KV heads x 64, group 32, mixed bits at a 4-bit budget):
// ~12 us per block and layer in this file, where the torch codec spends ~0.28 ms; what remains of
// KVStore.seal is then mostly the rotation GEMMs, which the codec does too (see cpu.py).

#include <omp.h>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_layout.h"
#include "cpu_quant.h"

namespace {

constexpr int kNumCodes = adakv::kPrecisionCodes;  // codes 0..3 = 2/4/8/16 bits (format.py / precision.py)
constexpr int kFp16Code = 3;  // the verbatim 16-bit precision
constexpr int kMaxHeadSize = 256;
constexpr int kMinGroupSize = 16;  // format.SUPPORTED_GROUP_SIZES

enum Status { kOk = 0, kBadArgs = 1, kBadBits = 2, kOverBudget = 3, kBadRows = 4, kNonFinite = 5, kTooLarge = 6 };
// Value errors found while encoding, as bit flags (a NaN/inf wins over an out-of-range value).
enum ValueError { kFinite = 0, kHasNonFinite = 1, kHasTooLarge = 2 };

// Mirror of cpu.py's _SealArgs, field by field.
struct SealArgs {
  int64_t layout[5 + 4 * kNumCodes];  // cpu.py: layout_numbers
  int64_t head_size, num_kv_heads, num_pages, num_tokens;
  const uint16_t* key;    // [num_slots, num_tokens, num_kv_heads, head_size] storage dtype
  const uint16_t* value;  // same
  int64_t num_slots;
  const int64_t* slots;       // [num_pages]: the slot page i encodes; null = 0, 1, ...
  const int64_t* key_bits;    // [num_pages, num_tokens]
  const int64_t* value_bits;  // [num_pages, num_tokens]
  int64_t rotate_keys;
  const float* key_rot[kNumCodes];  // per quantized code: see the header comment; else null
  int64_t key_rot_rows[kNumCodes];  // rows of key_rot[c] (checked against the bits)
  uint8_t* pages;                   // destination rows, each >= page_bytes bytes, contiguous
  int64_t page_stride;              // bytes between consecutive rows
  int64_t num_rows;                 // rows in `pages`
  const int64_t* rows;              // [num_pages]: the row page i is written to; null = 0, 1, ...
  int64_t clamp;                    // clamp inputs to +-clamp_abs first?
  double clamp_abs;                 // exactly representable in the storage dtype (cpu.py checks)
  int64_t clamp_bits[2];            // the storage dtype's bits of +clamp_abs and -clamp_abs
  double quantizable_abs;           // reference.MAX_QUANTIZED_ABS: the largest quantizable |x|
  int64_t num_threads;
};

// Sizes from quant/format.py, never derived here.
struct Layout : adakv::PageNumbers {
  int head_size, num_groups, num_kv_heads, num_tokens;
};

// What the serial pass learns about one page.
struct PagePlan {
  int64_t region;                      // bytes of one head region
  int64_t first_record[2][kNumCodes];  // per part (key, value): where class c starts in a region
  int64_t rot_row[kNumCodes];          // key_rot[c] token row of this page's first class-c key
  const uint16_t* src[2];              // the page's key and value tokens (its slot)
  uint8_t* dst;                        // the page's destination
};

// ---- 16-bit inputs ----------------------------------------------------------------------------

// [n] 16-bit -> fp32, exactly. GCC vectorizes the bf16 shift but not fp16 conversions (it would
// need AVX512-FP16), so fp16 takes F16C's 8-wide instruction where the CPU has it.
template <bool kBf16>
void to_float(const uint16_t* src, int n, float* out) {
  int i = 0;
  if constexpr (kBf16) {
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const uint32_t f = static_cast<uint32_t>(src[j]) << 16;  // bf16 is the top half of an fp32
      std::memcpy(out + j, &f, sizeof f);
    }
    return;
  }
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(adakv::from_bits(src[i]));
}

// torch.clamp(v, -m, m): NaN stays NaN.
inline float clamp_one(float v, float m) { return v > m ? m : (v < -m ? -m : v); }

// [n] 16-bit -> fp32, clamped to +-clamp_abs when asked.
template <bool kBf16>
void widen(const uint16_t* src, const SealArgs& a, int n, float* out) {
  to_float<kBf16>(src, n, out);
  if (!a.clamp) return;
  const float m = static_cast<float>(a.clamp_abs);
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = clamp_one(out[i], m);
}

// A 16-bit record: the (clamped) storage bits verbatim. Returns false on a NaN or inf
// (reference.check_finite): an all-ones exponent.
template <bool kBf16>
bool copy_16(const uint16_t* src, const SealArgs& a, int n, uint8_t* rec) {
  constexpr uint16_t kExponent = kBf16 ? 0x7F80 : 0x7C00;
  alignas(64) uint16_t bits[kMaxHeadSize];
  if (a.clamp) {  // a clamped value is the bound, whose storage bits cpu.py passes
    alignas(64) float v[kMaxHeadSize];
    to_float<kBf16>(src, n, v);
    const float m = static_cast<float>(a.clamp_abs);
    const auto above = static_cast<uint16_t>(a.clamp_bits[0]), below = static_cast<uint16_t>(a.clamp_bits[1]);
#pragma omp simd
    for (int i = 0; i < n; ++i) bits[i] = v[i] > m ? above : (v[i] < -m ? below : src[i]);
    src = bits;
  }
  int non_finite = 0;
#pragma omp simd reduction(| : non_finite)
  for (int i = 0; i < n; ++i) non_finite |= (src[i] & kExponent) == kExponent;
  std::memcpy(rec, src, 2 * static_cast<size_t>(n));
  return !non_finite;
}

// ---- one quantized record -----------------------------------------------------------------------

// x: [head_size] fp32 -> rec: packed codes, then fp16 scales, then fp16 mins (one per group).
// `omp simd` makes the vectorizer take the group loops as they are (reductions included); every
// lane still rounds each step as the oracle does. Returns false on a NaN, an inf or
// |x| > quantizable_abs (reference._check_quantizable); the record is then garbage.
template <int kBits>
ADAKV_EXACT bool encode_quantized(const float* x, const Layout& L, int code, float quantizable_abs, uint8_t* rec) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "packed words are stored little-endian");
  constexpr int kPerWord = 32 / kBits;  // codes per 32-bit word of packed codes
  const float top = static_cast<float>((1 << kBits) - 1);
  const int g_size = L.group_size, num_groups = L.num_groups;
  // 1. every group's range (the groups are independent: their steps overlap in the pipeline)
  float lo[kMaxHeadSize / kMinGroupSize], hi[kMaxHeadSize / kMinGroupSize];
  int bad = 0;
  for (int g = 0; g < num_groups; ++g) {
    const float* xg = x + g * g_size;
    float l = xg[0], h = xg[0];
#pragma omp simd reduction(min : l) reduction(max : h) reduction(| : bad)
    for (int i = 0; i < g_size; ++i) {
      l = xg[i] < l ? xg[i] : l;
      h = xg[i] > h ? xg[i] : h;
      bad |= !(std::fabs(xg[i]) <= quantizable_abs);  // true for NaN too
    }
    lo[g] = l;
    hi[g] = h;
  }
  // 2. every group's stored fp16 min and scale
  float mins[kMaxHeadSize / kMinGroupSize], safes[kMaxHeadSize / kMinGroupSize];
  for (int g = 0; g < num_groups; ++g) {
    const _Float16 min = adakv::group_min(lo[g]);
    const _Float16 scale = adakv::group_scale(hi[g], static_cast<float>(min), top);
    const uint16_t scale_bits = adakv::half_bits(scale), min_bits = adakv::half_bits(min);
    std::memcpy(rec + L.scales_offset[code] + 2 * g, &scale_bits, 2);
    std::memcpy(rec + L.mins_offset[code] + 2 * g, &min_bits, 2);
    mins[g] = static_cast<float>(min);
    safes[g] = static_cast<float>(scale) > 0.f ? static_cast<float>(scale) : 1.f;
  }
  // 3. the codes, one 32-bit word at a time: element j of a word at bits [j*bits, (j+1)*bits),
  //    stored little-endian, is format.py's rule (byte j / per_byte, bit (j % per_byte) * bits)
  for (int g = 0; g < num_groups; ++g) {
    for (int i = g * g_size; i < (g + 1) * g_size; i += kPerWord) {
      uint32_t word = 0;
#pragma omp simd reduction(| : word)
      for (int j = 0; j < kPerWord; ++j)
        word |= static_cast<uint32_t>(adakv::group_code(x[i + j], mins[g], safes[g], top)) << (j * kBits);
      std::memcpy(rec + i / kPerWord * 4, &word, 4);
    }
  }
  return !bad;
}

// As encode_quantized, for the record's precision code; on failure, which value error it was.
int encode_record(const float* x, const Layout& L, int code, float quantizable_abs, uint8_t* rec) {
  bool ok;
  switch (L.bits[code]) {
    case 2: ok = encode_quantized<2>(x, L, code, quantizable_abs, rec); break;
    case 4: ok = encode_quantized<4>(x, L, code, quantizable_abs, rec); break;
    default: ok = encode_quantized<8>(x, L, code, quantizable_abs, rec); break;  // layout checked: 2, 4 or 8
  }
  if (ok) return kFinite;
  for (int i = 0; i < L.head_size; ++i)
    if (!std::isfinite(x[i])) return kHasNonFinite;
  return kHasTooLarge;
}

// ---- one head region ---------------------------------------------------------------------------

// Write head h's region of a page. codes: [2][num_tokens] precision codes (key, value). Records are
// written in token order, each at the next free place of its class, which is exactly record order.
// Returns the ValueError flags of the values reference.py would refuse to store.
template <bool kBf16>
int encode_region(const SealArgs& a, const Layout& L, const PagePlan& plan, const uint8_t* codes, int h) {
  const int d = L.head_size, t_count = L.num_tokens;
  const float quantizable_abs = static_cast<float>(a.quantizable_abs);
  uint8_t* region = plan.dst + L.header_bytes + h * plan.region;
  alignas(64) float row[kMaxHeadSize];
  int errors = kFinite;
  for (int part = 0; part < 2; ++part) {
    const bool rotated = part == 0 && a.rotate_keys;
    int64_t next[kNumCodes], rot_row[kNumCodes];
    for (int c = 0; c < kNumCodes; ++c) next[c] = plan.first_record[part][c], rot_row[c] = plan.rot_row[c];
    for (int t = 0; t < t_count; ++t) {
      const int c = codes[part * t_count + t];
      uint8_t* rec = region + next[c];
      next[c] += L.record_bytes[c];
      const uint16_t* src = plan.src[part] + (static_cast<int64_t>(t) * L.num_kv_heads + h) * d;
      if (c == kFp16Code) {  // verbatim (after the clamp, if asked)
        if (!copy_16<kBf16>(src, a, d, rec)) errors |= kHasNonFinite;
      } else if (rotated) {
        errors |= encode_record(a.key_rot[c] + (rot_row[c]++ * L.num_kv_heads + h) * d, L, c, quantizable_abs, rec);
      } else {
        widen<kBf16>(src, a, d, row);
        errors |= encode_record(row, L, c, quantizable_abs, rec);
      }
    }
  }
  return errors;
}

// The bit map and every byte outside the head regions (zeros).
void write_header(const Layout& L, const PagePlan& plan, const uint8_t* codes) {
  const int t_count = L.num_tokens;
  for (int t = 0; t < t_count; ++t) plan.dst[t] = static_cast<uint8_t>(codes[t] | codes[t_count + t] << 4);
  std::memset(plan.dst + t_count, 0, L.header_bytes - t_count);
  const int64_t end = L.header_bytes + L.num_kv_heads * plan.region;
  std::memset(plan.dst + end, 0, L.page_bytes - end);
}

// ---- the serial pass ---------------------------------------------------------------------------

int read_layout(const SealArgs& a, Layout& L) {
  static_cast<adakv::PageNumbers&>(L) = adakv::read_page_numbers(a.layout);
  L.head_size = static_cast<int>(a.head_size);
  L.num_kv_heads = static_cast<int>(a.num_kv_heads);
  L.num_tokens = static_cast<int>(a.num_tokens);
  // cpu.py validates user input; these guard this file's own assumptions and buffers.
  if (L.head_size <= 0 || L.head_size > kMaxHeadSize || L.group_size < kMinGroupSize ||
      L.group_size % kMinGroupSize || L.head_size % L.group_size || L.num_kv_heads <= 0 || L.num_tokens <= 0 ||
      L.num_tokens > L.block_size || L.header_bytes < L.block_size || a.num_pages < 0 ||
      a.page_stride < L.page_bytes || (a.clamp && !(a.clamp_abs >= 0)))
    return kBadArgs;
  if (L.bits[0] != 2 || L.bits[1] != 4 || L.bits[2] != 8 || L.bits[3] != 16) return kBadArgs;
  L.num_groups = L.head_size / L.group_size;
  return kOk;
}

// bits -> precision code, or -1.
int code_of(int64_t bits, const Layout& L) {
  for (int c = 0; c < kNumCodes; ++c)
    if (bits == L.bits[c]) return c;
  return -1;
}

// Parse and check every page: codes [num_pages][2][num_tokens], one plan per page.
int plan_pages(const SealArgs& a, const Layout& L, std::vector<uint8_t>& codes, std::vector<PagePlan>& plans) {
  const int64_t n = a.num_pages, t_count = L.num_tokens;
  codes.resize(static_cast<size_t>(n * 2 * t_count));
  plans.resize(static_cast<size_t>(n));
  int64_t rot_rows[kNumCodes] = {};  // key_rot rows used so far, per class
  for (int64_t i = 0; i < n; ++i) {
    PagePlan& plan = plans[i];
    int64_t offset = 0;
    for (int part = 0; part < 2; ++part) {
      const int64_t* bits = (part == 0 ? a.key_bits : a.value_bits) + i * t_count;
      uint8_t* page_codes = codes.data() + (i * 2 + part) * t_count;
      int64_t count[kNumCodes] = {};
      for (int64_t t = 0; t < t_count; ++t) {
        const int c = code_of(bits[t], L);
        if (c < 0) return kBadBits;
        page_codes[t] = static_cast<uint8_t>(c);
        ++count[c];
      }
      for (int c = 0; c < kNumCodes; ++c) {  // classes in code order, the key part first
        plan.first_record[part][c] = offset;
        offset += count[c] * L.record_bytes[c];
      }
      if (part == 0)
        for (int c = 0; c < kNumCodes; ++c) plan.rot_row[c] = rot_rows[c], rot_rows[c] += count[c];
    }
    plan.region = offset;
    if (L.header_bytes + L.num_kv_heads * plan.region > L.page_bytes) return kOverBudget;
  }
  if (a.rotate_keys)
    for (int c = 0; c < kFp16Code; ++c)
      if (a.key_rot_rows[c] != rot_rows[c] * L.num_kv_heads || (rot_rows[c] && !a.key_rot[c])) return kBadArgs;
  // source slots in range; destination rows in range and distinct (two pages in one row would race)
  const int64_t slot_elems = t_count * L.num_kv_heads * L.head_size;
  std::vector<int64_t> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = a.slots ? a.slots[i] : i;
    rows[i] = a.rows ? a.rows[i] : i;
    if (slot < 0 || slot >= a.num_slots || rows[i] < 0 || rows[i] >= a.num_rows) return kBadRows;
    plans[i].src[0] = a.key + slot * slot_elems;
    plans[i].src[1] = a.value + slot * slot_elems;
    plans[i].dst = a.pages + rows[i] * a.page_stride;
  }
  std::sort(rows.begin(), rows.end());
  if (std::adjacent_find(rows.begin(), rows.end()) != rows.end()) return kBadRows;
  return kOk;
}

int seal(const SealArgs& a) {
  Layout L;
  if (const int status = read_layout(a, L)) return status;
  std::vector<uint8_t> codes;
  std::vector<PagePlan> plans;
  if (const int status = plan_pages(a, L, codes, plans)) return status;  // nothing written yet
  const int64_t items = a.num_pages * L.num_kv_heads;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min(a.num_threads, items)));
  int errors = kFinite;
#pragma omp parallel for num_threads(team) schedule(static) reduction(| : errors)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t i = item / L.num_kv_heads;
    const int h = static_cast<int>(item % L.num_kv_heads);
    const uint8_t* page_codes = codes.data() + i * 2 * L.num_tokens;
    if (h == 0) write_header(L, plans[i], page_codes);
    errors |= L.storage_bf16 ? encode_region<true>(a, L, plans[i], page_codes, h)
                             : encode_region<false>(a, L, plans[i], page_codes, h);
  }
  return errors & kHasNonFinite ? kNonFinite : (errors & kHasTooLarge ? kTooLarge : kOk);
}

}  // namespace

extern "C" {

// 0 = ok; 1 = inconsistent arguments; 2 = bits outside 2/4/8/16; 3 = bits exceed the page budget;
// 4 = a source slot or destination row out of range, or a row repeated (1-4: nothing written);
// 5 = a NaN or inf; 6 = a quantized value beyond quantizable_abs (5-6: pages partly written).
int adakv_seal(const SealArgs* args) { return seal(*args); }

int64_t adakv_seal_args_size() { return static_cast<int64_t>(sizeof(SealArgs)); }

}  // extern "C"
