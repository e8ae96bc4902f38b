// Fused CPU paged attention over AdaKV's mixed-precision pages: reads the packed records in place.
//
// Contract: kernels/attention_ref.py (`paged_attention_ref`), causal, any query_len per sequence
// (decode is the fast case: the backend sends only pure-decode steps here).
//
// Layout: quant/format.py owns every size and offset; the caller passes them in `layout` (see
// kernels/cpu.py). This file implements only format.py's documented packing rules:
//   * a page is [bit map: header_bytes][head 0 region][head 1 region]...; every region has the
//     same size, the sum over the block's tokens of record_bytes[key code] + record_bytes[value code];
//   * a region holds the key records then the value records, each part ordered by precision code
//     ascending, ties by token position; bit map byte t = key code | value code << 4;
//   * a quantized record is [codes][scales fp16 x G] (offsets given); its codes form a little-endian
//     bit stream, element i at bits [i*bits, (i+1)*bits), and element i decodes as
//     LEVELS[bits][code] * scale of its group (quant/levels.py's codebooks, passed in `codebooks`);
//   * a 16-bit record is the model's 16-bit dtype verbatim (the staging dtype).
// Rotation (quant/rotation.py): a quantized record holds y = rotate(x) = FWHT(x) 2**-k and stands for
// x^ = unrotate(y^) = FWHT(y^) 2**(k-m), with FWHT symmetric. So q . x^ = (FWHT(q) 2**(k-m)) . y^:
// quantized keys are dotted with the rotated query (its power of two folded into the score scale),
// and sum_t p_t x^_t = unrotate(sum_t p_t y^_t): quantized values accumulate in a rotated accumulator
// that is rotated back once per item and added to the plain one (16-bit records, staging).
//
// Work: one item = (sequence, range of pages), all KV heads (a page's bytes are read once, in
// order, and its bit map is parsed once). Per page and KV head, every record is decoded once into
// registers and serves all query rows of the GQA group (rows = query_len x heads per KV head):
//   1. scores of the page's key records, in record order (4 records at a time, reduced together);
//   2. online softmax at page granularity (one rescale of the accumulators per page, masked by
//      position for causality and the sequence end);
//   3. the value records accumulate p * v, p looked up through the key order's inverse.
// Long contexts are split over pages (flash-decoding) so that batch 1 still feeds every thread -- by
// each sequence's own length, never by the rest of the batch (batch-invariant results); a
// second pass merges the splits' (max, sum, acc).
//
// Threads: an OpenMP parallel region of the caller's torch.get_num_threads() threads -- what
// at::parallel_for expands to under torch's OpenMP backend. The library links libgomp.so.1, which
// the loader resolves by SONAME to the copy torch has already loaded; libgomp keeps one pool of
// worker threads per calling thread, so the region reuses the very threads torch's own regions use
// (those vLLM's CPU worker pinned to its cores), not a second runtime. Items are handed out through
// an atomic counter because their costs differ.
//
// The file includes no torch header (they dominate build time); cpu.py validates the tensors and
// passes raw pointers through `adakv_paged_attention(const Args*)`.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_layout.h"
#include "cpu_quant.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ADAKV_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int kNumCodes = adakv::kPrecisionCodes;  // codes 0..4 = 2/3/4/8/16 bits (precision.py)
constexpr int kFp16Code = adakv::kFp16Code;        // the verbatim 16-bit precision
constexpr int kQuantizedCodes = adakv::kQuantizedCodes;
constexpr int kMaxBlockSize = 1024;
constexpr int kMaxHeadSize = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sizes from quant/format.py, never derived here (see cpu.py: layout_numbers).
struct Layout : adakv::PageNumbers {
  int head_size, num_groups, num_kv_heads;
  int chunk_shift;  // log2(group_size / 16): the group of 16-element chunk c is c >> chunk_shift
  int64_t page_stride;
  int nibble_bytes[16];  // record bytes of a bit-map nibble, 0 for a nibble that is no precision code
  float unrotate;        // 2**(k - m): unrotate(y) = FWHT(y) * unrotate
  // the codebooks' levels: lv[c][code] for the <= 16-level codebooks (2/3/4 bits), zero-padded
  alignas(64) float lv[kQuantizedCodes][16];
  const float* levels[kQuantizedCodes];  // LEVELS of each quantized code (the portable path's table)
  float grid_base, grid_step;            // the 8-bit codebook, an exact grid: LEVELS[c] = fma(c, step, base)
};

// Decoder kinds: 0/1/2/3 = 2/3/4/8-bit codes (the precision code), 4 = bf16, 5 = fp16.
constexpr int kBf16Kind = 4, kHalfKind = 5;
inline int kind_of(int code, const Layout& L) { return code < kFp16Code ? code : (L.storage_bf16 ? kBf16Kind : kHalfKind); }

// A run of records of one kind: record i of the run lies at base + i * stride and holds token
// position order[i]; its score sits at record index first + i of the part.
struct Run {
  int kind, first, count, stride;
  const uint8_t* base;  // head 0; head h adds h * head_step
  int64_t head_step;
};

// One page (or staged block) as the kernel walks it: the runs of its key and value parts, the token
// position of every record, and for every position the index of its key record.
struct PageView {
  Run runs[2][kNumCodes];
  int num_runs[2];
  int num_records;                  // key records whose scores exist (block_size, or staged tokens)
  alignas(64) uint16_t order[2][kMaxBlockSize + 16];
  uint16_t key_rank[kMaxBlockSize];  // position -> index of its key record
};

uint16_t kIota[kMaxBlockSize + 16];
const bool kIotaReady = [] {
  for (int i = 0; i < kMaxBlockSize + 16; ++i) kIota[i] = static_cast<uint16_t>(i);
  return true;
}();

// Parse a sealed page's bit map. Returns false on a precision code outside 0..4 or a region
// that overflows the page.
inline bool view_page(const uint8_t* page, const Layout& L, PageView& v) {
  const int bs = L.block_size;
  int count[2][kNumCodes] = {};
  bool ok = true;
  for (int t = 0; t < bs; ++t) {
    const int k = page[t] & 0xF, val = page[t] >> 4;
    ok &= k < kNumCodes && val < kNumCodes;
    ++count[0][k < kNumCodes ? k : 0];
    ++count[1][val < kNumCodes ? val : 0];
  }
  if (!ok) return false;
  int first[2][kNumCodes], part_start = L.header_bytes;
  for (int part = 0; part < 2; ++part) {  // the value part starts where the key part ends
    int index = 0;
    v.num_runs[part] = 0;
    for (int c = 0; c < kNumCodes; ++c) {
      first[part][c] = index;
      if (count[part][c])
        v.runs[part][v.num_runs[part]++] = {kind_of(c, L), index, count[part][c], L.record_bytes[c],
                                            page + part_start, 0};
      index += count[part][c];
      part_start += count[part][c] * L.record_bytes[c];
    }
  }
  const int64_t region = part_start - L.header_bytes;
  if (L.header_bytes + L.num_kv_heads * region > L.page_bytes) return false;
  for (int part = 0; part < 2; ++part)
    for (int i = 0; i < v.num_runs[part]; ++i) v.runs[part][i].head_step = region;
  for (int t = 0; t < bs; ++t) {
    const int k = page[t] & 0xF, val = page[t] >> 4;
    v.key_rank[t] = static_cast<uint16_t>(first[0][k]);
    v.order[0][first[0][k]++] = static_cast<uint16_t>(t);
    v.order[1][first[1][val]++] = static_cast<uint16_t>(t);
  }
  v.num_records = bs;
  return true;
}

// An open block: staging [slot, t, head, d], one 16-bit run of n_valid tokens in position order.
inline void view_staged(const uint8_t* staging_key, const uint8_t* staging_value, int64_t slot, int n_valid,
                        const Layout& L, PageView& v) {
  const int64_t token_bytes = static_cast<int64_t>(L.num_kv_heads) * L.head_size * 2;
  const int64_t start = slot * L.block_size * token_bytes;
  const int kind = kind_of(kFp16Code, L);
  v.runs[0][0] = {kind, 0, n_valid, static_cast<int>(token_bytes), staging_key + start, L.head_size * 2};
  v.runs[1][0] = {kind, 0, n_valid, static_cast<int>(token_bytes), staging_value + start, L.head_size * 2};
  v.num_runs[0] = v.num_runs[1] = 1;
  v.num_records = n_valid;
  std::memcpy(v.order[0], kIota, sizeof(uint16_t) * (n_valid + 16));
  std::memcpy(v.order[1], kIota, sizeof(uint16_t) * n_valid);
  std::memcpy(v.key_rank, kIota, sizeof(uint16_t) * n_valid);
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}
inline uint16_t float_to_half(float f) {  // round to nearest even, overflow to inf
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00);
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below the smallest normal half: round a * 2^24 to an integer
    const float v = bits_to_float(a) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(v)));
  }
  const uint32_t r = a + 0xFFFu + ((a >> 13) & 1);
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

// The query rows of one KV head, and where their scores and accumulators live.
struct Rows {
  int count, d, sc_stride;
  const float* q;     // [count, d] pre-scaled query, for 16-bit keys
  const float* qrot;  // [count, d] pre-scaled rotated query (FWHT(q) 2**(k-m)), for quantized keys
  float* sc;          // [count, sc_stride] scores then probabilities, by key record index
  float* acc;         // [count, d] p * v of 16-bit values
  float* acc_rot;     // [count, d] p * y^ of quantized values, in the rotated space
  const int* visible; // [count] visible positions of the current page (a prefix, by causality)
  // 4-bit records in "nibble order" (see kNibbleKind), or null: the rotated query
  // permuted into that order, and the rotated value accumulators kept in it until the item ends.
  const float* qperm;  // [count, d]
  float* acc_perm;     // [count, d]
};

// ================================ portable path =================================================
// Plain C++ written so that the compiler vectorizes it for whatever -march=native offers (AVX2 on
// CPUs without AVX-512, NEON on Arm): the dot products keep 8 independent partial sums (the fp32
// adds stay in a fixed order, -ffp-contract=off), and decoding looks codes up unscaled, then
// multiplies each 16-element chunk by its group's scale in a loop of its own. A decoded element is
// still the fp32 product LEVELS[code] * scale of the oracle.
constexpr int kLanes = 8;

// sum_e a[e] * b[e], d a multiple of 16 (format.py: HEAD_SIZE_MULTIPLE)
inline float dot_lanes(const float* a, const float* b, int d) {
  float part[kLanes] = {};
  for (int e = 0; e < d; e += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[e + j] * b[e + j];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

struct ScalarPath {
  static constexpr bool kNibbleOrder = false;

  // A quantized record's codes -> levels, unscaled. 2 and 4 bits a byte at a time (elements of a
  // byte in little-endian bit order); 3 and 8 bits one little-endian word at a time: 16 codes
  // (6 bytes) at 3 bits, 8 codes at 8 bits, element i of the word at bits [i*bits, (i+1)*bits).
  template <int kBits>
  static void decode_levels(const uint8_t* rec, int d, const float* levels, float* out) {
    if constexpr (kBits == 2 || kBits == 4) {
      constexpr int kPerByte = 8 / kBits;
      for (int i = 0; i < d / kPerByte; ++i)
        for (int j = 0; j < kPerByte; ++j) out[i * kPerByte + j] = levels[(rec[i] >> (j * kBits)) & ((1u << kBits) - 1)];
    } else {
      constexpr int kPerWord = kBits == 8 ? 8 : 16;
      for (int i = 0; i < d; i += kPerWord) {
        uint64_t word = 0;
        std::memcpy(&word, rec + i * kBits / 8, kPerWord * kBits / 8);
        for (int j = 0; j < kPerWord; ++j) out[i + j] = levels[(word >> (j * kBits)) & ((1u << kBits) - 1)];
      }
    }
  }

  static void decode(int kind, const uint8_t* rec, const Layout& L, float* out) {
    const int d = L.head_size;
    if (kind >= kBf16Kind) {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(rec);
      if (kind == kBf16Kind)
        for (int i = 0; i < d; ++i) out[i] = bf16_to_float(x[i]);
      else
        for (int i = 0; i < d; ++i) out[i] = half_to_float(x[i]);
      return;
    }
    const float* levels = L.levels[kind];
    switch (L.bits[kind]) {
      case 2: decode_levels<2>(rec, d, levels, out); break;
      case 3: decode_levels<3>(rec, d, levels, out); break;
      case 4: decode_levels<4>(rec, d, levels, out); break;
      default: decode_levels<8>(rec, d, levels, out); break;
    }
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(rec + L.scales_offset[kind]);
    for (int c = 0; c < d / 16; ++c) {  // groups hold whole 16-element chunks
      const float s = half_to_float(scales[c >> L.chunk_shift]);
      for (int j = 0; j < 16; ++j) out[c * 16 + j] *= s;
    }
  }

  static void scores(const Run& run, const uint8_t* base, const uint16_t* order, Rows& R, const Layout& L) {
    (void)order;
    alignas(64) float k[kMaxHeadSize];
    const float* q = run.kind < kBf16Kind ? R.qrot : R.q;
    for (int i = 0; i < run.count; ++i) {
      decode(run.kind, base + static_cast<int64_t>(i) * run.stride, L, k);
      for (int r = 0; r < R.count; ++r) R.sc[r * R.sc_stride + run.first + i] = dot_lanes(q + r * R.d, k, R.d);
    }
  }

  static void values(const Run& run, const uint8_t* base, const uint16_t* order, const uint16_t* key_rank,
                     Rows& R, const Layout& L) {
    alignas(64) float v[kMaxHeadSize];
    float* acc = run.kind < kBf16Kind ? R.acc_rot : R.acc;
    const int t_max = R.visible[R.count - 1];
    for (int i = 0; i < run.count; ++i) {
      const int t = order[i];
      if (t >= t_max) continue;
      decode(run.kind, base + static_cast<int64_t>(i) * run.stride, L, v);
      for (int r = 0; r < R.count; ++r) {
        const float p = R.sc[r * R.sc_stride + key_rank[t]];
        float* a = acc + r * R.d;
        for (int e = 0; e < R.d; ++e) a[e] += p * v[e];
      }
    }
  }

  // scores -> probabilities in place (by key record index); returns via m/l and rescales acc.
  static void softmax(Rows& R, const uint16_t* key_order, int num_records, float* m, float* l) {
    for (int r = 0; r < R.count; ++r) {
      float* sc = R.sc + r * R.sc_stride;
      const int vis = R.visible[r];
      float m_new = m[r];
      for (int i = 0; i < num_records; ++i)
        if (key_order[i] < vis) m_new = std::max(m_new, sc[i]);
      if (m_new == kNegInf) {  // nothing visible: probabilities read as zero
        std::fill(sc, sc + num_records, 0.f);
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);
      float sum = 0.f;
      for (int i = 0; i < num_records; ++i) {
        sc[i] = key_order[i] < vis ? std::exp(sc[i] - m_new) : 0.f;
        sum += sc[i];
      }
      if (alpha != 1.0f)
        for (int e = 0; e < R.d; ++e) {  // no acc_perm on this path
          R.acc[r * R.d + e] *= alpha;
          R.acc_rot[r * R.d + e] *= alpha;
        }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
  }
};

// ================================ AVX-512 path ==================================================
#ifdef ADAKV_AVX512
constexpr int kMaxChunks = kMaxHeadSize / 16;
#define ADAKV_INLINE inline __attribute__((always_inline))

// Decoder kind 6 (kNibbleKind): 4-bit records left in nibble order -- per 32 elements, out[2b] holds the even
// elements 32b, 32b+2, ..., out[2b+1] the odd ones. Dot products do not care about element order
// (the query is permuted to match) and value accumulators stay in it until the item ends, so the
// two interleaving permutes per 32 elements disappear. Needs group_size >= 32 (one scale per pair).
constexpr int kNibbleKind = 6;

// One record -> NC zmm of fp32, out[c] = elements 16c .. 16c+15 (nibble order for kNibbleKind).
// NC = head_size / 16, 0 = runtime. Quantized kinds look their codes up in the codebook (a register
// for 2/3/4 bits; the 8-bit grid as fma(code, step, base), exact, see run()) and multiply by the
// group's scale: the very fp32 product LEVELS[code] * scale of the oracle. kScaled = false leaves
// the scale out (the record must have one group; `unit_scale` reads it): a caller that multiplies
// the scale into the dot product or the probability instead saves a multiply per element.
template <int KIND, int NC, bool kScaled = true>
ADAKV_INLINE void decode_record(const uint8_t* rec, const Layout& L, int nc, __m512* out) {
  constexpr int code = KIND == kNibbleKind ? 2 : KIND;
  const int n = NC ? NC : nc;
  if constexpr (KIND == kBf16Kind) {
    for (int c = 0; c < n; ++c) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * c));
      out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  } else if constexpr (KIND == kHalfKind) {
    for (int c = 0; c < n; ++c)
      out[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * c)));
  } else {
    const __m512 lv = _mm512_load_ps(L.lv[code]);
    if constexpr (KIND == 3) {  // one byte per element, on the 8-bit grid
      const __m512 step = _mm512_set1_ps(L.grid_step), base = _mm512_set1_ps(L.grid_base);
      for (int c = 0; c < n; ++c) {
        const __m512 q = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16 * c))));
        out[c] = _mm512_fmadd_ps(q, step, base);
      }
    } else if constexpr (KIND == kNibbleKind) {
      const __m512i nibble = _mm512_set1_epi32(0xF);
      for (int c = 0; c < n; c += 2) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 8 * c)));
        out[c] = _mm512_permutexvar_ps(_mm512_and_si512(b, nibble), lv);
        out[c + 1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lv);
      }
    } else if constexpr (KIND == 2) {
      // 16 bytes = 32 nibbles: low nibbles are the even elements, high nibbles the odd ones;
      // two 2-source permutes interleave them back into element order.
      const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
      const __m512i nibble = _mm512_set1_epi32(0xF);
      for (int c = 0; c < n; c += 2) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 8 * c)));
        const __m512i even = _mm512_and_si512(b, nibble), odd = _mm512_srli_epi32(b, 4);
        out[c] = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(even, lo_idx, odd), lv);
        out[c + 1] = _mm512_permutexvar_ps(_mm512_permutex2var_epi32(even, hi_idx, odd), lv);
      }
    } else if constexpr (KIND == 1) {
      // 6 bytes = 16 codes of 3 bits, read as one 64-bit word (the 2 bytes past the codes are the
      // record's own scales): elements 0..7 from its bits 0..23, elements 8..15 from bits 24..47,
      // one 32-bit window each, broadcast to 8 lanes and shifted by 3 * (lane % 8).
      const __m512i shift = _mm512_set_epi32(21, 18, 15, 12, 9, 6, 3, 0, 21, 18, 15, 12, 9, 6, 3, 0);
      const __m512i mask = _mm512_set1_epi32(7);
#ifdef __AVX512VBMI__
      // VBMI: one byte permute builds both windows from the 8 loaded bytes (lanes 0..7: bytes 0..3,
      // lanes 8..15: bytes 3..6), with no broadcast from a general register.
      const __m512i window = _mm512_set_epi32(0x06050403, 0x06050403, 0x06050403, 0x06050403, 0x06050403,
                                              0x06050403, 0x06050403, 0x06050403, 0x03020100, 0x03020100,
                                              0x03020100, 0x03020100, 0x03020100, 0x03020100, 0x03020100,
                                              0x03020100);
      for (int c = 0; c < n; ++c) {
        const __m512i bytes = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec + 6 * c)));
        const __m512i w = _mm512_permutexvar_epi8(window, bytes);
        out[c] = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srlv_epi32(w, shift), mask), lv);
      }
#else
      for (int c = 0; c < n; ++c) {
        uint64_t word;
        std::memcpy(&word, rec + 6 * c, 8);
        const __m512i w = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(word)), 0xFF00,
                                                 static_cast<int>(word >> 24));
        out[c] = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srlv_epi32(w, shift), mask), lv);
      }
#endif
    } else {
      // 4 bytes = 16 crumbs: element i at bit 2i of the little-endian word.
      const __m512i shift = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      for (int c = 0; c < n; ++c) {
        uint32_t word;
        std::memcpy(&word, rec + 4 * c, 4);
        out[c] = _mm512_permutexvar_ps(
            _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shift),
                             _mm512_set1_epi32(3)),
            lv);
      }
    }
    if constexpr (!kScaled) return;
    // x = LEVELS[code] * scale, per group of group_size elements (>= 16, so whole chunks). The fp16
    // scales are converted together, then broadcast by a permute.
    const __mmask16 gmask = static_cast<__mmask16>((1u << L.num_groups) - 1);
    const __m512 scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, rec + L.scales_offset[code]));
    for (int c = 0; c < n; ++c)
      out[c] = _mm512_mul_ps(out[c], _mm512_permutexvar_ps(_mm512_set1_epi32(c >> L.chunk_shift), scales));
  }
}

// [sum(a), sum(b), sum(c), sum(d)]
ADAKV_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

ADAKV_INLINE __m512 exp512(__m512 x) {
  // Cody-Waite reduction x = n ln2 + f, |f| <= ln2/2; degree-6 Taylor: relative error < 2e-7.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The scale of a one-group quantized record (kScaled = false decodes).
template <int KIND>
ADAKV_INLINE float unit_scale(const uint8_t* rec, const Layout& L) {
  constexpr int code = KIND == kNibbleKind ? 2 : KIND;
  uint16_t h;
  std::memcpy(&h, rec + L.scales_offset[code], 2);
  return _cvtsh_ss(h);
}

// Whether a run's records can be decoded without their scale (one group per record): the scale
// then multiplies the reduced dot product (keys) or the probability (values) instead of every
// element -- a different rounding order than the oracle's LEVELS[code] * scale, within fp32 noise.
template <int KIND>
ADAKV_INLINE bool folds_scale(const Layout& L) {
  return KIND != kBf16Kind && KIND != kHalfKind && L.num_groups == 1;
}

// Scores of RB rows for a run: 4 records at a time, their RB x 4 dot products reduced together.
template <int KIND, int NC, int RB, bool kFold>
inline void score_rows(const uint8_t* base, int stride, int count, const float* q, float* sc, int d,
                       int sc_stride, const Layout& L) {
  constexpr int cap = NC ? NC : kMaxChunks;
  const int nc = NC ? NC : d / 16;
  __m512 kv[cap];
  for (int i = 0; i < count; i += 4) {
    __m512 acc[RB][4];
    alignas(16) float scale[4] = {0.f, 0.f, 0.f, 0.f};
    // records past the run's end (its last group of 4) repeat its last record; their scores land past
    // the run, in the next run's places (scored after this one) or the row's slack, as the zeros of
    // the branchy form did. No branch in the loop, so the accumulators stay in registers.
    const int last = count - 1;
    for (int k = 0; k < 4; ++k) {
      const uint8_t* rec = base + static_cast<int64_t>(std::min(i + k, last)) * stride;
      decode_record<KIND, NC, !kFold>(rec, L, nc, kv);
      if constexpr (kFold) scale[k] = unit_scale<KIND>(rec, L);
      for (int r = 0; r < RB; ++r) {
        const float* qr = q + r * d;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), kv[0]);
        for (int c = 1; c < nc; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), kv[c], a);
        acc[r][k] = a;
      }
    }
    // sc has 16 slack floats per row beyond the last record, so a 4-wide store may overhang.
    for (int r = 0; r < RB; ++r) {
      __m128 dots = reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      if constexpr (kFold) dots = _mm_mul_ps(dots, _mm_load_ps(scale));
      _mm_storeu_ps(sc + r * sc_stride + i, dots);
    }
  }
}

// Accumulate p * v of a value run into RB rows kept in registers.
template <int KIND, int NC, int RB, bool kFold>
inline void value_rows(const uint8_t* base, int stride, int count, const uint16_t* order,
                       const uint16_t* key_rank, int t_max, const float* p, float* acc_rows, int d,
                       int sc_stride, const Layout& L) {
  constexpr int cap = NC ? NC : kMaxChunks;
  const int nc = NC ? NC : d / 16;
  __m512 acc[RB][cap];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < nc; ++c) acc[r][c] = _mm512_loadu_ps(acc_rows + r * d + 16 * c);
  __m512 v[cap];
  for (int i = 0; i < count; ++i) {
    const int t = order[i];
    if (t >= t_max) continue;
    const uint8_t* rec = base + static_cast<int64_t>(i) * stride;
    decode_record<KIND, NC, !kFold>(rec, L, nc, v);
    const float scale = kFold ? unit_scale<KIND>(rec, L) : 1.f;
    const float* pr = p + key_rank[t];
    for (int r = 0; r < RB; ++r) {
      const __m512 w = _mm512_set1_ps(kFold ? pr[r * sc_stride] * scale : pr[r * sc_stride]);
      for (int c = 0; c < nc; ++c) acc[r][c] = _mm512_fmadd_ps(w, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < nc; ++c) _mm512_storeu_ps(acc_rows + r * d + 16 * c, acc[r][c]);
}

template <int NC>
struct Avx512Path {
  static constexpr bool kNibbleOrder = NC % 2 == 0 && NC > 0;

  template <int KIND>
  static void scores_kind(const Run& run, const uint8_t* base, Rows& R, const Layout& L) {
    const float* q = KIND == kNibbleKind ? R.qperm : KIND < kBf16Kind ? R.qrot : R.q;
    // Rows in blocks of up to 3 (SmolLM2's GQA group): RB x 4 accumulators stay in registers.
    for (int r0 = 0; r0 < R.count; r0 += 3) {
      const float* qb = q + r0 * R.d;
      float* sc = R.sc + r0 * R.sc_stride + run.first;
      const bool fold = folds_scale<KIND>(L);
#define ADAKV_SCORES(N)                                                                            \
  (fold ? score_rows<KIND, NC, N, true>(base, run.stride, run.count, qb, sc, R.d, R.sc_stride, L) \
        : score_rows<KIND, NC, N, false>(base, run.stride, run.count, qb, sc, R.d, R.sc_stride, L))
      switch (std::min(3, R.count - r0)) {
        case 1: ADAKV_SCORES(1); break;
        case 2: ADAKV_SCORES(2); break;
        default: ADAKV_SCORES(3); break;
      }
#undef ADAKV_SCORES
    }
  }
  static void scores(const Run& run, const uint8_t* base, const uint16_t*, Rows& R, const Layout& L) {
    switch (run.kind) {
      case 0: scores_kind<0>(run, base, R, L); break;
      case 1: scores_kind<1>(run, base, R, L); break;
      case 2:
        if (R.qperm)
          scores_kind<kNibbleKind>(run, base, R, L);
        else
          scores_kind<2>(run, base, R, L);
        break;
      case 3: scores_kind<3>(run, base, R, L); break;
      case kBf16Kind: scores_kind<kBf16Kind>(run, base, R, L); break;
      default: scores_kind<kHalfKind>(run, base, R, L); break;
    }
  }

  template <int KIND>
  static void values_kind(const Run& run, const uint8_t* base, const uint16_t* order, const uint16_t* key_rank,
                          Rows& R, const Layout& L) {
    float* acc = KIND == kNibbleKind ? R.acc_perm : KIND < kBf16Kind ? R.acc_rot : R.acc;
    for (int r0 = 0; r0 < R.count; r0 += 4) {
      const int rb = std::min(4, R.count - r0);
      const int t_max = R.visible[r0 + rb - 1];  // later rows see at least as much (causal)
      if (t_max <= 0) continue;
      const float* p = R.sc + r0 * R.sc_stride;
      float* a = acc + r0 * R.d;
      const bool fold = folds_scale<KIND>(L);
#define ADAKV_VALUES(N)                                                                                       \
  (fold ? value_rows<KIND, NC, N, true>(base, run.stride, run.count, order, key_rank, t_max, p, a, R.d,      \
                                        R.sc_stride, L)                                                     \
        : value_rows<KIND, NC, N, false>(base, run.stride, run.count, order, key_rank, t_max, p, a, R.d,     \
                                         R.sc_stride, L))
      switch (rb) {
        case 1: ADAKV_VALUES(1); break;
        case 2: ADAKV_VALUES(2); break;
        case 3: ADAKV_VALUES(3); break;
        default: ADAKV_VALUES(4); break;
      }
#undef ADAKV_VALUES
    }
  }
  static void values(const Run& run, const uint8_t* base, const uint16_t* order, const uint16_t* key_rank,
                     Rows& R, const Layout& L) {
    switch (run.kind) {
      case 0: values_kind<0>(run, base, order, key_rank, R, L); break;
      case 1: values_kind<1>(run, base, order, key_rank, R, L); break;
      case 2:
        if (R.acc_perm)
          values_kind<kNibbleKind>(run, base, order, key_rank, R, L);
        else
          values_kind<2>(run, base, order, key_rank, R, L);
        break;
      case 3: values_kind<3>(run, base, order, key_rank, R, L); break;
      case kBf16Kind: values_kind<kBf16Kind>(run, base, order, key_rank, R, L); break;
      default: values_kind<kHalfKind>(run, base, order, key_rank, R, L); break;
    }
  }

  static void softmax(Rows& R, const uint16_t* key_order, int num_records, float* m, float* l) {
    for (int r = 0; r < R.count; ++r) {
      float* sc = R.sc + r * R.sc_stride;
      const __m512i vis = _mm512_set1_epi32(R.visible[r]);
      __mmask16 keep[kMaxBlockSize / 16 + 1];
      __m512 mx = _mm512_set1_ps(kNegInf);
      for (int i = 0, j = 0; i < num_records; i += 16, ++j) {
        const __mmask16 in = static_cast<__mmask16>(num_records - i >= 16 ? 0xFFFF : (1u << (num_records - i)) - 1);
        const __m512i pos = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(key_order + i)));
        keep[j] = _mm512_mask_cmplt_epi32_mask(in, pos, vis);
        mx = _mm512_mask_max_ps(mx, keep[j], mx, _mm512_loadu_ps(sc + i));
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      if (m_new == kNegInf) {  // nothing visible: probabilities read as zero
        std::fill(sc, sc + num_records, 0.f);
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first page
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int i = 0, j = 0; i < num_records; i += 16, ++j) {
        const __m512 e = _mm512_maskz_mov_ps(keep[j], exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), mv)));
        _mm512_storeu_ps(sc + i, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (alpha != 1.0f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (float* a : {R.acc + r * R.d, R.acc_rot + r * R.d, R.acc_perm ? R.acc_perm + r * R.d : nullptr}) {
          if (!a) continue;
          for (int e = 0; e < R.d; e += 16) _mm512_storeu_ps(a + e, _mm512_mul_ps(av, _mm512_loadu_ps(a + e)));
        }
      }
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
    }
  }
};
#endif  // ADAKV_AVX512

// ================================ driver =========================================================
using adakv::kBF16, adakv::kF16;  // library.py: DTYPE_CODES (cpu_quant.h)

// The C entry's arguments; library.py's DecodeArgs mirrors this struct field by field (ctypes).
struct Args {
  int64_t layout[adakv::kLayoutNumbers];  // see cpu.py: layout_numbers
  const adakv::Codebooks* codebooks;      // cpu.py: codebooks (quant/levels.py's tables)
  int64_t head_size, num_heads, num_kv_heads, num_tokens, num_seqs, num_blocks, num_slots;
  const uint8_t* pages;
  int64_t page_stride;
  const uint8_t* staging_key;    // [num_slots, block_size, num_kv_heads, head_size] 16-bit
  const uint8_t* staging_value;
  const int64_t* staging_slot;   // [num_blocks]
  const void* block_table;       // [>= num_seqs, block_table_stride]
  int64_t block_table_i64, block_table_stride, block_table_width;
  const void* seq_lens;          // [num_seqs]
  const void* query_start_loc;   // [num_seqs + 1]
  int64_t seq_lens_i64, query_start_loc_i64;
  const void* query;             // [num_tokens, num_heads, head_size], strided, last dim contiguous
  int64_t query_dtype, q_stride_t, q_stride_h;
  void* out;                     // like query
  int64_t out_dtype, out_stride_t, out_stride_h;
  double scale;
  int64_t pages_per_split, force_scalar, num_threads;
  // Optional (both null or both set): the `attention` policy's in-block measurement, fused
  // (kernels/block_attention.py's contract): [num_slots, block_size] fp32 sums, added to.
  float* received;
  float* seen;
};

enum Status : int { kOk = 0, kBadArgs = 1, kCorruptPage = 2 };

struct Problem {
  Layout L;
  int num_heads, group;
  const uint8_t* pages;
  const uint8_t* staging_key;
  const uint8_t* staging_value;
  const int64_t* staging_slot;
  int64_t num_blocks, num_slots;
  const void* block_table;
  bool block_table_i64;
  int64_t block_table_stride;
  const void* query;
  int64_t query_dtype;
  int64_t q_stride_t, q_stride_h;
  float scale;
  float* received;  // null: no in-block measurement
  float* seen;
  std::vector<int64_t> seq_lens, q_start, q_len;

  int64_t block_of(int64_t seq, int64_t page) const {
    const int64_t i = seq * block_table_stride + page;
    return block_table_i64 ? static_cast<const int64_t*>(block_table)[i]
                           : static_cast<const int32_t*>(block_table)[i];
  }
};

struct Item {
  int64_t seq;
  int page_begin, page_end;
  int64_t partial;  // first row of this item in the partial buffer
};

// out[e] = x[i + e] * scale for e < n, x in dtype dt.
inline void load_scaled(const void* base, int64_t dt, int64_t i, int n, float scale, float* out) {
  if (dt == kBF16) {
    const uint16_t* x = static_cast<const uint16_t*>(base) + i;
    for (int e = 0; e < n; ++e) out[e] = bf16_to_float(x[e]) * scale;
  } else if (dt == kF16) {
    const uint16_t* x = static_cast<const uint16_t*>(base) + i;
    for (int e = 0; e < n; ++e) out[e] = half_to_float(x[e]) * scale;
  } else {
    const float* x = static_cast<const float*>(base) + i;
    for (int e = 0; e < n; ++e) out[e] = x[e] * scale;
  }
}

inline void store_as(void* base, int64_t dt, int64_t i, float x) {
  switch (dt) {
    case kBF16: static_cast<uint16_t*>(base)[i] = float_to_bf16(x); break;
    case kF16: static_cast<uint16_t*>(base)[i] = float_to_half(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

// Prefetch the bytes a sealed page really uses (its bit map says how many): pages are sized for the
// budget, and whole-page prefetches would fetch the unused tail too.
inline void prefetch_page(const uint8_t* page, const Layout& L) {
  int64_t region = 0;  // not yet validated: a nibble that is no precision code counts 0 bytes
  for (int t = 0; t < L.block_size; ++t) region += L.nibble_bytes[page[t] & 0xF] + L.nibble_bytes[page[t] >> 4];
  const int64_t used = std::min<int64_t>(L.page_bytes, L.header_bytes + L.num_kv_heads * region);
  for (int64_t o = 64; o < used; o += 64) __builtin_prefetch(page + o);
}

// The `attention` policy's measurement (kernels/block_attention.py), from the scores of a staged
// page, before they turn into the context-wide softmax: a query row whose own token lies in this
// page adds softmax over its block's keys up to itself (the staged view's key records are in
// position order) to received[slot, :], and 1 to seen[slot, :] there. Only the item holding a
// query's own page writes its slot, so threads never share a slot (no atomics; the sums do not
// depend on the thread count).
inline void measure_in_block(const Rows& R, const int* qpos, int64_t base, int bs, int64_t slot, const Problem& P) {
  float* received = P.received + slot * bs;
  float* seen = P.seen + slot * bs;
  for (int r = 0; r < R.count; ++r) {
    const int64_t offset = qpos[r] - base;
    if (offset < 0 || offset >= bs) continue;
    const int n = static_cast<int>(offset) + 1;
    float tmp[kMaxBlockSize];  // the scores stay: the context-wide softmax reads them next
    adakv::add_softmax(R.sc + r * R.sc_stride, n, tmp, received);
    for (int j = 0; j < n; ++j) seen[j] += 1.f;
  }
}

// Rows of an item are ordered (KV head, query token, head in group): head h's rows are contiguous.
template <class Path>
bool run_item(const Problem& P, const Item& it, std::vector<float>& ws, PageView& view, float* partial) {
  const Layout& L = P.L;
  const int d = L.head_size, bs = L.block_size, group = P.group, heads = L.num_kv_heads;
  const int64_t seq_len = P.seq_lens[it.seq], q_len = P.q_len[it.seq], q0 = P.q_start[it.seq];
  const int per_head = static_cast<int>(q_len) * group, rows = per_head * heads;
  const int sc_stride = (bs + 31) / 16 * 16;  // >= bs + 16: room for 4-wide stores past the end
  const bool nibble = Path::kNibbleOrder && L.group_size >= 32;
  const size_t need = static_cast<size_t>(rows) * (d * (nibble ? 6 : 4) + sc_stride + 5);
  if (ws.size() < need) ws.resize(need);
  float* w = ws.data();
  float* q = w;
  w += rows * d;
  float* qrot = w;
  w += rows * d;
  float* acc = w;
  w += rows * d;
  float* acc_rot = w;
  w += rows * d;
  float* sc = w;
  w += rows * sc_stride;
  float* qperm = nibble ? w : nullptr;
  w += nibble ? rows * d : 0;
  float* acc_perm = nibble ? w : nullptr;
  w += nibble ? rows * d : 0;
  float* m = w;
  float* l = w + rows;
  int* visible = reinterpret_cast<int*>(w + 2 * rows);
  int* qpos = visible + rows;  // query positions
  for (int h = 0; h < heads; ++h)
    for (int j = 0; j < q_len; ++j)
      for (int g = 0; g < group; ++g) {
        const int r = h * per_head + j * group + g;
        const int64_t head = static_cast<int64_t>(h) * group + g;
        load_scaled(P.query, P.query_dtype, (q0 + j) * P.q_stride_t + head * P.q_stride_h, d, P.scale, q + r * d);
        std::memcpy(qrot + r * d, q + r * d, sizeof(float) * d);  // FWHT(q) 2**(k-m), see the top
        adakv::fwht(qrot + r * d, d, L.hadamard_log2);
        adakv::scale_pow2(qrot + r * d, d, L.rotate_shift - L.hadamard_log2);
        qpos[r] = static_cast<int>(seq_len - q_len + j);
        m[r] = kNegInf;
        l[r] = 0.f;
      }
  std::fill(acc, acc + static_cast<size_t>(rows) * d, 0.f);
  std::fill(acc_rot, acc_rot + static_cast<size_t>(rows) * d, 0.f);
  if (nibble) {  // element 32b + 2i (+1) of the rotated query -> lane i of chunk 2b (2b + 1)
    std::fill(acc_perm, acc_perm + static_cast<size_t>(rows) * d, 0.f);
    for (int r = 0; r < rows; ++r)
      for (int b = 0; b < d; b += 32)
        for (int i = 0; i < 16; ++i) {
          qperm[r * d + b + i] = qrot[r * d + b + 2 * i];
          qperm[r * d + b + 16 + i] = qrot[r * d + b + 2 * i + 1];
        }
  }

  for (int page = it.page_begin; page < it.page_end; ++page) {
    const int64_t base = static_cast<int64_t>(page) * bs;
    const int n_valid = static_cast<int>(std::min<int64_t>(bs, seq_len - base));
    for (int r = 0; r < rows; ++r)
      visible[r] = static_cast<int>(std::clamp<int64_t>(qpos[r] - base + 1, 0, n_valid));
    const int64_t block = P.block_of(it.seq, page);
    if (block < 0 || block >= P.num_blocks) return false;
    // Pipeline: the bit map of page+2 is fetched now, so that page+1's body can be sized and
    // fetched from it while this page computes.
    if (page + 2 < it.page_end) {
      const int64_t later = P.block_of(it.seq, page + 2);
      if (later >= 0 && later < P.num_blocks) __builtin_prefetch(P.pages + later * L.page_stride);
    }
    if (page + 1 < it.page_end) {
      const int64_t next = P.block_of(it.seq, page + 1);
      if (next >= 0 && next < P.num_blocks && P.staging_slot[next] < 0)
        prefetch_page(P.pages + next * L.page_stride, L);
    }
    const int64_t slot = P.staging_slot[block];
    if (slot >= 0) {
      if (slot >= P.num_slots) return false;
      view_staged(P.staging_key, P.staging_value, slot, n_valid, L, view);
    } else if (!view_page(P.pages + block * L.page_stride, L, view)) {
      return false;
    }
    for (int h = 0; h < heads; ++h) {
      const int r0 = h * per_head;
      Rows R{per_head,      d,           sc_stride,     q + r0 * d,
             qrot + r0 * d, sc + r0 * sc_stride, acc + r0 * d, acc_rot + r0 * d,
             visible + r0,  nibble ? qperm + r0 * d : nullptr, nibble ? acc_perm + r0 * d : nullptr};
      for (int i = 0; i < view.num_runs[0]; ++i) {
        const Run& run = view.runs[0][i];
        Path::scores(run, run.base + h * run.head_step, view.order[0] + run.first, R, L);
      }
      if (slot >= 0 && P.received) measure_in_block(R, qpos + r0, base, bs, slot, P);
      Path::softmax(R, view.order[0], view.num_records, m + r0, l + r0);
      for (int i = 0; i < view.num_runs[1]; ++i) {
        const Run& run = view.runs[1][i];
        Path::values(run, run.base + h * run.head_step, view.order[1] + run.first, view.key_rank, R, L);
      }
    }
  }
  if (nibble)  // fold the nibble-order accumulators back into element order
    for (int r = 0; r < rows; ++r)
      for (int b = 0; b < d; b += 32)
        for (int i = 0; i < 16; ++i) {
          acc_rot[r * d + b + 2 * i] += acc_perm[r * d + b + i];
          acc_rot[r * d + b + 2 * i + 1] += acc_perm[r * d + b + 16 + i];
        }
  for (int r = 0; r < rows; ++r) {  // acc += unrotate(acc_rot) = FWHT(acc_rot) 2**(k-m)
    float* a = acc_rot + r * d;
    adakv::fwht(a, d, L.hadamard_log2);
    for (int e = 0; e < d; ++e) acc[r * d + e] += a[e] * L.unrotate;
  }
  const int width = d + 2;
  for (int r = 0; r < rows; ++r) {
    float* out = partial + (it.partial + r) * width;
    out[0] = m[r];
    out[1] = l[r];
    std::memcpy(out + 2, acc + r * d, sizeof(float) * d);
  }
  return true;
}

using ItemFn = bool (*)(const Problem&, const Item&, std::vector<float>&, PageView&, float*);

ItemFn pick_path(int head_size, bool force_scalar) {
#ifdef ADAKV_AVX512
  if (!force_scalar) {
    if (head_size == 64) return run_item<Avx512Path<4>>;
    if (head_size == 128) return run_item<Avx512Path<8>>;
    return run_item<Avx512Path<0>>;
  }
#endif
  (void)head_size;
  (void)force_scalar;
  return run_item<ScalarPath>;
}

std::vector<int64_t> read_index(const void* p, bool i64, int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i)
    v[i] = i64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
  return v;
}

// The codebooks' levels into L; false unless the precisions are 2/3/4/8/16 bits with 2**bits levels
// and the 8-bit levels form an exact grid (what the AVX-512 decoder computes instead of a lookup).
bool read_codebooks(const adakv::Codebooks* books, Layout& L) {
  if (!books || L.bits[0] != 2 || L.bits[1] != 3 || L.bits[2] != 4 || L.bits[3] != 8 || L.bits[kFp16Code] != 16)
    return false;
  for (int c = 0; c < kQuantizedCodes; ++c) {
    const adakv::Codebook& cb = books->code[c];
    if (!adakv::codebook_ok(cb, L.bits[c])) return false;
    L.levels[c] = cb.levels;
    for (int i = 0; i < 16; ++i) L.lv[c][i] = i < cb.num_levels ? cb.levels[i] : 0.f;
  }
  const float* grid = books->code[3].levels;
  L.grid_base = grid[0];
  L.grid_step = grid[1] - grid[0];
  for (int i = 0; i < 256; ++i)
    if (std::fma(static_cast<float>(i), L.grid_step, L.grid_base) != grid[i]) return false;
  return true;
}

int run(const Args& a) {
  Problem P;
  Layout& L = P.L;
  static_cast<adakv::PageNumbers&>(L) = adakv::read_page_numbers(a.layout);
  L.head_size = static_cast<int>(a.head_size);
  L.num_kv_heads = static_cast<int>(a.num_kv_heads);
  L.page_stride = a.page_stride;
  // cpu.py validates user input; these guard the kernel's own buffers.
  if (L.block_size <= 0 || L.block_size > kMaxBlockSize || L.header_bytes < L.block_size ||
      L.head_size % 16 != 0 || L.head_size > kMaxHeadSize || L.group_size < 16 ||
      (L.group_size & (L.group_size - 1)) != 0 || L.head_size % L.group_size != 0 || L.num_kv_heads <= 0 ||
      a.num_heads % a.num_kv_heads != 0 || L.hadamard_log2 < 4 || L.head_size % (1 << L.hadamard_log2) != 0 ||
      !read_codebooks(a.codebooks, L))
    return kBadArgs;
  L.num_groups = L.head_size / L.group_size;
  L.chunk_shift = 0;
  while ((16 << L.chunk_shift) < L.group_size) ++L.chunk_shift;
  for (int nibble = 0; nibble < 16; ++nibble) L.nibble_bytes[nibble] = nibble < kNumCodes ? L.record_bytes[nibble] : 0;
  L.unrotate = std::ldexp(1.0f, L.rotate_shift - L.hadamard_log2);

  P.num_heads = static_cast<int>(a.num_heads);
  P.group = P.num_heads / L.num_kv_heads;
  P.pages = a.pages;
  P.staging_key = a.staging_key;
  P.staging_value = a.staging_value;
  P.staging_slot = a.staging_slot;
  P.num_blocks = a.num_blocks;
  P.num_slots = a.num_slots;
  P.block_table = a.block_table;
  P.block_table_i64 = a.block_table_i64 != 0;
  P.block_table_stride = a.block_table_stride;
  P.query = a.query;
  P.query_dtype = a.query_dtype;
  P.q_stride_t = a.q_stride_t;
  P.q_stride_h = a.q_stride_h;
  P.scale = static_cast<float>(a.scale);
  if ((a.received == nullptr) != (a.seen == nullptr)) return kBadArgs;
  P.received = a.received;
  P.seen = a.seen;
  const int64_t num_seqs = a.num_seqs;
  P.seq_lens = read_index(a.seq_lens, a.seq_lens_i64 != 0, num_seqs);
  const std::vector<int64_t> qsl = read_index(a.query_start_loc, a.query_start_loc_i64 != 0, num_seqs + 1);
  P.q_start.assign(qsl.begin(), qsl.begin() + num_seqs);
  P.q_len.resize(num_seqs);

  const int64_t num_threads = std::max<int64_t>(1, a.num_threads);
  const int bs = L.block_size;
  for (int64_t s = 0; s < num_seqs; ++s) {
    P.q_len[s] = qsl[s + 1] - qsl[s];
    if (P.q_len[s] < 0 || P.q_len[s] > P.seq_lens[s] || qsl[s] < 0 || qsl[s + 1] > a.num_tokens ||
        (P.seq_lens[s] + bs - 1) / bs > a.block_table_width)
      return kBadArgs;
  }
  std::vector<Item> items;
  std::vector<int64_t> seq_first;  // per sequence with queries: its first item
  std::vector<int64_t> seq_of_group;
  int64_t rows_total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (P.q_len[s] == 0) continue;
    const int64_t num_pages = (P.seq_lens[s] + bs - 1) / bs;
    const int64_t rows = P.q_len[s] * P.num_heads;
    // A sequence's split depends on its own length (and the thread count) only, never on the rest of
    // the batch: up to num_threads items of >= 8 pages. The merge's rounding then does not change
    // with batch composition, so a request decodes the same tokens alone or in any batch.
    const int64_t pages_per_split =
        a.pages_per_split > 0 ? a.pages_per_split
                              : std::max<int64_t>(8, (num_pages + num_threads - 1) / num_threads);
    seq_first.push_back(static_cast<int64_t>(items.size()));
    seq_of_group.push_back(s);
    for (int64_t p0 = 0; p0 < num_pages; p0 += pages_per_split) {
      items.push_back(
          {s, static_cast<int>(p0), static_cast<int>(std::min(num_pages, p0 + pages_per_split)), rows_total});
      rows_total += rows;
    }
  }
  seq_first.push_back(static_cast<int64_t>(items.size()));
  if (items.empty()) return kOk;

  std::vector<float> partial(static_cast<size_t>(rows_total) * (L.head_size + 2));
  const ItemFn fn = pick_path(L.head_size, a.force_scalar != 0);
  std::atomic<int64_t> next{0};
  std::atomic<bool> corrupt{false};
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int team = static_cast<int>(std::min(num_threads, num_items));
#pragma omp parallel num_threads(team)
  {
    std::vector<float> ws;
    std::unique_ptr<PageView> view(new PageView);
    for (int64_t i = next++; i < num_items; i = next++)
      if (!fn(P, items[i], ws, *view, partial.data())) corrupt = true;
  }
  if (corrupt) return kCorruptPage;

  // Merge the splits of every sequence and write `out` in its dtype. Rows: (KV head, token, group).
  // Serial: it touches rows x splits x head_size floats, far less than one item's work, and a second
  // parallel region would add a barrier per layer -- costly when the cores are oversubscribed.
  const int d = L.head_size, width = d + 2;
  const int64_t num_groups = static_cast<int64_t>(seq_of_group.size());
  std::vector<float> row(d);
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    const int64_t s = seq_of_group[gi], first = seq_first[gi], n_split = seq_first[gi + 1] - first;
    const int per_head = static_cast<int>(P.q_len[s]) * P.group;
    const int rows = per_head * L.num_kv_heads;
    for (int r = 0; r < rows; ++r) {
      float mx = kNegInf;
      for (int64_t k = 0; k < n_split; ++k) mx = std::max(mx, partial[(items[first + k].partial + r) * width]);
      float l = 0.f;
      std::fill(row.begin(), row.end(), 0.f);
      for (int64_t k = 0; k < n_split; ++k) {
        const float* src = partial.data() + (items[first + k].partial + r) * width;
        if (src[0] == kNegInf) continue;
        const float w = std::exp(src[0] - mx);
        l += src[1] * w;
        for (int e = 0; e < d; ++e) row[e] += src[2 + e] * w;
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int h = r / per_head, j = (r % per_head) / P.group, g = r % P.group;
      const int64_t o = (P.q_start[s] + j) * a.out_stride_t + (static_cast<int64_t>(h) * P.group + g) * a.out_stride_h;
      for (int e = 0; e < d; ++e) store_as(a.out, a.out_dtype, o + e, row[e] * inv);
    }
  }
  return kOk;
}

}  // namespace

extern "C" {

// 0 = ok, 1 = inconsistent arguments, 2 = a bit map / block id / staging slot out of range.
int adakv_paged_attention(const Args* args) { return run(*args); }

int adakv_has_avx512() {
#ifdef ADAKV_AVX512
  return 1;
#else
  return 0;
#endif
}

int64_t adakv_args_size() { return static_cast<int64_t>(sizeof(Args)); }

}  // extern "C"
