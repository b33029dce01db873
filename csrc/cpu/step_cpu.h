// The CPU work of the engine-step ops on arguments already checked, writing into caller-given outputs:
// the sage_ext ops of step_cpu.cpp allocate their outputs and call these; the engine's TreeWorkspace
// (csrc/session) calls them directly for CPU tensors, into buffers it keeps, with no dispatch and no
// allocation between two model forwards.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sage_ext::cpu {

// sage_level_ (docs/OPS.md) on the F = num_frontier logit rows [first_row, first_row + F) of logits [B, T, V]
// (last dim contiguous): count[B], frontier_alpha[B * F], max_depth[B]. Tree state contiguous [B, Ncap].
void sage_level_into(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                     const at::Tensor& cum_logprobs, const std::optional<at::Tensor>& tree_mask,
                     const at::Tensor& logits, int64_t first_row, int64_t num_frontier,
                     const std::optional<at::Tensor>& alpha, int64_t frontier_start,
                     int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature, double d_min,
                     double d_max, double w_min, double w_max, double theta_scale, int64_t* count,
                     float* frontier_alpha, int64_t* max_depth);

// One EAGLE-2 level of a one-row tree [1, Ncap]: topk_confidence of the F frontier logit rows [first_row,
// first_row + F) of logits [1, T, V] (last dim contiguous), then expand_tree with every frontier slot
// [frontier_start, frontier_start + F) allowed k children and no threshold, into [slot_start, slot_start +
// num_slots). frontier_alpha[F]; returns the count.
int64_t topk_expand_into(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                         const at::Tensor& cum_logprobs, const at::Tensor& logits, int64_t first_row,
                         int64_t num_frontier, int64_t frontier_start, int64_t k, double temperature,
                         int64_t slot_start, int64_t num_slots, float* frontier_alpha);

// A fixed tree's level of a one-row tree: topk_confidence of the F logit rows [first_row, first_row + F) of
// logits [1, T, V] (last dim contiguous), then tokens / logprobs of the slots [start, start + children) from the
// flattened top-k at child_index[children] (int64, contiguous, CPU). frontier_alpha[F].
void topk_gather_into(const at::Tensor& tokens, const at::Tensor& logprobs, const at::Tensor& logits,
                      int64_t first_row, int64_t num_frontier, int64_t k, double temperature,
                      const at::Tensor& child_index, int64_t start, float* frontier_alpha);

}  // namespace sage_ext::cpu
