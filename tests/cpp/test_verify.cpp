// Tests of core/verify.h: the greedy walk (first matching child, padding ignored, argmax read only
// on the path), argmax ties and NaN, and both rejection-sampling rules with hand-computed
// acceptance thresholds, residual updates and bonus draws.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "core/verify.h"

namespace sage_ext::core {
namespace {

using I64 = std::vector<int64_t>;

//        0
//      /   \.
//   1(10)  2(11)      node 6 (token 11) is padding
//   /  \      \.
// 3(20) 4(21)  5(30)
const I64 kParents{-1, 0, 0, 1, 1, 2, -1};
const I64 kTokens{5, 10, 11, 20, 21, 30, 11};

TEST(VerifyGreedy, WalksMatchingChildrenAndReturnsBonus) {
  const I64 argmax{11, 0, 30, 0, 0, 42, 0};
  std::set<int64_t> queried;
  I64 accepted(7);
  const VerifyResult result = verify_greedy_row(
      kTokens.data(), kParents.data(), 7,
      [&](int64_t node) {
        queried.insert(node);
        return argmax[node];
      },
      accepted.data());
  EXPECT_EQ(accepted, (I64{0, 2, 5, -1, -1, -1, -1}));
  EXPECT_EQ(result.accept_len, 2);
  EXPECT_EQ(result.bonus, 42);
  EXPECT_EQ(queried, (std::set<int64_t>{0, 2, 5}));  // only the accepted path is read
}

TEST(VerifyGreedy, NoMatchAcceptsNothing) {
  I64 accepted(7);
  const VerifyResult result =
      verify_greedy_row(kTokens.data(), kParents.data(), 7, [](int64_t) { return int64_t{77}; }, accepted.data());
  EXPECT_EQ(accepted, (I64{0, -1, -1, -1, -1, -1, -1}));
  EXPECT_EQ(result.accept_len, 0);
  EXPECT_EQ(result.bonus, 77);
}

TEST(VerifyGreedy, DuplicateSiblingTokensTakeLowestIndex) {
  const I64 parents{-1, 0, 0, 2};
  const I64 tokens{1, 9, 9, 4};
  const I64 argmax{9, 4, 4, 8};
  I64 accepted(4);
  const VerifyResult result = verify_greedy_row(tokens.data(), parents.data(), 4,
                                                [&](int64_t node) { return argmax[node]; }, accepted.data());
  EXPECT_EQ(accepted, (I64{0, 1, -1, -1}));
  EXPECT_EQ(result.bonus, 4);
}

TEST(ArgmaxRow, TiesToLowestIndexAndNaNWins) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(argmax_row(std::vector<float>{1, 3, 3, 2}.data(), 4), 1);
  EXPECT_EQ(argmax_row(std::vector<float>{1, nan, 3, nan}.data(), 4), 1);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(argmax_row(std::vector<float>{-inf, -inf}.data(), 2), 0);
}

// Root with children 1 (token 0) and 2 (token 1); vocab 3; node rows of target_probs follow.
const I64 kTwoChildParents{-1, 0, 0};
const I64 kTwoChildTokens{2, 0, 1};

VerifyResult sample(const std::vector<float>& target, const std::vector<float>* draft, const std::vector<float>& u,
                    I64* accepted) {
  std::vector<float> scratch;
  accepted->assign(3, 0);
  return verify_sampling_row(kTwoChildTokens.data(), kTwoChildParents.data(), 3, target.data(),
                             draft ? draft->data() : nullptr, 3, u.data(), accepted->data(), scratch);
}

TEST(VerifySampling, DeterministicDraftAcceptsWithTargetProbability) {
  const std::vector<float> target{0.5f, 0.3f, 0.2f,   // after the root
                                  0.0f, 0.0f, 1.0f,   // after node 1
                                  1.0f, 0.0f, 0.0f};  // after node 2
  I64 accepted;
  VerifyResult r = sample(target, nullptr, {0.1f, 0.4f, 0.0f}, &accepted);  // 0.4 < 0.5: accept node 1
  EXPECT_EQ(accepted, (I64{0, 1, -1}));
  EXPECT_EQ(r.accept_len, 1);
  EXPECT_EQ(r.bonus, 2);  // node 1's row puts all mass on token 2

  // Reject node 1 (0.6 >= 0.5): p = [0, .3, .2], m = .5; node 2 needs u < .3 / .5 = .6.
  r = sample(target, nullptr, {0.1f, 0.6f, 0.59f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 2, -1}));
  EXPECT_EQ(r.bonus, 0);

  // Reject both: residual [0, 0, .2] -> the bonus is token 2 whatever u0.
  r = sample(target, nullptr, {0.0f, 0.6f, 0.61f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, -1, -1}));
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 2);
}

TEST(VerifySampling, TargetNeedNotBeNormalized) {
  const std::vector<float> target{1.0f, 0.6f, 0.4f, 0.0f, 0.0f, 2.0f, 2.0f, 0.0f, 0.0f};  // 2x the above
  I64 accepted;
  EXPECT_EQ(sample(target, nullptr, {0.1f, 0.6f, 0.59f}, &accepted).accept_len, 1);
  EXPECT_EQ(accepted, (I64{0, 2, -1}));
  // Both children rejected: the residual [0, 0, .4] makes the bonus token 2.
  const VerifyResult r = sample(target, nullptr, {0.55f, 0.9f, 0.9f}, &accepted);
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 2);  // residual after two rejects: [0, 0, .4]
}

TEST(VerifySampling, BonusDrawFromUnmodifiedRow) {
  // A root without children: bonus = smallest x with cumsum(p)[x] > u0 * m.
  const I64 parents{-1};
  const I64 tokens{0};
  const std::vector<float> target{0.2f, 0.5f, 0.3f};
  std::vector<float> scratch;
  I64 accepted(1);
  for (auto [u0, expected] : std::vector<std::pair<float, int64_t>>{{0.0f, 0}, {0.19f, 0}, {0.21f, 1}, {0.69f, 1}, {0.71f, 2}, {0.999f, 2}}) {
    const VerifyResult r = verify_sampling_row(tokens.data(), parents.data(), 1, target.data(),
                                               static_cast<const float*>(nullptr), 3, &u0, accepted.data(), scratch);
    EXPECT_EQ(r.bonus, expected) << "u0 = " << u0;
  }
}

TEST(VerifySampling, DraftProbabilitiesUseSpecInferRule) {
  const std::vector<float> target{0.5f, 0.3f, 0.2f, 0, 0, 1, 0, 1, 0};
  const std::vector<float> draft{0.25f, 0.5f, 0.25f, 1, 0, 0, 1, 0, 0};
  I64 accepted;
  // Node 1 (token 0): min(1, .5 / .25) = 1 -> always accepted.
  EXPECT_EQ(sample(target, &draft, {0.0f, 0.999f, 0.0f}, &accepted).accept_len, 1);
  EXPECT_EQ(accepted, (I64{0, 1, -1}));

  // Children in the other order: node 1 has token 1 (ratio .3 / .5 = .6), node 2 token 0.
  const I64 tokens{2, 1, 0};
  std::vector<float> scratch;
  // Reject node 1 (u = .7): p = relu(p - q) = [.25, 0, 0]; node 2: (.25 / .25) / .25 >= 1 -> accept.
  VerifyResult r = verify_sampling_row(tokens.data(), kTwoChildParents.data(), 3, target.data(), draft.data(), 3,
                                       std::vector<float>{0.0f, 0.7f, 0.999f}.data(), accepted.data(), scratch);
  EXPECT_EQ(accepted, (I64{0, 2, -1}));
  EXPECT_EQ(r.bonus, 1);  // node 2's target row
  // Accept node 1 with u = .59 < .6.
  r = verify_sampling_row(tokens.data(), kTwoChildParents.data(), 3, target.data(), draft.data(), 3,
                          std::vector<float>{0.0f, 0.59f, 0.999f}.data(), accepted.data(), scratch);
  EXPECT_EQ(accepted, (I64{0, 1, -1}));
  EXPECT_EQ(r.bonus, 2);
}

TEST(VerifySampling, ZeroDraftProbabilityAccepts) {
  const std::vector<float> target{0.1f, 0.9f, 0.0f, 1, 0, 0, 1, 0, 0};
  const std::vector<float> draft{0.0f, 1.0f, 0.0f, 1, 0, 0, 1, 0, 0};
  I64 accepted;
  EXPECT_EQ(sample(target, &draft, {0.0f, 0.999f, 0.0f}, &accepted).accept_len, 1);  // node 1: q[0] = 0
}

TEST(VerifySampling, EmptyResidualFallsBackToTargetRow) {
  // q over-covers p (unnormalized draft): after rejecting node 1 the residual is all zero.
  const I64 parents{-1, 0};
  const I64 tokens{0, 0};
  const std::vector<float> target{0.5f, 0.5f, 0, 0};
  const std::vector<float> draft{0.6f, 0.6f, 0, 0};
  std::vector<float> scratch;
  I64 accepted(2);
  // Node 1: ratio .5 / .6 = .833 < u = .9 -> reject; relu(p - q) = 0 -> bonus from [.5, .5] with u0 = .7.
  const VerifyResult r = verify_sampling_row(tokens.data(), parents.data(), 2, target.data(), draft.data(), 2,
                                             std::vector<float>{0.7f, 0.9f}.data(), accepted.data(), scratch);
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 1);
}

TEST(VerifySampling, DuplicateTokenIsNotAcceptedTwice) {
  // Without q, a rejected token's probability is zeroed: a sibling with the same token is rejected.
  const I64 parents{-1, 0, 0};
  const I64 tokens{0, 1, 1};
  const std::vector<float> target{0.0f, 0.9f, 0.1f, 0, 0, 1, 0, 0, 1};
  std::vector<float> scratch;
  I64 accepted(3);
  const VerifyResult r = verify_sampling_row(tokens.data(), parents.data(), 3, target.data(),
                                             static_cast<const float*>(nullptr), 3,
                                             std::vector<float>{0.0f, 0.95f, 0.0f}.data(), accepted.data(), scratch);
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 2);
}

TEST(VerifySampling, TokensMustIndexVocabulary) {
  EXPECT_TRUE(validate_tokens(kTwoChildTokens.data(), kTwoChildParents.data(), 3, 3).ok());
  const I64 bad{2, 3, 0};
  const Status status = validate_tokens(bad.data(), kTwoChildParents.data(), 3, 3);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("tokens"), std::string::npos);
  const I64 padding_parents{-1, -1, 0};  // a padding node's token is never read
  EXPECT_TRUE(validate_tokens(bad.data(), padding_parents.data(), 3, 3).ok());
}

}  // namespace
}  // namespace sage_ext::core
