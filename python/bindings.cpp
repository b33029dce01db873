// The binding layer of sage_ext, registration only: every op schema of docs/OPS.md (TORCH_LIBRARY) and the Python
// module `sage_ext._C`: build facts, csrc/core's limits and SAGE formulas (the one source sage_ext.ops and
// sage_ext.policies read), and the engine's TreeWorkspace with its FixedLayout and CommitResult (csrc/session).
// The CPU and CUDA implementations of the ops register themselves from csrc/cpu and csrc/cuda with
// TORCH_LIBRARY_IMPL.
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
using sage_ext::session::TreeWorkspace;

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
      "expand_level_(Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) logprobs, Tensor(d!) cum_logprobs, "
      "Tensor logits, int frontier_start, int k, float temperature, int slot_start, int num_slots) "
      "-> (Tensor count, Tensor frontier_alpha)");
  m.def(
      "gather_level_(Tensor(a!) tokens, Tensor(b!) logprobs, Tensor logits, Tensor child_index, int slot_start, "
      "int k, float temperature) -> Tensor frontier_alpha");
  m.def(
      "rerank_select(Tensor tokens, Tensor parents, Tensor logprobs, Tensor cum_logprobs, Tensor node_row, "
      "int num_select) -> (Tensor tokens, Tensor parents, Tensor logprobs, Tensor node_row)");
  m.def(
      "tree_mask_feed_(Tensor(a!) tree_mask, Tensor parents, Tensor? node_row, int slot_start, int first_row, "
      "int count) -> ()");
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
  using sage_ext::session::FixedLayout;
  py::class_<FixedLayout>(module, "FixedLayout",
                          "A tree whose shape and feed schedule never change (static trees, chains), on the workspace's "
                          "device and dtypes: parents [N], node_row [1, N + 1] (the draft row of every slot the draft "
                          "processes, -1 for the others), draft_block [1, R, R] (the additive block of the step's R "
                          "draft rows, draft dtype), depth [1, N] and target_block [N, N] (target dtype).")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(), py::arg("parents"),
           py::arg("node_row"), py::arg("draft_block"), py::arg("depth"), py::arg("target_block"))
      .def_readonly("parents", &FixedLayout::parents)
      .def_readonly("node_row", &FixedLayout::node_row)
      .def_readonly("draft_block", &FixedLayout::draft_block)
      .def_readonly("depth", &FixedLayout::depth)
      .def_readonly("target_block", &FixedLayout::target_block);
  using sage_ext::session::LevelStops;
  py::class_<LevelStops>(module, "LevelStops",
                         "When a SAGE tree goes on past a level (TreeWorkspace.sage_level's level_stops): the next "
                         "draft forward pays if value(level, mass) >= cost_fixed + cost_per_node x count, mass being "
                         "the level's draft probability mass, count its nodes, and value(level, .) piecewise linear "
                         "through (masses[i], values[i] x scales[level - 1]) (masses increasing; flat beyond the ends; "
                         "levels deeper than the scales take the last one's).")
      .def(py::init<std::vector<double>, std::vector<double>, std::vector<double>, double, double>(),
           py::arg("masses"), py::arg("values"), py::arg("scales"), py::arg("cost_fixed"), py::arg("cost_per_node"))
      .def_readonly("masses", &LevelStops::masses)
      .def_readonly("values", &LevelStops::values)
      .def_readonly("scales", &LevelStops::scales)
      .def_readonly("cost_fixed", &LevelStops::cost_fixed)
      .def_readonly("cost_per_node", &LevelStops::cost_per_node)
      .def_property_readonly("levels", &LevelStops::levels)
      .def("value", &LevelStops::value, py::arg("level"), py::arg("mass"))
      .def("pays", &LevelStops::pays, py::arg("level"), py::arg("mass"), py::arg("count"))
      .def("sure_depth", &LevelStops::sure_depth, py::arg("max_depth"),
           "How deep a sure tree goes (one node a level, all the draft's mass on it): the first level whose next "
           "does not pay at mass 1, else max_depth.");
  py::class_<TreeWorkspace>(module, "TreeWorkspace",
                            "The engine's per-generation tree state on the device and the tensor work between two "
                            "model forwards, one call per gap (csrc/session/tree_workspace.h).")
      .def(py::init<int64_t, int64_t, int64_t, const at::Tensor&, std::optional<c10::ScalarType>, c10::ScalarType,
                    const std::optional<at::Tensor>&>(),
           py::arg("capacity"), py::arg("max_cache_len"), py::arg("chain_rows"), py::arg("sequence"),
           py::arg("draft_dtype"), py::arg("target_dtype"), py::arg("row_table") = py::none())
      .def("start_generation", &TreeWorkspace::start_generation, py::arg("draft_cache_len"),
           py::arg("stop_tokens") = std::vector<int64_t>{})
      .def("start", &TreeWorkspace::start, py::arg("cur_len"), py::arg("draft_done"), py::arg("layout") = py::none())
      .def("root_only", &TreeWorkspace::root_only, py::arg("cur_len"))
      .def("sage_level", &TreeWorkspace::sage_level, py::arg("logits"), py::arg("alpha"), py::arg("frontier_start"),
           py::arg("frontier_count"), py::arg("level"), py::arg("slot_start"), py::arg("num_slots"), py::arg("k"),
           py::arg("temperature"), py::arg("d_min"), py::arg("d_max"), py::arg("w_min"), py::arg("w_max"),
           py::arg("theta_scale"), py::arg("used"), py::arg("n_max"), py::arg("known_count"),
           py::arg("known_max_depth"), py::arg("level_stops") = py::none())
      .def("static_level", &TreeWorkspace::static_level, py::arg("logits"), py::arg("frontier_count"),
           py::arg("child_index"), py::arg("start"), py::arg("k"), py::arg("temperature"), py::arg("want_alpha"),
           py::arg("next_start"), py::arg("next_count"), py::arg("next_depth"), py::arg("cumulative") = false,
           py::arg("dynamic") = false, py::arg("level_stops") = py::none())
      .def("topk_expand", &TreeWorkspace::topk_expand)
      .def("use_slots", &TreeWorkspace::use_slots, py::arg("num_nodes"))
      .def("rerank", &TreeWorkspace::rerank, py::arg("num_slots"), py::arg("num_select"))
      .def_property_readonly("tree_nodes", &TreeWorkspace::tree_nodes)
      .def_property_readonly("level_masses", &TreeWorkspace::level_masses)
      .def_property_readonly("tree_tokens", &TreeWorkspace::tree_tokens)
      .def_property_readonly("tree_parents", &TreeWorkspace::tree_parents)
      .def_property_readonly("tree_logprobs", &TreeWorkspace::tree_logprobs)
      .def_property_readonly("tree_node_row", &TreeWorkspace::tree_node_row)
      .def("target_inputs", &TreeWorkspace::target_inputs, py::arg("target_len"))
      .def("commit", &TreeWorkspace::commit, py::arg("target"), py::arg("accepted"), py::arg("accept_len"),
           py::arg("bonus"), py::arg("cur_len"), py::arg("target_caches"), py::arg("target_len"),
           py::arg("draft_caches"))
      .def("commit_async", &TreeWorkspace::commit_async, py::arg("target"), py::arg("accepted"),
           py::arg("accept_len"), py::arg("bonus"), py::arg("cur_len"), py::arg("target_caches"),
           py::arg("target_len"), py::arg("draft_caches"))
      .def("read_commit", &TreeWorkspace::read_commit, py::arg("host_readback"))
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
