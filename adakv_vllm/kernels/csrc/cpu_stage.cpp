// Staging writes, compiled: the rows of a step's K and V copied into FP16 staging, both in one call.
//
// Contract and oracle: blocks/staging.py::StagingArea.write_planned's torch form (index_copy_ of the
// valid source rows into the planned destination rows); the same bytes. A row is one token's
// num_kv_heads * head_size elements, contiguous in source and destination, in one dtype, so a row is
// a memcpy. Destination rows are distinct (a step's slot mapping names each slot once), so the rows
// can be copied in any order, by several threads.

#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {

enum Status { kOk = 0, kBadArgs = 1, kOutOfRange = 2 };

// Rows at least this many per thread before a second thread is used (a decode step's few rows
// cost less than waking a thread).
constexpr int64_t kRowsPerThread = 256;

}  // namespace

extern "C" {

// dst_key/dst_value: [num_dst_rows] rows of row_bytes, contiguous; key/value: source rows
// key_stride/value_stride bytes apart; row i copies source row src_rows[i] (null: i) into destination
// row dst_rows[i], for i < n. 0 = ok; 1 = inconsistent arguments; 2 = a row out of range
// (1-2: nothing written).
int adakv_stage_rows(uint8_t* dst_key, uint8_t* dst_value, int64_t num_dst_rows, const int64_t* dst_rows,
                     const uint8_t* key, int64_t key_stride, const uint8_t* value, int64_t value_stride,
                     int64_t num_src_rows, const int64_t* src_rows, int64_t n, int64_t row_bytes,
                     int64_t num_threads) {
  if (!dst_key || !dst_value || !dst_rows || !key || !value || n < 0 || row_bytes <= 0 || key_stride < row_bytes ||
      value_stride < row_bytes)
    return kBadArgs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t src = src_rows ? src_rows[i] : i;
    if (dst_rows[i] < 0 || dst_rows[i] >= num_dst_rows || src < 0 || src >= num_src_rows) return kOutOfRange;
  }
  const int64_t wanted = n / kRowsPerThread;
  const int team = static_cast<int>(wanted < 1 ? 1 : (wanted < num_threads ? wanted : num_threads));
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t src = src_rows ? src_rows[i] : i;
    std::memcpy(dst_key + dst_rows[i] * row_bytes, key + src * key_stride, static_cast<size_t>(row_bytes));
    std::memcpy(dst_value + dst_rows[i] * row_bytes, value + src * value_stride, static_cast<size_t>(row_bytes));
  }
  return kOk;
}

}  // extern "C"
