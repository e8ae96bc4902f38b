// The page encoder ("seal"), compiled: blocks of 16-bit K/V -> packed mixed-precision pages.
//
// Contract and oracle: kernels/page_codec.py::PageCodec.encode (itself tested against
// quant/reference.py::pack_page); the bytes are identical. The layout is quant/format.py's, whose
// sizes arrive in `layout` (cpu.py: layout_numbers); this file applies only its documented rules:
//   * page = [bit map: header_bytes][head 0 region][head 1 region]...[zeros up to page_bytes];
//     bit map byte t = key code | value code << 4, padding bytes zero;
//   * a head region holds the key records then the value records, each part ordered by precision
//     code ascending, ties by token position; every region has the same size;
//   * a quantized record is [codes: little-endian bit stream][scales fp16 x G] of the rotated
//     vector; a 16-bit record is the storage dtype's bytes verbatim.
// The quantizer -- rotation by exact butterflies, the codebooks, the clip search -- is cpu_quant.h's,
// step for step the oracle's, with the tables cpu.py passes from quant/levels.py (`codebooks`).
//
// Inputs are read in place: page i encodes slot slots[i] of key/value ([num_slots, num_tokens,
// num_kv_heads, head_size], e.g. one layer of the store's staging) and is written to row rows[i] of
// `pages` (e.g. one layer of vLLM's KV tensor). With `clamp`, every input is first clamped to
// +-clamp_abs as torch.clamp does (inf -> +-clamp_abs, NaN stays NaN): KVStore.seal's clamp.
//
// Work: a serial pass parses every page's bits (codes, class offsets, region size) and checks the
// whole batch -- bits, page budget, source slots, destination rows -- before any byte is written;
// then one OpenMP item per (page, KV head) writes that head's region (head 0 also writes the bit
// map and the zeros around it). A value reference.py refuses to store (NaN/inf anywhere; in a
// quantized record, a rotated value beyond rotated_abs) is only found while encoding: the call then
// fails with pages partly written (PageCodec.encode raises at that point too, before its pages are
// stored).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_layout.h"
#include "cpu_quant.h"

namespace {

constexpr int kNumCodes = adakv::kPrecisionCodes;  // codes 0..4 = 2/3/4/8/16 bits (precision.py)
constexpr int kFp16Code = adakv::kFp16Code;
constexpr int kMaxHeadSize = 256;
constexpr int kMinGroupSize = 16;  // format.SUPPORTED_GROUP_SIZES
constexpr int kPrefetchAhead = 4;  // tokens a record's source is prefetched ahead of its encoding

enum Status { kOk = 0, kBadArgs = 1, kBadBits = 2, kOverBudget = 3, kBadRows = 4, kNonFinite = 5, kTooLarge = 6 };
// Value errors found while encoding, as bit flags (a NaN/inf wins over an out-of-range value).
enum ValueError { kFinite = 0, kHasNonFinite = 1, kHasTooLarge = 2 };

// Mirror of library.py's SealArgs, field by field.
struct SealArgs {
  int64_t layout[adakv::kLayoutNumbers];  // cpu.py: layout_numbers
  const adakv::Codebooks* codebooks;      // cpu.py: codebooks (quant/levels.py's tables)
  int64_t head_size, num_kv_heads, num_pages, num_tokens;
  const uint16_t* key;    // [num_slots, num_tokens, num_kv_heads, head_size] storage dtype
  const uint16_t* value;  // same
  int64_t num_slots;
  const int64_t* slots;       // [num_pages]: the slot page i encodes; null = 0, 1, ...
  const int64_t* key_bits;    // [num_pages, num_tokens]
  const int64_t* value_bits;  // [num_pages, num_tokens]
  uint8_t* pages;             // destination rows, each >= page_bytes bytes, contiguous
  int64_t page_stride;        // bytes between consecutive rows
  int64_t num_rows;           // rows in `pages`
  const int64_t* rows;        // [num_pages]: the row page i is written to; null = 0, 1, ...
  int64_t clamp;              // clamp inputs to +-clamp_abs first?
  double clamp_abs;           // exactly representable in the storage dtype (cpu.py checks)
  int64_t clamp_bits[2];      // the storage dtype's bits of +clamp_abs and -clamp_abs
  double quantized_abs;       // reference.MAX_QUANTIZED_ABS: a quantized record's inputs are clamped to it
  double rotated_abs;         // reference.MAX_ROTATED_ABS: the largest rotated |y| a quantized record takes
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
  const uint16_t* src[2];              // the page's key and value tokens (its slot)
  uint8_t* dst;                        // the page's destination
};

// torch.clamp(v, -m, m): NaN stays NaN.
inline float clamp_one(float v, float m) { return v > m ? m : (v < -m ? -m : v); }

// A 16-bit record: the (clamped) storage bits verbatim. Returns false on a NaN or inf
// (reference.check_finite): an all-ones exponent.
template <bool kBf16>
bool copy_16(const uint16_t* src, const SealArgs& a, int n, uint8_t* rec) {
  constexpr uint16_t kExponent = kBf16 ? 0x7F80 : 0x7C00;
  alignas(64) uint16_t bits[kMaxHeadSize];
  if (a.clamp) {  // a clamped value is the bound, whose storage bits cpu.py passes
    alignas(64) float v[kMaxHeadSize];
    adakv::to_float<kBf16>(src, n, v);
    const float m = static_cast<float>(a.clamp_abs);
    const auto above = static_cast<uint16_t>(a.clamp_bits[0]), below = static_cast<uint16_t>(a.clamp_bits[1]);
    for (int i = 0; i < n; ++i) bits[i] = v[i] > m ? above : (v[i] < -m ? below : src[i]);
    src = bits;
  }
  int non_finite = 0;
  for (int i = 0; i < n; ++i) non_finite |= (src[i] & kExponent) == kExponent;
  std::memcpy(rec, src, 2 * static_cast<size_t>(n));
  return !non_finite;
}

// A quantized record (reference.encode_records): src [head_size] 16-bit -> rec [codes][scales].
// Returns the ValueError flag of a value the oracle refuses (the record is then garbage).
template <bool kBf16>
int encode_quantized(const uint16_t* src, const SealArgs& a, const Layout& L, int code, uint8_t* rec) {
  const int d = L.head_size, g_size = L.group_size;
  alignas(64) float y[kMaxHeadSize];
  adakv::to_float<kBf16>(src, d, y);
  // the store's clamp (torch.clamp in the storage dtype: exact in fp32), then check_finite, then
  // the quantizer's own clamp
  const float store_clamp = a.clamp ? static_cast<float>(a.clamp_abs) : INFINITY;
  const float limit = static_cast<float>(a.quantized_abs);
  int non_finite = 0;
  for (int i = 0; i < d; ++i) {
    const float v = clamp_one(y[i], store_clamp);
    non_finite |= !std::isfinite(v);
    y[i] = clamp_one(v, limit);
  }
  if (non_finite) return kHasNonFinite;
  adakv::fwht(y, d, L.hadamard_log2);
  adakv::scale_pow2(y, d, -L.rotate_shift);
  const float rotated_abs = static_cast<float>(a.rotated_abs);
  int too_large = 0;
  for (int i = 0; i < d; ++i) too_large |= std::fabs(y[i]) > rotated_abs;
  if (too_large) return kHasTooLarge;
  const adakv::Codebook& cb = a.codebooks->code[code];
  alignas(64) uint8_t codes[kMaxHeadSize];
  for (int g = 0; g < L.num_groups; ++g) {
    const uint16_t scale = adakv::half_bits(adakv::quantize_group(y + g * g_size, g_size, cb, codes + g * g_size, nullptr));
    std::memcpy(rec + L.scales_offset[code] + 2 * g, &scale, 2);
  }
  adakv::pack_codes(codes, d, L.bits[code], rec);
  return kFinite;
}

// ---- one head region ---------------------------------------------------------------------------

// Write head h's region of a page. codes: [2][num_tokens] precision codes (key, value). Records are
// written in token order, each at the next free place of its class, which is exactly record order.
// Returns the ValueError flags of the values reference.py would refuse to store.
template <bool kBf16>
int encode_region(const SealArgs& a, const Layout& L, const PagePlan& plan, const uint8_t* codes, int h) {
  const int d = L.head_size, t_count = L.num_tokens;
  uint8_t* region = plan.dst + L.header_bytes + h * plan.region;
  int errors = kFinite;
  for (int part = 0; part < 2; ++part) {
    int64_t next[kNumCodes];
    for (int c = 0; c < kNumCodes; ++c) next[c] = plan.first_record[part][c];
    const uint16_t* head_src = plan.src[part] + static_cast<int64_t>(h) * d;
    const int64_t token_stride = static_cast<int64_t>(L.num_kv_heads) * d;
    for (int t = 0; t < t_count; ++t) {
      const int c = codes[part * t_count + t];
      uint8_t* rec = region + next[c];
      next[c] += L.record_bytes[c];
      const uint16_t* src = head_src + t * token_stride;
      if (t + kPrefetchAhead < t_count) {  // staging is cold by sealing time: fetch ahead of use
        const uint8_t* ahead = reinterpret_cast<const uint8_t*>(src + kPrefetchAhead * token_stride);
        for (int b = 0; b < 2 * d; b += 64) __builtin_prefetch(ahead + b);
      }
      if (c == kFp16Code)
        errors |= copy_16<kBf16>(src, a, d, rec) ? kFinite : kHasNonFinite;
      else
        errors |= encode_quantized<kBf16>(src, a, L, c, rec);
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
  if (L.head_size <= 0 || L.head_size > kMaxHeadSize || L.head_size % 16 || L.group_size < kMinGroupSize ||
      L.group_size % kMinGroupSize || L.head_size % L.group_size || L.num_kv_heads <= 0 || L.num_tokens <= 0 ||
      L.num_tokens > L.block_size || L.header_bytes < L.block_size || a.num_pages < 0 ||
      a.page_stride < L.page_bytes || (a.clamp && !(a.clamp_abs >= 0)) || !a.codebooks ||
      L.hadamard_log2 < 4 || L.head_size % (1 << L.hadamard_log2))
    return kBadArgs;
  if (L.bits[0] != 2 || L.bits[1] != 3 || L.bits[2] != 4 || L.bits[3] != 8 || L.bits[4] != 16) return kBadArgs;
  for (int c = 0; c < adakv::kQuantizedCodes; ++c)
    if (!adakv::codebook_ok(a.codebooks->code[c], L.bits[c])) return kBadArgs;
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
    }
    plan.region = offset;
    if (L.header_bytes + L.num_kv_heads * plan.region > L.page_bytes) return kOverBudget;
  }
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

// 0 = ok; 1 = inconsistent arguments; 2 = bits outside 2/3/4/8/16; 3 = bits exceed the page budget;
// 4 = a source slot or destination row out of range, or a row repeated (1-4: nothing written);
// 5 = a NaN or inf; 6 = a rotated value beyond rotated_abs in a quantized record (5-6: pages partly
// written).
int adakv_seal(const SealArgs* args) { return seal(*args); }

int64_t adakv_seal_args_size() { return static_cast<int64_t>(sizeof(SealArgs)); }

int64_t adakv_codebooks_size() { return static_cast<int64_t>(sizeof(adakv::Codebooks)); }

}  // extern "C"
