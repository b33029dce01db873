// The binding layer of sage_ext: every op schema of docs/OPS.md (TORCH_LIBRARY) and the Python module
// `sage_ext._C`: build facts, csrc/core's limits and SAGE formulas (the one source sage_ext.ops and
// sage_ext.policies read), and the engine's TreeWorkspace with its CommitResult (csrc/session). The CPU and CUDA
// implementations of the ops register themselves from csrc/cpu and csrc/cuda with TORCH_LIBRARY_IMPL.
//
// This is the only file with torch's pybind11 type casters (torch/csrc/utils/pybind.h, the slow part of
// torch/extension.h): the longest compile of the build.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "../csrc/core/formulas.h"
#include "../csrc/session/tree_workspace.h"

namespace py = pybind11;

namespace {

using sage_ext::session::TreeWorkspace;

// The keys and values of HF cache layers (objects with `keys` / `values` [B, H, L, D] tensors).
std::vector<at::Tensor> layer_tensors(const py::list& layers) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(2 * layers.size());
  for (const py::handle layer : layers) {
    tensors.push_back(py::cast<at::Tensor>(layer.attr("keys")));
    tensors.push_back(py::cast<at::Tensor>(layer.attr("values")));
  }
  return tensors;
}

// Every layer cut to `length` cached rows (what DynamicLayer.crop does: keys / values narrowed on the sequence dim).
void crop_layers(const py::list& layers, int64_t length) {
  for (const py::handle layer : layers) {
    for (const char* name : {"keys", "values"}) {
      const auto cached = py::cast<at::Tensor>(layer.attr(name));
      if (cached.size(2) > length) layer.attr(name) = cached.narrow(2, 0, length);
    }
  }
}

// TreeWorkspace::commit on HF cache layers, then both caches cropped: the target to the committed sequence
// (target_len + accept_len + 1 rows), the draft to the workspace's draft_len (which commit set to draft_base +
// the accepted nodes the draft holds).
sage_ext::session::CommitResult commit_and_crop(
    TreeWorkspace& workspace, const at::Tensor& tokens, const at::Tensor& parents,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& accepted,
    const std::optional<at::Tensor>& accept_len,
    const std::optional<at::Tensor>& bonus, int64_t cur_len, const py::list& target_layers, int64_t target_len,
    const py::list& draft_layers, const std::optional<at::Tensor>& node_row, const std::optional<at::Tensor>& alpha) {
  const bool root_only = tokens.size(1) == 1;  // a root alone: its cache rows are where they belong already
  const int64_t draft_len_before = workspace.draft_len;
  auto result = workspace.commit(tokens, parents, target, accepted, accept_len, bonus, cur_len,
                                 root_only ? std::vector<at::Tensor>{} : layer_tensors(target_layers), target_len,
                                 root_only ? std::vector<at::Tensor>{} : layer_tensors(draft_layers), node_row, alpha);
  if (!root_only) crop_layers(target_layers, target_len + result.accept_len + 1);
  if (workspace.draft_len < draft_len_before) crop_layers(draft_layers, workspace.draft_len);
  return result;
}

}  // namespace

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
  // Traversal Verification: verify_sampling's schema and outputs (the engine may swap one for the other).
  m.def(
      "verify_traversal(Tensor tokens, Tensor parents, Tensor target_probs, Tensor? draft_probs, Tensor uniforms) "
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
  module.def(
      "sage_shape",
      [](double alpha, double d_min, double d_max, double w_min, double w_max) {
        // the kernels' float32 arithmetic (csrc/core/formulas.h), on host values
        const float a = static_cast<float>(alpha);
        const float depth = sage_ext::core::sage_depth(a, static_cast<float>(d_min), static_cast<float>(d_max));
        const float width = sage_ext::core::sage_width(a, static_cast<float>(w_min), static_cast<float>(w_max));
        return std::make_tuple(static_cast<double>(depth), static_cast<double>(width),
                               sage_ext::core::round_half_up(depth));
      },
      py::arg("alpha"), py::arg("d_min"), py::arg("d_max"), py::arg("w_min"), py::arg("w_max"),
      "SAGE's (D(alpha), W(alpha), round(D)) with csrc/core/formulas.h in float32, as sage_tree computes them.");
  module.def(
      "sage_level_width",
      [](double width, double parent_logprob, int64_t level, int64_t k) {
        return sage_ext::core::sage_level_width(static_cast<float>(width), static_cast<float>(parent_logprob), level,
                                                k);
      },
      py::arg("width"), py::arg("parent_logprob"), py::arg("level"), py::arg("k"),
      "Children a frontier node gets at depth `level` (csrc/core/formulas.h, float32): clamp(round(W), 1, k) at "
      "level 1, clamp(round(W (0.5 + exp(parent_logprob)) / level), 1, k) deeper.");

  module.def("crop_layers", &crop_layers, py::arg("layers"), py::arg("length"),
             "Cut HF cache layers (objects with keys / values [B, H, L, D]) to `length` cached rows, as "
             "DynamicLayer.crop does; layers already that short are left alone.");
  using sage_ext::session::CommitResult;
  py::class_<CommitResult>(module, "CommitResult",
                           "What TreeWorkspace.commit tells the host about a step (one device-to-host copy): "
                           "accept_len (tau), draft_held, real_nodes (ints), alpha (float or None), tokens (the "
                           "accept_len + 1 new tokens, a list of ints) and accepted ([1, N] tensor).")
      .def_readonly("accept_len", &CommitResult::accept_len)
      .def_readonly("draft_held", &CommitResult::draft_held)
      .def_readonly("real_nodes", &CommitResult::real_nodes)
      .def_readonly("alpha", &CommitResult::alpha)
      .def_readonly("tokens", &CommitResult::tokens)
      .def_readonly("accepted", &CommitResult::accepted)
      .def("__repr__", [](const CommitResult& r) {
        return "CommitResult(accept_len=" + std::to_string(r.accept_len) + ", draft_held=" +
               std::to_string(r.draft_held) + ", real_nodes=" + std::to_string(r.real_nodes) + ", tokens=" +
               std::to_string(r.tokens.size()) + " ints)";
      });
  py::class_<TreeWorkspace>(module, "TreeWorkspace",
                            "The engine's per-generation tree state on the device and the tensor work between two "
                            "model forwards, one call per gap (csrc/session/tree_workspace.h).")
      .def(py::init<int64_t, int64_t, int64_t, const at::Tensor&, std::optional<c10::ScalarType>, c10::ScalarType,
                    const std::optional<at::Tensor>&, bool>(),
           py::arg("capacity"), py::arg("max_cache_len"), py::arg("chain_rows"), py::arg("sequence"),
           py::arg("draft_dtype"), py::arg("target_dtype"), py::arg("row_table") = py::none(),
           py::arg("direct_cpu") = true)
      .def("start_generation", &TreeWorkspace::start_generation, py::arg("draft_cache_len"))
      .def("start", &TreeWorkspace::start)
      .def("sage_level", &TreeWorkspace::sage_level)
      .def("static_level", &TreeWorkspace::static_level)
      .def("topk_expand", &TreeWorkspace::topk_expand)
      .def("rerank", &TreeWorkspace::rerank)
      .def("target_inputs", &TreeWorkspace::target_inputs)
      .def("commit", &commit_and_crop,
           "TreeWorkspace.commit on the keys/values of HF cache layers (lists of DynamicLayer), then both caches "
           "cropped to what they hold after the step (layer.keys / layer.values narrowed, as DynamicLayer.crop "
           "does). Returns a CommitResult.")
      .def_readonly("tokens", &TreeWorkspace::tokens)
      .def_readonly("parents", &TreeWorkspace::parents)
      .def_readonly("logprobs", &TreeWorkspace::logprobs)
      .def_readonly("cum_logprobs", &TreeWorkspace::cum_logprobs)
      .def_readonly("mask", &TreeWorkspace::mask)
      .def_property_readonly("node_row", &TreeWorkspace::node_row)
      .def_property_readonly("row_table", &TreeWorkspace::row_table)
      .def_readonly("rows_used", &TreeWorkspace::rows_used)
      .def_readonly("draft_base", &TreeWorkspace::draft_base)
      .def_readonly("draft_len", &TreeWorkspace::draft_len);
}
