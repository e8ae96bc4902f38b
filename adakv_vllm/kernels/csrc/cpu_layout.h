// The page-format numbers that cpu.py's layout_numbers() passes (every size from quant/format.py, the
// rotation's exponents from quant/rotation.py), read the same way by the decode kernel (the reader)
// and the page encoder (the writer), so that neither invents an offset of its own.
//
// Header-only and free of torch headers (see cpu.py: build time).

#pragma once

#include <cstdint>

namespace adakv {

constexpr int kPrecisionCodes = 5;  // 2, 3, 4, 8, 16 bits: quant/precision.py's PRECISIONS, in order
constexpr int kFp16Code = kPrecisionCodes - 1;  // the verbatim 16-bit precision is the last code
constexpr int kLayoutNumbers = 7 + 3 * kPrecisionCodes;

struct PageNumbers {
  int block_size, group_size, header_bytes;
  int64_t page_bytes;
  bool storage_bf16;
  // rotation.scale_exponents(head_size): rotate = FWHT * 2**-rotate_shift over blocks of
  // 2**hadamard_log2 channels; unrotate = FWHT * 2**(rotate_shift - hadamard_log2)
  int rotate_shift, hadamard_log2;
  // per precision code: record size, where its fp16 scales start (0 for 16 bits), and its bits
  int record_bytes[kPrecisionCodes], scales_offset[kPrecisionCodes], bits[kPrecisionCodes];
};

// v: the kLayoutNumbers numbers of layout_numbers(), in its order.
inline PageNumbers read_page_numbers(const int64_t* v) {
  PageNumbers n;
  n.block_size = static_cast<int>(v[0]);
  n.group_size = static_cast<int>(v[1]);
  n.header_bytes = static_cast<int>(v[2]);
  n.page_bytes = v[3];
  n.storage_bf16 = v[4] != 0;
  n.rotate_shift = static_cast<int>(v[5]);
  n.hadamard_log2 = static_cast<int>(v[6]);
  for (int c = 0; c < kPrecisionCodes; ++c) {
    n.record_bytes[c] = static_cast<int>(v[7 + c]);
    n.scales_offset[c] = static_cast<int>(v[7 + kPrecisionCodes + c]);
    n.bits[c] = static_cast<int>(v[7 + 2 * kPrecisionCodes + c]);
  }
  return n;
}

}  // namespace adakv
