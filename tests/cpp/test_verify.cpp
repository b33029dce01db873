// Tests of core/verify.h: the greedy walk (first matching child, padding ignored, argmax read only
// on the path), argmax ties and NaN, both rejection-sampling rules with hand-computed
// acceptance thresholds, residual updates and bonus draws, and traversal verification (hand-computed
// chains and trees, and the decisions of verify_sampling on depth-1 trees).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
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

// ---- verify_traversal ---------------------------------------------------------------------------
VerifyResult traverse(const I64& tokens, const I64& parents, const std::vector<float>& target,
                      const std::vector<float>* draft, const std::vector<float>& u, I64* accepted) {
  TraversalScratch scratch;
  accepted->assign(tokens.size(), 0);
  const int64_t vocab = static_cast<int64_t>(target.size() / tokens.size());
  return verify_traversal_row(tokens.data(), parents.data(), static_cast<int64_t>(tokens.size()), target.data(),
                              draft ? draft->data() : nullptr, vocab, u.data(), accepted->data(), scratch);
}

// A chain root -> 1 -> 2 over vocab 2, with draft probabilities.
const I64 kChainParents{-1, 0, 1};
const I64 kChainTokens{1, 0, 0};

TEST(VerifyTraversal, ChainAcceptsAtSequenceLevel) {
  // alpha_1 = min(1, .5 / .8) = .625; alpha_2 = min(1, .625 * .9 / .5) = 1: node 2 (the first leaf) is
  // accepted whatever its uniform, and with it node 1, which token-level sampling rejects with u = .9.
  const std::vector<float> target{0.5f, 0.5f, 0.9f, 0.1f, 0.3f, 0.7f};
  const std::vector<float> draft{0.8f, 0.2f, 0.5f, 0.5f, 0.5f, 0.5f};
  const std::vector<float> u{0.5f, 0.9f, 0.999f};
  I64 accepted;
  VerifyResult r = traverse(kChainTokens, kChainParents, target, &draft, u, &accepted);
  EXPECT_EQ(accepted, (I64{0, 1, 2}));
  EXPECT_EQ(r.accept_len, 2);
  EXPECT_EQ(r.bonus, 1);  // node 2's row [.3, .7] at u0 = .5
  std::vector<float> scratch;
  r = verify_sampling_row(kChainTokens.data(), kChainParents.data(), 3, target.data(), draft.data(), 2, u.data(),
                          accepted.data(), scratch);
  EXPECT_EQ(r.accept_len, 0);
}

TEST(VerifyTraversal, RejectedLeafUpdatesItsParent) {
  // alpha_1 = .625; node 2 has token 1 with p = 0: alpha_2 = 0, always rejected. Node 1 then has
  // coef = 1 / .625 = 1.6, r = relu([1, 0] - 1.6 [.5, .5]) = [.2, 0], R = .625 * .2 = .125 and
  // alpha_1 = .125 / (1 - .625 + .125) = .25; its bonus is token 0 (the only residual mass).
  const std::vector<float> target{0.5f, 0.5f, 1.0f, 0.0f, 0.3f, 0.7f};
  const std::vector<float> draft{0.8f, 0.2f, 0.5f, 0.5f, 0.5f, 0.5f};
  const I64 tokens{1, 0, 1};
  I64 accepted;
  VerifyResult r = traverse(tokens, kChainParents, target, &draft, {0.99f, 0.24f, 0.0f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 1, -1}));
  EXPECT_EQ(r.accept_len, 1);
  EXPECT_EQ(r.bonus, 0);
  // u_1 = .26 >= .25: node 1 rejected too; the root's residual relu([.5, .5] - [.8, .2]) = [0, .3]
  // gives token 1 whatever u0, and the root is accepted.
  r = traverse(tokens, kChainParents, target, &draft, {0.0f, 0.26f, 0.0f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, -1, -1}));
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 1);
}

TEST(VerifyTraversal, DeterministicDraftChain) {
  // q = point mass on each child's token. alpha_1 = .5, alpha_2 = .5 * .8 = .4.
  const I64 tokens{0, 1, 2};
  const std::vector<float> target{0.2f, 0.5f, 0.3f, 0.1f, 0.1f, 0.8f, 1.0f, 0.0f, 0.0f};
  I64 accepted;
  VerifyResult r = traverse(tokens, kChainParents, target, nullptr, {0.5f, 0.99f, 0.39f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 1, 2}));
  EXPECT_EQ(r.bonus, 0);
  // Reject node 2 (u = .41): node 1 keeps [.1, .1, 0] (mass .2), R = .5 * .2 = .1, alpha_1 = .1 / .6.
  r = traverse(tokens, kChainParents, target, nullptr, {0.6f, 0.16f, 0.41f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 1, -1}));
  EXPECT_EQ(r.bonus, 1);  // cumsum [.1, .2] > .6 * .2 first at token 1
  r = traverse(tokens, kChainParents, target, nullptr, {0.6f, 0.17f, 0.41f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, -1, -1}));
  EXPECT_EQ(r.bonus, 2);  // the root's residual [.2, 0, .3]: cumsum > .6 * .5 first at token 2
}

TEST(VerifyTraversal, RejectedSubtreeLeavesItsSiblingTheResidual) {
  //      0
  //    /   \.
  //   1(0)  3(1)      node 4 is padding
  //   |
  //   2(1)
  // alpha_1 = .6, alpha_2 = .6 * .5 = .3. Reject 2 (u = .9): alpha_1 = .3 / (.4 + .3) = 3 / 7.
  // Reject 1 (u = .5): the root keeps [0, .4], alpha_3 = .4 / .4 = 1 -> node 3 accepted.
  const I64 parents{-1, 0, 1, 0, -1};
  const I64 tokens{7, 0, 1, 1, 0};
  const std::vector<float> target{0.6f, 0.4f, 0.5f, 0.5f, 1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 0.5f};
  I64 accepted;
  VerifyResult r = traverse(tokens, parents, target, nullptr, {0.0f, 0.5f, 0.9f, 0.999f, 0.0f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 3, -1, -1, -1}));
  EXPECT_EQ(r.accept_len, 1);
  EXPECT_EQ(r.bonus, 1);
  // u_1 = .42 < 3 / 7: node 1 accepted; its bonus avoids the rejected token 1.
  r = traverse(tokens, parents, target, nullptr, {0.9f, 0.42f, 0.9f, 0.999f, 0.0f}, &accepted);
  EXPECT_EQ(accepted, (I64{0, 1, -1, -1, -1}));
  EXPECT_EQ(r.bonus, 0);
}

TEST(VerifyTraversal, DuplicateTokenAndZeroDraftProbability) {
  // No draft: the second child with the same token finds its residual at 0.
  const I64 parents{-1, 0, 0};
  const I64 dup_tokens{0, 1, 1};
  const std::vector<float> target{0.0f, 0.9f, 0.1f, 0, 0, 1, 0, 0, 1};
  I64 accepted;
  VerifyResult r = traverse(dup_tokens, parents, target, nullptr, {0.0f, 0.95f, 0.0f}, &accepted);
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 2);
  // q(x) = 0: accepted iff the residual gives x positive mass.
  const std::vector<float> target2{0.1f, 0.9f, 0.0f, 1, 0, 0, 1, 0, 0};
  const std::vector<float> draft{0.0f, 1.0f, 0.0f, 1, 0, 0, 1, 0, 0};
  EXPECT_EQ(traverse(I64{2, 0, 2}, parents, target2, &draft, {0.0f, 0.999f, 0.999f}, &accepted).accept_len, 1);
  EXPECT_EQ(accepted, (I64{0, 1, -1}));
  EXPECT_EQ(traverse(I64{2, 2, 2}, parents, target2, &draft, {0.0f, 0.0f, 0.0f}, &accepted).accept_len, 0);
}

TEST(VerifyTraversal, RootOnlyAndEmptyResidual) {
  I64 accepted;
  const std::vector<float> row{0.2f, 0.5f, 0.3f};
  EXPECT_EQ(traverse(I64{0}, I64{-1}, row, nullptr, {0.71f}, &accepted).bonus, 2);
  EXPECT_EQ(accepted, (I64{0}));
  // Unnormalized draft over-covering the target: after node 1's rejection the root's residual is 0,
  // the bonus comes from the target row.
  const std::vector<float> target{0.5f, 0.5f, 0, 0};
  const std::vector<float> draft{0.6f, 0.6f, 0, 0};
  const VerifyResult r = traverse(I64{0, 0}, I64{-1, 0}, target, &draft, {0.7f, 0.9f}, &accepted);
  EXPECT_EQ(r.accept_len, 0);
  EXPECT_EQ(r.bonus, 1);
}

TEST(VerifyTraversal, DepthOneTreesMatchVerifySampling) {
  // With every child a leaf of the root (alpha_root = 1) the rule is token-level rejection sampling.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t vocab = 1 + trial % 9, nodes = 1 + trial % 7;
    I64 parents(nodes, 0), tokens(nodes, 0);
    parents[0] = -1;
    for (int64_t i = 1; i < nodes; ++i) {
      parents[i] = unit(rng) < 0.2f ? -1 : 0;
      tokens[i] = static_cast<int64_t>(unit(rng) * vocab) % vocab;
    }
    std::vector<float> target(nodes * vocab), draft(nodes * vocab), u(nodes);
    for (float& v : target) v = unit(rng) < 0.3f ? 0.0f : unit(rng);
    for (float& v : draft) v = unit(rng);
    for (int64_t row = 0; row < nodes; ++row) {
      target[row * vocab + trial % vocab] += 0.1f;  // a valid row has some mass (zero rows: see EmptyResidual)
      float total = 0.0f;
      for (int64_t v = 0; v < vocab; ++v) total += draft[row * vocab + v];
      for (int64_t v = 0; v < vocab; ++v) draft[row * vocab + v] /= total;
    }
    for (float& v : u) v = unit(rng);
    for (const bool with_draft : {false, true}) {
      I64 got, want(nodes);
      std::vector<float> scratch;
      const VerifyResult a = traverse(tokens, parents, target, with_draft ? &draft : nullptr, u, &got);
      const VerifyResult b = verify_sampling_row(tokens.data(), parents.data(), nodes, target.data(),
                                                 with_draft ? draft.data() : nullptr, vocab, u.data(), want.data(),
                                                 scratch);
      EXPECT_EQ(got, want) << "trial " << trial;
      EXPECT_EQ(a.accept_len, b.accept_len) << "trial " << trial;
      EXPECT_EQ(a.bonus, b.bonus) << "trial " << trial;
    }
  }
}

}  // namespace
}  // namespace sage_ext::core
