// The binding layer of sage_ext: every op schema of docs/OPS.md (TORCH_LIBRARY) and the Python module
// `sage_ext._C`: build facts and the engine's TreeWorkspace (csrc/session). The CPU and CUDA
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
// (target_len + accept_len + 1 rows), the draft to the accepted nodes it holds (draft_base + readback[1]).
std::tuple<std::vector<int64_t>, at::Tensor> commit_and_crop(
    TreeWorkspace& workspace, const at::Tensor& tokens, const at::Tensor& parents,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& accepted,
    const std::optional<at::Tensor>& accept_len,
    const std::optional<at::Tensor>& bonus, int64_t cur_len, const py::list& target_layers, int64_t target_len,
    const py::list& draft_layers, const std::optional<at::Tensor>& node_row, const std::optional<at::Tensor>& alpha) {
  const bool root_only = tokens.size(1) == 1;  // a root alone: its cache rows are where they belong already
  auto result = workspace.commit(tokens, parents, target, accepted, accept_len, bonus, cur_len,
                                 root_only ? std::vector<at::Tensor>{} : layer_tensors(target_layers), target_len,
                                 root_only ? std::vector<at::Tensor>{} : layer_tensors(draft_layers), node_row, alpha);
  const std::vector<int64_t>& readback = std::get<0>(result);
  if (!root_only) crop_layers(target_layers, target_len + readback[0] + 1);
  if (node_row.has_value()) {
    const int64_t kept = workspace.draft_base + readback[1];
    if (workspace.draft_len > kept) {
      crop_layers(draft_layers, kept);
      workspace.draft_len = kept;
    }
  }
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

  module.def("crop_layers", &crop_layers, py::arg("layers"), py::arg("length"),
             "Cut HF cache layers (objects with keys / values [B, H, L, D]) to `length` cached rows, as "
             "DynamicLayer.crop does; layers already that short are left alone.");
  py::class_<TreeWorkspace>(module, "TreeWorkspace",
                            "The engine's per-generation tree state on the device and the tensor work between two "
                            "model forwards, one call per gap (csrc/session/tree_workspace.h).")
      .def(py::init<int64_t, int64_t, int64_t, const at::Tensor&, std::optional<c10::ScalarType>, c10::ScalarType,
                    const std::optional<at::Tensor>&, bool>(),
           py::arg("capacity"), py::arg("max_cache_len"), py::arg("chain_rows"), py::arg("sequence"),
           py::arg("draft_dtype"), py::arg("target_dtype"), py::arg("row_table") = py::none(),
           py::arg("direct_cpu") = true)
      .def("start", &TreeWorkspace::start)
      .def("sage_level", &TreeWorkspace::sage_level)
      .def("static_level", &TreeWorkspace::static_level)
      .def("topk_expand", &TreeWorkspace::topk_expand)
      .def("rerank", &TreeWorkspace::rerank)
      .def("target_inputs", &TreeWorkspace::target_inputs)
      .def("commit", &commit_and_crop,
           "TreeWorkspace.commit on the keys/values of HF cache layers (lists of DynamicLayer), then both caches "
           "cropped to what they hold after the step (layer.keys / layer.values narrowed, as DynamicLayer.crop "
           "does). Returns (readback row, accepted).")
      .def_readonly("tokens", &TreeWorkspace::tokens)
      .def_readonly("parents", &TreeWorkspace::parents)
      .def_readonly("logprobs", &TreeWorkspace::logprobs)
      .def_readonly("cum_logprobs", &TreeWorkspace::cum_logprobs)
      .def_readonly("mask", &TreeWorkspace::mask)
      .def_property_readonly("node_row", &TreeWorkspace::node_row)
      .def_property_readonly("row_table", &TreeWorkspace::row_table)
      .def_readonly("rows_used", &TreeWorkspace::rows_used)
      .def_readonly("draft_base", &TreeWorkspace::draft_base)
      .def_readwrite("draft_len", &TreeWorkspace::draft_len);
}
