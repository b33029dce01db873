// sage_level: one whole SAGE expansion level in one op call (docs/OPS.md), the composition
// topk_confidence -> sage_tree -> expand_tree over a frontier that is a slot range of the tree.
//
// Registered for CompositeImplicitAutograd: it calls the three ops through the dispatcher, so their
// CPU, CUDA and fake/meta implementations serve it on every device and nothing here reads device data.
// It exists for the engine's hot path: one Python call per draft level instead of about ten (ops,
// slices, unsqueezes), which is most of the engine's own time per level with small models.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace sage_ext {
namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Tensor3 call_topk_confidence(const at::Tensor& logits, int64_t k, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sage_ext::topk_confidence", "")
                       .typed<Tensor3(const at::Tensor&, int64_t, double)>();
  return op.call(logits, k, temperature);
}

Tensor3 call_sage_tree(const at::Tensor& alpha, const at::Tensor& frontier_logprobs, int64_t level, int64_t k,
                       double d_min, double d_max, double w_min, double w_max, double theta_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sage_ext::sage_tree", "")
                       .typed<Tensor3(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double,
                                      double, double, double)>();
  return op.call(alpha, frontier_logprobs, level, k, d_min, d_max, w_min, w_max, theta_scale);
}

at::Tensor call_expand_tree(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                            const at::Tensor& cum_logprobs, const at::Tensor& frontier, const at::Tensor& topk_logprobs,
                            const at::Tensor& topk_ids, const at::Tensor& widths, const at::Tensor& min_cum_logprob,
                            int64_t slot_start, int64_t num_slots) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sage_ext::expand_tree", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t)>();
  return op.call(tokens, parents, logprobs, cum_logprobs, frontier, topk_logprobs, topk_ids, widths,
                 min_cum_logprob, slot_start, num_slots);
}

Tensor3 sage_level(const at::Tensor& logits, const std::optional<at::Tensor>& alpha, const at::Tensor& tokens,
                   const at::Tensor& parents, const at::Tensor& logprobs, const at::Tensor& cum_logprobs,
                   int64_t frontier_start, int64_t level, int64_t slot_start, int64_t num_slots, int64_t k,
                   double temperature, double d_min, double d_max, double w_min, double w_max, double theta_scale) {
  constexpr const char* op = "sage_level";
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be a 3-D tensor [B, F, V] (the frontier's draft logits), got shape ",
              logits.sizes());
  TORCH_CHECK(logprobs.dim() == 2, op, ": logprobs must be a 2-D tensor [B, Ncap], got shape ", logprobs.sizes());
  const int64_t batch = logits.size(0), num_frontier = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(logprobs.size(0) == batch, op, ": logprobs.shape[0] must equal logits.shape[0] (", batch,
              "), got shape ", logprobs.sizes());
  TORCH_CHECK(num_frontier >= 1, op, ": logits must hold at least one frontier node, got shape ", logits.sizes());
  TORCH_CHECK(frontier_start >= 0 && frontier_start + num_frontier <= logprobs.size(1), op,
              ": frontier_start must satisfy 0 <= frontier_start and frontier_start + F <= Ncap (F = ", num_frontier,
              ", Ncap = ", logprobs.size(1), "), got ", frontier_start);
  TORCH_CHECK(frontier_start + num_frontier <= slot_start, op,
              ": slot_start must come after the frontier (frontier_start + F = ", frontier_start + num_frontier,
              "), got ", slot_start);
  TORCH_CHECK(logits.device() == logprobs.device(), op, ": logits must be on the same device as the tree state (",
              logprobs.device(), "), got ", logits.device());
  if (alpha.has_value()) {
    TORCH_CHECK(alpha->device() == logprobs.device(), op, ": alpha must be on the same device as the tree state (",
                logprobs.device(), "), got ", alpha->device());
  }

  auto [frontier_alpha, topk_logprobs, topk_ids] =
      call_topk_confidence(logits.reshape({batch * num_frontier, vocab}), k, temperature);
  frontier_alpha = frontier_alpha.view({batch, num_frontier});
  // no alpha given: the confidence of each row's first frontier node (the root at level 1: zero-lag SAGE)
  const at::Tensor level_alpha = alpha.has_value() ? *alpha : frontier_alpha.select(1, 0);
  auto [widths, min_cum_logprob, max_depth] =
      call_sage_tree(level_alpha, logprobs.narrow(1, frontier_start, num_frontier), level, k, d_min, d_max, w_min,
                     w_max, theta_scale);
  const at::Tensor frontier =
      at::arange(frontier_start, frontier_start + num_frontier, logprobs.options().dtype(at::kLong))
          .unsqueeze(0)
          .expand({batch, num_frontier})
          .contiguous();
  at::Tensor count = call_expand_tree(tokens, parents, logprobs, cum_logprobs, frontier,
                                      topk_logprobs.view({batch, num_frontier, k}), topk_ids.view({batch, num_frontier, k}),
                                      widths, min_cum_logprob, slot_start, num_slots);
  return {count, frontier_alpha, max_depth};
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CompositeImplicitAutograd, m) { m.impl("sage_level", &sage_level); }

}  // namespace sage_ext
