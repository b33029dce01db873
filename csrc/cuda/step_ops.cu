// CUDA implementations of the fused engine-step ops of docs/OPS.md: sage_level_ (the topk_confidence,
// sage_tree and expand_tree kernels, then one kernel for the new slots' tree-mask rows), expand_level_
// (topk_confidence and expand_tree), gather_level_ (topk_confidence and two gathers), rerank_select
// (rerank_tree and gathers), tree_mask_feed_ (one kernel for the fed rows) and commit_tree_ (one kernel for
// the sequence, the readback and the draft rows of the accepted path, then the kv_compact_ kernel for each
// cache list). Nothing is read back to the host: bad data is clamped or skipped, never
// raised (docs/OPS.md), and every kernel runs on the current stream of the tensors' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../core/tree.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace sage_ext::cuda {
namespace {

// ==================================================================================================
// sage_level_
// ==================================================================================================
constexpr int kMaskRowThreads = 256;

// grid (num_slots, B), block kMaskRowThreads. Row slot_start + blockIdx.x of batch row blockIdx.y by the
// tree-mask row rule (core::tree_mask_row, each thread its share of the columns). expand_tree only gives new slots parents before slot_start,
// so no block reads a row another block writes; any other parent (padding, bad data) gives the padding row.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaskRowThreads)
    tree_mask_rows_kernel(const int64_t* __restrict__ parents, int64_t capacity, scalar_t* mask, int64_t stride_b,
                          int64_t stride_r, int64_t width, int64_t slot_start, scalar_t blocked) {
  const int64_t b = blockIdx.y;
  const int64_t slot = slot_start + blockIdx.x;
  const int64_t parent = parents[b * capacity + slot];
  scalar_t* row = mask + b * stride_b + slot * stride_r;
  const scalar_t* from = (parent >= 0 && parent < slot_start) ? mask + b * stride_b + parent * stride_r : nullptr;
  core::tree_mask_row(from, slot, scalar_t(0.0f), blocked, row, width, threadIdx.x, blockDim.x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sage_level_cuda(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
    const std::optional<at::Tensor>& tree_mask, const at::Tensor& logits, const std::optional<at::Tensor>& alpha,
    int64_t frontier_start, int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature,
    double d_min, double d_max, double w_min, double w_max, double theta_scale) {
  check_sage_level_args(tokens, parents, logprobs, cum_logprobs, tree_mask, logits, alpha, frontier_start, level,
                        slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t batch = tokens.size(0);
  const int64_t num_frontier = logits.size(1);
  const int64_t vocab = logits.size(2);
  const auto topk = topk_confidence_cuda(logits.reshape({batch * num_frontier, vocab}), k, temperature);
  const at::Tensor frontier_alpha = std::get<0>(topk).view({batch, num_frontier});
  // zero-lag: each row's first frontier node's alpha (sage_tree_cuda makes the column contiguous)
  const at::Tensor shape_alpha = alpha.has_value() ? *alpha : frontier_alpha.select(1, 0);
  const auto shape = sage_tree_cuda(shape_alpha, logprobs.narrow(1, frontier_start, num_frontier), level, k, d_min,
                                    d_max, w_min, w_max, theta_scale);
  const at::Tensor frontier =
      at::arange(frontier_start, frontier_start + num_frontier, tokens.options()).expand({batch, num_frontier});
  at::Tensor count = expand_tree_cuda(tokens, parents, logprobs, cum_logprobs, frontier,
                                      std::get<1>(topk).view({batch, num_frontier, k}),
                                      std::get<2>(topk).view({batch, num_frontier, k}), std::get<0>(shape),
                                      std::get<1>(shape), slot_start, num_slots);
  if (tree_mask.has_value() && num_slots > 0 && batch > 0) {
    const at::Tensor& mask = *tree_mask;
    TORCH_CHECK(num_slots <= INT32_MAX && batch <= 65535, "sage_level_: too many slots or batch rows for one launch");
    dispatch_float_dtype(mask.scalar_type(), "sage_level_: tree_mask", [&](auto zero) {
      using scalar_t = decltype(zero);
      tree_mask_rows_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(num_slots), static_cast<unsigned>(batch)), kMaskRowThreads, 0,
             c10::cuda::getCurrentCUDAStream()>>>(parents.const_data_ptr<int64_t>(), tokens.size(1),
                                                  static_cast<scalar_t*>(mask.data_ptr()), mask.stride(0),
                                                  mask.stride(1), mask.size(2), slot_start,
                                                  std::numeric_limits<scalar_t>::lowest());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {count, frontier_alpha, std::get<2>(shape)};
}

// ==================================================================================================
// expand_level_, gather_level_, rerank_select
// ==================================================================================================
std::tuple<at::Tensor, at::Tensor> expand_level_cuda(const at::Tensor& tokens, const at::Tensor& parents,
                                                     const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
                                                     const at::Tensor& logits, int64_t frontier_start, int64_t k,
                                                     double temperature, int64_t slot_start, int64_t num_slots) {
  check_expand_level_args(tokens, parents, logprobs, cum_logprobs, logits, frontier_start, k, temperature,
                          slot_start, num_slots);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t batch = tokens.size(0);
  const int64_t num_frontier = logits.size(1);
  const auto topk = topk_confidence_cuda(logits.reshape({batch * num_frontier, logits.size(2)}), k, temperature);
  const at::Tensor frontier =
      at::arange(frontier_start, frontier_start + num_frontier, tokens.options()).expand({batch, num_frontier});
  const at::Tensor widths = at::full({batch, num_frontier}, k, tokens.options());
  const at::Tensor no_threshold = at::full({batch}, -std::numeric_limits<float>::infinity(), logprobs.options());
  at::Tensor count = expand_tree_cuda(tokens, parents, logprobs, cum_logprobs, frontier,
                                      std::get<1>(topk).view({batch, num_frontier, k}),
                                      std::get<2>(topk).view({batch, num_frontier, k}), widths, no_threshold,
                                      slot_start, num_slots);
  return {count, std::get<0>(topk).view({batch, num_frontier})};
}

at::Tensor gather_level_cuda(const at::Tensor& tokens, const at::Tensor& logprobs, const at::Tensor& logits,
                             const at::Tensor& child_index, int64_t slot_start, int64_t k, double temperature) {
  check_gather_level_args(tokens, logprobs, logits, child_index, slot_start, k, temperature);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t batch = tokens.size(0);
  const int64_t num_frontier = logits.size(1);
  const int64_t children = child_index.size(0);
  const auto topk = topk_confidence_cuda(logits.reshape({batch * num_frontier, logits.size(2)}), k, temperature);
  if (children > 0) {
    // bad indices are clamped (nothing is read back to check them)
    const at::Tensor index = child_index.clamp(0, num_frontier * k - 1);
    tokens.narrow(1, slot_start, children).copy_(std::get<2>(topk).view({batch, num_frontier * k}).index_select(1, index));
    logprobs.narrow(1, slot_start, children)
        .copy_(std::get<1>(topk).view({batch, num_frontier * k}).index_select(1, index));
  }
  return std::get<0>(topk).view({batch, num_frontier});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank_select_cuda(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
    const at::Tensor& node_row, int64_t num_select) {
  check_rerank_select_args(tokens, parents, logprobs, cum_logprobs, node_row, num_select);
  const c10::cuda::CUDAGuard guard(tokens.device());
  auto [keep, kept_parents] = rerank_tree_cuda(parents, cum_logprobs, num_select);
  const at::Tensor padding = keep.lt(0);
  const at::Tensor slots = keep.clamp_min(0);  // padding (-1) reads slot 0, then is overwritten
  at::Tensor kept_tokens = tokens.gather(1, slots).masked_fill_(padding, 0);
  at::Tensor kept_logprobs = logprobs.gather(1, slots).masked_fill_(padding, -std::numeric_limits<float>::infinity());
  at::Tensor kept_rows = node_row.gather(1, slots).clamp_min_(-1).masked_fill_(padding, -1);
  kept_rows = at::cat({kept_rows, at::full({keep.size(0), 1}, -1, keep.options())}, 1);
  return {kept_tokens, kept_parents, kept_logprobs, kept_rows};
}

// ==================================================================================================
// tree_mask_feed_
// ==================================================================================================
// grid (count, B), block kMaskRowThreads. Row first_row + blockIdx.x = the row of its slot's parent (node_row of
// the parent, or the parent itself without node_row) with its own column opened; a parent row that is not a row
// written before first_row (padding, not fed, bad data) gives the all-blocked padding row R - 1. No block reads a
// row another block writes.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaskRowThreads)
    tree_mask_feed_kernel(const int64_t* __restrict__ parents, int64_t capacity, const int64_t* __restrict__ node_row,
                          int64_t node_row_len, scalar_t* mask, int64_t stride_b, int64_t stride_r, int64_t rows,
                          int64_t width, int64_t slot_start, int64_t first_row, scalar_t blocked) {
  const int64_t b = blockIdx.y;
  const int64_t row = first_row + blockIdx.x;
  const int64_t parent_row =
      core::feed_parent_row(parents[b * capacity + slot_start + blockIdx.x],
                            node_row != nullptr ? node_row + b * node_row_len : nullptr, node_row_len, first_row,
                            rows - 1);
  scalar_t* base = mask + b * stride_b;
  core::tree_mask_row(base + parent_row * stride_r, row, scalar_t(0.0f), blocked, base + row * stride_r, width,
                      threadIdx.x, blockDim.x);
}

void tree_mask_feed_cuda(const at::Tensor& tree_mask, const at::Tensor& parents_in,
                         const std::optional<at::Tensor>& node_row_in, int64_t slot_start, int64_t first_row,
                         int64_t count) {
  check_tree_mask_feed_args(tree_mask, parents_in, node_row_in, slot_start, first_row, count);
  const c10::cuda::CUDAGuard guard(tree_mask.device());
  const int64_t batch = parents_in.size(0);
  if (count == 0 || batch == 0) return;
  TORCH_CHECK(count <= INT32_MAX && batch <= 65535, "tree_mask_feed_: too many rows or batch rows for one launch");
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor node_row = node_row_in.has_value() ? node_row_in->contiguous() : at::Tensor();
  dispatch_float_dtype(tree_mask.scalar_type(), "tree_mask_feed_", [&](auto zero) {
    using scalar_t = decltype(zero);
    tree_mask_feed_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(count), static_cast<unsigned>(batch)), kMaskRowThreads, 0,
           c10::cuda::getCurrentCUDAStream()>>>(
            parents.const_data_ptr<int64_t>(), parents.size(1),
            node_row.defined() ? node_row.const_data_ptr<int64_t>() : nullptr,
            node_row.defined() ? node_row.size(1) : 0, static_cast<scalar_t*>(tree_mask.data_ptr()),
            tree_mask.stride(0), tree_mask.stride(1), tree_mask.size(1), tree_mask.size(2), slot_start, first_row,
            std::numeric_limits<scalar_t>::lowest());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ==================================================================================================
// commit_tree_
// ==================================================================================================
constexpr int kCommitThreads = 256;

struct CommitArgs {
  const int64_t* tokens;      // [B, N]
  const int64_t* parents;     // [B, N]
  const int64_t* accepted;    // [B, N]
  const int64_t* accept_len;  // [B]
  const int64_t* bonus;       // [B]
  const int64_t* draft_rows;  // [B, M] or null
  const float* alpha;         // [B] or null
  int64_t* sequence;          // row b at sequence + b * sequence_stride
  int64_t* readback;          // [B, 4 + N]
  int64_t* draft_accepted;    // [B, N]
  int64_t sequence_stride, sequence_len, seq_start, draft_row_len;
  int nodes;
};

// grid B, block kCommitThreads. Thread j of row b writes new token j (readback and sequence) and counts
// real nodes; thread 0 then walks the path for the draft rows it holds (a prefix) and writes the header.
__global__ void __launch_bounds__(kCommitThreads) commit_tree_kernel(CommitArgs args) {
  const int64_t b = blockIdx.x;
  const int n = args.nodes;
  __shared__ int scratch[kWarpSize + 1];
  const int64_t* path = args.accepted + b * n;
  const int64_t* tokens = args.tokens + b * n;
  const int64_t tau = core::clamp_i64(args.accept_len[b], 0, n - 1);
  int64_t* out = args.readback + b * (4 + n);
  int64_t* sequence = args.sequence + b * args.sequence_stride;
  int real = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    int64_t token = -1;
    if (j < tau) {
      const int64_t node = path[j + 1];
      token = (node >= 0 && node < n) ? tokens[node] : 0;  // bad data: a 0, never an out-of-range read
    } else if (j == tau) {
      token = args.bonus[b];
    }
    out[4 + j] = token;
    if (j <= tau && args.seq_start + j < args.sequence_len) sequence[args.seq_start + j] = token;
    if (j > 0 && args.parents[b * n + j] >= 0) ++real;
    args.draft_accepted[b * n + j] = -1;
  }
  real = block_reduce(real, SumOp{}, 0, scratch);  // (its barriers also order the -1 fill before the walk)
  if (threadIdx.x != 0) return;
  int64_t held = 0;
  if (args.draft_rows != nullptr) {
    const int64_t* rows = args.draft_rows + b * args.draft_row_len;
    for (int64_t j = 0; j <= tau; ++j) {
      const int64_t node = path[j];
      const int64_t row = (node >= 0 && node < n) ? rows[node] : -1;
      if (row < 0) break;
      args.draft_accepted[b * n + j] = row;
      ++held;
    }
  }
  out[0] = tau;
  out[1] = held;
  out[2] = real;
  out[3] = args.alpha != nullptr ? static_cast<int64_t>(__float_as_int(args.alpha[b])) : 0;
}

at::Tensor commit_tree_cuda(const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& accepted_in,
                            const at::Tensor& accept_len_in, const at::Tensor& bonus_in, const at::Tensor& sequence,
                            int64_t seq_start, at::TensorList target_caches, int64_t target_past,
                            at::TensorList draft_caches, const std::optional<at::Tensor>& draft_rows_in,
                            int64_t draft_past, const std::optional<at::Tensor>& alpha_in) {
  check_commit_tree_args(tokens_in, parents_in, accepted_in, accept_len_in, bonus_in, sequence, seq_start,
                         target_caches, target_past, draft_caches, draft_rows_in, draft_past, alpha_in);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor accepted = accepted_in.contiguous();
  const at::Tensor accept_len = accept_len_in.contiguous();
  const at::Tensor bonus = bonus_in.contiguous();
  const at::Tensor draft_rows = draft_rows_in.has_value() ? draft_rows_in->contiguous() : at::Tensor();
  const at::Tensor alpha = alpha_in.has_value() ? alpha_in->contiguous() : at::Tensor();
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  at::Tensor readback = at::empty({batch, 4 + nodes}, tokens.options());
  at::Tensor draft_accepted = at::empty({batch, nodes}, tokens.options());
  if (batch == 0) return readback;
  const CommitArgs args{tokens.const_data_ptr<int64_t>(),
                        parents.const_data_ptr<int64_t>(),
                        accepted.const_data_ptr<int64_t>(),
                        accept_len.const_data_ptr<int64_t>(),
                        bonus.const_data_ptr<int64_t>(),
                        draft_rows.defined() ? draft_rows.const_data_ptr<int64_t>() : nullptr,
                        alpha.defined() ? alpha.const_data_ptr<float>() : nullptr,
                        sequence.data_ptr<int64_t>(),
                        readback.data_ptr<int64_t>(),
                        draft_accepted.data_ptr<int64_t>(),
                        sequence.stride(0),
                        sequence.size(1),
                        seq_start,
                        draft_rows.defined() ? draft_rows.size(1) : 0,
                        static_cast<int>(nodes)};
  commit_tree_kernel<<<grid_dim(batch), kCommitThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact_caches_cuda(target_caches, accepted, target_past);
  compact_caches_cuda(draft_caches, draft_accepted, draft_past);
  return readback;
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CUDA, m) {
  m.impl("sage_level_", &sage_level_cuda);
  m.impl("expand_level_", &expand_level_cuda);
  m.impl("gather_level_", &gather_level_cuda);
  m.impl("rerank_select", &rerank_select_cuda);
  m.impl("tree_mask_feed_", &tree_mask_feed_cuda);
  m.impl("commit_tree_", &commit_tree_cuda);
}

}  // namespace sage_ext::cuda
