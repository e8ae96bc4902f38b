// The page-format numbers that cpu.py's layout_numbers() passes (every size from quant/format.py),
// read the same way by the decode kernel (the reader) and the page encoder (the writer), so that
// neither invents an offset of its own.
//
// Header-only and free of torch headers (see cpu.py: build time).

#pragma once

#include <cstdint>

namespace adakv {

constexpr int kPrecisionCodes = 4;  // 2, 4, 8, 16 bits: quant/precision.py's PRECISIONS, in order

struct PageNumbers {
  int block_size, group_size, header_bytes;
  int64_t page_bytes;
  bool storage_bf16;
  // per precision code: record size, where its fp16 scales and mins start, and its bits
  int record_bytes[kPrecisionCodes], scales_offset[kPrecisionCodes], mins_offset[kPrecisionCodes];
  int bits[kPrecisionCodes];
};

// v: the 21 numbers of layout_numbers(), in its order.
inline PageNumbers read_page_numbers(const int64_t* v) {
  PageNumbers n;
  n.block_size = static_cast<int>(v[0]);
  n.group_size = static_cast<int>(v[1]);
  n.header_bytes = static_cast<int>(v[2]);
  n.page_bytes = v[3];
  n.storage_bf16 = v[4] != 0;
  for (int c = 0; c < kPrecisionCodes; ++c) {
    n.record_bytes[c] = static_cast<int>(v[5 + c]);
    n.scales_offset[c] = static_cast<int>(v[9 + c]);
    n.mins_offset[c] = static_cast<int>(v[13 + c]);
    n.bits[c] = static_cast<int>(v[17 + c]);
  }
  return n;
}

}  // namespace adakv
