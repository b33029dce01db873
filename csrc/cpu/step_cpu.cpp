// CPU implementations of the fused engine-step ops of docs/OPS.md:
//   sage_level_      one SAGE level: topk_confidence of the frontier's logits, sage_tree, expand_tree and
//                    the tree-mask rows of the new slots, in place;
//   expand_level_    one EAGLE-2 level: topk_confidence, then expand_tree with k children per frontier slot;
//   gather_level_    one level of a fixed tree: topk_confidence, then the children's tokens and log-probs
//                    gathered from the flattened top-k;
//   rerank_select    EAGLE-2's final selection: rerank_tree, then the kept nodes' tokens, log-probs and rows;
//   tree_mask_feed_  the draft tree-mask rows of the slots fed to the draft (parents' rows, own column open);
//   commit_tree_     after verification: the new tokens into the sequence buffer, kv_compact_ of the
//                    target's and the draft's caches, and the step's host readback in one tensor.
// Each is the work of several small ATen calls in one: they run between model forwards, where every
// separate call pays again for the caches the forward evicted. The row algorithms are core/'s, the
// vocabulary and KV loops the ones topk_confidence and kv_compact_ use (cpu_utils.h); top-k scratch and
// frontier lists are thread-local buffers reused across calls.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../core/kv_compact.h"
#include "../core/tree.h"
#include "cpu_utils.h"

namespace sage_ext::cpu {
namespace {

// Top-k of `rows` logit rows starting at `logits` (rows `row_stride` elements apart), into scratch buffers
// reused across calls (the engine calls these between every two draft forwards: no allocation).
struct TopkScratch {
  std::vector<float> logprobs;
  std::vector<int64_t> ids;
};

TopkScratch& topk_rows(const at::Tensor& logits, int64_t batch_row, int64_t first_row, int64_t rows, int64_t k,
                       double temperature, float* alpha) {
  thread_local TopkScratch scratch;
  scratch.logprobs.resize(rows * k);
  scratch.ids.resize(rows * k);
  const char* data = static_cast<const char*>(logits.const_data_ptr()) +
                     (batch_row * logits.stride(0) + first_row * logits.stride(1)) *
                         static_cast<int64_t>(logits.element_size());
  topk_confidence_rows(logits.scalar_type(), data, rows, logits.size(2), logits.stride(1), k,
                       static_cast<float>(temperature), alpha, scratch.logprobs.data(), scratch.ids.data());
  return scratch;
}

// The frontier as expand_tree takes it: the slots [start, start + count), in a buffer reused across calls.
const std::vector<int64_t>& slot_range(int64_t start, int64_t count) {
  thread_local std::vector<int64_t> slots;
  slots.resize(count);
  std::iota(slots.begin(), slots.end(), start);
  return slots;
}

core::TreeRow tree_row(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                       const at::Tensor& cum_logprobs, int64_t b) {
  const int64_t capacity = tokens.size(1);
  return core::TreeRow{tokens.data_ptr<int64_t>() + b * capacity, parents.data_ptr<int64_t>() + b * capacity,
                       logprobs.data_ptr<float>() + b * capacity, cum_logprobs.data_ptr<float>() + b * capacity,
                       capacity};
}

// sage_level_ on checked arguments: count[B], frontier_alpha[B * F], max_depth[B].
void sage_level_into(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                     const at::Tensor& cum_logprobs, const std::optional<at::Tensor>& tree_mask,
                     const at::Tensor& logits, int64_t first_row, int64_t num_frontier,
                     const std::optional<at::Tensor>& alpha_in, int64_t frontier_start, int64_t level,
                     int64_t slot_start, int64_t num_slots, int64_t k, double temperature, double d_min, double d_max,
                     double w_min, double w_max, double theta_scale, int64_t* count, float* frontier_alpha,
                     int64_t* max_depth) {
  const int64_t batch = tokens.size(0);
  const at::Tensor alpha = alpha_in.has_value() ? alpha_in->contiguous() : at::Tensor();
  const core::SageParams params = sage_params(level, k, d_min, d_max, w_min, w_max, theta_scale);
  const std::vector<int64_t>& frontier = slot_range(frontier_start, num_frontier);
  thread_local std::vector<int64_t> widths;
  widths.resize(num_frontier);
  for (int64_t b = 0; b < batch; ++b) {
    float* row_alpha = frontier_alpha + b * num_frontier;
    const TopkScratch& topk = topk_rows(logits, b, first_row, num_frontier, k, temperature, row_alpha);
    const core::TreeRow tree = tree_row(tokens, parents, logprobs, cum_logprobs, b);
    // lagged alpha, or (zero-lag) the row's first frontier node's own
    const float shape_alpha = alpha.defined() ? alpha.const_data_ptr<float>()[b] : row_alpha[0];
    float min_cum_logprob = 0.0f;
    core::sage_tree_row(shape_alpha, tree.logprobs + frontier_start, num_frontier, params, widths.data(),
                        &min_cum_logprob, max_depth + b);
    const core::FrontierRow proposals{frontier.data(), topk.logprobs.data(), topk.ids.data(), widths.data(),
                                      num_frontier,    k,                     min_cum_logprob};
    count[b] = core::expand_tree_row(tree, proposals, slot_start, num_slots);
  }
  if (tree_mask.has_value()) {
    const at::Tensor& mask = *tree_mask;
    dispatch_float_dtype(mask.scalar_type(), "sage_level_", [&](auto zero) {
      using T = decltype(zero);
      for (int64_t b = 0; b < batch; ++b) {
        core::tree_mask_rows(parents.const_data_ptr<int64_t>() + b * tokens.size(1), slot_start, num_slots, T(0.0f),
                             std::numeric_limits<T>::lowest(), static_cast<T*>(mask.data_ptr()) + b * mask.stride(0),
                             mask.stride(1), mask.size(2));
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sage_level_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
    const std::optional<at::Tensor>& tree_mask, const at::Tensor& logits_in, const std::optional<at::Tensor>& alpha,
    int64_t frontier_start, int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature,
    double d_min, double d_max, double w_min, double w_max, double theta_scale) {
  check_sage_level_args(tokens, parents, logprobs, cum_logprobs, tree_mask, logits_in, alpha, frontier_start,
                        level, slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale);
  const int64_t batch = tokens.size(0);
  at::Tensor frontier_alpha = empty_on(tokens, {batch, logits_in.size(1)}, c10::kFloat);
  at::Tensor count = empty_on(tokens, {batch}, c10::kLong);
  at::Tensor max_depth = empty_on(tokens, {batch}, c10::kLong);
  sage_level_into(tokens, parents, logprobs, cum_logprobs, tree_mask, with_contiguous_last_dim(logits_in), 0,
                  logits_in.size(1), alpha, frontier_start, level, slot_start, num_slots, k, temperature, d_min,
                  d_max, w_min, w_max, theta_scale, count.data_ptr<int64_t>(), frontier_alpha.data_ptr<float>(),
                  max_depth.data_ptr<int64_t>());
  return {count, frontier_alpha, max_depth};
}

std::tuple<at::Tensor, at::Tensor> expand_level_cpu(const at::Tensor& tokens, const at::Tensor& parents,
                                                    const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
                                                    const at::Tensor& logits_in, int64_t frontier_start, int64_t k,
                                                    double temperature, int64_t slot_start, int64_t num_slots) {
  check_expand_level_args(tokens, parents, logprobs, cum_logprobs, logits_in, frontier_start, k, temperature,
                          slot_start, num_slots);
  const at::Tensor logits = with_contiguous_last_dim(logits_in);
  const int64_t batch = tokens.size(0);
  const int64_t num_frontier = logits.size(1);
  at::Tensor frontier_alpha = empty_on(tokens, {batch, num_frontier}, c10::kFloat);
  at::Tensor count = empty_on(tokens, {batch}, c10::kLong);
  const std::vector<int64_t>& frontier = slot_range(frontier_start, num_frontier);
  thread_local std::vector<int64_t> widths;
  widths.assign(num_frontier, k);  // every frontier slot k children, no threshold
  for (int64_t b = 0; b < batch; ++b) {
    const TopkScratch& topk =
        topk_rows(logits, b, 0, num_frontier, k, temperature, frontier_alpha.data_ptr<float>() + b * num_frontier);
    const core::FrontierRow proposals{frontier.data(), topk.logprobs.data(), topk.ids.data(), widths.data(),
                                      num_frontier,    k,                     -std::numeric_limits<float>::infinity()};
    count.data_ptr<int64_t>()[b] =
        core::expand_tree_row(tree_row(tokens, parents, logprobs, cum_logprobs, b), proposals, slot_start, num_slots);
  }
  return {count, frontier_alpha};
}

at::Tensor gather_level_cpu(const at::Tensor& tokens, const at::Tensor& logprobs, const at::Tensor& logits_in,
                            const at::Tensor& child_index_in, int64_t slot_start, int64_t k, double temperature) {
  check_gather_level_args(tokens, logprobs, logits_in, child_index_in, slot_start, k, temperature);
  const at::Tensor logits = with_contiguous_last_dim(logits_in);
  const at::Tensor child_index = child_index_in.contiguous();
  const int64_t batch = tokens.size(0);
  const int64_t capacity = tokens.size(1);
  const int64_t num_frontier = logits.size(1);
  const int64_t children = child_index.size(0);
  const int64_t* index = child_index.const_data_ptr<int64_t>();
  for (int64_t c = 0; c < children; ++c) {
    TORCH_CHECK_VALUE(index[c] >= 0 && index[c] < num_frontier * k, "gather_level_: child_index[", c, "] = ",
                      index[c], " must be in [0, F * k) = [0, ", num_frontier * k, ")");
  }
  at::Tensor frontier_alpha = empty_on(tokens, {batch, num_frontier}, c10::kFloat);
  for (int64_t b = 0; b < batch; ++b) {
    const TopkScratch& topk =
        topk_rows(logits, b, 0, num_frontier, k, temperature, frontier_alpha.data_ptr<float>() + b * num_frontier);
    int64_t* token_out = tokens.data_ptr<int64_t>() + b * capacity + slot_start;
    float* logprob_out = logprobs.data_ptr<float>() + b * capacity + slot_start;
    for (int64_t c = 0; c < children; ++c) {
      token_out[c] = topk.ids[index[c]];
      logprob_out[c] = topk.logprobs[index[c]];
    }
  }
  return frontier_alpha;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank_select_cpu(
    const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& logprobs_in,
    const at::Tensor& cum_logprobs_in, const at::Tensor& node_row_in, int64_t num_select) {
  check_rerank_select_args(tokens_in, parents_in, logprobs_in, cum_logprobs_in, node_row_in, num_select);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor logprobs = logprobs_in.contiguous();
  const at::Tensor cum_logprobs = cum_logprobs_in.contiguous();
  const at::Tensor node_row = node_row_in.contiguous();
  validate_parent_rows("rerank_select", parents);
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  at::Tensor kept_tokens = empty_on(tokens, {batch, num_select}, c10::kLong);
  at::Tensor kept_parents = empty_on(tokens, {batch, num_select}, c10::kLong);
  at::Tensor kept_logprobs = empty_on(tokens, {batch, num_select}, c10::kFloat);
  at::Tensor kept_rows = empty_on(tokens, {batch, num_select + 1}, c10::kLong);
  thread_local std::vector<int64_t> keep;
  keep.resize(num_select);
  for (int64_t b = 0; b < batch; ++b) {
    core::rerank_tree_row(parents.const_data_ptr<int64_t>() + b * nodes, cum_logprobs.const_data_ptr<float>() + b * nodes,
                          nodes, num_select, keep.data(), kept_parents.data_ptr<int64_t>() + b * num_select);
    const int64_t* token_row = tokens.const_data_ptr<int64_t>() + b * nodes;
    const float* logprob_row = logprobs.const_data_ptr<float>() + b * nodes;
    const int64_t* slot_rows = node_row.const_data_ptr<int64_t>() + b * node_row.size(1);
    int64_t* token_out = kept_tokens.data_ptr<int64_t>() + b * num_select;
    float* logprob_out = kept_logprobs.data_ptr<float>() + b * num_select;
    int64_t* row_out = kept_rows.data_ptr<int64_t>() + b * (num_select + 1);
    for (int64_t j = 0; j < num_select; ++j) {
      const int64_t slot = keep[j];  // -1: padding (fewer real nodes than num_select)
      token_out[j] = slot >= 0 ? token_row[slot] : 0;
      logprob_out[j] = slot >= 0 ? logprob_row[slot] : -std::numeric_limits<float>::infinity();
      row_out[j] = slot >= 0 ? std::max<int64_t>(slot_rows[slot], -1) : -1;
    }
    row_out[num_select] = -1;
  }
  return {kept_tokens, kept_parents, kept_logprobs, kept_rows};
}

void tree_mask_feed_cpu(const at::Tensor& tree_mask, const at::Tensor& parents_in,
                        const std::optional<at::Tensor>& node_row_in, int64_t slot_start, int64_t first_row,
                        int64_t count) {
  check_tree_mask_feed_args(tree_mask, parents_in, node_row_in, slot_start, first_row, count);
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor node_row = node_row_in.has_value() ? node_row_in->contiguous() : at::Tensor();
  const int64_t batch = parents.size(0);
  const int64_t padding_row = tree_mask.size(1) - 1;
  dispatch_float_dtype(tree_mask.scalar_type(), "tree_mask_feed_", [&](auto zero) {
    using T = decltype(zero);
    for (int64_t b = 0; b < batch; ++b) {
      T* block = static_cast<T*>(tree_mask.data_ptr()) + b * tree_mask.stride(0);
      const int64_t* parent_slots = parents.const_data_ptr<int64_t>() + b * parents.size(1);
      const int64_t* row_of = node_row.defined() ? node_row.const_data_ptr<int64_t>() + b * node_row.size(1) : nullptr;
      const int64_t row_of_len = node_row.defined() ? node_row.size(1) : 0;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t row = first_row + j;
        const int64_t parent_row =
            core::feed_parent_row(parent_slots[slot_start + j], row_of, row_of_len, first_row, padding_row);
        core::tree_mask_row(block + parent_row * tree_mask.stride(1), row, T(0.0f), std::numeric_limits<T>::lowest(),
                            block + row * tree_mask.stride(1), tree_mask.size(2));
      }
    }
  });
}

// The accepted path of one batch row: accepted[0] = 0 (the root), accepted[j] in [j, N) for j <= tau,
// -1 after it.
void validate_path(const int64_t* accepted, int64_t nodes, int64_t tau, int64_t b) {
  TORCH_CHECK_VALUE(tau >= 0 && tau < nodes, "commit_tree_: batch row ", b, ": accept_len (", tau,
                    ") must be in [0, N) = [0, ", nodes, ")");
  TORCH_CHECK_VALUE(accepted[0] == 0, "commit_tree_: batch row ", b, ": accepted[0] must be 0 (the root), got ",
                    accepted[0]);
  for (int64_t j = 1; j < nodes; ++j) {
    const int64_t a = accepted[j];
    const bool ok = j <= tau ? (a >= j && a < nodes) : a == -1;
    TORCH_CHECK_VALUE(ok, "commit_tree_: batch row ", b, ": accepted[", j, "] = ", a, " must be ",
                      j <= tau ? "a node index in [j, N)" : "-1 (past accept_len)");
  }
}

int64_t shortest_cache(at::TensorList caches) {
  int64_t shortest = std::numeric_limits<int64_t>::max();
  for (const at::Tensor& cache : caches) shortest = std::min(shortest, cache.size(2));
  return shortest;
}

at::Tensor commit_tree_cpu(const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& accepted_in,
                           const at::Tensor& accept_len_in, const at::Tensor& bonus_in, const at::Tensor& sequence,
                           int64_t seq_start, at::TensorList target_caches, int64_t target_past,
                           at::TensorList draft_caches, const std::optional<at::Tensor>& draft_rows_in,
                           int64_t draft_past, const std::optional<at::Tensor>& alpha_in) {
  check_commit_tree_args(tokens_in, parents_in, accepted_in, accept_len_in, bonus_in, sequence, seq_start,
                         target_caches, target_past, draft_caches, draft_rows_in, draft_past, alpha_in);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor accepted = accepted_in.contiguous();
  const at::Tensor accept_len = accept_len_in.contiguous();
  const at::Tensor bonus = bonus_in.contiguous();
  const at::Tensor draft_rows = draft_rows_in.has_value() ? draft_rows_in->contiguous() : at::Tensor();
  const at::Tensor alpha = alpha_in.has_value() ? alpha_in->contiguous() : at::Tensor();
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  const int64_t* accepted_data = accepted.const_data_ptr<int64_t>();
  const int64_t* tau_data = accept_len.const_data_ptr<int64_t>();

  // Everything is checked before anything is written.
  std::vector<int64_t> draft_accepted(batch * nodes, -1);  // draft row of each accepted node the draft holds
  std::vector<int64_t> held(batch, 0);
  const int64_t target_len = shortest_cache(target_caches);
  const int64_t draft_len = shortest_cache(draft_caches);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* path = accepted_data + b * nodes;
    validate_path(path, nodes, tau_data[b], b);
    if (!target_caches.empty()) {
      raise_if_error(core::validate_accepted(path, nodes, target_past, target_len), "commit_tree_", b);
    }
    if (!draft_rows.defined()) continue;
    const int64_t* rows = draft_rows.const_data_ptr<int64_t>() + b * draft_rows.size(1);
    for (int64_t j = 0; j <= tau_data[b]; ++j) {
      const int64_t row = rows[path[j]];
      if (row < 0) continue;
      TORCH_CHECK_VALUE(held[b] == j, "commit_tree_: batch row ", b,
                        ": the accepted nodes the draft holds (draft_rows >= 0) must be a prefix of the path; node ",
                        path[j], " at path position ", j, " follows one the draft does not hold");
      draft_accepted[b * nodes + j] = row;
      ++held[b];
    }
    if (!draft_caches.empty()) {
      raise_if_error(core::validate_accepted(draft_accepted.data() + b * nodes, nodes, draft_past, draft_len),
                     "commit_tree_", b);
    }
  }

  at::Tensor readback = empty_on(tokens, {batch, 4 + nodes}, c10::kLong);
  int64_t* out = readback.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b, out += 4 + nodes) {
    const int64_t* path = accepted_data + b * nodes;
    const int64_t* token_row = tokens.const_data_ptr<int64_t>() + b * nodes;
    const int64_t* parent_row = parents.const_data_ptr<int64_t>() + b * nodes;
    const int64_t tau = tau_data[b];
    int64_t* new_tokens = out + 4;
    for (int64_t j = 0; j < tau; ++j) new_tokens[j] = token_row[path[j + 1]];
    new_tokens[tau] = bonus.const_data_ptr<int64_t>()[b];
    std::fill(new_tokens + tau + 1, new_tokens + nodes, -1);
    std::copy(new_tokens, new_tokens + tau + 1, sequence.data_ptr<int64_t>() + b * sequence.stride(0) + seq_start);
    int32_t alpha_bits = 0;
    if (alpha.defined()) std::memcpy(&alpha_bits, alpha.const_data_ptr<float>() + b, sizeof(alpha_bits));
    out[0] = tau;
    out[1] = held[b];
    out[2] = std::count_if(parent_row + 1, parent_row + nodes, [](int64_t p) { return p >= 0; });
    out[3] = alpha_bits;  // sign-extended int32 bits of the float32 alpha
  }
  compact_caches(target_caches, accepted_data, batch, nodes, target_past);
  compact_caches(draft_caches, draft_accepted.data(), batch, nodes, draft_past);
  return readback;
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CPU, m) {
  m.impl("sage_level_", &sage_level_cpu);
  m.impl("expand_level_", &expand_level_cpu);
  m.impl("gather_level_", &gather_level_cpu);
  m.impl("rerank_select", &rerank_select_cpu);
  m.impl("tree_mask_feed_", &tree_mask_feed_cpu);
  m.impl("commit_tree_", &commit_tree_cpu);
}

}  // namespace sage_ext::cpu
