// Tests of core/topk_confidence.h: top-k order and ties, log-softmax values, alpha, NaN / inf
// handling, temperature, and that vocabulary chunks merged together equal one pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/topk_confidence.h"

namespace sage_ext::core {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct TopK {
  float alpha;
  std::vector<float> logprobs;
  std::vector<int64_t> ids;
};

TopK run(const std::vector<float>& logits, int64_t k, float temperature = 1.0f) {
  TopK out{0.0f, std::vector<float>(k), std::vector<int64_t>(k)};
  topk_confidence_row(logits.data(), static_cast<int64_t>(logits.size()), k, temperature, &out.alpha,
                      out.logprobs.data(), out.ids.data());
  return out;
}

double log_sum_exp(const std::vector<double>& z) {
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// alpha straight from the definition: renormalized top-k entropy over log k.
double expected_alpha(const std::vector<double>& topk_logprobs) {
  const double lse = log_sum_exp(topk_logprobs);
  double h = 0.0;
  for (double lp : topk_logprobs) {
    if (std::exp(lp - lse) > 0.0) h -= std::exp(lp - lse) * (lp - lse);  // 0 log 0 = 0
  }
  return std::clamp(1.0 - h / std::log(static_cast<double>(topk_logprobs.size())), 0.0, 1.0);
}

TEST(TopKConfidence, SortedLogSoftmaxWithTiesToLowerId) {
  const std::vector<float> logits{1.0f, 3.0f, 2.0f, 0.5f, 3.0f};
  const TopK out = run(logits, 3);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{1, 4, 2}));
  const double lse = log_sum_exp({1.0, 3.0, 2.0, 0.5, 3.0});
  EXPECT_NEAR(out.logprobs[0], 3.0 - lse, 1e-6);
  EXPECT_NEAR(out.logprobs[1], 3.0 - lse, 1e-6);
  EXPECT_NEAR(out.logprobs[2], 2.0 - lse, 1e-6);
  EXPECT_NEAR(out.alpha, expected_alpha({3.0 - lse, 3.0 - lse, 2.0 - lse}), 1e-6);
}

TEST(TopKConfidence, TemperatureDividesLogits) {
  const std::vector<float> logits{2.0f, 0.0f, -2.0f, 1.0f};
  const TopK out = run(logits, 2, 0.5f);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{0, 3}));
  const double lse = log_sum_exp({4.0, 0.0, -4.0, 2.0});
  EXPECT_NEAR(out.logprobs[0], 4.0 - lse, 1e-6);
  EXPECT_NEAR(out.logprobs[1], 2.0 - lse, 1e-6);
}

TEST(TopKConfidence, UniformTopKHasAlphaZeroAndPeakedHasAlphaOne) {
  EXPECT_NEAR(run({1.0f, 1.0f, 1.0f, 1.0f, -5.0f}, 4).alpha, 0.0f, 1e-6);
  // One token with all the mass among the top-k: entropy 0.
  EXPECT_NEAR(run({0.0f, 200.0f, 0.0f}, 2).alpha, 1.0f, 1e-6);
}

TEST(TopKConfidence, KEqualsOneGivesAlphaOne) {
  const TopK out = run({0.3f, -1.0f, 0.2f}, 1);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{0}));
  EXPECT_FLOAT_EQ(out.alpha, 1.0f);
}

TEST(TopKConfidence, NaNIsMinusInfinity) {
  const TopK out = run({kNaN, 1.0f, kNaN, 0.0f}, 3);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{1, 3, 0}));
  const double lse = log_sum_exp({1.0, 0.0});
  EXPECT_NEAR(out.logprobs[0], 1.0 - lse, 1e-6);
  EXPECT_NEAR(out.logprobs[1], 0.0 - lse, 1e-6);
  EXPECT_EQ(out.logprobs[2], -kInf);
  EXPECT_FALSE(std::isnan(out.alpha));
  EXPECT_NEAR(out.alpha, expected_alpha({1.0 - lse, -lse, -INFINITY}), 1e-6);
}

TEST(TopKConfidence, FewerFiniteThanKFillsWithLowestMinusInfIds) {
  const TopK out = run({-kInf, 2.0f, -kInf, -kInf}, 3);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{1, 0, 2}));
  EXPECT_FLOAT_EQ(out.logprobs[0], 0.0f);
  EXPECT_EQ(out.logprobs[1], -kInf);
  EXPECT_EQ(out.logprobs[2], -kInf);
  EXPECT_FLOAT_EQ(out.alpha, 1.0f);  // all renormalized mass on one token
}

TEST(TopKConfidence, PlusInfinityIsLargestFiniteFloat) {
  const TopK out = run({kInf, 0.0f, kInf}, 2);
  EXPECT_EQ(out.ids, (std::vector<int64_t>{0, 2}));
  EXPECT_NEAR(out.logprobs[0], -std::log(2.0), 1e-6);  // two tokens share all the mass
  EXPECT_NEAR(out.logprobs[1], -std::log(2.0), 1e-6);
  EXPECT_NEAR(out.alpha, 0.0f, 1e-6);
}

TEST(TopKConfidence, AllMinusInfOrNaNRow) {
  for (const std::vector<float>& row : {std::vector<float>{-kInf, -kInf, -kInf, -kInf},
                                        std::vector<float>{kNaN, kNaN, -kInf, kNaN}}) {
    const TopK out = run(row, 3);
    EXPECT_FLOAT_EQ(out.alpha, 0.0f);
    EXPECT_EQ(out.ids, (std::vector<int64_t>{0, 1, 2}));
    for (float lp : out.logprobs) EXPECT_EQ(lp, -kInf);
  }
  EXPECT_FLOAT_EQ(run({-kInf, -kInf}, 1).alpha, 0.0f);  // the empty-row rule wins over k == 1
}

TEST(TopKConfidence, MergedChunksEqualOnePass) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-20, 20);  // many exact ties
  std::vector<float> logits(5003);
  for (float& x : logits) x = static_cast<float>(small(rng)) * 0.25f;
  const int64_t k = 17;
  const TopK whole = run(logits, k);

  const int64_t vocab = static_cast<int64_t>(logits.size());
  const int chunks = 7;
  std::vector<TopKAccumulator> parts(chunks, TopKAccumulator(k));
  for (int c = 0; c < chunks; ++c) parts[c].add_range(logits.data(), c * vocab / chunks, (c + 1) * vocab / chunks, 1.0f);
  // Merge out of order: the result must not depend on it.
  TopKAccumulator total = parts[3];
  for (int c : {6, 0, 5, 1, 4, 2}) total.merge(parts[c]);
  TopK merged{0.0f, std::vector<float>(k), std::vector<int64_t>(k)};
  total.finalize(&merged.alpha, merged.logprobs.data(), merged.ids.data());

  EXPECT_EQ(merged.ids, whole.ids);
  for (int64_t i = 0; i < k; ++i) EXPECT_NEAR(merged.logprobs[i], whole.logprobs[i], 1e-5);
  EXPECT_NEAR(merged.alpha, whole.alpha, 1e-6);
  // Ties: within each equal-value run the ids ascend.
  for (int64_t i = 1; i < k; ++i) {
    ASSERT_GE(logits[whole.ids[i - 1]], logits[whole.ids[i]]);
    if (logits[whole.ids[i - 1]] == logits[whole.ids[i]]) {
      EXPECT_LT(whole.ids[i - 1], whole.ids[i]);
    }
  }
}

TEST(TopKConfidence, MatchesDirectLogSoftmaxOnLargeRow) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> logits(100000);
  for (float& x : logits) x = normal(rng);
  const TopK out = run(logits, 10);
  std::vector<double> z(logits.begin(), logits.end());
  const double lse = log_sum_exp(z);
  std::vector<int64_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::partial_sort(order.begin(), order.begin() + 10, order.end(), [&](int64_t a, int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<double> expected_lp;
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(out.ids[i], order[i]);
    expected_lp.push_back(logits[order[i]] - lse);
    EXPECT_NEAR(out.logprobs[i], expected_lp.back(), 1e-4);
  }
  EXPECT_NEAR(out.alpha, expected_alpha(expected_lp), 1e-5);
}

}  // namespace
}  // namespace sage_ext::core
