// CPU implementations of verification and KV-cache compaction (docs/OPS.md): verify_greedy,
// verify_sampling, verify_traversal and kv_compact_. The target tensors are read in place (only the
// rows of nodes the walk reaches are touched) with the widest SIMD the CPU has; batch rows, and for
// kv_compact_ every (cache, b, head) slice, run in parallel when there is enough work.

// The W = 8 SIMD kernels are instantiated in templates built without AVX, for which GCC notes the
// AVX ABI (at the end of the file); no vector is passed out of line (core/simd.h).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../core/kv_compact.h"
#include "../core/tree.h"
#include "../core/verify.h"
#include "cpu_utils.h"

namespace sage_ext::cpu {
namespace {

using VerifyOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// core::argmax_row and core::verify_sampling_row with the widest SIMD of this CPU (cpu_utils.h).
template <typename T>
SAGE_EXT_AVX2_FMA int64_t argmax_row_avx2_fma(const T* values, int64_t count) {
  return core::argmax_row<8>(values, count);
}

template <typename T>
int64_t argmax_row_simd(const T* values, int64_t count) {
  if (cpu_has_avx2_fma()) return argmax_row_avx2_fma(values, count);
  return core::argmax_row<core::simd::kPortableWidth>(values, count);
}

template <typename T>
SAGE_EXT_AVX2_FMA core::VerifyResult verify_sampling_row_avx2_fma(const int64_t* tokens, const int64_t* parents,
                                                                  int64_t nodes, const T* target, const T* draft,
                                                                  int64_t vocab, const float* uniforms,
                                                                  int64_t* accepted, std::vector<float>& residual) {
  return core::verify_sampling_row<8>(tokens, parents, nodes, target, draft, vocab, uniforms, accepted, residual);
}

template <typename T>
core::VerifyResult verify_sampling_row_simd(const int64_t* tokens, const int64_t* parents, int64_t nodes,
                                            const T* target, const T* draft, int64_t vocab, const float* uniforms,
                                            int64_t* accepted, std::vector<float>& residual) {
  if (cpu_has_avx2_fma()) {
    return verify_sampling_row_avx2_fma(tokens, parents, nodes, target, draft, vocab, uniforms, accepted, residual);
  }
  return core::verify_sampling_row<core::simd::kPortableWidth>(tokens, parents, nodes, target, draft, vocab, uniforms,
                                                               accepted, residual);
}

template <typename T>
SAGE_EXT_AVX2_FMA core::VerifyResult verify_traversal_row_avx2_fma(const int64_t* tokens, const int64_t* parents,
                                                                   int64_t nodes, const T* target, const T* draft,
                                                                   int64_t vocab, const float* uniforms,
                                                                   int64_t* accepted, core::TraversalScratch& scratch) {
  return core::verify_traversal_row<8>(tokens, parents, nodes, target, draft, vocab, uniforms, accepted, scratch);
}

template <typename T>
core::VerifyResult verify_traversal_row_simd(const int64_t* tokens, const int64_t* parents, int64_t nodes,
                                             const T* target, const T* draft, int64_t vocab, const float* uniforms,
                                             int64_t* accepted, core::TraversalScratch& scratch) {
  if (cpu_has_avx2_fma()) {
    return verify_traversal_row_avx2_fma(tokens, parents, nodes, target, draft, vocab, uniforms, accepted, scratch);
  }
  return core::verify_traversal_row<core::simd::kPortableWidth>(tokens, parents, nodes, target, draft, vocab,
                                                                uniforms, accepted, scratch);
}

VerifyOutputs verify_greedy_cpu(const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& target_in) {
  check_verify_greedy_args(tokens_in, parents_in, target_in);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  validate_parent_rows("verify_greedy", parents);
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  at::Tensor accepted = empty_on(tokens, {batch, nodes}, c10::kLong);
  at::Tensor accept_len = empty_on(tokens, {batch}, c10::kLong);
  at::Tensor bonus = empty_on(tokens, {batch}, c10::kLong);

  // work_per_row: elements read per row, at least one argmax over the vocabulary for logits.
  auto run_rows = [&](int64_t work_per_row, auto&& argmax_for_row) {
    parallel_for_work(batch, work_per_row, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const core::VerifyResult result =
            core::verify_greedy_row(tokens.const_data_ptr<int64_t>() + b * nodes,
                                    parents.const_data_ptr<int64_t>() + b * nodes, nodes,
                                    [&](int64_t node) { return argmax_for_row(b, node); },
                                    accepted.data_ptr<int64_t>() + b * nodes);
        accept_len.data_ptr<int64_t>()[b] = result.accept_len;
        bonus.data_ptr<int64_t>()[b] = result.bonus;
      }
    });
  };

  if (target_in.dim() == 2) {
    const at::Tensor target = target_in.contiguous();
    const int64_t* argmax = target.const_data_ptr<int64_t>();
    run_rows(nodes, [&](int64_t b, int64_t node) { return argmax[b * nodes + node]; });
  } else {
    const at::Tensor target = with_contiguous_last_dim(target_in);
    const int64_t vocab = target.size(2);
    const int64_t stride_b = target.stride(0), stride_n = target.stride(1);
    dispatch_vocab_dtype(target.scalar_type(), "verify_greedy", [&](auto zero) {
      using T = decltype(zero);
      const T* logits = static_cast<const T*>(target.const_data_ptr());
      run_rows(vocab, [&](int64_t b, int64_t node) {
        return argmax_row_simd(logits + b * stride_b + node * stride_n, vocab);
      });
    });
  }
  return {accepted, accept_len, bonus};
}

// verify_sampling and verify_traversal share their checks, layout and batch loop: `walk` decides one row (a
// core:: walker over [N, V] rows back to back, with the per-thread `Scratch` it reuses); `reads_per_row` is the
// work of one row for at::parallel_for's split (verify_sampling reads a path's rows, verify_traversal may read
// every row of its tree).
template <typename Scratch, typename Walk>
VerifyOutputs verify_sampled_rows(const char* op, int64_t reads_per_row, const at::Tensor& tokens_in,
                                  const at::Tensor& parents_in, const at::Tensor& target_probs_in,
                                  const std::optional<at::Tensor>& draft_probs_in, const at::Tensor& uniforms_in,
                                  Walk walk) {
  check_verify_sampling_args(tokens_in, parents_in, target_probs_in, draft_probs_in, uniforms_in, op);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  const at::Tensor target_probs = target_probs_in.contiguous();  // [N, V] rows back to back
  at::Tensor draft_probs;  // undefined when the draft is a deterministic top-k (q = 1)
  if (draft_probs_in.has_value()) draft_probs = draft_probs_in->contiguous();
  validate_parent_rows(op, parents);
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  const int64_t vocab = target_probs.size(2);
  for (int64_t b = 0; b < batch; ++b) {
    raise_if_error(core::validate_tokens(tokens.const_data_ptr<int64_t>() + b * nodes,
                                         parents.const_data_ptr<int64_t>() + b * nodes, nodes, vocab),
                   op, b);
  }
  at::Tensor accepted = empty_on(tokens, {batch, nodes}, c10::kLong);
  at::Tensor accept_len = empty_on(tokens, {batch}, c10::kLong);
  at::Tensor bonus = empty_on(tokens, {batch}, c10::kLong);
  dispatch_vocab_dtype(target_probs.scalar_type(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* target = static_cast<const T*>(target_probs.const_data_ptr());
    const T* draft = draft_probs.defined() ? static_cast<const T*>(draft_probs.const_data_ptr()) : nullptr;
    parallel_for_work(batch, reads_per_row * vocab, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        const core::VerifyResult result =
            walk(tokens.const_data_ptr<int64_t>() + b * nodes, parents.const_data_ptr<int64_t>() + b * nodes, nodes,
                 target + b * nodes * vocab, draft ? draft + b * nodes * vocab : nullptr, vocab,
                 uniforms.const_data_ptr<float>() + b * nodes, accepted.data_ptr<int64_t>() + b * nodes, scratch);
        accept_len.data_ptr<int64_t>()[b] = result.accept_len;
        bonus.data_ptr<int64_t>()[b] = result.bonus;
      }
    });
  });
  return {accepted, accept_len, bonus};
}

VerifyOutputs verify_sampling_cpu(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_probs,
                                  const std::optional<at::Tensor>& draft_probs, const at::Tensor& uniforms) {
  return verify_sampled_rows<std::vector<float>>(
      "verify_sampling", 1, tokens, parents, target_probs, draft_probs, uniforms,
      [](auto&&... args) { return verify_sampling_row_simd(std::forward<decltype(args)>(args)...); });
}

VerifyOutputs verify_traversal_cpu(const at::Tensor& tokens, const at::Tensor& parents,
                                   const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                   const at::Tensor& uniforms) {
  return verify_sampled_rows<core::TraversalScratch>(
      "verify_traversal", tokens.size(1), tokens, parents, target_probs, draft_probs, uniforms,
      [](auto&&... args) { return verify_traversal_row_simd(std::forward<decltype(args)>(args)...); });
}

void kv_compact_cpu(at::TensorList caches, const at::Tensor& accepted_in, int64_t past_len) {
  check_kv_compact_args(caches, accepted_in, past_len);
  if (caches.empty()) return;
  const at::Tensor accepted = accepted_in.contiguous();
  const int64_t batch = accepted.size(0);
  const int64_t num_accepted = accepted.size(1);
  const int64_t* accepted_data = accepted.const_data_ptr<int64_t>();
  int64_t shortest = caches[0].size(2);
  for (const at::Tensor& cache : caches) shortest = std::min(shortest, cache.size(2));
  for (int64_t b = 0; b < batch; ++b) {
    raise_if_error(core::validate_accepted(accepted_data + b * num_accepted, num_accepted, past_len, shortest),
                   "kv_compact_", b);
  }
  compact_caches(caches, accepted_data, batch, num_accepted, past_len);
}

}  // namespace

void compact_caches(at::TensorList caches, const int64_t* accepted, int64_t batch, int64_t num_accepted,
                    int64_t past_len) {
  if (caches.empty()) return;
  // One task per (cache, batch row, head) slice [L, D]; at most num_accepted rows of D move in each.
  std::vector<int64_t> first_task(caches.size() + 1, 0);
  for (size_t c = 0; c < caches.size(); ++c) first_task[c + 1] = first_task[c] + batch * caches[c].size(1);
  parallel_for_work(first_task.back(), num_accepted * caches[0].size(3), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const size_t c = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const at::Tensor& cache = caches[c];
      const int64_t heads = cache.size(1);
      const int64_t b = (task - first_task[c]) / heads, h = (task - first_task[c]) % heads;
      const int64_t item = static_cast<int64_t>(cache.element_size());
      std::byte* slice = static_cast<std::byte*>(cache.data_ptr()) + (b * cache.stride(0) + h * cache.stride(1)) * item;
      core::compact_rows(slice, cache.stride(2) * item, cache.size(3) * item, accepted + b * num_accepted,
                         num_accepted, past_len);
    }
  });
}

TORCH_LIBRARY_IMPL(sage_ext, CPU, m) {
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_sampling", &verify_sampling_cpu);
  m.impl("verify_traversal", &verify_traversal_cpu);
  m.impl("kv_compact_", &kv_compact_cpu);
}

}  // namespace sage_ext::cpu
