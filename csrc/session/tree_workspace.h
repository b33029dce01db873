// TreeWorkspace: the engine's per-generation tree state on the device and the tensor work it does between
// two model forwards, one native call per gap.
//
// Why: on the CPU every separate small call made right after a model forward pays again for the
// instruction and data caches the forward evicted (measured: ~5-15 us per distinct call, several times
// its warm cost), so the work of a gap — a SAGE level, the views of the next draft forward, the target's
// mask and positions, verification and the commit — is done here in one call each. On CUDA the same
// calls only launch kernels (through the dispatcher, so the registered CUDA kernels run) and never read
// device values, except a SAGE level's count when the caller does not know it (static_shapes=False).
//
// The workspace owns (sizes in tree slots, `cap` = capacity):
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

// What the host learns from a step's commit, decoded from commit_tree_'s readback row (one device-to-host copy).
struct CommitResult {
  int64_t accept_len = 0;        // tau: accepted draft tokens
  int64_t draft_held = 0;        // accepted nodes (root included) the draft cache holds: a prefix of the path
  int64_t real_nodes = 0;        // real (non-padding) tree nodes besides the root
  std::optional<double> alpha;   // the root alpha passed to commit (a float32 value), none when none was passed
  std::vector<int64_t> tokens;   // the accept_len + 1 new tokens: the accepted path's, then the bonus
  at::Tensor accepted;           // [1, N] the accepted path's node indices, -1 padded (on the device)
};

class TreeWorkspace {
 public:
  // sequence: the engine's [1, S] int64 token buffer (device of the tree). draft_dtype: dtype of the draft's
  // masks (none without a draft); chain_rows: longest first draft forward (pending tokens + root).
  // direct_cpu: on the CPU run the level work with core/'s row loops in place (no dispatch, no allocation);
  // false: through the registered ops as on other devices (the tests compare the two).
  TreeWorkspace(int64_t capacity, int64_t max_cache_len, int64_t chain_rows, const at::Tensor& sequence,
                std::optional<c10::ScalarType> draft_dtype, c10::ScalarType target_dtype,
                const std::optional<at::Tensor>& row_table, bool direct_cpu = true);

  // ---- draft side -----------------------------------------------------------------------------------
  // A generation starts on a draft cache of `draft_cache_len` rows (after the prefill): resets the host
  // bookkeeping (draft_len = draft_cache_len, draft_base and rows_used 0).
  void start_generation(int64_t draft_cache_len);

  // Step start: the root (sequence[cur_len - 1]) into slot 0; optionally a fixed layout (parents [N],
  // node_row [1, N + 1], draft block [1, R, R] of the step's R draft rows); the tree block moved to the
  // new base; returns the inputs of the step's first draft forward (sequence [draft_done, cur_len)).
  ForwardInputs start(int64_t cur_len, int64_t draft_done, const std::optional<at::Tensor>& layout_parents,
                      const std::optional<at::Tensor>& layout_node_row,
                      const std::optional<at::Tensor>& layout_draft_block);

  // One SAGE level (the sage_level_ op) on the last `frontier_count` rows of the draft logits [1, T, V]; then,
  // when the tree goes on (count > 0, level < max_depth, used + count < n_max), the inputs of the draft forward
  // that feeds the new slots. count / max_depth: known_count / known_max_depth when >= 0 (static shapes), else
  // read from the op's outputs (free on the CPU, a sync elsewhere). Returns (count, frontier_alpha [1, F] at
  // level 1 (else none), max_depth, next forward inputs or none).
  std::tuple<int64_t, at::Tensor, int64_t, std::optional<ForwardInputs>> sage_level(
      const at::Tensor& logits, const std::optional<at::Tensor>& alpha, int64_t frontier_start, int64_t frontier_count,
      int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature, double d_min, double d_max,
      double w_min, double w_max, double theta_scale, int64_t used, int64_t n_max, int64_t known_count,
      int64_t known_max_depth);

  // One level of a fixed tree: topk_confidence of the last `frontier_count` rows of the draft logits, then
  // tokens/logprobs of the slots [start, start + child_index.size(0)) gathered from the flattened top-k
  // (child_index); then the inputs of the next feed when next_count > 0. Returns (alpha [F] when want_alpha,
  // else none; inputs or none).
  std::tuple<at::Tensor, std::optional<ForwardInputs>> static_level(
      const at::Tensor& logits, int64_t frontier_count, const at::Tensor& child_index, int64_t start, int64_t k,
      double temperature, bool want_alpha, int64_t next_start, int64_t next_count, int64_t next_depth);

  // One EAGLE-2 level: topk_confidence of the last `frontier_count` rows of the draft logits, then expand_tree
  // with every frontier slot [frontier_start, frontier_start + F) allowed k children and no threshold, into
  // [slot_start, slot_start + num_slots); then the inputs of the next feed when next_count > 0. Returns (alpha
  // [F] when want_alpha, else none; inputs or none).
  std::tuple<at::Tensor, std::optional<ForwardInputs>> topk_expand(
      const at::Tensor& logits, int64_t frontier_count, int64_t frontier_start, int64_t k, double temperature,
      int64_t slot_start, int64_t num_slots, bool want_alpha, int64_t next_start, int64_t next_count,
      int64_t next_depth);

  // EAGLE-2's final selection over the slots [0, num_slots): rerank_tree, then the kept nodes' tokens [1, S],
  // new parents [1, S], log-probs [1, S] and draft rows [1, S + 1] (-1 terminated).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank(int64_t num_slots, int64_t num_select);

  // ---- target side ----------------------------------------------------------------------------------
  // Positions [1, N] and the additive mask [1, 1, N, target_len + N] of the target's verification forward
  // of the tree `parents` [1, N] (tokens at sequence indices target_len + depth): a root alone, a fixed
  // layout (depth [1, N], target block [N, N]), a tree built in place whose draft mask rows equal its
  // target mask (the draft mask is reused), or any tree (tree_buffers).
  std::tuple<at::Tensor, at::Tensor> target_inputs(const at::Tensor& parents, int64_t target_len,
                                                   const std::optional<at::Tensor>& layout_depth,
                                                   const std::optional<at::Tensor>& layout_target_block);

  // Verify (greedily from `target` logits [1, N, V], or take the given verify_sampling outputs) and commit
  // (commit_tree_ at cur_len, draft rows node_row relative to draft_base): new tokens into the sequence,
  // both cache lists compacted. Returns the step's CommitResult: commit_tree_'s readback row, read to the host
  // here (the step's one sync on accelerators) and decoded, and `accepted`.
  // With draft rows, draft_len drops to what the draft cache holds after the step (draft_base + the accepted
  // nodes it holds): the caller crops the draft cache to draft_len.
  CommitResult commit(
      const at::Tensor& tokens, const at::Tensor& parents, const std::optional<at::Tensor>& target,
      const std::optional<at::Tensor>& accepted, const std::optional<at::Tensor>& accept_len,
      const std::optional<at::Tensor>& bonus, int64_t cur_len, const std::vector<at::Tensor>& target_caches,
      int64_t target_len, const std::vector<at::Tensor>& draft_caches, const std::optional<at::Tensor>& node_row,
      const std::optional<at::Tensor>& alpha);

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
  // The inputs of a draft forward over the slots [slot_start, slot_start + count), all at tree depth
  // `depth` (sequence index root + depth); their mask rows are written here unless sage_level already did
  // (or a fixed layout holds them).
  ForwardInputs feed(int64_t slot_start, int64_t count, int64_t depth);
  // The tree state was written by a level's expansion: a fixed layout's parents must be copied again.
  void tree_written();
  void write_feed_rows(int64_t slot_start, int64_t count);  // the mask rows of a feed (sage_level wrote none)
  ForwardInputs draft_inputs(int64_t slot_start, int64_t count, int64_t depth);
  // Where a level's frontier alphas go: a new tensor of `shape` in `alpha` when wanted, else a scratch buffer.
  float* alpha_output(bool wanted, int64_t count, at::Tensor& alpha, at::IntArrayRef shape);

  bool direct(const at::Tensor& logits) const;  // the level work can run with core/'s loops in place
  int64_t capacity_;
  bool direct_cpu_;
  at::Tensor sequence_, positions_, arange_;
  at::Tensor depth_;  // [1, cap]: the level each slot was expanded at (target positions of in-place trees)
  bool slots_are_rows_ = true;  // every feed so far took the slots right after the rows used (row == slot)
  at::Tensor node_row_, row_table_;
  at::Tensor block_;  // [1, cap + 1, cap] view of the tree block at columns draft_base ..
  at::Tensor edge_rows_, edge_values_, self_columns_;
  at::Tensor chain_, chain_block_;
  int64_t chain_base_ = 0;
  int64_t root_position_ = 0;  // sequence index of the root (cur_len - 1): a node at depth d sits at + d
  int64_t rows_ready_ = 0;    // leading block rows already valid this step (slots == rows)
  int64_t rows_written_ = 0;  // block rows [0, rows_written_) hold values this step (the padding row aside)
  at::Tensor fixed_node_row_;  // this step's fixed layout (undefined: the tree is built level by level)
  at::Tensor layout_parents_;  // the fixed parents last copied into `parents`
  c10::ScalarType target_dtype_;
  at::Tensor target_mask_;  // [1, 1, rows, W']: the target's persistent additive mask buffer
  std::vector<float> alpha_scratch_;
  int64_t target_block_at_ = 0, target_block_size_ = 0;
};

}  // namespace sage_ext::session
