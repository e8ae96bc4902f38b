// Fused CPU paged attention over AdaKV's mixed-precision pages: reads the packed records in place.
//
// Contract: attention/ops/torch_ref.py (`paged_attention_ref`), causal, any query_len per sequence
// (decode is the fast case: the backend sends only pure-decode steps here).
//
// Layout: quant/format.py owns every size and offset; the caller passes them in `layout` (see
// attention/ops/cpu.py). This file implements only format.py's documented packing rules:
//   * a page is [bit map: header_bytes][head 0 region][head 1 region]...; every region has the
//     same size, the sum over the block's tokens of record_bytes[key code] + record_bytes[value code];
//   * a region holds the key records then the value records, each part ordered by precision code
//     ascending, ties by token position; bit map byte t = key code | value code << 4;
//   * a quantized record is [codes][scales fp16 x G][mins fp16 x G] (offsets given), element i of a
//     byte occupies bits [i*bits, (i+1)*bits) (little-endian), and decodes as code*scale + min;
//   * a 16-bit record is the model's 16-bit dtype verbatim (the staging dtype).
// With rotate_keys, quantized key records hold k @ R; R is orthonormal, so q . k == (q @ R) . (k @ R)
// and the kernel dots them with the pre-rotated query instead of rotating keys back.
//
// Work: one item = (sequence, KV head, range of pages). An item decodes each record once and serves
// every query row of its GQA group (rows = query_len x heads per KV head). Per page it computes the
// scores of the page's tokens, updates an online softmax at page granularity (one rescale per page),
// then accumulates the values. Long contexts are split over pages (flash-decoding) so that batch 1
// with 3 KV heads still feeds every thread; a second pass merges the splits' (max, sum, acc).
// Threads: at::parallel_for (torch's own OpenMP pool, i.e. the threads vLLM's CPU worker binds);
// items are handed out through an atomic counter because their costs differ.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(ADAKV_FORCE_SCALAR)
#define ADAKV_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int kNumCodes = 4;      // precision codes 0..3 = 2/4/8/16 bits (format.py / precision.py)
constexpr int kFp16Code = 3;      // the verbatim 16-bit precision
constexpr int kMaxBlockSize = 1024;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sizes from quant/format.py, never derived here (see cpu.py: layout_numbers).
struct Layout {
  int block_size, head_size, group_size, num_groups, header_bytes, num_kv_heads;
  int64_t page_bytes, page_stride;
  int record_bytes[kNumCodes], scales_offset[kNumCodes], mins_offset[kNumCodes], bits[kNumCodes];
  bool storage_bf16, rotate_keys;
};

// Record order of one page: counting sort of the bit map, for the key part [0] and value part [1].
struct PageIndex {
  int part_bytes[2];
  int first[2][kNumCodes + 1];        // record index where each class starts
  int byte_start[2][kNumCodes];       // byte offset of each class from its part's start
  uint16_t order[2][kMaxBlockSize];   // token positions in record order
};

inline bool build_index(const uint8_t* bit_map, const Layout& L, PageIndex& ix) {
  int count[2][kNumCodes] = {};
  for (int t = 0; t < L.block_size; ++t) {
    const int k = bit_map[t] & 0xF, v = bit_map[t] >> 4;
    if (k >= kNumCodes || v >= kNumCodes) return false;
    ++count[0][k];
    ++count[1][v];
  }
  for (int part = 0; part < 2; ++part) {
    int index = 0, bytes = 0;
    for (int c = 0; c < kNumCodes; ++c) {
      ix.first[part][c] = index;
      ix.byte_start[part][c] = bytes;
      index += count[part][c];
      bytes += count[part][c] * L.record_bytes[c];
    }
    ix.first[part][kNumCodes] = index;
    ix.part_bytes[part] = bytes;
  }
  int next[2][kNumCodes];
  std::memcpy(next, ix.first, sizeof(next[0]));
  std::memcpy(next[1], ix.first[1], sizeof(next[1]));
  for (int t = 0; t < L.block_size; ++t) {
    ix.order[0][next[0][bit_map[t] & 0xF]++] = static_cast<uint16_t>(t);
    ix.order[1][next[1][bit_map[t] >> 4]++] = static_cast<uint16_t>(t);
  }
  return true;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline float bf16_to_float(uint16_t h) {
  return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits()));
}

// ---- one record -> fp32, portable ------------------------------------------------------------
inline void decode_record_scalar(const uint8_t* rec, int code, const Layout& L, float* out) {
  const int d = L.head_size;
  if (code == kFp16Code) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(rec);
    for (int i = 0; i < d; ++i) out[i] = L.storage_bf16 ? bf16_to_float(x[i]) : half_to_float(x[i]);
    return;
  }
  const int bits = L.bits[code], per_byte = 8 / bits, mask = (1 << bits) - 1;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(rec + L.scales_offset[code]);
  const uint16_t* mins = reinterpret_cast<const uint16_t*>(rec + L.mins_offset[code]);
  for (int i = 0; i < d; ++i) {
    const int q = (rec[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    const int g = i / L.group_size;
    out[i] = static_cast<float>(q) * half_to_float(scales[g]) + half_to_float(mins[g]);
  }
}

#ifdef ADAKV_AVX512
// ---- one record -> NC zmm of fp32 (elements 16c .. 16c+15 in out[c]) ---------------------------
// KIND: 0/1/2 = 2/4/8-bit codes, 3 = bf16, 4 = fp16. NC = head_size / 16, or 0 = runtime (nc).
constexpr int kMaxChunks = 16;  // head_size <= 256

template <int NC>
struct Chunks {
  static constexpr int kCap = NC ? NC : kMaxChunks;
};

template <int KIND>
inline __m512i unpack16(const uint8_t* codes, int c) {
  if constexpr (KIND == 2) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * c)));
  } else if constexpr (KIND == 1) {
    // 8 bytes hold 16 nibbles: duplicate each byte, then shift odd lanes by 4.
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * c));
    const __m512i w = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(w, shift), _mm512_set1_epi32(0xF));
  } else {
    // 4 bytes hold 16 crumbs: element i at bit 2i of the little-endian word.
    uint32_t word;
    std::memcpy(&word, codes + 4 * c, 4);
    const __m512i shift = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shift),
                            _mm512_set1_epi32(0x3));
  }
}

template <int KIND, int NC>
inline void decode_record(const uint8_t* rec, const Layout& L, int nc, __m512* out) {
  constexpr int code = KIND < 3 ? KIND : kFp16Code;
  const int n = NC ? NC : nc;
  if constexpr (KIND == 3) {
    for (int c = 0; c < n; ++c) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * c));
      out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  } else if constexpr (KIND == 4) {
    for (int c = 0; c < n; ++c)
      out[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 * c)));
  } else {
    const __mmask16 gmask = static_cast<__mmask16>((1u << L.num_groups) - 1);
    const __m512 scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, rec + L.scales_offset[code]));
    const __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gmask, rec + L.mins_offset[code]));
    const int chunks_per_group = L.group_size / 16;
    for (int c = 0; c < n; ++c) {
      const __m512i g = _mm512_set1_epi32(c / chunks_per_group);
      const __m512 x = _mm512_cvtepi32_ps(unpack16<KIND>(rec, c));
      out[c] = _mm512_fmadd_ps(x, _mm512_permutexvar_ps(g, scales), _mm512_permutexvar_ps(g, mins));
    }
  }
}

inline __m512 exp512(__m512 x) {
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
#endif  // ADAKV_AVX512

// Everything one work item needs, in fp32, laid out per query row (row = j * group + g).
struct ItemState {
  int rows, d, sc_stride;
  float* q;      // [rows, d], pre-scaled by `scale`
  float* qrot;   // [rows, d] (rotated query, pre-scaled) or == q when keys are not rotated
  float* sc;     // [rows, sc_stride] scores, then probabilities, of the current page
  float* acc;    // [rows, d]
  float* m;      // [rows] running max
  float* l;      // [rows] running sum
  int* visible;  // [rows] visible tokens of the current page
};

// ---- scores of one page ----------------------------------------------------------------------
// key(t) for t < n_valid is given by the caller through `for_each_key(fn)`, fn(t, record, code).
#ifdef ADAKV_AVX512
template <int KIND, int NC>
inline void score_run(const uint8_t* rec, int stride, const uint16_t* order, int n, int n_valid,
                      const float* qsel, ItemState& s, const Layout& L, int nc) {
  __m512 kv[Chunks<NC>::kCap];
  const int chunks = NC ? NC : nc;
  for (int i = 0; i < n; ++i, rec += stride) {
    const int t = order ? order[i] : i;
    if (t >= n_valid) continue;
    decode_record<KIND, NC>(rec, L, nc, kv);
    for (int r = 0; r < s.rows; ++r) {
      const float* q = qsel + r * s.d;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), kv[0]);
      for (int c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), kv[c], acc);
      s.sc[r * s.sc_stride + t] = _mm512_reduce_add_ps(acc);
    }
  }
}

template <int KIND, int NC, int RB>
inline void value_run_rows(const uint8_t* rec, int stride, const uint16_t* order, int n, int t_max,
                           const float* p, float* acc_rows, ItemState& s, const Layout& L, int nc) {
  const int chunks = NC ? NC : nc;
  __m512 acc[RB][Chunks<NC>::kCap];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_loadu_ps(acc_rows + r * s.d + 16 * c);
  __m512 v[Chunks<NC>::kCap];
  for (int i = 0; i < n; ++i, rec += stride) {
    const int t = order ? order[i] : i;
    if (t >= t_max) continue;
    decode_record<KIND, NC>(rec, L, nc, v);
    for (int r = 0; r < RB; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * s.sc_stride + t]);
      for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(pr, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(acc_rows + r * s.d + 16 * c, acc[r][c]);
}

template <int KIND, int NC>
inline void value_run(const uint8_t* rec, int stride, const uint16_t* order, int n, ItemState& s,
                      const Layout& L, int nc) {
  // Rows in blocks of up to 4 keep their accumulators in registers; a row block decodes the run once.
  for (int r0 = 0; r0 < s.rows; r0 += 4) {
    const int rb = std::min(4, s.rows - r0);
    const int t_max = s.visible[r0 + rb - 1];  // later rows see at least as much (causal)
    if (t_max <= 0) continue;
    const float* p = s.sc + r0 * s.sc_stride;
    float* a = s.acc + r0 * s.d;
    switch (rb) {
      case 1: value_run_rows<KIND, NC, 1>(rec, stride, order, n, t_max, p, a, s, L, nc); break;
      case 2: value_run_rows<KIND, NC, 2>(rec, stride, order, n, t_max, p, a, s, L, nc); break;
      case 3: value_run_rows<KIND, NC, 3>(rec, stride, order, n, t_max, p, a, s, L, nc); break;
      default: value_run_rows<KIND, NC, 4>(rec, stride, order, n, t_max, p, a, s, L, nc); break;
    }
  }
}

template <int NC>
struct Avx512Path {
  static void scores(int kind, const uint8_t* rec, int stride, const uint16_t* order, int n, int n_valid,
                     const float* qsel, ItemState& s, const Layout& L) {
    const int nc = L.head_size / 16;
    switch (kind) {
      case 0: score_run<0, NC>(rec, stride, order, n, n_valid, qsel, s, L, nc); break;
      case 1: score_run<1, NC>(rec, stride, order, n, n_valid, qsel, s, L, nc); break;
      case 2: score_run<2, NC>(rec, stride, order, n, n_valid, qsel, s, L, nc); break;
      case 3: score_run<3, NC>(rec, stride, order, n, n_valid, qsel, s, L, nc); break;
      default: score_run<4, NC>(rec, stride, order, n, n_valid, qsel, s, L, nc); break;
    }
  }
  static void values(int kind, const uint8_t* rec, int stride, const uint16_t* order, int n, ItemState& s,
                     const Layout& L) {
    const int nc = L.head_size / 16;
    switch (kind) {
      case 0: value_run<0, NC>(rec, stride, order, n, s, L, nc); break;
      case 1: value_run<1, NC>(rec, stride, order, n, s, L, nc); break;
      case 2: value_run<2, NC>(rec, stride, order, n, s, L, nc); break;
      case 3: value_run<3, NC>(rec, stride, order, n, s, L, nc); break;
      default: value_run<4, NC>(rec, stride, order, n, s, L, nc); break;
    }
  }
  // Page-level online softmax: scores -> probabilities in place, rescale acc/l.
  static void softmax(ItemState& s) {
    for (int r = 0; r < s.rows; ++r) {
      const int n = s.visible[r];
      float* sc = s.sc + r * s.sc_stride;
      if (n <= 0) {  // this row sees none of the page: its probabilities must read as zero
        std::fill(sc, sc + s.sc_stride, 0.f);
        continue;
      }
      __m512 mx = _mm512_set1_ps(kNegInf);
      for (int t = 0; t < n; t += 16) {
        const __mmask16 k = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1);
        mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, sc + t));
      }
      const float m_new = std::max(s.m[r], _mm512_reduce_max_ps(mx));
      const float alpha = std::exp(s.m[r] - m_new);  // exp(-inf) = 0 on the first page
      __m512 sum = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(m_new);
      for (int t = 0; t < s.sc_stride; t += 16) {
        const __mmask16 k =
            static_cast<__mmask16>(t >= n ? 0 : (n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1));
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), mv)));
        _mm512_storeu_ps(sc + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (alpha != 1.0f) {
        const __m512 av = _mm512_set1_ps(alpha);
        float* a = s.acc + r * s.d;
        for (int i = 0; i < s.d; i += 16) _mm512_storeu_ps(a + i, _mm512_mul_ps(av, _mm512_loadu_ps(a + i)));
      }
      s.l[r] = s.l[r] * alpha + _mm512_reduce_add_ps(sum);
      s.m[r] = m_new;
    }
  }
};
#endif  // ADAKV_AVX512

struct ScalarPath {
  static void scores(int kind, const uint8_t* rec, int stride, const uint16_t* order, int n, int n_valid,
                     const float* qsel, ItemState& s, const Layout& L) {
    float k[256];
    const int code = kind < 3 ? kind : kFp16Code;
    for (int i = 0; i < n; ++i, rec += stride) {
      const int t = order ? order[i] : i;
      if (t >= n_valid) continue;
      decode_record_scalar(rec, code, L, k);
      for (int r = 0; r < s.rows; ++r) {
        const float* q = qsel + r * s.d;
        float dot = 0.f;
        for (int e = 0; e < s.d; ++e) dot += q[e] * k[e];
        s.sc[r * s.sc_stride + t] = dot;
      }
    }
  }
  static void values(int kind, const uint8_t* rec, int stride, const uint16_t* order, int n, ItemState& s,
                     const Layout& L) {
    float v[256];
    const int code = kind < 3 ? kind : kFp16Code;
    const int t_max = s.visible[s.rows - 1];
    for (int i = 0; i < n; ++i, rec += stride) {
      const int t = order ? order[i] : i;
      if (t >= t_max) continue;
      decode_record_scalar(rec, code, L, v);
      for (int r = 0; r < s.rows; ++r) {
        if (t >= s.visible[r]) continue;
        const float p = s.sc[r * s.sc_stride + t];
        float* a = s.acc + r * s.d;
        for (int e = 0; e < s.d; ++e) a[e] += p * v[e];
      }
    }
  }
  static void softmax(ItemState& s) {
    for (int r = 0; r < s.rows; ++r) {
      const int n = s.visible[r];
      float* sc = s.sc + r * s.sc_stride;
      if (n <= 0) {
        std::fill(sc, sc + s.sc_stride, 0.f);
        continue;
      }
      float m_new = s.m[r];
      for (int t = 0; t < n; ++t) m_new = std::max(m_new, sc[t]);
      const float alpha = std::exp(s.m[r] - m_new);
      float sum = 0.f;
      for (int t = 0; t < s.sc_stride; ++t) {
        sc[t] = t < n ? std::exp(sc[t] - m_new) : 0.f;
        sum += sc[t];
      }
      if (alpha != 1.0f)
        for (int e = 0; e < s.d; ++e) s.acc[r * s.d + e] *= alpha;
      s.l[r] = s.l[r] * alpha + sum;
      s.m[r] = m_new;
    }
  }
};

// ---- inputs, decoded once per call ---------------------------------------------------------
struct Problem {
  Layout L;
  int num_heads, group;
  const uint8_t* pages;
  const uint8_t* staging_key;
  const uint8_t* staging_value;
  const int64_t* staging_slot;
  int64_t num_blocks, num_slots;
  const void* block_table;
  bool block_table_i32;
  int64_t block_table_stride;
  const void* query;
  at::ScalarType query_dtype;
  int64_t q_stride_t, q_stride_h;
  const float* query_rot;  // [T, num_heads, D] contiguous, or nullptr
  float scale;
  std::vector<int64_t> seq_lens, q_start, q_len;

  int64_t block_of(int64_t seq, int64_t page) const {
    const int64_t i = seq * block_table_stride + page;
    return block_table_i32 ? static_cast<const int32_t*>(block_table)[i]
                           : static_cast<const int64_t*>(block_table)[i];
  }
};

struct Item {
  int64_t seq;
  int head, page_begin, page_end;
  int64_t partial;  // first row of this item in the partial buffer
};

inline float load_as_float(const void* base, at::ScalarType dt, int64_t i) {
  switch (dt) {
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// The 16-bit kind (3 = bf16, 4 = fp16) of the storage dtype, or the quantized code itself.
inline int kind_of(int code, const Layout& L) {
  return code < kFp16Code ? code : (L.storage_bf16 ? 3 : 4);
}

template <class Path>
void run_item(const Problem& P, const Item& it, std::vector<float>& ws, float* partial, bool& corrupt) {
  const Layout& L = P.L;
  const int d = L.head_size, bs = L.block_size, group = P.group;
  const int64_t seq_len = P.seq_lens[it.seq], q_len = P.q_len[it.seq], q0 = P.q_start[it.seq];
  ItemState s;
  s.rows = static_cast<int>(q_len) * group;
  s.d = d;
  s.sc_stride = (bs + 15) / 16 * 16;
  const bool rotated = P.query_rot != nullptr;
  const size_t need = static_cast<size_t>(s.rows) * (d * (rotated ? 3 : 2) + s.sc_stride + 3);
  if (ws.size() < need) ws.resize(need);
  float* w = ws.data();
  s.q = w, w += s.rows * d;
  s.qrot = rotated ? w : s.q, w += rotated ? s.rows * d : 0;
  s.acc = w, w += s.rows * d;
  s.sc = w, w += s.rows * s.sc_stride;
  s.m = w, w += s.rows;
  s.l = w, w += s.rows;
  s.visible = reinterpret_cast<int*>(w);
  std::vector<int64_t> qpos(s.rows);
  for (int j = 0; j < q_len; ++j) {
    for (int g = 0; g < group; ++g) {
      const int r = j * group + g;
      const int64_t head = static_cast<int64_t>(it.head) * group + g;
      const int64_t qi = (q0 + j) * P.q_stride_t + head * P.q_stride_h;
      for (int e = 0; e < d; ++e) s.q[r * d + e] = load_as_float(P.query, P.query_dtype, qi + e) * P.scale;
      if (rotated) {
        const float* qr = P.query_rot + ((q0 + j) * P.num_heads + head) * d;
        for (int e = 0; e < d; ++e) s.qrot[r * d + e] = qr[e] * P.scale;
      }
      qpos[r] = seq_len - q_len + j;
      s.m[r] = kNegInf;
      s.l[r] = 0.f;
    }
  }
  std::fill(s.acc, s.acc + static_cast<size_t>(s.rows) * d, 0.f);
  std::fill(s.sc, s.sc + static_cast<size_t>(s.rows) * s.sc_stride, 0.f);

  PageIndex ix;
  const int64_t token_bytes = static_cast<int64_t>(L.num_kv_heads) * d * 2;  // one staged token, all heads
  for (int page = it.page_begin; page < it.page_end; ++page) {
    const int64_t base = static_cast<int64_t>(page) * bs;
    const int n_valid = static_cast<int>(std::min<int64_t>(bs, seq_len - base));
    for (int r = 0; r < s.rows; ++r)
      s.visible[r] = static_cast<int>(std::clamp<int64_t>(qpos[r] - base + 1, 0, n_valid));
    const int64_t block = P.block_of(it.seq, page);
    if (block < 0 || block >= P.num_blocks) {
      corrupt = true;
      return;
    }
    const int64_t slot = P.staging_slot[block];
    if (slot >= 0) {  // open block: exact 16-bit K/V in staging [slot, t, head, d]
      if (slot >= P.num_slots) {
        corrupt = true;
        return;
      }
      const int64_t off = (slot * bs * L.num_kv_heads + it.head) * d * 2;
      const int kind = kind_of(kFp16Code, L);
      Path::scores(kind, P.staging_key + off, token_bytes, nullptr, n_valid, n_valid, s.q, s, L);
      Path::softmax(s);
      Path::values(kind, P.staging_value + off, token_bytes, nullptr, n_valid, s, L);
      continue;
    }
    const uint8_t* pg = P.pages + block * L.page_stride;
    if (!build_index(pg, L, ix)) {
      corrupt = true;
      return;
    }
    const int region = ix.part_bytes[0] + ix.part_bytes[1];
    if (L.header_bytes + static_cast<int64_t>(L.num_kv_heads) * region > L.page_bytes) {
      corrupt = true;
      return;
    }
    const uint8_t* part[2] = {pg + L.header_bytes + static_cast<int64_t>(it.head) * region, nullptr};
    part[1] = part[0] + ix.part_bytes[0];
    for (int c = 0; c < kNumCodes; ++c) {
      const int first = ix.first[0][c], n = ix.first[0][c + 1] - first;
      if (n == 0) continue;
      const float* qsel = c < kFp16Code ? s.qrot : s.q;
      Path::scores(kind_of(c, L), part[0] + ix.byte_start[0][c], L.record_bytes[c], ix.order[0] + first, n,
                   n_valid, qsel, s, L);
    }
    Path::softmax(s);
    for (int c = 0; c < kNumCodes; ++c) {
      const int first = ix.first[1][c], n = ix.first[1][c + 1] - first;
      if (n == 0) continue;
      Path::values(kind_of(c, L), part[1] + ix.byte_start[1][c], L.record_bytes[c], ix.order[1] + first, n, s,
                   L);
    }
  }
  const int width = d + 2;
  for (int r = 0; r < s.rows; ++r) {
    float* out = partial + (it.partial + r) * width;
    out[0] = s.m[r];
    out[1] = s.l[r];
    std::memcpy(out + 2, s.acc + r * d, sizeof(float) * d);
  }
}

inline void store_as(void* base, at::ScalarType dt, int64_t i, float x) {
  switch (dt) {
    case at::kBFloat16: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(x); break;
    case at::kHalf: static_cast<c10::Half*>(base)[i] = c10::Half(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}

using ItemFn = void (*)(const Problem&, const Item&, std::vector<float>&, float*, bool&);

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

std::vector<int64_t> to_i64(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

// query: [T, num_heads, D] bf16/fp16/fp32 (last dim contiguous); query_rot: [T, num_heads, D] fp32
// contiguous or empty (keys not rotated); pages: [num_blocks, >= page_bytes] uint8 (row stride any);
// staging_key/value: [num_slots, block_size, num_kv_heads, D] 16-bit contiguous; staging_slot:
// [num_blocks] int64; block_table: [num_seqs(+), max_blocks] int32/int64; seq_lens: [num_seqs];
// query_start_loc: [num_seqs + 1]; out: [T, num_heads, D] (last dim contiguous), written for the
// tokens owned by a sequence. layout: block_size, group_size, header_bytes, page_bytes, storage_is_bf16,
// then record_bytes[4], scales_offset[4], mins_offset[4], bits[4] (see cpu.py). pages_per_split:
// 0 = choose. force_scalar: use the portable path even where AVX-512 is compiled in (tests).
void paged_attention(const at::Tensor& query, const at::Tensor& query_rot, const at::Tensor& pages,
                     const at::Tensor& staging_key, const at::Tensor& staging_value,
                     const at::Tensor& staging_slot, const at::Tensor& block_table, const at::Tensor& seq_lens,
                     const at::Tensor& query_start_loc, double scale, std::vector<int64_t> layout, at::Tensor out,
                     int64_t pages_per_split, bool force_scalar) {
  TORCH_CHECK(layout.size() == 5 + 4 * kNumCodes, "layout must hold 21 numbers");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [T, H, D] with contiguous D");
  TORCH_CHECK(out.dim() == 3 && out.stride(2) == 1 && out.sizes() == query.sizes(), "bad out");
  TORCH_CHECK(pages.dim() == 2 && pages.scalar_type() == at::kByte && pages.stride(1) == 1, "bad pages");
  TORCH_CHECK(staging_key.dim() == 4 && staging_key.is_contiguous() && staging_value.is_contiguous() &&
                  staging_key.sizes() == staging_value.sizes() && staging_key.element_size() == 2,
              "bad staging");
  TORCH_CHECK(staging_slot.scalar_type() == at::kLong && staging_slot.is_contiguous() &&
                  staging_slot.numel() == pages.size(0),
              "bad staging_slot");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  (block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong),
              "bad block_table");

  Problem P;
  Layout& L = P.L;
  L.block_size = static_cast<int>(layout[0]);
  L.group_size = static_cast<int>(layout[1]);
  L.header_bytes = static_cast<int>(layout[2]);
  L.page_bytes = layout[3];
  L.storage_bf16 = layout[4] != 0;
  for (int c = 0; c < kNumCodes; ++c) {
    L.record_bytes[c] = static_cast<int>(layout[5 + c]);
    L.scales_offset[c] = static_cast<int>(layout[9 + c]);
    L.mins_offset[c] = static_cast<int>(layout[13 + c]);
    L.bits[c] = static_cast<int>(layout[17 + c]);
  }
  L.head_size = static_cast<int>(query.size(2));
  L.num_groups = L.head_size / L.group_size;
  L.num_kv_heads = static_cast<int>(staging_key.size(2));
  L.page_stride = pages.stride(0);
  TORCH_CHECK(pages.size(1) >= L.page_bytes, "pages narrower than page_bytes");
  L.rotate_keys = query_rot.numel() > 0;
  TORCH_CHECK(L.block_size > 0 && L.block_size <= kMaxBlockSize && staging_key.size(1) == L.block_size,
              "block_size");
  TORCH_CHECK(L.head_size % 16 == 0 && L.head_size <= 256 && staging_key.size(3) == L.head_size, "head_size");
  TORCH_CHECK(L.group_size % 16 == 0 && L.head_size % L.group_size == 0, "group_size");
  TORCH_CHECK(query.size(1) % L.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  if (L.rotate_keys)
    TORCH_CHECK(query_rot.scalar_type() == at::kFloat && query_rot.is_contiguous() &&
                    query_rot.sizes() == query.sizes(),
                "bad query_rot");

  P.num_heads = static_cast<int>(query.size(1));
  P.group = P.num_heads / L.num_kv_heads;
  P.pages = pages.data_ptr<uint8_t>();
  P.staging_key = static_cast<const uint8_t*>(staging_key.data_ptr());
  P.staging_value = static_cast<const uint8_t*>(staging_value.data_ptr());
  P.staging_slot = staging_slot.data_ptr<int64_t>();
  P.num_blocks = pages.size(0);
  P.num_slots = staging_key.size(0);
  P.block_table = block_table.data_ptr();
  P.block_table_i32 = block_table.scalar_type() == at::kInt;
  P.block_table_stride = block_table.stride(0);
  P.query = query.data_ptr();
  P.query_dtype = query.scalar_type();
  P.q_stride_t = query.stride(0);
  P.q_stride_h = query.stride(1);
  P.query_rot = L.rotate_keys ? query_rot.data_ptr<float>() : nullptr;
  P.scale = static_cast<float>(scale);
  P.seq_lens = to_i64(seq_lens);
  const std::vector<int64_t> qsl = to_i64(query_start_loc);
  const int64_t num_seqs = static_cast<int64_t>(P.seq_lens.size());
  TORCH_CHECK(static_cast<int64_t>(qsl.size()) >= num_seqs + 1 && block_table.size(0) >= num_seqs,
              "query_start_loc / block_table shorter than seq_lens");
  P.q_start.assign(qsl.begin(), qsl.begin() + num_seqs);
  P.q_len.resize(num_seqs);

  // Split every (sequence, KV head) into items of about `pages_per_split` pages.
  const int64_t num_threads = at::get_num_threads();
  const int bs = L.block_size;
  int64_t total_pages = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    P.q_len[s] = qsl[s + 1] - qsl[s];
    TORCH_CHECK(P.q_len[s] >= 0 && P.q_len[s] <= P.seq_lens[s] && qsl[s + 1] <= query.size(0),
                "query_start_loc / seq_lens inconsistent");
    TORCH_CHECK((P.seq_lens[s] + bs - 1) / bs <= block_table.size(1), "block_table too narrow");
    if (P.q_len[s] > 0) total_pages += (P.seq_lens[s] + bs - 1) / bs;
  }
  if (pages_per_split <= 0) {
    // Enough items for dynamic balancing (about 8 per thread), never below 8 pages per item.
    const int64_t target = (total_pages * L.num_kv_heads + 8 * num_threads - 1) / (8 * num_threads);
    pages_per_split = std::max<int64_t>(8, target);
  }
  std::vector<Item> items;
  std::vector<int64_t> group_first;  // per (seq, head) with queries: first item index
  int64_t rows_total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (P.q_len[s] == 0) continue;
    const int64_t num_pages = (P.seq_lens[s] + bs - 1) / bs;
    const int rows = static_cast<int>(P.q_len[s]) * P.group;
    for (int h = 0; h < L.num_kv_heads; ++h) {
      group_first.push_back(static_cast<int64_t>(items.size()));
      for (int64_t p0 = 0; p0 < num_pages; p0 += pages_per_split) {
        items.push_back({s, h, static_cast<int>(p0), static_cast<int>(std::min(num_pages, p0 + pages_per_split)),
                         rows_total});
        rows_total += rows;
      }
    }
  }
  group_first.push_back(static_cast<int64_t>(items.size()));
  if (items.empty()) return;

  std::vector<float> partial(static_cast<size_t>(rows_total) * (L.head_size + 2));
  const ItemFn fn = pick_path(L.head_size, force_scalar);
  std::atomic<int64_t> next{0};
  std::atomic<bool> corrupt{false};
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(num_threads, num_items), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next++; i < num_items; i = next++) {
        bool bad = false;
        fn(P, items[i], ws, partial.data(), bad);
        if (bad) corrupt = true;
      }
    }
  });
  TORCH_CHECK(!corrupt, "AdaKV fused attention: a page's bit map or block id is out of range");

  // Merge the splits of every (sequence, KV head) and write `out` in its dtype.
  const int64_t num_groups = static_cast<int64_t>(group_first.size()) - 1;
  const int d = L.head_size, width = d + 2;
  void* out_base = out.data_ptr();
  const at::ScalarType out_dtype = out.scalar_type();
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Item& first = items[group_first[gi]];
      const int64_t n_split = group_first[gi + 1] - group_first[gi];
      const int rows = static_cast<int>(P.q_len[first.seq]) * P.group;
      for (int r = 0; r < rows; ++r) {
        float m = kNegInf;
        for (int64_t k = 0; k < n_split; ++k)
          m = std::max(m, partial[(items[group_first[gi] + k].partial + r) * width]);
        float l = 0.f;
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t k = 0; k < n_split; ++k) {
          const float* src = partial.data() + (items[group_first[gi] + k].partial + r) * width;
          if (src[0] == kNegInf) continue;
          const float w = std::exp(src[0] - m);
          l += src[1] * w;
          for (int e = 0; e < d; ++e) row[e] += src[2 + e] * w;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int j = r / P.group, g = r % P.group;
        const int64_t o = (P.q_start[first.seq] + j) * out.stride(0) +
                          (static_cast<int64_t>(first.head) * P.group + g) * out.stride(1);
        for (int e = 0; e < d; ++e) store_as(out_base, out_dtype, o + e, row[e] * inv);
      }
    }
  });
}

bool has_avx512() {
#ifdef ADAKV_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "AdaKV fused paged attention over packed pages (CPU)");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 path was compiled in");
}
