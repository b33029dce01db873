// CPU implementations of the tree-construction ops of docs/OPS.md: build_static_tree, sage_tree,
// expand_tree, rerank_tree and tree_buffers. Each validates its arguments (csrc/checks.h), then the
// data (parents topological, frontier nodes existing) before writing anything, and runs the
// torch-free row algorithms of core/tree.h over the batch, in parallel when there is enough work.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../core/tree.h"
#include "cpu_utils.h"

namespace sage_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_static_tree_cpu(const at::Tensor& paths_in) {
  check_build_static_tree_args(paths_in);
  const at::Tensor paths = paths_in.contiguous();
  core::StaticTree tree;
  raise_if_error(core::build_static_tree(paths.const_data_ptr<int64_t>(), paths.size(0), paths.size(1), &tree),
                 "build_static_tree");
  const int64_t nodes = paths.size(0) + 1;
  at::Tensor parents = empty_on(paths, {nodes}, c10::kLong);
  at::Tensor ranks = empty_on(paths, {nodes}, c10::kLong);
  at::Tensor depth = empty_on(paths, {nodes}, c10::kLong);
  std::copy(tree.parents.begin(), tree.parents.end(), parents.data_ptr<int64_t>());
  std::copy(tree.ranks.begin(), tree.ranks.end(), ranks.data_ptr<int64_t>());
  std::copy(tree.depth.begin(), tree.depth.end(), depth.data_ptr<int64_t>());
  return {parents, ranks, depth};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sage_tree_cpu(const at::Tensor& alpha_in,
                                                             const at::Tensor& frontier_logprobs_in, int64_t level,
                                                             int64_t k, double d_min, double d_max, double w_min,
                                                             double w_max, double theta_scale) {
  check_sage_tree_args(alpha_in, frontier_logprobs_in, level, k, d_min, d_max, w_min, w_max, theta_scale);
  const at::Tensor alpha = alpha_in.contiguous();
  const at::Tensor frontier_logprobs = frontier_logprobs_in.contiguous();
  const int64_t batch = alpha.size(0);
  const int64_t num_frontier = frontier_logprobs.size(1);
  at::Tensor widths = empty_on(alpha, {batch, num_frontier}, c10::kLong);
  at::Tensor min_cum_logprob = empty_on(alpha, {batch}, c10::kFloat);
  at::Tensor max_depth = empty_on(alpha, {batch}, c10::kLong);
  const core::SageParams params = sage_params(level, k, d_min, d_max, w_min, w_max, theta_scale);
  const float* alpha_data = alpha.const_data_ptr<float>();
  const float* logprob_data = frontier_logprobs.const_data_ptr<float>();
  int64_t* width_data = widths.data_ptr<int64_t>();
  float* min_cum_data = min_cum_logprob.data_ptr<float>();
  int64_t* depth_data = max_depth.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    core::sage_tree_row(alpha_data[b], logprob_data + b * num_frontier, num_frontier, params,
                        width_data + b * num_frontier, min_cum_data + b, depth_data + b);
  }
  return {widths, min_cum_logprob, max_depth};
}

at::Tensor expand_tree_cpu(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                           const at::Tensor& cum_logprobs, const at::Tensor& frontier_in,
                           const at::Tensor& topk_logprobs_in, const at::Tensor& topk_ids_in,
                           const at::Tensor& widths_in, const at::Tensor& min_cum_logprob_in, int64_t slot_start,
                           int64_t num_slots) {
  check_expand_tree_args(tokens, parents, logprobs, cum_logprobs, frontier_in, topk_logprobs_in, topk_ids_in,
                         widths_in, min_cum_logprob_in, slot_start, num_slots);
  const at::Tensor frontier = frontier_in.contiguous();
  const at::Tensor topk_logprobs = topk_logprobs_in.contiguous();
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  const at::Tensor widths = widths_in.contiguous();
  const at::Tensor min_cum_logprob = min_cum_logprob_in.contiguous();
  const int64_t batch = tokens.size(0);
  const int64_t capacity = tokens.size(1);
  const int64_t num_frontier = frontier.size(1);
  const int64_t top_k = topk_logprobs.size(2);

  const int64_t* frontier_data = frontier.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    raise_if_error(core::validate_frontier(frontier_data + b * num_frontier, num_frontier, slot_start),
                   "expand_tree", b);
  }
  at::Tensor count = empty_on(tokens, {batch}, c10::kLong);
  int64_t* count_data = count.data_ptr<int64_t>();
  parallel_for_work(batch, num_frontier * top_k + num_slots, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const core::TreeRow tree{tokens.data_ptr<int64_t>() + b * capacity, parents.data_ptr<int64_t>() + b * capacity,
                               logprobs.data_ptr<float>() + b * capacity,
                               cum_logprobs.data_ptr<float>() + b * capacity, capacity};
      const core::FrontierRow proposals{frontier_data + b * num_frontier,
                                        topk_logprobs.const_data_ptr<float>() + b * num_frontier * top_k,
                                        topk_ids.const_data_ptr<int64_t>() + b * num_frontier * top_k,
                                        widths.const_data_ptr<int64_t>() + b * num_frontier,
                                        num_frontier,
                                        top_k,
                                        min_cum_logprob.const_data_ptr<float>()[b]};
      count_data[b] = core::expand_tree_row(tree, proposals, slot_start, num_slots);
    }
  });
  return count;
}

std::tuple<at::Tensor, at::Tensor> rerank_tree_cpu(const at::Tensor& parents_in, const at::Tensor& cum_logprobs_in,
                                                   int64_t num_select) {
  check_rerank_tree_args(parents_in, cum_logprobs_in, num_select);
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor cum_logprobs = cum_logprobs_in.contiguous();
  validate_parent_rows("rerank_tree", parents);
  const int64_t batch = parents.size(0);
  const int64_t nodes = parents.size(1);
  at::Tensor keep = empty_on(parents, {batch, num_select}, c10::kLong);
  at::Tensor new_parents = empty_on(parents, {batch, num_select}, c10::kLong);
  parallel_for_work(batch, nodes, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      core::rerank_tree_row(parents.const_data_ptr<int64_t>() + b * nodes,
                            cum_logprobs.const_data_ptr<float>() + b * nodes, nodes, num_select,
                            keep.data_ptr<int64_t>() + b * num_select, new_parents.data_ptr<int64_t>() + b * num_select);
    }
  });
  return {keep, new_parents};
}

using TreeBuffers = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>;

TreeBuffers tree_buffers_cpu(const at::Tensor& parents_in, int64_t past_len, c10::ScalarType mask_dtype) {
  check_tree_buffers_args(parents_in, past_len, mask_dtype);
  const at::Tensor parents = parents_in.contiguous();
  validate_parent_rows("tree_buffers", parents);
  const int64_t batch = parents.size(0);
  const int64_t nodes = parents.size(1);
  const int64_t mask_bytes = (nodes + 7) / 8;
  const int64_t mask_width = past_len + nodes;
  at::Tensor depth = empty_on(parents, {batch, nodes}, c10::kLong);
  at::Tensor positions = empty_on(parents, {batch, nodes}, c10::kLong);
  at::Tensor first_child = empty_on(parents, {batch, nodes}, c10::kLong);
  at::Tensor next_sibling = empty_on(parents, {batch, nodes}, c10::kLong);
  at::Tensor paths = empty_on(parents, {batch, nodes, nodes}, c10::kLong);
  at::Tensor is_leaf = empty_on(parents, {batch, nodes}, c10::kBool);
  at::Tensor float_mask = empty_on(parents, {batch, 1, nodes, mask_width}, mask_dtype);
  at::Tensor packed_mask = empty_on(parents, {batch, nodes, mask_bytes}, c10::kByte);

  dispatch_float_dtype(mask_dtype, "tree_buffers", [&](auto zero) {
    using T = decltype(zero);
    const T attend(0.0f);
    const T blocked = std::numeric_limits<T>::lowest();  // torch.finfo(mask_dtype).min
    // Per row: the [N, past_len + N] float mask and the [N, N] paths dominate.
    parallel_for_work(batch, nodes * (mask_width + nodes), [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> bits(nodes * core::ancestor_words(nodes));
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* parent_row = parents.const_data_ptr<int64_t>() + b * nodes;
        int64_t* depth_row = depth.data_ptr<int64_t>() + b * nodes;
        core::tree_links_row(parent_row, nodes, depth_row, first_child.data_ptr<int64_t>() + b * nodes,
                             next_sibling.data_ptr<int64_t>() + b * nodes, is_leaf.data_ptr<bool>() + b * nodes);
        int64_t* position_row = positions.data_ptr<int64_t>() + b * nodes;
        for (int64_t i = 0; i < nodes; ++i) position_row[i] = past_len + depth_row[i];
        core::tree_paths_row(parent_row, depth_row, nodes, paths.data_ptr<int64_t>() + b * nodes * nodes);
        core::ancestor_bits_row(parent_row, nodes, bits.data());
        core::packed_mask_row(bits.data(), nodes, packed_mask.data_ptr<uint8_t>() + b * nodes * mask_bytes);
        core::float_mask_row(bits.data(), nodes, past_len, attend, blocked,
                             static_cast<T*>(float_mask.data_ptr()) + b * nodes * mask_width);
      }
    });
  });
  return {depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CPU, m) {
  m.impl("build_static_tree", &build_static_tree_cpu);
  m.impl("sage_tree", &sage_tree_cpu);
  m.impl("expand_tree", &expand_tree_cpu);
  m.impl("rerank_tree", &rerank_tree_cpu);
  m.impl("tree_buffers", &tree_buffers_cpu);
}

}  // namespace sage_ext::cpu
