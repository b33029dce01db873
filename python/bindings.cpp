// The binding layer of sage_ext: every op schema of docs/OPS.md (TORCH_LIBRARY) and the small
// Python module `sage_ext._C` (build facts). The CPU and CUDA implementations register themselves
// from csrc/cpu and csrc/cuda with TORCH_LIBRARY_IMPL.
//
// This is the only file allowed torch/extension.h, but it needs no torch type in Python: pybind11
// (the copy bundled with torch) plus torch/library.h compile in a third of the time, and this file
// is the longest compile of the build. Include torch/extension.h here if a binding ever takes tensors.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "../csrc/core/formulas.h"

TORCH_LIBRARY(sage_ext, m) {
  m.def(
      "topk_confidence(Tensor logits, int k, float temperature=1.0) "
      "-> (Tensor alpha, Tensor topk_logprobs, Tensor topk_ids)");
  m.def("build_static_tree(Tensor paths) -> (Tensor parents, Tensor ranks, Tensor depth)");
  m.def(
      "sage_tree(Tensor alpha, Tensor frontier_logprobs, int level, int k, float d_min, float d_max, "
      "float w_min, float w_max, float theta_scale=0.1) "
      "-> (Tensor widths, Tensor min_cum_logprob, Tensor max_depth)");
  m.def(
      "expand_tree(Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) logprobs, Tensor(d!) cum_logprobs, "
      "Tensor frontier, Tensor topk_logprobs, Tensor topk_ids, Tensor widths, Tensor min_cum_logprob, "
      "int slot_start, int num_slots) -> Tensor count");
  m.def("rerank_tree(Tensor parents, Tensor cum_logprobs, int num_select) -> (Tensor keep, Tensor new_parents)");
  m.def(
      "tree_buffers(Tensor parents, int past_len, ScalarType mask_dtype=float) "
      "-> (Tensor depth, Tensor positions, Tensor first_child, Tensor next_sibling, Tensor paths, "
      "Tensor is_leaf, Tensor float_mask, Tensor packed_mask)");
  m.def("verify_greedy(Tensor tokens, Tensor parents, Tensor target) -> (Tensor accepted, Tensor accept_len, Tensor bonus)");
  m.def(
      "verify_sampling(Tensor tokens, Tensor parents, Tensor target_probs, Tensor? draft_probs, Tensor uniforms) "
      "-> (Tensor accepted, Tensor accept_len, Tensor bonus)");
  m.def("kv_compact_(Tensor(a!)[] caches, Tensor accepted, int past_len) -> ()");
  // The fused engine-step ops (docs/OPS.md, "Engine-step ops").
  m.def(
      "sage_level_(Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) logprobs, Tensor(d!) cum_logprobs, "
      "Tensor(e!)? tree_mask, Tensor logits, Tensor? alpha, int frontier_start, int level, int slot_start, "
      "int num_slots, int k, float temperature, float d_min, float d_max, float w_min, float w_max, "
      "float theta_scale=0.1) -> (Tensor count, Tensor frontier_alpha, Tensor max_depth)");
  m.def(
      "commit_tree_(Tensor tokens, Tensor parents, Tensor accepted, Tensor accept_len, Tensor bonus, "
      "Tensor(a!) sequence, int seq_start, Tensor(b!)[] target_caches, int target_past, "
      "Tensor(c!)[] draft_caches, Tensor? draft_rows, int draft_past, Tensor? alpha) -> Tensor readback");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "sage_ext native extension: registers torch.ops.sage_ext.* (see docs/OPS.md).";
  module.def(
      "cuda_built",
      []() {
#ifdef SAGE_EXT_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the extension was compiled with its CUDA kernels.");
  module.attr("MAX_TREE_NODES") = sage_ext::core::kMaxTreeNodes;
  module.attr("MAX_TOPK") = sage_ext::core::kMaxTopK;
}
