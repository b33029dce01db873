// KV-cache row compaction of docs/OPS.md (kv_compact_), torch-free: after verification, the accepted
// tree rows of a cache slice [L, D] move to contiguous positions right after the committed prefix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "status.h"

namespace sage_ext::core {

// accepted[A] entries must be -1 or satisfy j <= accepted[j] and past_len + accepted[j] < cache_len
// (accepted[j] >= j makes the in-place copy in increasing j safe).
inline Status validate_accepted(const int64_t* accepted, int64_t num_accepted, int64_t past_len, int64_t cache_len) {
  for (int64_t j = 0; j < num_accepted; ++j) {
    const int64_t a = accepted[j];
    if (a == -1) continue;
    if (a < j || past_len + a >= cache_len) {
      return Status::Error("accepted[" + std::to_string(j) + "] = " + std::to_string(a) +
                           " must be -1 or in [" + std::to_string(j) + ", L - past_len) = [" + std::to_string(j) +
                           ", " + std::to_string(cache_len - past_len) + ")");
    }
  }
  return Status::Ok();
}

// One [L, D] slice: row past_len + j <- row past_len + accepted[j] for each j with accepted[j] >= 0,
// in increasing j. Rows are `row_bytes` long and `row_stride_bytes` apart.
inline void compact_rows(std::byte* slice, int64_t row_stride_bytes, int64_t row_bytes, const int64_t* accepted,
                         int64_t num_accepted, int64_t past_len) {
  for (int64_t j = 0; j < num_accepted; ++j) {
    const int64_t a = accepted[j];
    if (a < 0 || a == j) continue;
    std::memmove(slice + (past_len + j) * row_stride_bytes, slice + (past_len + a) * row_stride_bytes,
                 static_cast<size_t>(row_bytes));
  }
}

}  // namespace sage_ext::core
