// Tree algorithms of docs/OPS.md on plain pointers, one batch row at a time, torch-free:
// parent validation, build_static_tree, sage_tree (one level's widths and threshold), expand_tree
// (best-first level expansion), rerank_tree (EAGLE-2 global top-N), the tree_buffers pieces
// (depth, links, paths, leaves, ancestor bitsets, packed and additive masks), the tree-mask row rule
// (tree_mask_row, host and device: the one definition the CPU loops, the CUDA kernel and the engine's
// workspace call) and the mask rows sage_level_ writes for new slots.
//
// Tree format: parents[i] < i, parents[0] == -1; a node i > 0 with parent -1 is padding.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "formulas.h"  // SAGE_HD
#include "status.h"

namespace sage_ext::core {

inline bool is_real_node(const int64_t* parents, int64_t i) { return i == 0 || parents[i] >= 0; }

// Checks one row of parents: parents[0] == -1; every other entry is -1 (padding) or the index of an
// earlier real node. The message names `arg_name` and the first bad node.
Status validate_parents(const int64_t* parents, int64_t num_nodes, const char* arg_name = "parents");

// ---- build_static_tree ----------------------------------------------------------------------
struct StaticTree {
  std::vector<int64_t> parents;  // [P + 1], root -1
  std::vector<int64_t> ranks;    // [P + 1], root -1
  std::vector<int64_t> depth;    // [P + 1], root 0
};

// paths: row-major [num_paths, path_len] child-rank paths, -1 padded at the end. Validates
// (non-empty rows, ranks in [0, kMaxTopK), -1 only as trailing padding, no duplicates, every proper
// prefix present) and orders nodes root first, then by depth, then lexicographically by rank path.
Status build_static_tree(const int64_t* paths, int64_t num_paths, int64_t path_len, StaticTree* out);

// ---- sage_tree --------------------------------------------------------------------------------
struct SageParams {
  int64_t level;  // depth of the children being created, >= 1
  int64_t k;
  float d_min, d_max, w_min, w_max, theta_scale;
};

// One row: widths[F] (0 for empty slots, -inf log-prob, and when level > max_depth),
// *min_cum_logprob = log(theta_scale * level / D), *max_depth = round(D).
void sage_tree_row(float alpha, const float* frontier_logprobs, int64_t num_frontier, const SageParams& params,
                   int64_t* widths, float* min_cum_logprob, int64_t* max_depth);

// ---- expand_tree ------------------------------------------------------------------------------
struct TreeRow {  // mutable tree state of one batch row, each [capacity]
  int64_t* tokens;
  int64_t* parents;
  float* logprobs;
  float* cum_logprobs;
  int64_t capacity;
};

struct FrontierRow {  // the draft's proposals for one batch row
  const int64_t* frontier;       // [F], node index or -1
  const float* topk_logprobs;    // [F, K], descending
  const int64_t* topk_ids;       // [F, K]
  const int64_t* widths;         // [F], clamped to [0, K] here
  int64_t num_frontier;          // F
  int64_t top_k;                 // K
  float min_cum_logprob;
};

// Frontier entries must be -1 or an existing node before the slots written: [0, slot_start).
Status validate_frontier(const int64_t* frontier, int64_t num_frontier, int64_t slot_start);

// Fills slots [slot_start, slot_start + num_slots) best-first (cum log-prob descending, ties by
// (f, r)); unused slots become padding. Returns the number of real nodes written.
int64_t expand_tree_row(const TreeRow& tree, const FrontierRow& proposals, int64_t slot_start, int64_t num_slots);

// ---- rerank_tree ------------------------------------------------------------------------------
// keep[num_select]: the root and the best num_select - 1 real nodes by s = min over the path of
// cum_logprobs (NaN counts as -inf), sorted ascending, -1 padded; new_parents[num_select]: parent's
// position in keep (root, padding: -1).
void rerank_tree_row(const int64_t* parents, const float* cum_logprobs, int64_t num_nodes, int64_t num_select,
                     int64_t* keep, int64_t* new_parents);

// ---- tree_buffers -----------------------------------------------------------------------------
// depth (padding 0), first_child / next_sibling (-1 when none; padding -1), is_leaf.
void tree_links_row(const int64_t* parents, int64_t num_nodes, int64_t* depth, int64_t* first_child,
                    int64_t* next_sibling, bool* is_leaf);

// paths[N, N]: row i = root-to-i node indices, -1 padded; padding rows all -1. Needs depth.
void tree_paths_row(const int64_t* parents, const int64_t* depth, int64_t num_nodes, int64_t* paths);

// Ancestor-or-self bitsets: row i has ancestor_words(N) uint64 words; bit j set iff j is an
// ancestor-or-self of i (padding rows: only bit i).
inline int64_t ancestor_words(int64_t num_nodes) { return (num_nodes + 63) / 64; }
void ancestor_bits_row(const int64_t* parents, int64_t num_nodes, uint64_t* bits);

inline bool test_bit(const uint64_t* row_bits, int64_t j) { return (row_bits[j >> 6] >> (j & 63)) & 1u; }

// packed[N, ceil(N/8)]: bit j % 8 (LSB first) of byte j / 8 of row i = ancestor-or-self.
void packed_mask_row(const uint64_t* bits, int64_t num_nodes, uint8_t* packed);

// mask[N, past_len + N]: `attend` on every past column and on ancestor-or-self tree columns,
// `blocked` elsewhere. T is any type constructible from float (float, c10::Half, ...).
template <typename T>
void float_mask_row(const uint64_t* bits, int64_t num_nodes, int64_t past_len, T attend, T blocked, T* mask) {
  const int64_t words = ancestor_words(num_nodes);
  const int64_t width = past_len + num_nodes;
  for (int64_t i = 0; i < num_nodes; ++i) {
    T* row = mask + i * width;
    const uint64_t* row_bits = bits + i * words;
    for (int64_t c = 0; c < past_len; ++c) row[c] = attend;
    for (int64_t j = 0; j < num_nodes; ++j) row[past_len + j] = test_bit(row_bits, j) ? attend : blocked;
  }
}

// ---- the tree-mask row rule ----------------------------------------------------------------------
// THE rule every additive tree-mask row written incrementally follows (sage_level_'s and tree_mask_feed_'s CPU
// loops and CUDA kernels): a node's row is its parent's row with the node's own column
// `self` set to `attend`; a node without a parent row (padding, parent -1) gets `blocked` everywhere but
// column `self`. Writes the columns first, first + step, ... < width of `row` (a CUDA thread passes its
// share of a block's columns; host loops 0 and 1). `parent_row` (nullptr: padding) must not be `row`.
template <typename T>
SAGE_HD void tree_mask_row(const T* parent_row, int64_t self, T attend, T blocked, T* row, int64_t width,
                           int64_t first = 0, int64_t step = 1) {
  if (parent_row != nullptr) {
    for (int64_t c = first; c < width; c += step) row[c] = parent_row[c];
  } else {
    for (int64_t c = first; c < width; c += step) row[c] = blocked;
  }
  if (self >= first && self < width && (self - first) % step == 0) row[self] = attend;
}

// ---- the draft row a fed slot copies (tree_mask_feed_) ------------------------------------------------
// The mask row a slot fed as draft row `first_row + j` starts from: the row of its parent (`node_row[parent]`, or
// the parent itself when slots are rows: node_row == nullptr; node_row holds node_row_len entries). A padding
// parent, one the draft was not fed, or a row not written before `first_row` gives `padding_row` (all blocked).
SAGE_HD int64_t feed_parent_row(int64_t parent, const int64_t* node_row, int64_t node_row_len,
                                int64_t first_row, int64_t padding_row) {
  if (parent < 0) return padding_row;
  const int64_t row = node_row == nullptr ? parent : (parent < node_row_len ? node_row[parent] : -1);
  return row < 0 || row >= first_row ? padding_row : row;
}

// ---- tree_mask rows of new slots (sage_level_) ---------------------------------------------------
// Additive tree-mask rows of the slots [slot_start, slot_start + num_slots), whose parents' rows are
// already written, by tree_mask_row (column c = slot c; a padding slot has parent -1). Row r starts at
// mask + r * row_stride and has `width` columns. Increasing i, so a slot may be the parent of a later one.
template <typename T>
void tree_mask_rows(const int64_t* parents, int64_t slot_start, int64_t num_slots, T attend, T blocked, T* mask,
                    int64_t row_stride, int64_t width) {
  for (int64_t i = slot_start; i < slot_start + num_slots; ++i) {
    const int64_t parent = parents[i];
    tree_mask_row(parent >= 0 ? mask + parent * row_stride : nullptr, i, attend, blocked, mask + i * row_stride,
                  width);
  }
}

}  // namespace sage_ext::core
