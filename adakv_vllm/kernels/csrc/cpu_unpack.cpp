// The page decoder, compiled: packed mixed-precision pages of one layer -> the K and V of every token
// in the model's 16-bit dtype, for the scratch path (KVStore.gather) that hands vLLM's own CPU
// attention a plain copy of the context.
//
// Contract and oracle: kernels/page_codec.py::PageCodec.decode(pages)[:2], converted .to(storage dtype)
// -- the same bits. The layout is quant/format.py's, whose sizes arrive in `layout` (cpu.py:
// layout_numbers); this file applies only its documented rules:
//   * page = [bit map: header_bytes][head 0 region][head 1 region]...; bit map byte t = key code |
//     value code << 4; every region has the size implied by the bit map;
//   * a head region holds the key records then the value records, each part ordered by precision
//     code ascending, ties by token position -- so walking the tokens in order and taking the next
//     record of each one's class visits every record where it lies (as cpu_seal.cpp writes them);
//   * a quantized record is [codes: little-endian bit stream][scales fp16 x G]; a 16-bit record is
//     the storage dtype's bytes verbatim.
//
// Arithmetic: exactly the oracle's (quant/reference.py::decode_records), one IEEE-rounded fp32
// operation per torch op, never fused (the library builds with -ffp-contract=off):
//   y_i = fp32(LEVELS[bits][code_i] * scale of its group)      dequantize
//   rotation.fwht's butterflies, stage h = 1, 2, 4, ...       (a + b, a - b), in that order
//   x_i = fp32(fwht(y)_i * 2**(k - m))                          unrotate's power of two
//   out_i = x_i rounded to the storage dtype, to nearest even  torch's .to(bfloat16 / float16)
// 16-bit records are copied verbatim (what .float().to(dtype) gives back for any finite value).
//
// Work: one OpenMP item per (page, KV head), torch.get_num_threads() threads (see library.py:
// Threads); an item parses its page's bit map (block_size bytes) and writes that head's rows of
// out_key / out_value. Block ids, output rows and every bit map are checked before a byte is written.
// Paths: AVX-512 (codes unpacked in registers, the butterflies across registers) where the build
// has it, else -- or with force_scalar -- a portable one; both round identically.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_layout.h"
#include "cpu_quant.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ADAKV_UNPACK_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int kNumCodes = adakv::kPrecisionCodes;  // codes 0..4 = 2/3/4/8/16 bits (precision.py)
constexpr int kFp16Code = adakv::kFp16Code;
constexpr int kMaxHeadSize = 256;
constexpr int kMinGroupSize = 16;  // format.SUPPORTED_GROUP_SIZES

enum Status { kOk = 0, kBadArgs = 1, kCorruptPage = 2, kBadRows = 3 };

// Mirror of library.py's UnpackArgs, field by field.
struct UnpackArgs {
  int64_t layout[adakv::kLayoutNumbers];  // cpu.py: layout_numbers
  const adakv::Codebooks* codebooks;      // cpu.py: codebooks (quant/levels.py's tables)
  int64_t head_size, num_kv_heads, num_pages;
  const uint8_t* pages;     // [num_blocks, >= page_bytes] rows, page_stride bytes apart
  int64_t page_stride, num_blocks;
  const int64_t* block_ids;  // [num_pages]: the page row decoded as page i
  const int64_t* rows;       // [num_pages]: the output row page i is written to; null = 0, 1, ...
  uint16_t* out_key;         // [num_rows, block_size, num_kv_heads, head_size] storage dtype
  uint16_t* out_value;       // same
  int64_t num_rows, force_scalar, num_threads;
};

// Sizes from quant/format.py, never derived here.
struct Layout : adakv::PageNumbers {
  int head_size, num_groups, num_kv_heads;
  int chunk_shift;                          // log2(group_size / 16): chunk c of 16 elements is in group c >> chunk_shift
  float unrotate;                           // 2**(k - m)
  const float* levels[adakv::kQuantizedCodes];  // LEVELS of each quantized code
};

// ---- rounding to the storage dtype ------------------------------------------------------------

// fp32 -> bf16 bits, round to nearest even: c10::BFloat16's (and torch's vectorised) formula.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN (a finite page never decodes to one)
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

// ================================ portable path =================================================
struct ScalarPath {
  // y = LEVELS[code] * scale, one little-endian word at a time: 16 codes (4, 6 or 8 bytes) at
  // 2/3/4 bits, 8 codes at 8 bits; element j of a word at bits [j*kBits, (j+1)*kBits).
  template <int kBits>
  static void dequantize(const uint8_t* rec, const Layout& L, int code, float* y) {
    constexpr int kPerWord = kBits == 8 ? 8 : 16;
    const float* levels = L.levels[code];
    for (int i = 0; i < L.head_size; i += kPerWord) {
      uint64_t word = 0;
      std::memcpy(&word, rec + i * kBits / 8, kPerWord * kBits / 8);
      _Float16 half;
      std::memcpy(&half, rec + L.scales_offset[code] + 2 * ((i >> 4) >> L.chunk_shift), sizeof half);
      const float s = static_cast<float>(half);  // groups hold whole 16-element chunks
      for (int j = 0; j < kPerWord; ++j) y[i + j] = levels[(word >> (j * kBits)) & ((1u << kBits) - 1)] * s;
    }
  }

  static void decode(int code, const uint8_t* rec, const Layout& L, uint16_t* dst) {
    const int d = L.head_size;
    if (code == kFp16Code) {
      std::memcpy(dst, rec, 2 * static_cast<size_t>(d));
      return;
    }
    alignas(64) float y[kMaxHeadSize];
    switch (code) {  // read_layout: codes 0..3 are 2, 3, 4, 8 bits
      case 0: dequantize<2>(rec, L, code, y); break;
      case 1: dequantize<3>(rec, L, code, y); break;
      case 2: dequantize<4>(rec, L, code, y); break;
      default: dequantize<8>(rec, L, code, y); break;
    }
    adakv::fwht(y, d, L.hadamard_log2);
    for (int i = 0; i < d; ++i) y[i] *= L.unrotate;
    if (L.storage_bf16) {
      for (int i = 0; i < d; ++i) dst[i] = float_to_bf16(y[i]);
    } else {
      for (int i = 0; i < d; ++i) dst[i] = adakv::half_bits(static_cast<_Float16>(y[i]));
    }
  }
};

// ================================ AVX-512 path ==================================================
#ifdef ADAKV_UNPACK_AVX512
constexpr int kMaxChunks = kMaxHeadSize / 16;
#define ADAKV_INLINE inline __attribute__((always_inline))

inline __m512 as_m512(adakv::v16f v) { return reinterpret_cast<__m512>(v); }
inline adakv::v16f as_v16f(__m512 v) { return reinterpret_cast<adakv::v16f>(v); }

// The codes of chunk c (16 elements) as lane indices; CODE: the precision code (2/3/4/8 bits).
template <int CODE>
ADAKV_INLINE __m512i chunk_codes(const uint8_t* rec, int c) {
  if constexpr (CODE == 0) {  // 4 bytes: element i at bit 2i of the little-endian word
    uint32_t word;
    std::memcpy(&word, rec + 4 * c, 4);
    const __m512i shift = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shift),
                            _mm512_set1_epi32(3));
  } else if constexpr (CODE == 1) {
    // 6 bytes, read as one 64-bit word (the 2 bytes past the last codes are the record's own
    // scales): elements 0..7 from bits 0..23, elements 8..15 from bits 24..47.
    uint64_t word;
    std::memcpy(&word, rec + 6 * c, 8);
    const __m512i w = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(word)), 0xFF00,
                                             static_cast<int>(word >> 24));
    const __m512i shift = _mm512_set_epi32(21, 18, 15, 12, 9, 6, 3, 0, 21, 18, 15, 12, 9, 6, 3, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(w, shift), _mm512_set1_epi32(7));
  } else if constexpr (CODE == 2) {  // 8 bytes: element 2j the low nibble of byte j, 2j + 1 the high one
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec + 8 * c));
    const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(twice, shift), _mm512_set1_epi32(0xF));
  } else {  // one byte per element
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16 * c)));
  }
}

// v[c] = LEVELS[code] * scale for the nc chunks of a quantized record.
template <int CODE>
ADAKV_INLINE void dequantize(const uint8_t* rec, const Layout& L, int nc, __m512* v) {
  const __m512 lv = CODE < 3 ? _mm512_loadu_ps(L.levels[CODE]) : _mm512_setzero_ps();  // <= 16 levels
  const __mmask16 gmask = static_cast<__mmask16>((1u << L.num_groups) - 1);
  const __m512 scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, rec + L.scales_offset[CODE]));
  for (int c = 0; c < nc; ++c) {
    const __m512i codes = chunk_codes<CODE>(rec, c);
    const __m512 level = CODE < 3 ? _mm512_permutexvar_ps(codes, lv) : _mm512_i32gather_ps(codes, L.levels[CODE], 4);
    v[c] = _mm512_mul_ps(level, _mm512_permutexvar_ps(_mm512_set1_epi32(c >> L.chunk_shift), scales));
  }
}

// rotation.fwht over the chunks in registers: stages 1..8 inside each chunk (cpu_quant.h's
// butterflies), then 16, 32, ... across chunks, up to the Hadamard block of block_chunks chunks.
ADAKV_INLINE void fwht_chunks(__m512* v, int nc, int block_chunks) {
  using adakv::butterfly;
  for (int c = 0; c < nc; ++c) v[c] = as_m512(butterfly<8>(butterfly<4>(butterfly<2>(butterfly<1>(as_v16f(v[c]))))));
  for (int h = 1; h < block_chunks; h *= 2)
    for (int run = 0; run < nc; run += 2 * h)
      for (int i = run; i < run + h; ++i) {
        const __m512 a = v[i], b = v[i + h];
        v[i] = _mm512_add_ps(a, b);
        v[i + h] = _mm512_sub_ps(a, b);
      }
}

// 16 fp32 -> 16 bf16 bits, float_to_bf16 lane by lane.
ADAKV_INLINE __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// NC: head_size / 16 when fixed at compile time (the loops unroll), else 0.
template <int NC>
struct Avx512Path {
  static void decode(int code, const uint8_t* rec, const Layout& L, uint16_t* dst) {
    const int d = L.head_size;
    if (code == kFp16Code) {
      std::memcpy(dst, rec, 2 * static_cast<size_t>(d));
      return;
    }
    const int nc = NC ? NC : d / 16;
    __m512 v[NC ? NC : kMaxChunks];
    switch (code) {
      case 0: dequantize<0>(rec, L, nc, v); break;
      case 1: dequantize<1>(rec, L, nc, v); break;
      case 2: dequantize<2>(rec, L, nc, v); break;
      default: dequantize<3>(rec, L, nc, v); break;
    }
    fwht_chunks(v, nc, NC ? (NC & -NC) : (1 << L.hadamard_log2) / 16);
    const __m512 unrotate = _mm512_set1_ps(L.unrotate);
    for (int c = 0; c < nc; ++c) {
      const __m512 x = _mm512_mul_ps(v[c], unrotate);
      const __m256i bits = L.storage_bf16 ? to_bf16(x) : _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), bits);
    }
  }
};
#endif  // ADAKV_UNPACK_AVX512

// ================================ driver =========================================================

struct Problem {
  Layout L;
  const UnpackArgs* a;
};

// Where the key and value records of a page start, by class, and one region's size; false on a
// nibble that is no precision code or a region that overflows the page.
bool class_offsets(const uint8_t* page, const Layout& L, int64_t first[2][kNumCodes], int64_t* region) {
  int count[2][kNumCodes] = {};
  bool ok = true;
  for (int t = 0; t < L.block_size; ++t) {
    const int k = page[t] & 0xF, v = page[t] >> 4;
    ok &= k < kNumCodes && v < kNumCodes;
    ++count[0][k < kNumCodes ? k : 0];
    ++count[1][v < kNumCodes ? v : 0];
  }
  int64_t offset = 0;
  for (int part = 0; part < 2; ++part)  // the value part starts where the key part ends
    for (int c = 0; c < kNumCodes; ++c) {
      first[part][c] = offset;
      offset += static_cast<int64_t>(count[part][c]) * L.record_bytes[c];
    }
  *region = offset;
  return ok && L.header_bytes + L.num_kv_heads * offset <= L.page_bytes;
}

// Decode head h of page i into its output row.
template <class Path>
void unpack_head(const Problem& P, int64_t i, int h) {
  const Layout& L = P.L;
  const UnpackArgs& a = *P.a;
  const uint8_t* page = a.pages + a.block_ids[i] * a.page_stride;
  int64_t next[2][kNumCodes], region;
  class_offsets(page, L, next, &region);  // checked for every page before any item runs
  const uint8_t* base = page + L.header_bytes + h * region;
  const int64_t token_elems = static_cast<int64_t>(L.num_kv_heads) * L.head_size;
  const int64_t start = (a.rows ? a.rows[i] : i) * L.block_size * token_elems + static_cast<int64_t>(h) * L.head_size;
  uint16_t* out[2] = {a.out_key + start, a.out_value + start};
  for (int t = 0; t < L.block_size; ++t)
    for (int part = 0; part < 2; ++part) {
      const int c = part == 0 ? page[t] & 0xF : page[t] >> 4;
      Path::decode(c, base + next[part][c], L, out[part] + t * token_elems);
      next[part][c] += L.record_bytes[c];
    }
}

using HeadFn = void (*)(const Problem&, int64_t, int);

HeadFn pick_path(int head_size, bool force_scalar) {
#ifdef ADAKV_UNPACK_AVX512
  if (!force_scalar) {
    if (head_size == 64) return unpack_head<Avx512Path<4>>;
    if (head_size == 128) return unpack_head<Avx512Path<8>>;
    return unpack_head<Avx512Path<0>>;
  }
#endif
  (void)head_size;
  (void)force_scalar;
  return unpack_head<ScalarPath>;
}

int read_layout(const UnpackArgs& a, Layout& L) {
  static_cast<adakv::PageNumbers&>(L) = adakv::read_page_numbers(a.layout);
  L.head_size = static_cast<int>(a.head_size);
  L.num_kv_heads = static_cast<int>(a.num_kv_heads);
  // cpu.py validates user input; these guard this file's own assumptions and buffers.
  if (L.head_size <= 0 || L.head_size > kMaxHeadSize || L.head_size % 16 || L.group_size < kMinGroupSize ||
      (L.group_size & (L.group_size - 1)) || L.head_size % L.group_size || L.num_kv_heads <= 0 ||
      L.block_size <= 0 || L.header_bytes < L.block_size || a.num_pages < 0 || a.page_stride < L.page_bytes ||
      !a.codebooks || L.hadamard_log2 < 4 || L.head_size % (1 << L.hadamard_log2))
    return kBadArgs;
  if (L.bits[0] != 2 || L.bits[1] != 3 || L.bits[2] != 4 || L.bits[3] != 8 || L.bits[kFp16Code] != 16) return kBadArgs;
  for (int c = 0; c < adakv::kQuantizedCodes; ++c) {
    if (!adakv::codebook_ok(a.codebooks->code[c], L.bits[c])) return kBadArgs;
    L.levels[c] = a.codebooks->code[c].levels;
  }
  L.num_groups = L.head_size / L.group_size;
  L.chunk_shift = 0;
  while ((16 << L.chunk_shift) < L.group_size) ++L.chunk_shift;
  L.unrotate = std::ldexp(1.0f, L.rotate_shift - L.hadamard_log2);
  return kOk;
}

int unpack(const UnpackArgs& a) {
  Problem P{{}, &a};
  Layout& L = P.L;
  if (const int status = read_layout(a, L)) return status;
  // every source page and output row in range, every output row written once (two pages in one row
  // would race), every bit map sound -- before anything is written
  std::vector<int64_t> rows(static_cast<size_t>(a.num_pages));
  for (int64_t i = 0; i < a.num_pages; ++i) {
    rows[i] = a.rows ? a.rows[i] : i;
    if (a.block_ids[i] < 0 || a.block_ids[i] >= a.num_blocks || rows[i] < 0 || rows[i] >= a.num_rows)
      return kBadRows;
  }
  std::sort(rows.begin(), rows.end());
  if (std::adjacent_find(rows.begin(), rows.end()) != rows.end()) return kBadRows;
  for (int64_t i = 0; i < a.num_pages; ++i) {
    int64_t first[2][kNumCodes], region;
    if (!class_offsets(a.pages + a.block_ids[i] * a.page_stride, L, first, &region)) return kCorruptPage;
  }
  const HeadFn fn = pick_path(L.head_size, a.force_scalar != 0);
  const int64_t items = a.num_pages * L.num_kv_heads;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min(a.num_threads, items)));
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t item = 0; item < items; ++item)
    fn(P, item / L.num_kv_heads, static_cast<int>(item % L.num_kv_heads));
  return kOk;
}

}  // namespace

extern "C" {

// 0 = ok; 1 = inconsistent arguments; 2 = a bit map with a nibble that is no precision code, or
// records beyond the page; 3 = a block id or output row out of range, or an output row repeated
// (1-3: nothing written).
int adakv_unpack(const UnpackArgs* args) { return unpack(*args); }

int64_t adakv_unpack_args_size() { return static_cast<int64_t>(sizeof(UnpackArgs)); }

}  // extern "C"
