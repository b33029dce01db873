// TreeWorkspace: the engine's per-generation tree state on the device and the tensor work it does between
// two model forwards, one native call per gap.
//
// Why: on the CPU every separate small call made right after a model forward pays again for the
// instruction and data caches the forward evicted (measured: ~5-15 us per distinct call, several times
// its warm cost), so the work of a gap — a tree level, the views of the next draft forward, the target's
// mask and positions, verification and the commit — is done here in one call each. Every piece of tensor
// work is a registered sage_ext op, resolved once and called through the dispatcher, so the CPU and the
// CUDA kernels run the same path (the CPU kernels of the level ops are core/'s in-place row loops); the
// glue (views, small copies, fills) is ATen. Nothing reads device values, except a SAGE level's count when
// the caller does not know it (static_shapes=False) and the commit's one readback.
//
// The workspace owns the step's tree: the policies tell it what to do (start, levels, which tree to verify:
// the slots [0, N), EAGLE-2's selection, or the root alone) and the engine asks it for the target's inputs
// and the commit without passing any tree tensor back.
//
// It holds (sizes in tree slots, `cap` = capacity):
//   tokens, parents [1, cap] int64; logprobs, cum_logprobs [1, cap] float32 (slot 0 = the root);
//   depth [1, cap] int64: the level each slot was expanded at (target positions of trees built in place);
//   node_row [1, cap + 1]: the draft-cache row of every slot fed to the draft this step (-1: not fed; the
//     last entry stays -1), or a row of row_table while slots are rows (row_table[r] = [0 .. r-1, -1 ..]);
//   the draft's additive tree mask [1, 1, cap + 1, W] (rows 64-element aligned): row r = draft row r,
//     columns [0, base) the draft's past (zeros), columns [base, base + cap) the tree block, row cap
//     all blocked (the row a padding slot's parent -1 picks); a chain buffer for the step's first draft
//     forward (pending committed tokens + the root, a causal chain);
//   the target's additive mask buffer and the position table [1, L] (sequence index -> itself).
// Host bookkeeping (rows_used, draft_base, draft_len, whether slots are rows) lives here too, so the
// Python side only passes the ints a gap depends on. The workspace is the only writer of that bookkeeping:
// draft_len (the draft cache's length) is set by start_generation, grows with start() and every feed, and
// shrinks in commit() to the rows the draft keeps; Python reads it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace sage_ext::session {

// Inputs of one model forward: tokens [1, n], sequence positions [1, n], additive mask [1, 1, n, past + n].
using ForwardInputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// KV-cache tensors [B, H, L, D] grouped by device: group 0 the layers on the tree's device (may be empty), then one
// group per other device (a model split with device_map).
using CacheGroups = std::vector<std::vector<at::Tensor>>;

// A tree whose shape and feed schedule never change (static trees, chains), on the workspace's device and
// dtypes: what tree_buffers would compute every step, made once.
struct FixedLayout {
  at::Tensor parents;       // [N] int64
  at::Tensor node_row;      // [1, N + 1] int64: the draft row of every slot the draft processes, -1 for the others
  at::Tensor draft_block;   // [1, R, R] the additive tree block of the step's R draft rows (draft dtype)
  at::Tensor depth;         // [1, N] int64
  at::Tensor target_block;  // [N, N] the whole tree's additive block (target dtype)
};

// When a SAGE tree goes on past a level (a cost-aware policy's stop rule, SpecDec++-style): the next draft forward
// is worth its cost if what one more level is expected to bring, in seconds of output, is at least what it costs:
// cost_fixed (one more draft forward) + cost_per_node x count (verifying the level's children). What it brings is
// a piecewise-linear function of the level's draft probability mass (the sum of its nodes' cumulative
// probabilities), scaled per level: at level l, values[i] x scales[l - 1] at masses[i] (increasing), linear
// between, flat beyond the ends; levels deeper than the scales take the last one's. One object for every level,
// built once per observed step (one call from the host, not one per level).
struct LevelStops {
  std::vector<double> masses;
  std::vector<double> values;
  std::vector<double> scales;
  double cost_fixed = 0.0;
  double cost_per_node = 0.0;

  LevelStops(std::vector<double> masses_, std::vector<double> values_, std::vector<double> scales_,
             double cost_fixed_, double cost_per_node_);

  int64_t levels() const { return static_cast<int64_t>(scales.size()); }
  double value(int64_t level, double mass) const;
  bool pays(int64_t level, double mass, int64_t count) const {
    return value(level, mass) >= cost_fixed + cost_per_node * static_cast<double>(count);
  }
  // How deep a sure tree goes (one node a level, all the draft's mass on it): the first level whose next does
  // not pay at mass 1, else max_depth.
  int64_t sure_depth(int64_t max_depth) const;

 private:
  std::vector<std::vector<double>> level_values_;  // values x scales[l - 1], per level
};

// What the host learns from a step's commit, decoded from commit_tree_'s readback row (one device-to-host copy).
struct CommitResult {
  int64_t accept_len = 0;        // tau: accepted draft tokens
  int64_t draft_held = 0;        // accepted nodes (root included) the draft cache holds: a prefix of the path
  int64_t real_nodes = 0;        // real (non-padding) tree nodes besides the root
  std::optional<double> alpha;   // the root's confidence (a float32 value), none when no level measured it
  std::vector<int64_t> tokens;   // the accept_len + 1 new tokens: the accepted path's, then the bonus
  at::Tensor accepted;           // [1, N] the accepted path's node indices, -1 padded (on the device)
};

class TreeWorkspace {
 public:
  // sequence: the engine's [1, S] int64 token buffer (device of the tree). draft_dtype: dtype of the draft's
  // masks (none without a draft); chain_rows: longest first draft forward (pending tokens + root).
  TreeWorkspace(int64_t capacity, int64_t max_cache_len, int64_t chain_rows, const at::Tensor& sequence,
                std::optional<c10::ScalarType> draft_dtype, c10::ScalarType target_dtype,
                const std::optional<at::Tensor>& row_table);

  // ---- draft side -----------------------------------------------------------------------------------
  // A generation starts on a draft cache of `draft_cache_len` rows (after the prefill): resets the host
  // bookkeeping (draft_len = draft_cache_len, draft_base and rows_used 0). `stop_tokens`: the tokens that end
  // this generation (its EOS ids): with dynamic shapes a level whose nodes are all stop tokens is not fed to the
  // draft (whatever follows an accepted stop token is dropped, so a level below it can only cost).
  void start_generation(int64_t draft_cache_len, const std::vector<int64_t>& stop_tokens = {});

  // Step start: the root (sequence[cur_len - 1]) into slot 0; optionally a fixed layout; the tree block moved
  // to the new base; returns the inputs of the step's first draft forward (sequence [draft_done, cur_len)).
  ForwardInputs start(int64_t cur_len, int64_t draft_done, const FixedLayout* layout);

  // A step without a draft: the tree is the root alone (sequence[cur_len - 1]). With a draft, its cache is left as
  // it is: the tokens this step commits are pending for the next start() (any number of them).
  void root_only(int64_t cur_len);

  // One SAGE level (the sage_level_ op) on the last `frontier_count` rows of the draft logits [1, T, V]; then,
  // when the tree goes on (count > 0, level < max_depth, used + count < n_max, with dynamic shapes not every new
  // node a stop token, and, with level_stops, the next level pays), the inputs of the draft forward that feeds the new
  // slots. count / max_depth: known_count /
  // known_max_depth when >= 0 (static shapes), else read from the op's outputs (free on the CPU, a sync
  // elsewhere; level_stops need them read: the level's mass comes with the same copy, and is kept in level_masses).
  // Returns (count, frontier_alpha [1, F] at level 1 (else none), max_depth, next forward inputs or none).
  std::tuple<int64_t, at::Tensor, int64_t, std::optional<ForwardInputs>> sage_level(
      const at::Tensor& logits, const std::optional<at::Tensor>& alpha, int64_t frontier_start, int64_t frontier_count,
      int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature, double d_min, double d_max,
      double w_min, double w_max, double theta_scale, int64_t used, int64_t n_max, int64_t known_count,
      int64_t known_max_depth, const LevelStops* level_stops);

  // One level of a fixed tree (the gather_level_ op): the top-k of the last `frontier_count` rows of the draft
  // logits, then the tokens/logprobs of the slots [start, start + child_index.size(0)) gathered from the
  // flattened top-k (child_index); then the inputs of the next feed (the slots [next_start, next_start +
  // next_count) at depth next_depth, which is then this level's) when next_count > 0. `cumulative`: the level's
  // cumulative log-probs are kept too (parent's + own; what a level's draft mass is summed from). `dynamic` (needs
  // `cumulative`): the level's draft mass and stop tokens are read (free on the CPU, a sync elsewhere), the mass
  // kept in level_masses, and the tree stops as sage_level's does with dynamic shapes: not fed on when every node of
  // the level is a stop token or, given level_stops, when the next level does not pay. A tree that stops early
  // is a prefix of its fixed layout (use_slots). Returns (alpha [F] when want_alpha, else none; inputs or none).
  std::tuple<at::Tensor, std::optional<ForwardInputs>> static_level(
      const at::Tensor& logits, int64_t frontier_count, const at::Tensor& child_index, int64_t start, int64_t k,
      double temperature, bool want_alpha, int64_t next_start, int64_t next_count, int64_t next_depth,
      bool cumulative = false, bool dynamic = false, const LevelStops* level_stops = nullptr);

  // One EAGLE-2 level (the expand_level_ op): the top-k of the last `frontier_count` rows of the draft logits,
  // every frontier slot [frontier_start, frontier_start + F) allowed k children and no threshold, best-first
  // into [slot_start, slot_start + num_slots); then the inputs of the next feed when next_count > 0. Returns
  // (alpha [F] when want_alpha, else none; inputs or none).
  std::tuple<at::Tensor, std::optional<ForwardInputs>> topk_expand(
      const at::Tensor& logits, int64_t frontier_count, int64_t frontier_start, int64_t k, double temperature,
      int64_t slot_start, int64_t num_slots, bool want_alpha, int64_t next_start, int64_t next_count,
      int64_t next_depth);

  // The step's tree is the slots [0, num_nodes) (SAGE, fixed layouts: all its nodes or, where static_level stopped
  // early, a prefix of them).
  void use_slots(int64_t num_nodes);
  // The step's tree is EAGLE-2's final selection over the slots [0, num_slots) (the rerank_select op).
  void rerank(int64_t num_slots, int64_t num_select);

  // ---- the step's tree (read-only views) ------------------------------------------------------------
  int64_t tree_nodes() const { return tree_nodes_; }
  // Draft probability mass (sum of the nodes' cumulative probabilities) of each level sage_level or static_level
  // built since start() with its count and mass read (dynamic shapes), in order; levels with no node are not listed.
  const std::vector<double>& level_masses() const { return level_masses_; }
  at::Tensor tree_tokens() const;    // [1, N]
  at::Tensor tree_parents() const;   // [1, N]
  at::Tensor tree_logprobs() const;  // [1, N] (undefined for the root alone)
  at::Tensor tree_node_row() const;  // [1, >= N + 1] draft rows (undefined without a draft or for the root alone)

  // ---- target side ----------------------------------------------------------------------------------
  // Tokens [1, N], positions [1, N] and the additive mask [1, 1, N, target_len + N] of the target's
  // verification forward of the step's tree (its tokens at sequence indices target_len + depth).
  ForwardInputs target_inputs(int64_t target_len);

  // Verify the step's tree (greedily from `target` logits [1, N, V], or take the given verify_sampling outputs)
  // and commit it (commit_tree_ at cur_len): new tokens into the sequence, the caches compacted — group 0 (the
  // tree's device) by commit_tree_, every other device group by kv_compact_ with the path copied there. Returns
  // the step's CommitResult: commit_tree_'s readback row, read to the host here (the step's one sync on
  // accelerators) and decoded, and `accepted`. With a draft, draft_len drops to what the draft cache holds after
  // the step (draft_base + the accepted nodes it holds): the caller crops the caches (the target to target_len +
  // accept_len + 1 rows, the draft to draft_len).
  CommitResult commit(const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& accepted,
                      const std::optional<at::Tensor>& accept_len, const std::optional<at::Tensor>& bonus,
                      int64_t cur_len, const CacheGroups& target_caches, int64_t target_len,
                      const CacheGroups& draft_caches);
  // commit() in two halves, so that a batch of workspaces is read with one copy: commit_async does the device work
  // and returns commit_tree_'s readback row [1, 4 + N] on the device (nothing read); read_commit decodes that row
  // once it is on the host (a contiguous CPU int64 tensor, e.g. a slice of all rows' readbacks copied together).
  at::Tensor commit_async(const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& accepted,
                          const std::optional<at::Tensor>& accept_len, const std::optional<at::Tensor>& bonus,
                          int64_t cur_len, const CacheGroups& target_caches, int64_t target_len,
                          const CacheGroups& draft_caches);
  CommitResult read_commit(const at::Tensor& host_readback);

  // ---- state ----------------------------------------------------------------------------------------
  at::Tensor tokens, parents, logprobs, cum_logprobs;
  at::Tensor mask;  // the draft's tree mask (undefined without a draft)
  at::Tensor node_row() const;  // [1, cap + 1] draft row of every slot fed this step (-1: not fed)
  at::Tensor row_table() const { return row_table_; }
  // host bookkeeping: written by the methods above only (read-only from Python)
  int64_t rows_used = 0;   // draft rows fed this step
  int64_t draft_base = 0;  // draft cache length at the root row
  int64_t draft_len = 0;   // draft cache length

 private:
  enum class TreeKind { kRoot, kSlots, kSelected };
  // The inputs of a draft forward over the slots [slot_start, slot_start + count), all at tree depth
  // `depth` (sequence index root + depth); their mask rows are written here (tree_mask_feed_) unless
  // sage_level already did (or a fixed layout holds them).
  ForwardInputs feed(int64_t slot_start, int64_t count, int64_t depth);
  void tree_written();  // a level's expansion wrote the slots: a fixed layout's parents must be copied again
  // The draft probability mass of the `count` slots from `slot_start` (the sum of their cumulative probabilities;
  // all real nodes) and how many of them are stop tokens, read on the host (a loop on the CPU).
  std::pair<double, int64_t> host_level_mass(int64_t slot_start, int64_t count) const;
  // The same on the device for the slots' real nodes (parent >= 0), read to the host in one copy (one sync) with
  // the one-element int64 tensors `leading`, whose values go to leading_values.
  std::pair<double, int64_t> device_level_mass(int64_t slot_start, int64_t count, const std::vector<at::Tensor>& leading,
                                               int64_t* leading_values) const;
  ForwardInputs draft_inputs(int64_t slot_start, int64_t count, int64_t depth);

  int64_t capacity_;
  at::Tensor sequence_, positions_, arange_;
  at::Tensor depth_;  // [1, cap]: the level each slot was expanded at (target positions of in-place trees)
  bool slots_are_rows_ = true;  // every feed so far took the slots right after the rows used (row == slot)
  at::Tensor node_row_, row_table_;
  at::Tensor block_;  // [1, cap + 1, cap] view of the tree block at columns draft_base ..
  at::Tensor edge_rows_, edge_values_;
  at::Tensor chain_, chain_block_;
  int64_t chain_base_ = 0;
  int64_t root_position_ = 0;  // sequence index of the root (cur_len - 1): a node at depth d sits at + d
  int64_t rows_ready_ = 0;    // leading block rows already valid this step (slots == rows)
  int64_t rows_written_ = 0;  // block rows [0, rows_written_) hold values this step (the padding row aside)
  std::optional<FixedLayout> layout_;  // this step's fixed layout (none: the tree is built level by level)
  at::Tensor prefix_node_row_;  // the layout's node_row for a tree that is a prefix of it (defined only then)
  at::Tensor layout_parents_;  // the fixed parents last copied into `parents`
  std::vector<double> level_masses_;  // this step's levels' draft probability masses (dynamic shapes)
  std::vector<int64_t> stop_tokens_;  // the generation's stop tokens (start_generation), and on the tree's device
  at::Tensor stop_tokens_device_;     // (undefined on the CPU, where the host list is read)
  at::Tensor root_alpha_;      // [1] the root's confidence, measured by this step's first level (or undefined)
  // the step's tree
  TreeKind tree_kind_ = TreeKind::kRoot;
  int64_t tree_nodes_ = 1;
  at::Tensor selected_tokens_, selected_parents_, selected_logprobs_, selected_rows_;  // rerank's selection
  c10::ScalarType target_dtype_;
  at::Tensor target_mask_;  // [1, 1, rows, W']: the target's persistent additive mask buffer
  at::Tensor pending_accepted_;  // commit_async's accepted path, until read_commit
  int64_t target_block_at_ = 0, target_block_size_ = 0;
};

}  // namespace sage_ext::session
