// The attention each staged token receives inside its own open block, for one layer (the `attention`
// policy's measurement), fused: for every query token i of a step and every query head h,
//     p_j = softmax over j <= offset_i of  scale * q[row_i, h] . k[slot_i, j, h / group]
// over the keys of the token's own block up to itself (FP16 staging), and received[slot_i, j] += sum_h p_j.
// Oracle: kernels/block_attention.py::attend (the same sums in torch's order; fp32 here too, so the
// results differ by rounding only). Tokens are computed in parallel into a scratch row each, then
// added to `received` in token order, so the result does not depend on the thread count.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_quant.h"

namespace {

constexpr int kMaxHeadSize = 256;
constexpr int kMaxBlockSize = 1024;

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

// q . k over d (a multiple of 16) in 16 interleaved partial sums, which the compiler vectorises.
float dot(const float* q, const float* k, int d) {
  float part[16] = {};
  for (int e = 0; e < d; e += 16)
    for (int j = 0; j < 16; ++j) part[j] += q[e + j] * k[e + j];
  float sum = 0.f;
  for (float p : part) sum += p;
  return sum;
}

// One query token: sum over heads of its within-block attention -> out[0..block_size).
void token(const BlockAttnArgs& a, int64_t i, float* out) {
  const int d = static_cast<int>(a.head_size), bs = static_cast<int>(a.block_size);
  const int heads = static_cast<int>(a.num_heads), group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int visible = static_cast<int>(a.offsets[i]) + 1;
  std::vector<float> q(static_cast<size_t>(heads) * d);
  for (int h = 0; h < heads; ++h)
    adakv::widen(a.dtype, a.query, a.rows[i] * a.query_token_stride + h * a.query_head_stride, d, q.data() + h * d);
  std::vector<float> scores(static_cast<size_t>(heads) * visible);
  alignas(64) float k[kMaxHeadSize];
  const float scale = static_cast<float>(a.scale);
  const int64_t key_base = a.slots[i] * bs * a.num_kv_heads * d;
  for (int kvh = 0; kvh < a.num_kv_heads; ++kvh) {
    for (int j = 0; j < visible; ++j) {
      adakv::widen(a.dtype, a.key, key_base + (static_cast<int64_t>(j) * a.num_kv_heads + kvh) * d, d, k);
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        scores[static_cast<size_t>(h) * visible + j] = dot(q.data() + static_cast<size_t>(h) * d, k, d) * scale;
      }
    }
  }
  for (int j = 0; j < bs; ++j) out[j] = 0.f;
  for (int h = 0; h < heads; ++h) {
    float* s = scores.data() + static_cast<size_t>(h) * visible;
    adakv::add_softmax(s, visible, s, out);
  }
}

int block_attention(const BlockAttnArgs& a) {
  if (!a.query || !a.key || !a.received || a.n < 0 || a.head_size <= 0 || a.head_size > kMaxHeadSize || a.head_size % 16 ||
      a.block_size <= 0 || a.block_size > kMaxBlockSize || a.num_kv_heads <= 0 || a.num_heads <= 0 ||
      a.num_heads % a.num_kv_heads || (a.dtype != adakv::kF32 && a.dtype != adakv::kBF16 && a.dtype != adakv::kF16))
    return kBadArgs;
  for (int64_t i = 0; i < a.n; ++i)
    if (a.rows[i] < 0 || a.rows[i] >= a.num_rows || a.slots[i] < 0 || a.slots[i] >= a.num_slots || a.offsets[i] < 0 ||
        a.offsets[i] >= a.block_size)
      return kOutOfRange;
  const int64_t bs = a.block_size;
  std::vector<float> rows(static_cast<size_t>(a.n) * bs);
  const int team = static_cast<int>(a.num_threads > 0 ? a.num_threads : 1);
#pragma omp parallel for num_threads(team) schedule(dynamic, 8)
  for (int64_t i = 0; i < a.n; ++i) token(a, i, rows.data() + i * bs);
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
