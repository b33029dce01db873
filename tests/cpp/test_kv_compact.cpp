// Tests of core/kv_compact.h: accepted rows move right after the committed prefix, in place, and
// the accepted-index validation.
#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#include "core/kv_compact.h"

namespace sage_ext::core {
namespace {

TEST(KvCompact, MovesAcceptedRowsInPlace) {
  const int64_t length = 8, dim = 2, past_len = 2;
  std::vector<float> slice(length * dim);
  for (int64_t r = 0; r < length; ++r) slice[r * dim] = slice[r * dim + 1] = static_cast<float>(r);
  const std::vector<int64_t> accepted{0, 2, 3, 5, -1};
  ASSERT_TRUE(validate_accepted(accepted.data(), 5, past_len, length).ok());
  compact_rows(reinterpret_cast<std::byte*>(slice.data()), dim * sizeof(float), dim * sizeof(float), accepted.data(),
               5, past_len);
  // rows: 0 1 | 2 (from 2) 4 (from 4) 5 (from 5) 7 (from 7) | 6 7 untouched
  const std::vector<float> expected{0, 0, 1, 1, 2, 2, 4, 4, 5, 5, 7, 7, 6, 6, 7, 7};
  EXPECT_EQ(slice, expected);
}

TEST(KvCompact, StridedRowsOnlyCopyRowBytes) {
  // Rows 3 floats apart, 2 floats long: the third float of each row is not part of the row.
  std::vector<float> slice{0, 0, -1, 1, 1, -1, 2, 2, -1, 3, 3, -1};
  const std::vector<int64_t> accepted{0, 2};
  compact_rows(reinterpret_cast<std::byte*>(slice.data()), 3 * sizeof(float), 2 * sizeof(float), accepted.data(), 2,
               1);
  EXPECT_EQ(slice, (std::vector<float>{0, 0, -1, 1, 1, -1, 3, 3, -1, 3, 3, -1}));
}

TEST(KvCompact, ValidationNamesAccepted) {
  const std::vector<int64_t> behind{0, 0};      // accepted[1] < 1 would read an overwritten row
  const std::vector<int64_t> too_far{0, 6};     // past_len + 6 >= L
  const std::vector<int64_t> negative{0, -2};
  for (const auto* bad : {&behind, &too_far, &negative}) {
    const Status status = validate_accepted(bad->data(), 2, 2, 8);
    ASSERT_FALSE(status.ok());
    EXPECT_NE(status.message().find("accepted"), std::string::npos);
  }
  const std::vector<int64_t> fine{0, 5, -1};
  EXPECT_TRUE(validate_accepted(fine.data(), 3, 2, 8).ok());
}

}  // namespace
}  // namespace sage_ext::core
