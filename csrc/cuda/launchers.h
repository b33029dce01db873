// The CUDA implementations that the fused engine-step ops (step_ops.cu) launch in sequence, callable
// across the CUDA translation units. Each one but compact_caches_cuda is the op's registered kernel
// (arguments checked); compact_caches_cuda is kv_compact_ without the argument checks, for a caller
// that checked them already.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace sage_ext::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_confidence_cuda(const at::Tensor& logits, int64_t k,
                                                                    double temperature);  // vocab_ops.cu

std::tuple<at::Tensor, at::Tensor, at::Tensor> sage_tree_cuda(const at::Tensor& alpha,
                                                              const at::Tensor& frontier_logprobs, int64_t level,
                                                              int64_t k, double d_min, double d_max, double w_min,
                                                              double w_max, double theta_scale);  // tree_ops.cu

at::Tensor expand_tree_cuda(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                            const at::Tensor& cum_logprobs, const at::Tensor& frontier,
                            const at::Tensor& topk_logprobs, const at::Tensor& topk_ids, const at::Tensor& widths,
                            const at::Tensor& min_cum_logprob, int64_t slot_start, int64_t num_slots);  // tree_ops.cu

std::tuple<at::Tensor, at::Tensor> rerank_tree_cuda(const at::Tensor& parents, const at::Tensor& cum_logprobs,
                                                    int64_t num_select);  // tree_ops.cu

void compact_caches_cuda(at::TensorList caches, const at::Tensor& accepted, int64_t past_len);  // kv_compact.cu

}  // namespace sage_ext::cuda
