// Tests of core/tree.h on hand-built trees with exact expected outputs: parent validation,
// build_static_tree (the SpecVLM 25-node tree and its errors), sage_tree widths, expand_tree
// (best-first order, ties, thresholds, budget), rerank_tree (order, ties, ancestor closure) and
// the tree_buffers pieces (depth, links, paths, leaves, packed and additive masks), the tree-mask
// row rule (tree_mask_row, whole and split into column shares as the CUDA kernel does) and the mask
// rows of new slots (tree_mask_rows).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "core/formulas.h"
#include "core/tree.h"

namespace sage_ext::core {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
using I64 = std::vector<int64_t>;

// ---- validate_parents -------------------------------------------------------------------------
TEST(ValidateParents, AcceptsTreesWithPadding) {
  const I64 parents{-1, 0, 0, 1, -1, 3};
  EXPECT_TRUE(validate_parents(parents.data(), 6).ok());
}

TEST(ValidateParents, RejectsBadEntriesNamingParents) {
  for (const I64& parents : {I64{0, 0}, I64{-1, 1}, I64{-1, 2, 0}, I64{-1, -2}, I64{-1, -1, 1}}) {
    const Status status = validate_parents(parents.data(), static_cast<int64_t>(parents.size()));
    ASSERT_FALSE(status.ok());
    EXPECT_NE(status.message().find("parents"), std::string::npos) << status.message();
  }
}

// ---- build_static_tree ------------------------------------------------------------------------
// The SpecVLM 25-node static tree (sage_ext.policies.SPECVLM_TREE_PATHS), as a [25, 5] -1 padded paths matrix.
const std::vector<I64> kSpecVlmPaths{
    {0}, {1}, {2}, {3}, {0, 0}, {0, 1}, {0, 2}, {1, 0}, {1, 1}, {2, 0}, {2, 1}, {3, 0}, {0, 0, 0},
    {0, 0, 1}, {0, 0, 2}, {0, 1, 0}, {0, 1, 1}, {0, 2, 0}, {0, 2, 1}, {1, 0, 0}, {0, 0, 0, 0},
    {0, 0, 0, 1}, {0, 0, 0, 2}, {0, 0, 0, 0, 0}, {0, 0, 0, 0, 1}};

I64 to_matrix(const std::vector<I64>& rows, int64_t width) {
  I64 out;
  for (const I64& row : rows) {
    for (int64_t j = 0; j < width; ++j) out.push_back(j < static_cast<int64_t>(row.size()) ? row[j] : -1);
  }
  return out;
}

Status build(const std::vector<I64>& rows, StaticTree* tree, int64_t width = 5) {
  const I64 matrix = to_matrix(rows, width);
  return build_static_tree(matrix.data(), static_cast<int64_t>(rows.size()), width, tree);
}

TEST(BuildStaticTree, SpecVlmTree) {
  StaticTree tree;
  ASSERT_TRUE(build(kSpecVlmPaths, &tree).ok());
  EXPECT_EQ(tree.parents, (I64{-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21}));
  EXPECT_EQ(tree.ranks, (I64{-1, 0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 1}));
  EXPECT_EQ(tree.depth, (I64{0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 5, 5}));
  I64 level_sizes(6, 0);
  for (size_t i = 1; i < tree.depth.size(); ++i) ++level_sizes[tree.depth[i]];
  EXPECT_EQ(level_sizes, (I64{0, 4, 8, 8, 3, 2}));
  EXPECT_TRUE(validate_parents(tree.parents.data(), 26).ok());
}

TEST(BuildStaticTree, OrderDoesNotDependOnInputOrder) {
  std::vector<I64> shuffled = kSpecVlmPaths;
  std::mt19937 rng(11);
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  StaticTree expected, got;
  ASSERT_TRUE(build(kSpecVlmPaths, &expected).ok());
  ASSERT_TRUE(build(shuffled, &got, 7).ok());  // also wider padding
  EXPECT_EQ(got.parents, expected.parents);
  EXPECT_EQ(got.ranks, expected.ranks);
  EXPECT_EQ(got.depth, expected.depth);
}

TEST(BuildStaticTree, SortsByDepthThenRankPath) {
  StaticTree tree;
  ASSERT_TRUE(build({{1, 0}, {1}, {0}, {0, 2}, {0, 1}}, &tree).ok());
  // nodes: 1=[0] 2=[1] 3=[0,1] 4=[0,2] 5=[1,0]
  EXPECT_EQ(tree.parents, (I64{-1, 0, 0, 1, 1, 2}));
  EXPECT_EQ(tree.ranks, (I64{-1, 0, 1, 1, 2, 0}));
}

TEST(BuildStaticTree, RootOnlyTree) {
  StaticTree tree;
  ASSERT_TRUE(build_static_tree(nullptr, 0, 0, &tree).ok());
  EXPECT_EQ(tree.parents, (I64{-1}));
  EXPECT_EQ(tree.depth, (I64{0}));
}

TEST(BuildStaticTree, RejectsInvalidPathsNamingPaths) {
  const std::vector<std::vector<I64>> bad_inputs{
      {{0}, {}},            // empty row
      {{0}, {64}},          // rank out of range
      {{0}, {-2}},          // negative rank
      {{0}, {0}},           // duplicate
      {{0}, {1, 0}},        // missing prefix [1]
      {{0}, {0, 0, 0}},     // missing prefix [0, 0]
  };
  for (const auto& rows : bad_inputs) {
    StaticTree tree;
    const Status status = build(rows, &tree, 3);
    ASSERT_FALSE(status.ok());
    EXPECT_NE(status.message().find("paths"), std::string::npos) << status.message();
  }
  const I64 gap{0, -1, 1};  // a rank after the -1 padding
  StaticTree tree;
  const Status status = build_static_tree(gap.data(), 1, 3, &tree);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("paths"), std::string::npos);
}

// ---- sage_tree --------------------------------------------------------------------------------
TEST(SageTree, PaperDefaultsAtAlphaHalf) {
  // alpha 0.5, D in [3, 8] -> D = 5.5, max depth round(5.5) = 6; W in [2, 10] -> W = 6.
  const SageParams level1{1, 10, 3.0f, 8.0f, 2.0f, 10.0f, 0.1f};
  const std::vector<float> root{0.0f, -kInf};
  I64 widths(2);
  float min_cum = 0.0f;
  int64_t max_depth = 0;
  sage_tree_row(0.5f, root.data(), 2, level1, widths.data(), &min_cum, &max_depth);
  EXPECT_EQ(max_depth, 6);
  EXPECT_EQ(widths, (I64{6, 0}));  // empty slot -> 0
  EXPECT_NEAR(min_cum, std::log(0.1 * 1 / 5.5), 1e-6);

  // Level 2, parent probabilities 0.5 and 1: round(6 * 1.0 / 2) = 3, round(6 * 1.5 / 2) = round(4.5) = 5.
  SageParams level2 = level1;
  level2.level = 2;
  const std::vector<float> frontier{std::log(0.5f), 0.0f, std::log(1e-9f)};
  I64 widths2(3);
  sage_tree_row(0.5f, frontier.data(), 3, level2, widths2.data(), &min_cum, &max_depth);
  EXPECT_EQ(widths2, (I64{3, 5, 2}));  // tiny parent prob: round(6 * 0.5 / 2) = round(1.5) = 2
  EXPECT_NEAR(min_cum, std::log(0.1 * 2 / 5.5), 1e-6);
}

TEST(SageTree, ClampsToOneAndKAndStopsBeyondMaxDepth) {
  SageParams params{1, 4, 3.0f, 8.0f, 2.0f, 10.0f, 0.1f};
  const std::vector<float> root{0.0f};
  I64 widths(1);
  float min_cum;
  int64_t max_depth;
  sage_tree_row(0.0f, root.data(), 1, params, widths.data(), &min_cum, &max_depth);  // W = 10 > k
  EXPECT_EQ(widths[0], 4);
  EXPECT_EQ(max_depth, 3);

  params.level = 3;  // alpha 1: W = 2, D = 8; P = 1e-9: round(2 * 0.5 / 3) = 0 -> clamped to 1
  const std::vector<float> unlikely{std::log(1e-9f)};
  sage_tree_row(1.0f, unlikely.data(), 1, params, widths.data(), &min_cum, &max_depth);
  EXPECT_EQ(widths[0], 1);
  EXPECT_EQ(max_depth, 8);

  params.level = 9;  // beyond round(D) = 8
  const std::vector<float> certain{0.0f};
  sage_tree_row(1.0f, certain.data(), 1, params, widths.data(), &min_cum, &max_depth);
  EXPECT_EQ(widths[0], 0);
}

TEST(Formulas, RoundHalfUp) {
  EXPECT_EQ(round_half_up(2.5f), 3);
  EXPECT_EQ(round_half_up(2.49f), 2);
  EXPECT_EQ(round_half_up(-0.5f), 0);
  EXPECT_EQ(sage_level_width(6.0f, 0.0f, 1, 10), 6);
}

// ---- expand_tree ------------------------------------------------------------------------------
struct TreeBuffer {
  I64 tokens, parents;
  std::vector<float> logprobs, cum;
  explicit TreeBuffer(int64_t capacity)
      : tokens(capacity, 99), parents(capacity, 99), logprobs(capacity, 99.0f), cum(capacity, 99.0f) {
    tokens[0] = 5;
    parents[0] = -1;
    logprobs[0] = 0.0f;
    cum[0] = 0.0f;
  }
  TreeRow row() { return TreeRow{tokens.data(), parents.data(), logprobs.data(), cum.data(), (int64_t)tokens.size()}; }
};

TEST(ExpandTree, FirstLevelKeepsAboveThresholdAndPadsTheRest) {
  TreeBuffer tree(8);
  const I64 frontier{0};
  const std::vector<float> topk_lp{-0.1f, -1.0f, -2.0f};
  const I64 topk_ids{7, 8, 9};
  const I64 widths{3};
  const FrontierRow proposals{frontier.data(), topk_lp.data(), topk_ids.data(), widths.data(), 1, 3, -1.5f};
  EXPECT_EQ(expand_tree_row(tree.row(), proposals, 1, 4), 2);
  EXPECT_EQ(tree.tokens, (I64{5, 7, 8, 0, 0, 99, 99, 99}));
  EXPECT_EQ(tree.parents, (I64{-1, 0, 0, -1, -1, 99, 99, 99}));
  EXPECT_EQ(tree.logprobs[1], -0.1f);
  EXPECT_EQ(tree.cum[2], -1.0f);
  EXPECT_EQ(tree.logprobs[3], -kInf);
  EXPECT_EQ(tree.cum[4], -kInf);
  EXPECT_EQ(tree.cum[5], 99.0f);  // outside the slot range: untouched
}

TEST(ExpandTree, BestFirstAcrossFrontierWithTiesAndBudget) {
  TreeBuffer tree(8);
  // Level 1 already holds nodes 1 (cum -0.5) and 2 (cum -0.25).
  tree.parents[1] = 0, tree.parents[2] = 0;
  tree.cum[1] = -0.5f, tree.cum[2] = -0.25f;
  const I64 frontier{1, 2, -1};
  const std::vector<float> topk_lp{-0.125f, -0.25f,   // node 1: cum -0.625, -0.75
                                   -0.5f, -4.0f,      // node 2: cum -0.75 (tie with (0, 1)), -4.25
                                   0.0f, 0.0f};       // empty slot
  const I64 topk_ids{10, 11, 20, 21, 30, 31};
  const I64 widths{2, 5, 2};  // 5 > K: clamped to 2
  const FrontierRow proposals{frontier.data(), topk_lp.data(), topk_ids.data(), widths.data(), 3, 2, -5.0f};
  EXPECT_EQ(expand_tree_row(tree.row(), proposals, 3, 3), 3);  // 4 candidates, budget 3
  EXPECT_EQ(tree.tokens[3], 10);
  EXPECT_EQ(tree.tokens[4], 11);  // tie at -0.75: (f=0, r=1) before (f=1, r=0)
  EXPECT_EQ(tree.tokens[5], 20);
  EXPECT_EQ((I64{tree.parents[3], tree.parents[4], tree.parents[5]}), (I64{1, 1, 2}));
  EXPECT_EQ(tree.cum[3], -0.625f);
  EXPECT_EQ(tree.cum[5], -0.75f);
  EXPECT_EQ(tree.logprobs[5], -0.5f);
  EXPECT_EQ(tree.tokens[6], 99);
}

TEST(ExpandTree, ThresholdIsStrictAndMinusInfNeverKept) {
  TreeBuffer tree(4);
  const I64 frontier{0};
  const std::vector<float> topk_lp{-1.0f, -kInf};
  const I64 topk_ids{1, 2};
  const I64 widths{2};
  FrontierRow proposals{frontier.data(), topk_lp.data(), topk_ids.data(), widths.data(), 1, 2, -1.0f};
  EXPECT_EQ(expand_tree_row(tree.row(), proposals, 1, 3), 0);  // -1 is not > -1
  proposals.min_cum_logprob = -kInf;
  EXPECT_EQ(expand_tree_row(tree.row(), proposals, 1, 3), 1);  // -inf candidate still dropped
  const I64 zero_width{0};
  proposals.widths = zero_width.data();
  EXPECT_EQ(expand_tree_row(tree.row(), proposals, 1, 3), 0);
  EXPECT_EQ(tree.parents, (I64{-1, -1, -1, -1}));
}

TEST(ExpandTree, FrontierMustPrecedeSlots) {
  const I64 frontier{0, 3, -1};
  EXPECT_TRUE(validate_frontier(frontier.data(), 3, 4).ok());
  const Status status = validate_frontier(frontier.data(), 3, 3);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("frontier"), std::string::npos);
}

// ---- rerank_tree ------------------------------------------------------------------------------
// Scores s = path minimum: 1:-1  2:-0.5  3:min(-0.2,-1)=-1  4:-3  5:-0.6  6: padding  7:min(-0.1,-1)=-1
const I64 kRerankParents{-1, 0, 0, 1, 1, 2, -1, 3};
const std::vector<float> kRerankCum{0.0f, -1.0f, -0.5f, -0.2f, -3.0f, -0.6f, 5.0f, -0.1f};

TEST(RerankTree, SelectsByPathMinimumWithTiesToLowerIndex) {
  I64 keep(4), new_parents(4);
  rerank_tree_row(kRerankParents.data(), kRerankCum.data(), 8, 4, keep.data(), new_parents.data());
  EXPECT_EQ(keep, (I64{0, 1, 2, 5}));  // 2, 5, then the -1 tie {1, 3, 7} -> 1
  EXPECT_EQ(new_parents, (I64{-1, 0, 0, 2}));

  I64 keep5(5), new_parents5(5);
  rerank_tree_row(kRerankParents.data(), kRerankCum.data(), 8, 5, keep5.data(), new_parents5.data());
  EXPECT_EQ(keep5, (I64{0, 1, 2, 3, 5}));
  EXPECT_EQ(new_parents5, (I64{-1, 0, 0, 1, 2}));
}

TEST(RerankTree, PadsWhenFewerRealNodesAndNeverSelectsPadding) {
  I64 keep(8), new_parents(8);
  rerank_tree_row(kRerankParents.data(), kRerankCum.data(), 8, 8, keep.data(), new_parents.data());
  EXPECT_EQ(keep, (I64{0, 1, 2, 3, 4, 5, 7, -1}));
  EXPECT_EQ(new_parents, (I64{-1, 0, 0, 1, 1, 2, 3, -1}));
  I64 root_only(1), root_parent(1);
  rerank_tree_row(kRerankParents.data(), kRerankCum.data(), 8, 1, root_only.data(), root_parent.data());
  EXPECT_EQ(root_only, (I64{0}));
  EXPECT_EQ(root_parent, (I64{-1}));
}

TEST(RerankTree, RandomTreesStayAncestorClosed) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t n = 2 + trial % 40;
    I64 parents(n, -1);
    std::vector<float> cum(n, 0.0f);
    std::uniform_real_distribution<float> uniform(-4.0f, 0.0f);
    for (int64_t i = 1; i < n; ++i) {
      parents[i] = (rng() % 6 == 0) ? -1 : static_cast<int64_t>(rng() % i);
      if (parents[i] > 0 && parents[parents[i]] == -1) parents[i] = 0;  // no child of padding
      cum[i] = (rng() % 5 == 0) ? -1.0f : uniform(rng);                 // plenty of ties
    }
    ASSERT_TRUE(validate_parents(parents.data(), n).ok());
    const int64_t num_select = 1 + static_cast<int64_t>(rng() % n);
    I64 keep(num_select), new_parents(num_select);
    rerank_tree_row(parents.data(), cum.data(), n, num_select, keep.data(), new_parents.data());
    EXPECT_EQ(keep[0], 0);
    std::set<int64_t> kept;
    for (int64_t j = 0; j < num_select && keep[j] >= 0; ++j) kept.insert(keep[j]);
    for (int64_t j = 0; j < num_select; ++j) {
      if (keep[j] < 0) {
        EXPECT_EQ(new_parents[j], -1);
        continue;
      }
      if (j > 0) {
        EXPECT_GT(keep[j], keep[j - 1]);
        EXPECT_TRUE(kept.count(parents[keep[j]])) << "parent of a kept node is missing";
        ASSERT_GE(new_parents[j], 0);
        EXPECT_EQ(keep[new_parents[j]], parents[keep[j]]);
        EXPECT_NE(parents[keep[j]], -1);  // never padding
      }
    }
  }
}

// ---- tree_buffers -----------------------------------------------------------------------------
//        0
//      /   \        node 4 is padding
//     1     2
//    / \.
//   3   5
//   |
//   6
const I64 kParents{-1, 0, 0, 1, -1, 1, 3};

TEST(TreeBuffers, DepthLinksLeaves) {
  I64 depth(7), first_child(7), next_sibling(7);
  bool is_leaf[7];
  tree_links_row(kParents.data(), 7, depth.data(), first_child.data(), next_sibling.data(), is_leaf);
  EXPECT_EQ(depth, (I64{0, 1, 1, 2, 0, 2, 3}));
  EXPECT_EQ(first_child, (I64{1, 3, -1, 6, -1, -1, -1}));
  EXPECT_EQ(next_sibling, (I64{-1, 2, -1, 5, -1, -1, -1}));
  EXPECT_EQ((std::vector<bool>(is_leaf, is_leaf + 7)), (std::vector<bool>{false, false, true, false, false, true, true}));
}

TEST(TreeBuffers, Paths) {
  I64 depth(7), first_child(7), next_sibling(7), paths(49);
  bool is_leaf[7];
  tree_links_row(kParents.data(), 7, depth.data(), first_child.data(), next_sibling.data(), is_leaf);
  tree_paths_row(kParents.data(), depth.data(), 7, paths.data());
  const I64 expected{0, -1, -1, -1, -1, -1, -1,  //
                     0, 1, -1, -1, -1, -1, -1,   //
                     0, 2, -1, -1, -1, -1, -1,   //
                     0, 1, 3, -1, -1, -1, -1,    //
                     -1, -1, -1, -1, -1, -1, -1, // padding
                     0, 1, 5, -1, -1, -1, -1,    //
                     0, 1, 3, 6, -1, -1, -1};
  EXPECT_EQ(paths, expected);
}

TEST(TreeBuffers, PackedAndFloatMasks) {
  std::vector<uint64_t> bits(7 * ancestor_words(7));
  ancestor_bits_row(kParents.data(), 7, bits.data());
  std::vector<uint8_t> packed(7);
  packed_mask_row(bits.data(), 7, packed.data());
  // ancestor-or-self sets: {0} {0,1} {0,2} {0,1,3} {4} {0,1,5} {0,1,3,6}
  EXPECT_EQ(packed, (std::vector<uint8_t>{0x01, 0x03, 0x05, 0x0B, 0x10, 0x23, 0x4B}));

  const float blocked = std::numeric_limits<float>::lowest();
  std::vector<float> mask(7 * 9);
  float_mask_row(bits.data(), 7, 2, 0.0f, blocked, mask.data());
  const float B = blocked;
  const std::vector<float> row6{0, 0, /*tree*/ 0, 0, B, 0, B, B, 0};
  const std::vector<float> row4{0, 0, /*tree*/ B, B, B, B, 0, B, B};  // padding: past + diagonal
  EXPECT_EQ(std::vector<float>(mask.begin() + 6 * 9, mask.end()), row6);
  EXPECT_EQ(std::vector<float>(mask.begin() + 4 * 9, mask.begin() + 5 * 9), row4);
}

TEST(TreeBuffers, ChainOfSeventyCrossesWordAndByteBoundaries) {
  const int64_t n = 70;
  I64 parents(n);
  for (int64_t i = 0; i < n; ++i) parents[i] = i - 1;
  std::vector<uint64_t> bits(n * ancestor_words(n));
  ancestor_bits_row(parents.data(), n, bits.data());
  const int64_t bytes = (n + 7) / 8;
  std::vector<uint8_t> packed(n * bytes);
  packed_mask_row(bits.data(), n, packed.data());
  const std::vector<uint8_t> last_row(packed.end() - bytes, packed.end());
  EXPECT_EQ(last_row, (std::vector<uint8_t>{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F}));
  const std::vector<uint8_t> row64(packed.begin() + 64 * bytes, packed.begin() + 65 * bytes);
  EXPECT_EQ(row64, (std::vector<uint8_t>{0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01}));
  I64 depth(n), first_child(n), next_sibling(n);
  std::vector<char> leaf_storage(n);
  tree_links_row(parents.data(), n, depth.data(), first_child.data(), next_sibling.data(),
                 reinterpret_cast<bool*>(leaf_storage.data()));
  EXPECT_EQ(depth[69], 69);
  EXPECT_EQ(first_child[68], 69);
}

TEST(TreeBuffers, SpecVlmTreeMasksMatchPaths) {
  StaticTree tree;
  ASSERT_TRUE(build(kSpecVlmPaths, &tree).ok());
  const int64_t n = 26;
  I64 depth(n), first_child(n), next_sibling(n), paths(n * n);
  std::vector<char> leaf_storage(n);
  bool* is_leaf = reinterpret_cast<bool*>(leaf_storage.data());
  tree_links_row(tree.parents.data(), n, depth.data(), first_child.data(), next_sibling.data(), is_leaf);
  EXPECT_EQ(depth, tree.depth);
  EXPECT_EQ(std::count(is_leaf, is_leaf + n, true), 15);  // inner nodes: 0-8, 13, 21
  tree_paths_row(tree.parents.data(), depth.data(), n, paths.data());
  std::vector<uint64_t> bits(n * ancestor_words(n));
  ancestor_bits_row(tree.parents.data(), n, bits.data());
  for (int64_t i = 0; i < n; ++i) {
    std::set<int64_t> on_path;
    for (int64_t j = 0; j < n && paths[i * n + j] >= 0; ++j) on_path.insert(paths[i * n + j]);
    EXPECT_EQ(static_cast<int64_t>(on_path.size()), depth[i] + 1);
    for (int64_t j = 0; j < n; ++j) EXPECT_EQ(test_bit(bits.data() + i * ancestor_words(n), j), on_path.count(j) == 1);
  }
}

// ---- tree_mask_rows ---------------------------------------------------------------------------
TEST(TreeMaskRows, RowsFromParentsMatchTheAncestorBits) {
  // kParents-like tree with padding: {0} {0,1} {0,2} {0,1,3} pad {0,1,5} {0,1,3,6}; rows of slots
  // 1..6 written from row 0 one level at a time (as sage_level_ does), in a stride-9 buffer whose
  // stale contents must not leak.
  const I64 parents{-1, 0, 0, 1, -1, 1, 3};
  const int64_t n = 7, stride = 9;
  const float B = std::numeric_limits<float>::lowest();
  std::vector<float> mask(8 * stride, 123.0f);
  for (int64_t c = 0; c < n; ++c) mask[c] = c == 0 ? 0.0f : B;  // the root's row
  tree_mask_rows(parents.data(), 1, 2, 0.0f, B, mask.data(), stride, n);
  tree_mask_rows(parents.data(), 3, 4, 0.0f, B, mask.data(), stride, n);
  std::vector<uint64_t> bits(n * ancestor_words(n));
  ancestor_bits_row(parents.data(), n, bits.data());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < n; ++c) {
      EXPECT_EQ(mask[i * stride + c], test_bit(bits.data() + i, c) ? 0.0f : B) << "row " << i << " column " << c;
    }
    EXPECT_EQ(mask[i * stride + n], 123.0f);  // columns past `width` untouched
  }
  EXPECT_EQ(mask[7 * stride], 123.0f);  // rows past the slots untouched
}

// ---- tree_mask_row (the row rule, as the CUDA kernel's threads split it) ---------------------------
TEST(TreeMaskRow, ColumnSharesGiveTheWholeRow) {
  // a parent row and padding (no parent row), written whole and as `step` interleaved shares (first =
  // thread, step = threads), for every own column: the same row, own column opened, nothing past width.
  const float B = std::numeric_limits<float>::lowest();
  const int64_t width = 11;
  const std::vector<float> parent_row{0.0f, B, 0.0f, B, B, 0.0f, B, B, B, 0.0f, B};
  for (const float* from : {parent_row.data(), static_cast<const float*>(nullptr)}) {
    for (int64_t self = 0; self < width; ++self) {
      std::vector<float> whole(width + 1, 7.0f);
      tree_mask_row(from, self, 0.0f, B, whole.data(), width);
      for (int64_t c = 0; c < width; ++c) {
        const float expected = c == self ? 0.0f : (from != nullptr ? parent_row[c] : B);
        EXPECT_EQ(whole[c], expected) << "self " << self << " column " << c;
      }
      EXPECT_EQ(whole[width], 7.0f);
      for (int64_t step : {2, 3, 4, 16}) {
        std::vector<float> shared(width + 1, 7.0f);
        for (int64_t first = 0; first < step; ++first) {
          tree_mask_row(from, self, 0.0f, B, shared.data(), width, first, step);
        }
        EXPECT_EQ(shared, whole) << "self " << self << " step " << step;
      }
    }
  }
}

}  // namespace
}  // namespace sage_ext::core
