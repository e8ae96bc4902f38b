// The attention each staged token receives inside its own open block, for one layer (the `attention`
// policy's measurement), fused: for every query token i of a step and every query head h,
//     p_j = softmax over j <= offset_i of  scale * q[row_i, h] . k[slot_i, j, h / group]
// over the keys of the token's own block up to itself (FP16 staging), and received[slot_i, j] += sum_h p_j.
// Oracle: kernels/block_attention.py::attend (fp32 here too; the dot products summed in another
// order and exp by a polynomial within 2 ulp, so the results differ by rounding only). bf16 inputs,
// where the CPU has AVX512-BF16, are multiplied by VDPBF16PS: the products of two bf16 are exact in
// fp32, so only the order of the sums (pairs of dimensions, then along the head) changes.
// Work: a prefill chunk lists a block's tokens one after another, so the tokens come in runs of one
// staging slot; one OpenMP item per run widens that block's keys once (not once per token; for the
// bf16 dot product it pairs them instead), transposed so that a query's scores come 16 keys at a
// time in vector lanes (the query heads of one KV head scored together, sharing each key vector
// loaded), and computes each token into a scratch row of its own; the rows are then added to
// `received` in token order, so the result does not depend on the thread count or on how the tokens
// fall into runs.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_quant.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define ADAKV_BF16_DOT 1
#else
#define ADAKV_BF16_DOT 0
#endif

namespace {

constexpr int kMaxHeadSize = 256;
constexpr int kMaxBlockSize = 1024;
constexpr int kMaxGroupHeads = 64;  // query heads per KV head

enum Status { kOk = 0, kBadArgs = 1, kOutOfRange = 2 };

// Mirror of library.py's BlockAttnArgs, field by field.
struct BlockAttnArgs {
  const void* query;  // [num_rows, num_heads, head_size] in dtype, each head's row contiguous
  int64_t num_rows, query_token_stride, query_head_stride;  // strides in elements
  const void* key;    // one layer's staging keys [num_slots, block_size, num_kv_heads, head_size], contiguous
  int64_t dtype, num_slots, block_size, num_heads, num_kv_heads, head_size;
  const int64_t* rows;     // [n] the query rows to use
  const int64_t* slots;    // [n] the staging slot of each one's block
  const int64_t* offsets;  // [n] its position in the block
  int64_t n;
  double scale;
  float* received;  // [num_slots, block_size], added to
  int64_t num_threads;
};

// exp(x) for x <= 0, per lane, within 2 ulp (Cephes' expf polynomial after x = n ln2 + r); x below
// -87.3 (e**x < 2**-126, the normal range), -inf included, gives 0.
inline adakv::v16f exp16(adakv::v16f x) {
  using adakv::splat;
  const adakv::v16i underflow = x < -87.3f;
  x = underflow != 0 ? splat(-87.3f) : x;
  const adakv::v16f round = splat(12582912.f);  // 1.5 * 2**23: adding it rounds to an integer
  const adakv::v16f n = (x * 1.44269504088896341f + round) - round;
  const adakv::v16f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  adakv::v16f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const adakv::v16i two_n = (__builtin_convertvector(n, adakv::v16i) + 127) << 23;  // n >= -126
  const adakv::v16f e = p * reinterpret_cast<adakv::v16f>(two_n);
  return underflow != 0 ? splat(0.f) : e;
}

// A block's keys transposed, for scores 16 keys at a time, width = the keys' count rounded up to 16,
// zeros past it: widened, [num_kv_heads][head_size][width] floats (`data`), or for the bf16 dot
// product, [num_kv_heads][head_size / 2][width] words of two bf16, key j's dimensions 2e and 2e + 1
// (`pairs`).
struct KeysT {
  int width;
  std::vector<float> data;
  std::vector<uint32_t> pairs;
  const float* at(int kvh, int e, int d) const { return data.data() + (static_cast<size_t>(kvh) * d + e) * width; }
  const uint32_t* pairs_at(int kvh, int d) const { return pairs.data() + static_cast<size_t>(kvh) * (d / 2) * width; }
};

// s[h * width + 16 v + lane] = score where the key is visible, -inf where not.
inline void store_scores(adakv::v16f score, int v, int visible, float* s) {
  const adakv::v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  adakv::store16(s + 16 * v, lane + 16 * v < visible ? score : adakv::splat(-INFINITY));
}

// Scores of kGroup query heads (q: kGroup rows of head_size floats) against one KV head's keys
// (kt: [head_size][width], transposed), 16 keys per vector, keys at or past `visible` masked to
// -inf: s[h * width + j]. The heads share every key vector loaded.
template <int kGroup>
void group_scores(const float* q, const float* kt, int d, int width, int visible, float scale, float* s) {
  using adakv::v16f;
  for (int v = 0; v < (visible + 15) / 16; ++v) {
    v16f acc[kGroup][2] = {};  // two partial sums over e per head
    for (int e = 0; e < d; e += 2)
      for (int u = 0; u < 2; ++u) {
        const v16f k = adakv::load16(kt + static_cast<size_t>(e + u) * width + 16 * v);
        for (int h = 0; h < kGroup; ++h) acc[h][u] += q[h * d + e + u] * k;
      }
    for (int h = 0; h < kGroup; ++h) store_scores((acc[h][0] + acc[h][1]) * scale, v, visible, s + h * width);
  }
}

#if ADAKV_BF16_DOT
// group_scores for bf16: q[h] points at query head h's bf16 row, kp at one KV head's key pairs
// ([head_size / 2][width] words). VDPBF16PS adds two exact products per lane and step.
template <int kGroup>
void group_scores_bf16(const uint16_t* const* q, const uint32_t* kp, int d, int width, int visible, float scale,
                       float* s) {
  for (int v = 0; v < (visible + 15) / 16; ++v) {
    __m512 acc[kGroup][2];
    for (int h = 0; h < kGroup; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
    for (int e2 = 0; e2 < d / 2; e2 += 2)
      for (int u = 0; u < 2; ++u) {
        const __m512i k = _mm512_loadu_si512(kp + static_cast<size_t>(e2 + u) * width + 16 * v);
        for (int h = 0; h < kGroup; ++h) {
          uint32_t word;
          std::memcpy(&word, q[h] + 2 * (e2 + u), sizeof word);
          acc[h][u] = _mm512_dpbf16_ps(acc[h][u], (__m512bh)k, (__m512bh)_mm512_set1_epi32(static_cast<int>(word)));
        }
      }
    for (int h = 0; h < kGroup; ++h) {
      const adakv::v16f sum = reinterpret_cast<adakv::v16f>(_mm512_add_ps(acc[h][0], acc[h][1]));
      store_scores(sum * scale, v, visible, s + h * width);
    }
  }
}
#endif

// out[j] += softmax(s[0..visible))[j]; s (width floats, -inf past visible) is overwritten.
void add_softmax16(float* s, int visible, float* out) {
  using adakv::v16f;
  const int vectors = (visible + 15) / 16;
  v16f top = adakv::splat(-INFINITY);
  for (int v = 0; v < vectors; ++v) {
    const v16f x = adakv::load16(s + 16 * v);
    top = x > top ? x : top;
  }
  const float m = adakv::max16(top);
  v16f total = {};
  for (int v = 0; v < vectors; ++v) {
    const v16f p = exp16(adakv::load16(s + 16 * v) - m);
    adakv::store16(s + 16 * v, p);
    total += p;
  }
  const v16f sum = adakv::splat(adakv::sum16(total));
  for (int v = 0; v < vectors; ++v) adakv::store16(s + 16 * v, adakv::load16(s + 16 * v) / sum);
  for (int j = 0; j < visible; ++j) out[j] += s[j];
}

// One query token: sum over heads of its within-block attention -> out[0..block_size). q: scratch of
// group * head_size floats; s: scratch of group * width floats.
void token(const BlockAttnArgs& a, int64_t i, const KeysT& keys, float* q, float* s, float* out) {
  const int d = static_cast<int>(a.head_size), bs = static_cast<int>(a.block_size), w = keys.width;
  const int kv_heads = static_cast<int>(a.num_kv_heads), group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int visible = static_cast<int>(a.offsets[i]) + 1;
  const float scale = static_cast<float>(a.scale);
  for (int j = 0; j < bs; ++j) out[j] = 0.f;
#if ADAKV_BF16_DOT
  if (!keys.pairs.empty()) {
    const uint16_t* heads[kMaxGroupHeads];  // the bf16 query rows of one KV head's query heads
    for (int g = 0; g < kv_heads; ++g) {
      for (int h = 0; h < group; ++h)
        heads[h] = static_cast<const uint16_t*>(a.query) + a.rows[i] * a.query_token_stride +
                   (g * group + h) * a.query_head_stride;
      const uint32_t* kp = keys.pairs_at(g, d);
      switch (group) {  // as below
        case 1: group_scores_bf16<1>(heads, kp, d, w, visible, scale, s); break;
        case 2: group_scores_bf16<2>(heads, kp, d, w, visible, scale, s); break;
        case 3: group_scores_bf16<3>(heads, kp, d, w, visible, scale, s); break;
        case 4: group_scores_bf16<4>(heads, kp, d, w, visible, scale, s); break;
        default:
          for (int h = 0; h < group; ++h) group_scores_bf16<1>(heads + h, kp, d, w, visible, scale, s + h * w);
      }
      for (int h = 0; h < group; ++h) add_softmax16(s + h * w, visible, out);
    }
    return;
  }
#endif
  for (int g = 0; g < kv_heads; ++g) {
    for (int h = 0; h < group; ++h)
      adakv::widen(a.dtype, a.query, a.rows[i] * a.query_token_stride + (g * group + h) * a.query_head_stride, d,
                   q + h * d);
    const float* kt = keys.at(g, 0, d);
    switch (group) {  // the usual GQA groups share key loads; others go head by head
      case 1: group_scores<1>(q, kt, d, w, visible, scale, s); break;
      case 2: group_scores<2>(q, kt, d, w, visible, scale, s); break;
      case 3: group_scores<3>(q, kt, d, w, visible, scale, s); break;
      case 4: group_scores<4>(q, kt, d, w, visible, scale, s); break;
      default:
        for (int h = 0; h < group; ++h) group_scores<1>(q + h * d, kt, d, w, visible, scale, s + h * w);
    }
    for (int h = 0; h < group; ++h) add_softmax16(s + h * w, visible, out);
  }
}

// Tokens [first, end), all of one staging slot: that block's keys up to the furthest offset among
// them are widened (and transposed) once, then each token -> its row of `rows`.
void run(const BlockAttnArgs& a, int64_t first, int64_t end, float* rows) {
  const int d = static_cast<int>(a.head_size), bs = static_cast<int>(a.block_size);
  const int kv_heads = static_cast<int>(a.num_kv_heads);
  int key_rows = 0;
  for (int64_t i = first; i < end; ++i) key_rows = std::max(key_rows, static_cast<int>(a.offsets[i]) + 1);
  KeysT keys{(key_rows + 15) / 16 * 16, {}, {}};
  const size_t group = static_cast<size_t>(a.num_heads / a.num_kv_heads);
  std::vector<float> q(group * d), s(group * keys.width);
#if ADAKV_BF16_DOT
  if (a.dtype == adakv::kBF16) {  // pairs of bf16 straight from staging, no widening
    keys.pairs.assign(static_cast<size_t>(kv_heads) * (d / 2) * keys.width, 0u);
    const uint16_t* block = static_cast<const uint16_t*>(a.key) + a.slots[first] * bs * kv_heads * d;
    for (int kvh = 0; kvh < kv_heads; ++kvh)
      for (int e2 = 0; e2 < d / 2; ++e2) {
        uint32_t* into = keys.pairs.data() + (static_cast<size_t>(kvh) * (d / 2) + e2) * keys.width;
        const uint16_t* from = block + static_cast<size_t>(kvh) * d + 2 * e2;
        for (int j = 0; j < key_rows; ++j) std::memcpy(into + j, from + static_cast<size_t>(j) * kv_heads * d, 4);
      }
    for (int64_t i = first; i < end; ++i) token(a, i, keys, q.data(), s.data(), rows + i * bs);
    return;
  }
#endif
  keys.data.assign(static_cast<size_t>(kv_heads) * d * keys.width, 0.f);
  // widened row by row ([key_rows][num_kv_heads * head_size], one call), then transposed
  std::vector<float> rows_kv(static_cast<size_t>(key_rows) * kv_heads * d);
  adakv::widen(a.dtype, a.key, a.slots[first] * bs * kv_heads * d, key_rows * kv_heads * d, rows_kv.data());
  for (int kvh = 0; kvh < kv_heads; ++kvh)
    for (int e = 0; e < d; ++e) {
      float* into = keys.data.data() + (static_cast<size_t>(kvh) * d + e) * keys.width;
      const float* from = rows_kv.data() + static_cast<size_t>(kvh) * d + e;
      for (int j = 0; j < key_rows; ++j) into[j] = from[static_cast<size_t>(j) * kv_heads * d];
    }
  for (int64_t i = first; i < end; ++i) token(a, i, keys, q.data(), s.data(), rows + i * bs);
}

int block_attention(const BlockAttnArgs& a) {
  if (!a.query || !a.key || !a.received || a.n < 0 || a.head_size <= 0 || a.head_size > kMaxHeadSize || a.head_size % 16 ||
      a.block_size <= 0 || a.block_size > kMaxBlockSize || a.num_kv_heads <= 0 || a.num_heads <= 0 ||
      a.num_heads % a.num_kv_heads || a.num_heads / a.num_kv_heads > kMaxGroupHeads ||
      (a.dtype != adakv::kF32 && a.dtype != adakv::kBF16 && a.dtype != adakv::kF16))
    return kBadArgs;
  for (int64_t i = 0; i < a.n; ++i)
    if (a.rows[i] < 0 || a.rows[i] >= a.num_rows || a.slots[i] < 0 || a.slots[i] >= a.num_slots || a.offsets[i] < 0 ||
        a.offsets[i] >= a.block_size)
      return kOutOfRange;
  const int64_t bs = a.block_size;
  std::vector<float> rows(static_cast<size_t>(a.n) * bs);
  std::vector<int64_t> starts;  // runs of one slot: [starts[r], starts[r + 1])
  for (int64_t i = 0; i < a.n; ++i)
    if (i == 0 || a.slots[i] != a.slots[i - 1]) starts.push_back(i);
  starts.push_back(a.n);
  const int64_t num_runs = static_cast<int64_t>(starts.size()) - 1;
  const int team = static_cast<int>(a.num_threads > 0 ? a.num_threads : 1);
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
  for (int64_t r = 0; r < num_runs; ++r) run(a, starts[r], starts[r + 1], rows.data());
  for (int64_t i = 0; i < a.n; ++i) {
    float* into = a.received + a.slots[i] * bs;
    const float* from = rows.data() + i * bs;
    for (int64_t j = 0; j <= a.offsets[i]; ++j) into[j] += from[j];
  }
  return kOk;
}

}  // namespace

extern "C" {

// 0 = ok; 1 = inconsistent arguments; 2 = a row, slot or offset out of range (nothing written).
int adakv_block_attention(const BlockAttnArgs* args) { return block_attention(*args); }

int64_t adakv_block_attn_args_size() { return static_cast<int64_t>(sizeof(BlockAttnArgs)); }

}  // extern "C"
