// Device-independent argument validation for every sage_ext op (docs/OPS.md).
//
// One function per op, `check_<op>_args(...)`, taking exactly the op's arguments. They look only at
// metadata (dtype, rank, shape, device, scalar ranges), never at tensor data, so the CUDA launchers
// call them too without a host-device sync. Data-dependent checks (parents topological, paths
// ancestor-closed, accepted increasing) are done by the CPU implementations only.
//
// Every failure raises c10::Error (RuntimeError in Python) or c10::ValueError (ValueError) with a
// message of the form "<op>: <argument> must be ..., got ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "core/formulas.h"

namespace sage_ext {

namespace check_detail {

inline bool is_logit_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16;
}

inline void expect_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

inline void expect_logit_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_logit_dtype(t.scalar_type()), op, ": ", name,
              " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void expect_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor ", shape, ", got shape ", t.sizes());
}

inline void expect_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t want,
                        const char* what) {
  TORCH_CHECK(t.size(d) == want, op, ": ", name, ".shape[", d, "] must equal ", what, " (", want, "), got shape ",
              t.sizes());
}

inline void expect_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                          const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void expect_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (it is written in place)");
}

inline void expect_tree_size(const char* op, const char* name, int64_t n) {
  TORCH_CHECK(n >= 1 && n <= core::kMaxTreeNodes, op, ": ", name, " must hold between 1 and ",
              core::kMaxTreeNodes, " tree nodes (N), got N = ", n);
}

// [B, N] int64 tree tensor (tokens or parents).
inline void expect_tree_tensor(const char* op, const char* name, const at::Tensor& t) {
  expect_dim(op, name, t, 2, "[B, N]");
  expect_dtype(op, name, t, c10::kLong);
  expect_tree_size(op, name, t.size(1));
}

// `t` is 2-D (`shape` names its dimensions) with dtype `dtype`, the shape of `ref` (named `ref_name`) and its device.
inline void expect_like(const char* op, const char* name, const at::Tensor& t, c10::ScalarType dtype,
                        const at::Tensor& ref, const char* ref_name, const char* shape = "[B, N]") {
  expect_dim(op, name, t, 2, shape);
  expect_dtype(op, name, t, dtype);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  expect_device(op, name, t, ref, ref_name);
}

// In-place tree state: tokens, parents [B, Ncap] int64 and logprobs, cum_logprobs [B, Ncap] float32,
// one shape, one device, contiguous.
inline void expect_tree_state(const char* op, const at::Tensor& tokens, const at::Tensor& parents,
                              const at::Tensor& logprobs, const at::Tensor& cum_logprobs) {
  expect_tree_tensor(op, "tokens", tokens);
  expect_contiguous(op, "tokens", tokens);
  auto check_state = [&](const char* name, const at::Tensor& t, c10::ScalarType dtype) {
    expect_like(op, name, t, dtype, tokens, "tokens", "[B, Ncap]");
    expect_contiguous(op, name, t);
  };
  check_state("parents", parents, c10::kLong);
  check_state("logprobs", logprobs, c10::kFloat);
  check_state("cum_logprobs", cum_logprobs, c10::kFloat);
}

// The top-k size and temperature of topk_confidence / sage_level_ for a vocabulary of `vocab`.
inline void expect_topk_params(const char* op, int64_t vocab, int64_t k, double temperature) {
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(vocab, core::kMaxTopK), op, ": k must be in [1, min(V, ",
                    core::kMaxTopK, ")] = [1, ", std::min<int64_t>(vocab, core::kMaxTopK), "], got k = ", k);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

// The SAGE shape parameters of sage_tree / sage_level_.
inline void expect_sage_params(const char* op, int64_t level, int64_t k, double d_min, double d_max, double w_min,
                               double w_max, double theta_scale) {
  TORCH_CHECK_VALUE(level >= 1, op, ": level must be >= 1, got ", level);
  TORCH_CHECK_VALUE(k >= 1 && k <= core::kMaxTopK, op, ": k must be in [1, ", core::kMaxTopK, "], got ", k);
  TORCH_CHECK_VALUE(std::isfinite(d_min) && std::isfinite(d_max) && d_min > 0.0 && d_min <= d_max, op,
                    ": d_min and d_max must be finite with 0 < d_min <= d_max, got d_min = ", d_min,
                    ", d_max = ", d_max);
  TORCH_CHECK_VALUE(std::isfinite(w_min) && std::isfinite(w_max) && w_min >= 0.0 && w_min <= w_max, op,
                    ": w_min and w_max must be finite with 0 <= w_min <= w_max, got w_min = ", w_min,
                    ", w_max = ", w_max);
  // 0: no threshold (min_cum_logprob = log 0 = -inf: every finite candidate passes; a greedy chain's levels)
  TORCH_CHECK_VALUE(theta_scale >= 0.0 && std::isfinite(theta_scale), op,
                    ": theta_scale must be a finite number >= 0, got ", theta_scale);
}

// A list of KV-cache tensors [B, H, L, D] (floating, last dim contiguous) on `device`, each at least
// past_len long; `list` names the argument, `past_name` the past length.
inline void expect_caches(const char* op, const char* list, at::TensorList caches, int64_t batch,
                          const c10::Device& device, const char* device_of, int64_t past_len,
                          const char* past_name) {
  TORCH_CHECK_VALUE(past_len >= 0, op, ": ", past_name, " must be >= 0, got ", past_len);
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& cache = caches[i];
    TORCH_CHECK(cache.defined(), op, ": ", list, "[", i, "] is undefined");
    TORCH_CHECK(cache.dim() == 4, op, ": ", list, "[", i, "] must be a 4-D tensor [B, H, L, D], got shape ",
                cache.sizes());
    TORCH_CHECK(c10::isFloatingType(cache.scalar_type()), op, ": ", list, "[", i, "] must have a floating dtype, got ",
                cache.scalar_type());
    TORCH_CHECK(cache.size(0) == batch, op, ": ", list, "[", i, "].shape[0] must equal ", device_of, ".shape[0] (",
                batch, "), got shape ", cache.sizes());
    TORCH_CHECK(cache.device() == device, op, ": ", list, "[", i, "] must be on the same device as ", device_of,
                " (", device, "), got ", cache.device());
    TORCH_CHECK(cache.size(3) <= 1 || cache.stride(3) == 1, op, ": ", list, "[", i,
                "] must be contiguous in its last dimension, got strides ", cache.strides());
    TORCH_CHECK(past_len <= cache.size(2), op, ": ", past_name, " (", past_len, ") must be <= ", list, "[", i,
                "].shape[2] (", cache.size(2), ")");
  }
}

}  // namespace check_detail

// topk_confidence(logits [R, V] float32/16/bf16, k, temperature)
inline void check_topk_confidence_args(const at::Tensor& logits, int64_t k, double temperature) {
  using namespace check_detail;
  constexpr const char* op = "topk_confidence";
  expect_dim(op, "logits", logits, 2, "[R, V]");
  expect_logit_dtype(op, "logits", logits);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, op, ": logits must have a non-empty vocabulary dimension, got shape ", logits.sizes());
  expect_topk_params(op, vocab, k, temperature);
}

// build_static_tree(paths [P, L] int64)
inline void check_build_static_tree_args(const at::Tensor& paths) {
  using namespace check_detail;
  constexpr const char* op = "build_static_tree";
  expect_dim(op, "paths", paths, 2, "[P, L]");
  expect_dtype(op, "paths", paths, c10::kLong);
  TORCH_CHECK_VALUE(paths.size(0) + 1 <= core::kMaxTreeNodes, op, ": paths must have at most ",
                    core::kMaxTreeNodes - 1, " rows (tree of at most ", core::kMaxTreeNodes, " nodes), got ",
                    paths.size(0));
  TORCH_CHECK_VALUE(paths.size(0) == 0 || paths.size(1) >= 1, op,
                    ": paths must have at least one column, got shape ", paths.sizes());
}

// sage_tree(alpha [B] f32, frontier_logprobs [B, F] f32, level, k, d_min, d_max, w_min, w_max, theta_scale)
inline void check_sage_tree_args(const at::Tensor& alpha, const at::Tensor& frontier_logprobs, int64_t level,
                                 int64_t k, double d_min, double d_max, double w_min, double w_max,
                                 double theta_scale) {
  using namespace check_detail;
  constexpr const char* op = "sage_tree";
  expect_dim(op, "alpha", alpha, 1, "[B]");
  expect_dtype(op, "alpha", alpha, c10::kFloat);
  expect_dim(op, "frontier_logprobs", frontier_logprobs, 2, "[B, F]");
  expect_dtype(op, "frontier_logprobs", frontier_logprobs, c10::kFloat);
  expect_size(op, "frontier_logprobs", frontier_logprobs, 0, alpha.size(0), "alpha.shape[0]");
  expect_device(op, "frontier_logprobs", frontier_logprobs, alpha, "alpha");
  TORCH_CHECK_VALUE(frontier_logprobs.size(1) <= core::kMaxTreeNodes, op,
                    ": frontier_logprobs must have at most ", core::kMaxTreeNodes, " frontier slots, got ",
                    frontier_logprobs.size(1));
  expect_sage_params(op, level, k, d_min, d_max, w_min, w_max, theta_scale);
}

// expand_tree: in-place tree state [B, Ncap], frontier [B, F], top-k [B, F, K], widths [B, F],
// min_cum_logprob [B]; writes slots [slot_start, slot_start + num_slots).
inline void check_expand_tree_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                                   const at::Tensor& cum_logprobs, const at::Tensor& frontier,
                                   const at::Tensor& topk_logprobs, const at::Tensor& topk_ids,
                                   const at::Tensor& widths, const at::Tensor& min_cum_logprob, int64_t slot_start,
                                   int64_t num_slots) {
  using namespace check_detail;
  constexpr const char* op = "expand_tree";
  expect_tree_state(op, tokens, parents, logprobs, cum_logprobs);
  const int64_t batch = tokens.size(0);
  const int64_t capacity = tokens.size(1);

  expect_dim(op, "frontier", frontier, 2, "[B, F]");
  expect_dtype(op, "frontier", frontier, c10::kLong);
  expect_size(op, "frontier", frontier, 0, batch, "B");
  expect_device(op, "frontier", frontier, tokens, "tokens");
  const int64_t num_frontier = frontier.size(1);
  TORCH_CHECK_VALUE(num_frontier <= core::kMaxTreeNodes, op, ": frontier must have at most ", core::kMaxTreeNodes,
                    " slots, got ", num_frontier);

  expect_dim(op, "topk_logprobs", topk_logprobs, 3, "[B, F, K]");
  expect_dtype(op, "topk_logprobs", topk_logprobs, c10::kFloat);
  expect_size(op, "topk_logprobs", topk_logprobs, 0, batch, "B");
  expect_size(op, "topk_logprobs", topk_logprobs, 1, num_frontier, "frontier.shape[1]");
  expect_device(op, "topk_logprobs", topk_logprobs, tokens, "tokens");
  const int64_t top_k = topk_logprobs.size(2);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= core::kMaxTopK, op, ": topk_logprobs.shape[2] (K) must be in [1, ",
                    core::kMaxTopK, "], got ", top_k);
  TORCH_CHECK(topk_ids.sizes() == topk_logprobs.sizes(), op, ": topk_ids must have the shape of topk_logprobs ",
              topk_logprobs.sizes(), ", got ", topk_ids.sizes());
  expect_dtype(op, "topk_ids", topk_ids, c10::kLong);
  expect_device(op, "topk_ids", topk_ids, tokens, "tokens");

  expect_dim(op, "widths", widths, 2, "[B, F]");
  expect_dtype(op, "widths", widths, c10::kLong);
  TORCH_CHECK(widths.sizes() == frontier.sizes(), op, ": widths must have the shape of frontier ", frontier.sizes(),
              ", got ", widths.sizes());
  expect_device(op, "widths", widths, tokens, "tokens");

  expect_dim(op, "min_cum_logprob", min_cum_logprob, 1, "[B]");
  expect_dtype(op, "min_cum_logprob", min_cum_logprob, c10::kFloat);
  expect_size(op, "min_cum_logprob", min_cum_logprob, 0, batch, "B");
  expect_device(op, "min_cum_logprob", min_cum_logprob, tokens, "tokens");

  TORCH_CHECK_VALUE(slot_start >= 1 && slot_start <= capacity, op, ": slot_start must be in [1, Ncap] = [1, ",
                    capacity, "] (slot 0 is the root), got ", slot_start);
  TORCH_CHECK_VALUE(num_slots >= 0 && slot_start + num_slots <= capacity, op,
                    ": num_slots must be >= 0 with slot_start + num_slots <= Ncap (", capacity, "), got slot_start = ",
                    slot_start, ", num_slots = ", num_slots);
}

// rerank_tree(parents [B, N] int64, cum_logprobs [B, N] f32, num_select)
inline void check_rerank_tree_args(const at::Tensor& parents, const at::Tensor& cum_logprobs, int64_t num_select) {
  using namespace check_detail;
  constexpr const char* op = "rerank_tree";
  expect_tree_tensor(op, "parents", parents);
  expect_dim(op, "cum_logprobs", cum_logprobs, 2, "[B, N]");
  expect_dtype(op, "cum_logprobs", cum_logprobs, c10::kFloat);
  TORCH_CHECK(cum_logprobs.sizes() == parents.sizes(), op, ": cum_logprobs must have the shape of parents ",
              parents.sizes(), ", got ", cum_logprobs.sizes());
  expect_device(op, "cum_logprobs", cum_logprobs, parents, "parents");
  TORCH_CHECK_VALUE(num_select >= 1 && num_select <= parents.size(1), op, ": num_select must be in [1, N] = [1, ",
                    parents.size(1), "], got ", num_select);
}

// tree_buffers(parents [B, N] int64, past_len, mask_dtype)
inline void check_tree_buffers_args(const at::Tensor& parents, int64_t past_len, c10::ScalarType mask_dtype) {
  using namespace check_detail;
  constexpr const char* op = "tree_buffers";
  expect_tree_tensor(op, "parents", parents);
  TORCH_CHECK_VALUE(past_len >= 0, op, ": past_len must be >= 0, got ", past_len);
  TORCH_CHECK_VALUE(is_logit_dtype(mask_dtype), op,
                    ": mask_dtype must be float32, float16 or bfloat16, got ", mask_dtype);
}

// verify_greedy(tokens [B, N] int64, parents [B, N] int64, target [B, N] int64 or [B, N, V] float)
inline void check_verify_greedy_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target) {
  using namespace check_detail;
  constexpr const char* op = "verify_greedy";
  expect_tree_tensor(op, "tokens", tokens);
  expect_dim(op, "parents", parents, 2, "[B, N]");
  expect_dtype(op, "parents", parents, c10::kLong);
  TORCH_CHECK(parents.sizes() == tokens.sizes(), op, ": parents must have the shape of tokens ", tokens.sizes(),
              ", got ", parents.sizes());
  expect_device(op, "parents", parents, tokens, "tokens");
  expect_device(op, "target", target, tokens, "tokens");
  if (target.dim() == 2) {
    TORCH_CHECK(target.scalar_type() == c10::kLong, op,
                ": a 2-D target must be the int64 argmax [B, N], got dtype ", target.scalar_type());
    TORCH_CHECK(target.sizes() == tokens.sizes(), op, ": target must have the shape of tokens ", tokens.sizes(),
                ", got ", target.sizes());
  } else {
    TORCH_CHECK(target.dim() == 3, op, ": target must be int64 argmax [B, N] or logits [B, N, V], got shape ",
                target.sizes());
    expect_logit_dtype(op, "target", target);
    TORCH_CHECK(target.size(0) == tokens.size(0) && target.size(1) == tokens.size(1), op,
                ": target logits must have shape [B, N, V] with [B, N] = ", tokens.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.size(2) >= 1, op, ": target logits must have a non-empty vocabulary, got shape ",
                target.sizes());
  }
}

// verify_sampling and verify_traversal (`op`, which the messages name): tokens, parents [B, N] int64,
// target_probs [B, N, V] float, draft_probs None or [B, N, V] of target_probs' dtype, uniforms [B, N] float32
inline void check_verify_sampling_args(const at::Tensor& tokens, const at::Tensor& parents,
                                       const at::Tensor& target_probs, const std::optional<at::Tensor>& draft_probs,
                                       const at::Tensor& uniforms, const char* op = "verify_sampling") {
  using namespace check_detail;
  expect_tree_tensor(op, "tokens", tokens);
  expect_dim(op, "parents", parents, 2, "[B, N]");
  expect_dtype(op, "parents", parents, c10::kLong);
  TORCH_CHECK(parents.sizes() == tokens.sizes(), op, ": parents must have the shape of tokens ", tokens.sizes(),
              ", got ", parents.sizes());
  expect_device(op, "parents", parents, tokens, "tokens");

  expect_dim(op, "target_probs", target_probs, 3, "[B, N, V]");
  expect_logit_dtype(op, "target_probs", target_probs);
  TORCH_CHECK(target_probs.size(0) == tokens.size(0) && target_probs.size(1) == tokens.size(1), op,
              ": target_probs must have shape [B, N, V] with [B, N] = ", tokens.sizes(), ", got ",
              target_probs.sizes());
  TORCH_CHECK(target_probs.size(2) >= 1, op, ": target_probs must have a non-empty vocabulary, got shape ",
              target_probs.sizes());
  expect_device(op, "target_probs", target_probs, tokens, "tokens");

  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.sizes() == target_probs.sizes(), op, ": draft_probs must have the shape of target_probs ",
                target_probs.sizes(), ", got ", q.sizes());
    TORCH_CHECK(q.scalar_type() == target_probs.scalar_type(), op,
                ": draft_probs must have the dtype of target_probs (", target_probs.scalar_type(), "), got ",
                q.scalar_type());
    expect_device(op, "draft_probs", q, tokens, "tokens");
  }

  expect_dim(op, "uniforms", uniforms, 2, "[B, N]");
  expect_dtype(op, "uniforms", uniforms, c10::kFloat);
  TORCH_CHECK(uniforms.sizes() == tokens.sizes(), op, ": uniforms must have the shape of tokens ", tokens.sizes(),
              ", got ", uniforms.sizes());
  expect_device(op, "uniforms", uniforms, tokens, "tokens");
}

// kv_compact_(caches: list of [B, H, L, D] float tensors, accepted [B, A] int64, past_len)
inline void check_kv_compact_args(at::TensorList caches, const at::Tensor& accepted, int64_t past_len) {
  using namespace check_detail;
  constexpr const char* op = "kv_compact_";
  expect_dim(op, "accepted", accepted, 2, "[B, A]");
  expect_dtype(op, "accepted", accepted, c10::kLong);
  expect_caches(op, "caches", caches, accepted.size(0), accepted.device(), "accepted", past_len, "past_len");
}

// sage_level_: in-place tree state [B, Ncap] (+ optional tree_mask [B, R, C]), logits [B, F, V] of the
// frontier slots [frontier_start, frontier_start + F), optional alpha [B]; SAGE parameters as sage_tree.
inline void check_sage_level_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                                  const at::Tensor& cum_logprobs, const std::optional<at::Tensor>& tree_mask,
                                  const at::Tensor& logits, const std::optional<at::Tensor>& alpha,
                                  int64_t frontier_start, int64_t level, int64_t slot_start, int64_t num_slots,
                                  int64_t k, double temperature, double d_min, double d_max, double w_min,
                                  double w_max, double theta_scale) {
  using namespace check_detail;
  constexpr const char* op = "sage_level_";
  expect_tree_state(op, tokens, parents, logprobs, cum_logprobs);
  const int64_t batch = tokens.size(0);
  const int64_t capacity = tokens.size(1);

  expect_dim(op, "logits", logits, 3, "[B, F, V]");
  expect_logit_dtype(op, "logits", logits);
  expect_size(op, "logits", logits, 0, batch, "B");
  expect_device(op, "logits", logits, tokens, "tokens");
  const int64_t num_frontier = logits.size(1);
  const int64_t vocab = logits.size(2);
  TORCH_CHECK(num_frontier >= 1 && vocab >= 1, op,
              ": logits must hold at least one frontier row and one token, got shape ", logits.sizes());
  expect_topk_params(op, vocab, k, temperature);
  if (alpha.has_value()) {
    expect_dim(op, "alpha", *alpha, 1, "[B]");
    expect_dtype(op, "alpha", *alpha, c10::kFloat);
    expect_size(op, "alpha", *alpha, 0, batch, "B");
    expect_device(op, "alpha", *alpha, tokens, "tokens");
  }
  expect_sage_params(op, level, k, d_min, d_max, w_min, w_max, theta_scale);
  TORCH_CHECK_VALUE(slot_start >= 1 && slot_start <= capacity, op, ": slot_start must be in [1, Ncap] = [1, ",
                    capacity, "] (slot 0 is the root), got ", slot_start);
  TORCH_CHECK_VALUE(frontier_start >= 0 && frontier_start + num_frontier <= slot_start, op,
                    ": the frontier slots [frontier_start, frontier_start + F) must lie before slot_start (",
                    slot_start, "), got frontier_start = ", frontier_start, ", F = logits.shape[1] = ", num_frontier);
  TORCH_CHECK_VALUE(num_slots >= 0 && slot_start + num_slots <= capacity, op,
                    ": num_slots must be >= 0 with slot_start + num_slots <= Ncap (", capacity,
                    "), got slot_start = ", slot_start, ", num_slots = ", num_slots);
  if (tree_mask.has_value()) {
    const at::Tensor& mask = *tree_mask;
    expect_dim(op, "tree_mask", mask, 3, "[B, R, C]");
    expect_logit_dtype(op, "tree_mask", mask);
    expect_size(op, "tree_mask", mask, 0, batch, "B");
    expect_device(op, "tree_mask", mask, tokens, "tokens");
    const int64_t end = slot_start + num_slots;
    TORCH_CHECK_VALUE(mask.size(1) >= end && mask.size(2) >= end, op,
                      ": tree_mask must have at least slot_start + num_slots (", end,
                      ") rows and columns, got shape ", mask.sizes());
    TORCH_CHECK(mask.size(2) <= 1 || mask.stride(2) == 1, op,
                ": tree_mask must be contiguous in its last dimension (it is written in place), got strides ",
                mask.strides());
  }
}

// commit_tree_: tree tokens/parents [B, N], verify outputs accepted [B, N] / accept_len [B] / bonus [B],
// sequence [B, S] (written in place from seq_start), two KV-cache lists (as kv_compact_), draft_rows
// [B, M >= N] or None, alpha [B] float32 or None.
inline void check_commit_tree_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& accepted,
                                   const at::Tensor& accept_len, const at::Tensor& bonus, const at::Tensor& sequence,
                                   int64_t seq_start, at::TensorList target_caches, int64_t target_past,
                                   at::TensorList draft_caches, const std::optional<at::Tensor>& draft_rows,
                                   int64_t draft_past, const std::optional<at::Tensor>& alpha) {
  using namespace check_detail;
  constexpr const char* op = "commit_tree_";
  expect_tree_tensor(op, "tokens", tokens);
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  expect_like(op, "parents", parents, c10::kLong, tokens, "tokens");
  expect_like(op, "accepted", accepted, c10::kLong, tokens, "tokens");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"accept_len", &accept_len},
                                std::pair<const char*, const at::Tensor*>{"bonus", &bonus}}) {
    expect_dim(op, name, *t, 1, "[B]");
    expect_dtype(op, name, *t, c10::kLong);
    expect_size(op, name, *t, 0, batch, "B");
    expect_device(op, name, *t, tokens, "tokens");
  }
  expect_dim(op, "sequence", sequence, 2, "[B, S]");
  expect_dtype(op, "sequence", sequence, c10::kLong);
  expect_size(op, "sequence", sequence, 0, batch, "B");
  expect_device(op, "sequence", sequence, tokens, "tokens");
  TORCH_CHECK(sequence.size(1) <= 1 || sequence.stride(1) == 1, op,
              ": sequence must be contiguous in its last dimension (it is written in place), got strides ",
              sequence.strides());
  TORCH_CHECK_VALUE(seq_start >= 0 && seq_start + nodes <= sequence.size(1), op,
                    ": seq_start must be >= 0 with seq_start + N <= S (room for every new token of an N-node tree), "
                    "got seq_start = ", seq_start, ", N = ", nodes, ", S = ", sequence.size(1));
  if (draft_rows.has_value()) {
    expect_dim(op, "draft_rows", *draft_rows, 2, "[B, M]");
    expect_dtype(op, "draft_rows", *draft_rows, c10::kLong);
    expect_size(op, "draft_rows", *draft_rows, 0, batch, "B");
    TORCH_CHECK(draft_rows->size(1) >= nodes, op, ": draft_rows must have at least N (", nodes,
                ") columns, got shape ", draft_rows->sizes());
    expect_device(op, "draft_rows", *draft_rows, tokens, "tokens");
  } else {
    TORCH_CHECK_VALUE(draft_caches.empty(), op, ": draft_caches need draft_rows (which tree node is which draft row)");
  }
  if (alpha.has_value()) {
    expect_dim(op, "alpha", *alpha, 1, "[B]");
    expect_dtype(op, "alpha", *alpha, c10::kFloat);
    expect_size(op, "alpha", *alpha, 0, batch, "B");
    expect_device(op, "alpha", *alpha, tokens, "tokens");
  }
  expect_caches(op, "target_caches", target_caches, batch, tokens.device(), "tokens", target_past, "target_past");
  expect_caches(op, "draft_caches", draft_caches, batch, tokens.device(), "tokens", draft_past, "draft_past");
}

// The frontier logits [B, F, V] of a draft level (expand_level_, gather_level_): float, batch B, on tokens' device.
inline void check_level_logits(const char* op, const at::Tensor& logits, const at::Tensor& tokens, int64_t k,
                               double temperature) {
  using namespace check_detail;
  expect_dim(op, "logits", logits, 3, "[B, F, V]");
  expect_logit_dtype(op, "logits", logits);
  expect_size(op, "logits", logits, 0, tokens.size(0), "B");
  expect_device(op, "logits", logits, tokens, "tokens");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1, op,
              ": logits must hold at least one frontier row and one token, got shape ", logits.sizes());
  expect_topk_params(op, logits.size(2), k, temperature);
}

// expand_level_: in-place tree state [B, Ncap], frontier logits [B, F, V] of the slots [frontier_start,
// frontier_start + F), every frontier slot k children into [slot_start, slot_start + num_slots).
inline void check_expand_level_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                                    const at::Tensor& cum_logprobs, const at::Tensor& logits, int64_t frontier_start,
                                    int64_t k, double temperature, int64_t slot_start, int64_t num_slots) {
  using namespace check_detail;
  constexpr const char* op = "expand_level_";
  expect_tree_state(op, tokens, parents, logprobs, cum_logprobs);
  check_level_logits(op, logits, tokens, k, temperature);
  const int64_t capacity = tokens.size(1);
  TORCH_CHECK_VALUE(slot_start >= 1 && slot_start <= capacity, op, ": slot_start must be in [1, Ncap] = [1, ",
                    capacity, "] (slot 0 is the root), got ", slot_start);
  TORCH_CHECK_VALUE(frontier_start >= 0 && frontier_start + logits.size(1) <= slot_start, op,
                    ": the frontier slots [frontier_start, frontier_start + F) must lie before slot_start (",
                    slot_start, "), got frontier_start = ", frontier_start, ", F = logits.shape[1] = ", logits.size(1));
  TORCH_CHECK_VALUE(num_slots >= 0 && slot_start + num_slots <= capacity, op,
                    ": num_slots must be >= 0 with slot_start + num_slots <= Ncap (", capacity,
                    "), got slot_start = ", slot_start, ", num_slots = ", num_slots);
}

// gather_level_: tokens [B, Ncap] int64 and logprobs [B, Ncap] float32 (written in place), frontier logits
// [B, F, V], child_index [C] int64 into the flattened [F * k] top-k, slots [slot_start, slot_start + C).
inline void check_gather_level_args(const at::Tensor& tokens, const at::Tensor& logprobs, const at::Tensor& logits,
                                    const at::Tensor& child_index, int64_t slot_start, int64_t k, double temperature) {
  using namespace check_detail;
  constexpr const char* op = "gather_level_";
  expect_tree_tensor(op, "tokens", tokens);
  expect_contiguous(op, "tokens", tokens);
  expect_dim(op, "logprobs", logprobs, 2, "[B, Ncap]");
  expect_dtype(op, "logprobs", logprobs, c10::kFloat);
  TORCH_CHECK(logprobs.sizes() == tokens.sizes(), op, ": logprobs must have the shape of tokens ", tokens.sizes(),
              ", got ", logprobs.sizes());
  expect_device(op, "logprobs", logprobs, tokens, "tokens");
  expect_contiguous(op, "logprobs", logprobs);
  check_level_logits(op, logits, tokens, k, temperature);
  expect_dim(op, "child_index", child_index, 1, "[C]");
  expect_dtype(op, "child_index", child_index, c10::kLong);
  expect_device(op, "child_index", child_index, tokens, "tokens");
  TORCH_CHECK_VALUE(slot_start >= 1 && slot_start + child_index.size(0) <= tokens.size(1), op,
                    ": the slots [slot_start, slot_start + C) must lie in [1, Ncap = ", tokens.size(1),
                    "), got slot_start = ", slot_start, ", C = ", child_index.size(0));
}

// rerank_select: a built tree tokens, parents [B, N] int64, logprobs, cum_logprobs [B, N] float32, node_row
// [B, M >= N] int64, num_select in [1, N].
inline void check_rerank_select_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                                     const at::Tensor& cum_logprobs, const at::Tensor& node_row, int64_t num_select) {
  using namespace check_detail;
  constexpr const char* op = "rerank_select";
  expect_tree_tensor(op, "tokens", tokens);
  expect_like(op, "parents", parents, c10::kLong, tokens, "tokens");
  expect_like(op, "logprobs", logprobs, c10::kFloat, tokens, "tokens");
  expect_like(op, "cum_logprobs", cum_logprobs, c10::kFloat, tokens, "tokens");
  expect_dim(op, "node_row", node_row, 2, "[B, M]");
  expect_dtype(op, "node_row", node_row, c10::kLong);
  expect_size(op, "node_row", node_row, 0, tokens.size(0), "B");
  expect_device(op, "node_row", node_row, tokens, "tokens");
  TORCH_CHECK(node_row.size(1) >= tokens.size(1), op, ": node_row must have at least N (", tokens.size(1),
              ") columns, got shape ", node_row.sizes());
  TORCH_CHECK_VALUE(num_select >= 1 && num_select <= tokens.size(1), op, ": num_select must be in [1, N] = [1, ",
                    tokens.size(1), "], got ", num_select);
}

// tree_mask_feed_: tree_mask [B, R, C] (written in place, last dim contiguous; row R - 1 the all-blocked padding
// row), parents [B, Ncap] int64, node_row [B, >= Ncap] int64 or None, rows [first_row, first_row + count) for the
// slots [slot_start, slot_start + count).
inline void check_tree_mask_feed_args(const at::Tensor& tree_mask, const at::Tensor& parents,
                                      const std::optional<at::Tensor>& node_row, int64_t slot_start,
                                      int64_t first_row, int64_t count) {
  using namespace check_detail;
  constexpr const char* op = "tree_mask_feed_";
  expect_tree_tensor(op, "parents", parents);
  expect_dim(op, "tree_mask", tree_mask, 3, "[B, R, C]");
  expect_logit_dtype(op, "tree_mask", tree_mask);
  expect_size(op, "tree_mask", tree_mask, 0, parents.size(0), "B");
  expect_device(op, "tree_mask", tree_mask, parents, "parents");
  TORCH_CHECK(tree_mask.size(2) <= 1 || tree_mask.stride(2) == 1, op,
              ": tree_mask must be contiguous in its last dimension (it is written in place), got strides ",
              tree_mask.strides());
  if (node_row.has_value()) {
    expect_dim(op, "node_row", *node_row, 2, "[B, M]");
    expect_dtype(op, "node_row", *node_row, c10::kLong);
    expect_size(op, "node_row", *node_row, 0, parents.size(0), "B");
    expect_device(op, "node_row", *node_row, parents, "parents");
    TORCH_CHECK(node_row->size(1) >= parents.size(1), op, ": node_row must have at least Ncap (", parents.size(1),
                ") columns, got shape ", node_row->sizes());
  }
  TORCH_CHECK_VALUE(slot_start >= 1 && count >= 0 && slot_start + count <= parents.size(1), op,
                    ": the slots [slot_start, slot_start + count) must lie in [1, Ncap = ", parents.size(1),
                    "), got slot_start = ", slot_start, ", count = ", count);
  TORCH_CHECK_VALUE(first_row >= 1 && first_row + count < tree_mask.size(1) && first_row + count <= tree_mask.size(2),
                    op, ": the rows [first_row, first_row + count) must lie in [1, R - 1) and within the C columns "
                    "(row R - 1 is the padding row), got first_row = ", first_row, ", count = ", count,
                    ", tree_mask shape ", tree_mask.sizes());
}

}  // namespace sage_ext
