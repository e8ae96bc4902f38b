// The attention each staged token receives inside its own open block, for one layer (the `attention`
// policy's measurement), fused: for every query token i of a step and every query head h,
//     p_j = softmax over j <= offset_i of  scale * q[row_i, h] . k[slot_i, j, h / group]
// over the keys of the token's own block up to itself (FP16 staging), and received[slot_i, j] += sum_h p_j.
// Oracle: kernels/block_attention.py::attend (the same sums in torch's order; fp32 here too, so the
// results differ by rounding only).
// Work: a prefill chunk lists a block's tokens one after another, so the tokens come in runs of one
// staging slot; one OpenMP item per run widens that block's keys once (not once per token) and
// computes each token into a scratch row of its own; the rows are then added to `received` in token
// order, so the result does not depend on the thread count or on how the tokens fall into runs.

#include <omp.h>

#include <algorithm>
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

// One query token: sum over heads of its within-block attention -> out[0..block_size). keys: its
// block's keys widened, [num_kv_heads][key_rows][head_size] (key_rows > its offset); q, scores:
// scratch of num_heads * head_size and num_heads * block_size floats.
void token(const BlockAttnArgs& a, int64_t i, const float* keys, int key_rows, float* q, float* scores, float* out) {
  const int d = static_cast<int>(a.head_size), bs = static_cast<int>(a.block_size);
  const int heads = static_cast<int>(a.num_heads), group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int visible = static_cast<int>(a.offsets[i]) + 1;
  for (int h = 0; h < heads; ++h)
    adakv::widen(a.dtype, a.query, a.rows[i] * a.query_token_stride + h * a.query_head_stride, d, q + h * d);
  const float scale = static_cast<float>(a.scale);
  for (int h = 0; h < heads; ++h) {
    const float* k = keys + static_cast<size_t>(h / group) * key_rows * d;
    for (int j = 0; j < visible; ++j) scores[h * visible + j] = dot(q + h * d, k + j * d, d) * scale;
  }
  for (int j = 0; j < bs; ++j) out[j] = 0.f;
  for (int h = 0; h < heads; ++h) adakv::add_softmax(scores + h * visible, visible, scores + h * visible, out);
}

// Tokens [first, end), all of one staging slot: that block's keys up to the furthest offset among
// them are widened once, then each token -> its row of `rows`.
void run(const BlockAttnArgs& a, int64_t first, int64_t end, float* rows) {
  const int d = static_cast<int>(a.head_size), bs = static_cast<int>(a.block_size);
  const int kv_heads = static_cast<int>(a.num_kv_heads);
  int key_rows = 0;
  for (int64_t i = first; i < end; ++i) key_rows = std::max(key_rows, static_cast<int>(a.offsets[i]) + 1);
  std::vector<float> keys(static_cast<size_t>(kv_heads) * key_rows * d);
  const int64_t key_base = a.slots[first] * bs * kv_heads * d;
  for (int kvh = 0; kvh < kv_heads; ++kvh)
    for (int j = 0; j < key_rows; ++j)
      adakv::widen(a.dtype, a.key, key_base + (static_cast<int64_t>(j) * kv_heads + kvh) * d, d,
                   keys.data() + (static_cast<size_t>(kvh) * key_rows + j) * d);
  std::vector<float> q(static_cast<size_t>(a.num_heads) * d), scores(static_cast<size_t>(a.num_heads) * bs);
  for (int64_t i = first; i < end; ++i) token(a, i, keys.data(), key_rows, q.data(), scores.data(), rows + i * bs);
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
