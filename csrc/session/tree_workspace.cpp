// TreeWorkspace (tree_workspace.h): the tensor work between two model forwards, one native call per gap.
// The sage_ext ops are called through the dispatcher (their CPU or CUDA kernel runs, as from Python,
// minus the Python argument parsing), the glue (views, copies, fills) through ATen.
#include "tree_workspace.h"

#include "../op_signatures.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index.h>
#include <ATen/ops/isin.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace sage_ext::session {
namespace {

// op<"sage_ext::name", Sig>(): the operator's typed handle, looked up once per operator (the dispatcher then
// picks the kernel of the arguments' device on every call).
template <size_t N>
struct OpName {
  char value[N];
  constexpr OpName(const char (&name)[N]) { std::copy_n(name, N, value); }  // NOLINT: implicit by design
};

template <OpName name, typename Sig>
const c10::TypedOperatorHandle<Sig>& op() {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.value, "").template typed<Sig>();
  return handle;
}

void check_draft_logits(const at::Tensor& logits, int64_t frontier_count, const char* what) {
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(0) == 1 && frontier_count >= 1 && logits.size(1) >= frontier_count,
                    "TreeWorkspace.", what, ": logits must be [1, T, V] with T >= frontier_count (", frontier_count,
                    "), got shape ", logits.sizes());
}

// The frontier's rows of draft logits [1, T, V]: the last `frontier_count`.
at::Tensor frontier_rows(const at::Tensor& logits, int64_t frontier_count) {
  return logits.size(1) == frontier_count ? logits : logits.narrow(1, logits.size(1) - frontier_count, frontier_count);
}

// Row length of a mask buffer: a multiple of 64 elements, so every row view starts at an aligned address
// (CUDA's memory-efficient attention requires an aligned bias pointer and row stride).
int64_t aligned_width(int64_t columns) { return (columns + 63) / 64 * 64; }

// torch.finfo(dtype).min: the additive mask's "blocked".
double blocked_value(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return std::numeric_limits<float>::lowest();
    case c10::kHalf:
      return static_cast<float>(std::numeric_limits<c10::Half>::lowest());
    case c10::kBFloat16:
      return static_cast<float>(std::numeric_limits<c10::BFloat16>::lowest());
    default:
      TORCH_CHECK_VALUE(false, "TreeWorkspace: mask dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

// A host int64 of a one-element device tensor (free on the CPU, a sync elsewhere).
int64_t host_int(const at::Tensor& value) {
  return value.is_cpu() ? value.const_data_ptr<int64_t>()[0] : value.item<int64_t>();
}

}  // namespace

LevelStops::LevelStops(std::vector<double> masses_, std::vector<double> values_, std::vector<double> scales_,
                       double cost_fixed_, double cost_per_node_)
    : masses(std::move(masses_)),
      values(std::move(values_)),
      scales(std::move(scales_)),
      cost_fixed(cost_fixed_),
      cost_per_node(cost_per_node_) {
  TORCH_CHECK_VALUE(!masses.empty() && masses.size() == values.size(),
                    "LevelStops: masses and values must be non-empty and of one length");
  TORCH_CHECK_VALUE(!scales.empty(), "LevelStops: need the scale of at least one level");
  for (size_t i = 1; i < masses.size(); ++i) {
    TORCH_CHECK_VALUE(masses[i] > masses[i - 1], "LevelStops: masses must increase");
  }
  level_values_.reserve(scales.size());
  for (const double scale : scales) {
    std::vector<double> scaled(values.size());
    for (size_t i = 0; i < values.size(); ++i) scaled[i] = values[i] * scale;
    level_values_.push_back(std::move(scaled));
  }
}

double LevelStops::value(int64_t level, double mass) const {
  TORCH_CHECK_VALUE(level >= 1, "LevelStops: levels count from 1, got ", level);
  const std::vector<double>& at = level_values_[static_cast<size_t>(std::min(level, levels()) - 1)];
  if (mass <= masses.front()) return at.front();
  if (mass >= masses.back()) return at.back();
  size_t i = 1;
  while (masses[i] < mass) ++i;
  const double t = (mass - masses[i - 1]) / (masses[i] - masses[i - 1]);
  return at[i - 1] + t * (at[i] - at[i - 1]);
}

int64_t LevelStops::sure_depth(int64_t max_depth) const {
  for (int64_t level = 1; level < max_depth; ++level) {
    if (!pays(level, 1.0, 1)) return level;
  }
  return max_depth;
}

TreeWorkspace::TreeWorkspace(int64_t capacity, int64_t max_cache_len, int64_t chain_rows, const at::Tensor& sequence,
                             std::optional<c10::ScalarType> draft_dtype, c10::ScalarType target_dtype,
                             const std::optional<at::Tensor>& row_table)
    : capacity_(capacity), sequence_(sequence), target_dtype_(target_dtype) {
  TORCH_CHECK_VALUE(capacity >= 1, "TreeWorkspace: capacity must be >= 1, got ", capacity);
  const auto longs = sequence.options().dtype(at::kLong);
  const auto floats = sequence.options().dtype(at::kFloat);
  arange_ = at::arange(std::max<int64_t>(capacity, 2), longs);
  positions_ = at::arange(max_cache_len + capacity + 2, longs).unsqueeze(0);
  tokens = at::zeros({1, capacity}, longs);
  parents = at::full({1, capacity}, -1, longs);
  logprobs = at::zeros({1, capacity}, floats);
  cum_logprobs = at::zeros({1, capacity}, floats);
  depth_ = at::zeros({1, capacity}, longs);
  node_row_ = at::full({1, capacity + 1}, -1, longs);
  if (row_table.has_value()) {
    row_table_ = *row_table;
  } else {  // row_table[r] = [[0, 1, ..., r - 1, -1, ..., -1]]: node_row while slots are rows and r rows are fed
    const at::Tensor index = at::arange(capacity + 1, longs);
    row_table_ = at::where(index.unsqueeze(0).lt(index.unsqueeze(1)), index.unsqueeze(0), -1).unsqueeze(1);
  }
  target_mask_ = at::zeros({1, 1, 1, aligned_width(max_cache_len + capacity)}, sequence.options().dtype(target_dtype));
  if (!draft_dtype.has_value()) return;
  const auto mask_options = sequence.options().dtype(*draft_dtype);
  const double blocked = blocked_value(*draft_dtype);
  mask = at::zeros({1, 1, capacity + 1, aligned_width(max_cache_len + capacity + 1)}, mask_options);
  block_ = mask.select(0, 0).narrow(2, 0, capacity);
  // the block's fixed rows: 0 = the root (itself only), cap = all blocked (padding's parent)
  edge_rows_ = at::tensor({int64_t{0}, capacity}, longs);
  edge_values_ = at::full({1, 2, capacity}, blocked, mask_options);
  edge_values_.select(0, 0).select(0, 0).select(0, 0).fill_(0);
  chain_ = at::zeros({1, 1, chain_rows, aligned_width(max_cache_len + chain_rows)}, mask_options);
  chain_block_ = at::full({chain_rows, chain_rows}, blocked, mask_options).triu_(1);
}

at::Tensor TreeWorkspace::node_row() const {
  if (layout_.has_value()) return prefix_node_row_.defined() ? prefix_node_row_ : layout_->node_row;
  return slots_are_rows_ ? row_table_.select(0, rows_used) : node_row_;
}

void TreeWorkspace::tree_written() { layout_parents_ = at::Tensor(); }

// ---- draft side -------------------------------------------------------------------------------------
void TreeWorkspace::start_generation(int64_t draft_cache_len, const std::vector<int64_t>& stop_tokens) {
  TORCH_CHECK_VALUE(draft_cache_len >= 0, "TreeWorkspace.start_generation: draft_cache_len must be >= 0, got ",
                    draft_cache_len);
  draft_len = draft_cache_len;
  draft_base = 0;
  rows_used = 0;
  stop_tokens_ = stop_tokens;
  stop_tokens_device_ = at::Tensor();
  if (!stop_tokens.empty() && !tokens.is_cpu()) {  // one small upload per generation
    stop_tokens_device_ = at::tensor(stop_tokens, at::TensorOptions().dtype(at::kLong)).to(tokens.device());
  }
}

void TreeWorkspace::root_only(int64_t cur_len) {
  TORCH_CHECK_VALUE(cur_len >= 1 && cur_len <= sequence_.size(1), "TreeWorkspace.root_only: cur_len must be in [1, ",
                    sequence_.size(1), "], got ", cur_len);
  root_position_ = cur_len - 1;
  root_alpha_ = at::Tensor();
  tree_kind_ = TreeKind::kRoot;
  tree_nodes_ = 1;
}

ForwardInputs TreeWorkspace::start(int64_t cur_len, int64_t draft_done, const FixedLayout* layout) {
  TORCH_CHECK(mask.defined(), "TreeWorkspace.start: the workspace was made without a draft");
  const int64_t rows = cur_len - draft_done;  // pending committed tokens + the root
  TORCH_CHECK_VALUE(rows >= 1 && draft_done >= 0, "TreeWorkspace.start: need 0 <= draft_done < cur_len, got ",
                    draft_done, " and ", cur_len);
  tokens.narrow(1, 0, 1).copy_(sequence_.narrow(1, cur_len - 1, 1));
  root_position_ = cur_len - 1;
  root_alpha_ = at::Tensor();
  level_masses_.clear();
  prefix_node_row_ = at::Tensor();
  tree_kind_ = TreeKind::kSlots;
  tree_nodes_ = 1;
  if (layout != nullptr) {
    if (!layout_parents_.defined() || !layout_parents_.is_same(layout->parents)) {
      parents.select(0, 0).narrow(0, 0, layout->parents.size(0)).copy_(layout->parents);
      layout_parents_ = layout->parents;
    }
    layout_ = *layout;
  } else {
    layout_.reset();
  }
  rows_used = 0;
  slots_are_rows_ = true;
  rows_ready_ = 0;

  // move the tree block to the new base: clear the old one, write the root row and the padding row (a
  // fixed layout: all the step's rows)
  const int64_t cache_len = draft_len;
  const int64_t base = cache_len + rows - 1;
  // the old block's columns become past (zeros): only the rows written last step hold anything, and the
  // padding row
  if (rows_written_ > 0) block_.narrow(1, 0, rows_written_).zero_();
  block_.narrow(1, capacity_, 1).zero_();
  block_ = mask.select(0, 0).narrow(2, base, capacity_);
  if (layout != nullptr) {
    const int64_t size = layout->draft_block.size(1);
    block_.narrow(1, 0, size).narrow(2, 0, size).copy_(layout->draft_block);
    rows_written_ = size;
  } else {
    block_.index_copy_(1, edge_rows_, edge_values_);
    rows_ready_ = 1;
    rows_written_ = 1;
  }
  at::Tensor root_mask;
  const int64_t chain_rows = chain_block_.size(0);
  if (rows == 1) {
    root_mask = mask.as_strided({1, 1, 1, base + 1}, mask.strides(), mask.storage_offset());
  } else if (rows <= chain_rows) {  // a causal chain over the pending tokens, in its own buffer
    const at::Tensor chain_rows_view = chain_.select(0, 0).select(0, 0);
    chain_rows_view.narrow(1, chain_base_, chain_rows).zero_();
    chain_rows_view.narrow(1, cache_len, chain_rows).copy_(chain_block_);
    chain_base_ = cache_len;
    root_mask = chain_.narrow(2, 0, rows).narrow(3, 0, cache_len + rows);
  } else {  // more pending tokens than any tree is deep (after a long stop): a fresh causal mask
    root_mask = at::full({rows, cache_len + rows}, blocked_value(mask.scalar_type()), mask.options())
                    .triu_(cache_len + 1)
                    .unsqueeze(0)
                    .unsqueeze(0);
  }
  draft_base = base;
  draft_len = cache_len + rows;
  rows_used = 1;
  return {sequence_.narrow(1, draft_done, rows), positions_.narrow(1, draft_done, rows), root_mask};
}

ForwardInputs TreeWorkspace::draft_inputs(int64_t slot_start, int64_t count, int64_t node_depth) {
  // views made with as_strided: mask rows [rows_used, rows_used + count), columns [0, base + rows_used + count);
  // every node at sequence index root + depth
  const at::Tensor mask_rows =
      mask.as_strided({1, 1, count, draft_base + rows_used + count}, mask.strides(),
                      mask.storage_offset() + rows_used * mask.stride(2));
  const at::Tensor node_positions =
      positions_.as_strided({1, count}, {0, 0}, positions_.storage_offset() + root_position_ + node_depth);
  return {tokens.narrow(1, slot_start, count), node_positions, mask_rows};
}

ForwardInputs TreeWorkspace::feed(int64_t slot_start, int64_t count, int64_t node_depth) {
  TORCH_CHECK_VALUE(count >= 1 && slot_start >= 1 && slot_start + count <= capacity_ && rows_used + count <= capacity_,
                    "TreeWorkspace: cannot feed slots [", slot_start, ", ", slot_start + count, ") after ", rows_used,
                    " rows (capacity ", capacity_, ")");
  const int64_t first = rows_used;
  const int64_t last = first + count;
  // mask rows: a fixed layout's are all written by start(); sage_level wrote the rows of the slots it expanded
  // while slots were rows
  if (!layout_.has_value() && !(slots_are_rows_ && slot_start == first && last <= rows_ready_)) {
    const bool slot_is_row = slots_are_rows_ && slot_start == first;  // slot == row for every fed node so far
    if (!slot_is_row) {
      if (slots_are_rows_) {  // the first feed where slots and rows part: the map of the rows fed so far
        slots_are_rows_ = false;
        node_row_.copy_(row_table_.select(0, first));
      }
      node_row_.narrow(1, slot_start, count).copy_(arange_.narrow(0, first, count).unsqueeze(0));
    }
    op<"sage_ext::tree_mask_feed_", TreeMaskFeedSig>().call(
        block_, parents, slot_is_row ? std::nullopt : std::optional<at::Tensor>(node_row_), slot_start, first, count);
    rows_written_ = std::max(rows_written_, last);
  }
  ForwardInputs inputs = draft_inputs(slot_start, count, node_depth);
  rows_used = last;
  draft_len += count;
  return inputs;
}

std::tuple<int64_t, at::Tensor, int64_t, std::optional<ForwardInputs>> TreeWorkspace::sage_level(
    const at::Tensor& logits, const std::optional<at::Tensor>& alpha, int64_t frontier_start, int64_t frontier_count,
    int64_t level, int64_t slot_start, int64_t num_slots, int64_t k, double temperature, double d_min, double d_max,
    double w_min, double w_max, double theta_scale, int64_t used, int64_t n_max, int64_t known_count,
    int64_t known_max_depth, const LevelStops* level_stops) {
  check_draft_logits(logits, frontier_count, "sage_level");
  TORCH_CHECK_VALUE(level_stops == nullptr || (known_count < 0 && known_max_depth < 0),
                    "sage_level: level_stops need the level's count read (known_count and known_max_depth < 0)");
  tree_written();
  std::optional<at::Tensor> rows_mask;
  if (mask.defined() && slots_are_rows_ && !layout_.has_value() && slot_start <= rows_ready_) {
    rows_mask = block_;  // the new slots' rows come with the expansion
    rows_ready_ = slot_start + num_slots;
    rows_written_ = std::max(rows_written_, rows_ready_);
  }
  auto [count_t, alpha_t, max_depth_t] = op<"sage_ext::sage_level_", SageLevelSig>().call(
      tokens, parents, logprobs, cum_logprobs, rows_mask, frontier_rows(logits, frontier_count), alpha, frontier_start,
      level, slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale);
  at::Tensor frontier_alpha;  // returned for the root level only
  if (level == 1) {
    frontier_alpha = alpha_t;
    root_alpha_ = alpha_t.select(1, 0);
  }
  if (num_slots > 0) depth_.narrow(1, slot_start, num_slots).fill_(level);
  // counts the host does not know are read (free on the CPU, a sync elsewhere: SagePolicy reads them only
  // with static_shapes=False, the default on the CPU); both in one copy, so one sync per level, not two.
  // With both read (dynamic shapes) two more values ride along in the same copy (on the CPU: a loop over the
  // level's nodes): the level's draft probability mass (float64 bits), for level_stops and for level_masses (what
  // cost-aware policies learn from: nothing about the tree is read again after the step), and, with stop tokens,
  // how many of its nodes are stop tokens (a level of stop tokens only, a chain that reached EOS, ends the tree).
  int64_t count = known_count, max_depth = known_max_depth, stops = 0;
  const bool dynamic = known_count < 0 && known_max_depth < 0;
  double mass = 0.0;
  if (dynamic && !count_t.is_cpu()) {
    int64_t counts[2];
    std::tie(mass, stops) =
        device_level_mass(slot_start, num_slots, {count_t.reshape({1}), max_depth_t.reshape({1})}, counts);
    count = counts[0];
    max_depth = counts[1];
  } else {
    if (known_count < 0) count = host_int(count_t);
    if (known_max_depth < 0) max_depth = host_int(max_depth_t);
    // a dynamic level's real nodes are its first `count` slots
    if (dynamic) std::tie(mass, stops) = host_level_mass(slot_start, count);
  }
  if (dynamic && count > 0) level_masses_.push_back(mass);
  std::optional<ForwardInputs> next;
  if (count > 0 && stops < count && level < max_depth && used + count < n_max &&
      (level_stops == nullptr || level_stops->pays(level, mass, count))) {
    next = feed(slot_start, count, level);
  }
  return {count, frontier_alpha, max_depth, next};
}

std::pair<double, int64_t> TreeWorkspace::host_level_mass(int64_t slot_start, int64_t count) const {
  const float* cum = cum_logprobs.const_data_ptr<float>() + slot_start;
  const int64_t* new_tokens = tokens.const_data_ptr<int64_t>() + slot_start;
  double mass = 0.0;
  int64_t stops = 0;
  for (int64_t i = 0; i < count; ++i) {
    mass += std::exp(static_cast<double>(cum[i]));
    stops += std::find(stop_tokens_.begin(), stop_tokens_.end(), new_tokens[i]) != stop_tokens_.end();
  }
  return {mass, stops};
}

std::pair<double, int64_t> TreeWorkspace::device_level_mass(int64_t slot_start, int64_t count,
                                                           const std::vector<at::Tensor>& leading,
                                                           int64_t* leading_values) const {
  const at::Tensor real = parents.narrow(1, slot_start, count).ge(0);
  const at::Tensor probabilities = cum_logprobs.narrow(1, slot_start, count).to(at::kDouble).exp();
  std::vector<at::Tensor> parts(leading);
  parts.push_back(at::where(real, probabilities, 0.0).sum().reshape({1}).view(at::kLong));  // float64 bits
  if (stop_tokens_device_.defined()) {
    const at::Tensor is_stop = at::isin(tokens.narrow(1, slot_start, count), stop_tokens_device_);
    parts.push_back(at::logical_and(real, is_stop).sum().reshape({1}));
  }
  const at::Tensor read = at::cat(parts).cpu();  // the one sync
  const int64_t* values = read.const_data_ptr<int64_t>();
  const size_t first = leading.size();
  std::copy_n(values, first, leading_values);
  double mass;
  std::memcpy(&mass, values + first, sizeof mass);
  return {mass, stop_tokens_device_.defined() ? values[first + 1] : 0};
}

std::tuple<at::Tensor, std::optional<ForwardInputs>> TreeWorkspace::static_level(
    const at::Tensor& logits, int64_t frontier_count, const at::Tensor& child_index, int64_t start, int64_t k,
    double temperature, bool want_alpha, int64_t next_start, int64_t next_count, int64_t next_depth, bool cumulative,
    bool dynamic, const LevelStops* level_stops) {
  check_draft_logits(logits, frontier_count, "static_level");
  TORCH_CHECK_VALUE(cumulative || !dynamic, "static_level: dynamic needs cumulative (the level's mass is summed from it)");
  TORCH_CHECK_VALUE(dynamic || level_stops == nullptr, "static_level: level_stops need dynamic (the mass read)");
  TORCH_CHECK_VALUE(!cumulative || layout_.has_value(),
                    "static_level: cumulative log-probs need a fixed layout (its parents, copied by start)");
  const at::Tensor frontier_alpha = op<"sage_ext::gather_level_", GatherLevelSig>().call(
      tokens, logprobs, frontier_rows(logits, frontier_count), child_index, start, k, temperature);
  at::Tensor alpha;
  if (want_alpha) {
    alpha = frontier_alpha.select(0, 0);
    if (start == 1) root_alpha_ = frontier_alpha.select(1, 0);  // the frontier is the root
  }
  const int64_t count = child_index.size(0);
  if (cumulative) {  // each slot's parent is an earlier slot, its cumulative log-prob already kept (the root's 0)
    if (tokens.is_cpu()) {
      const int64_t* parent = parents.const_data_ptr<int64_t>();
      const float* own = logprobs.const_data_ptr<float>();
      float* cum = cum_logprobs.mutable_data_ptr<float>();
      for (int64_t slot = start; slot < start + count; ++slot) cum[slot] = cum[parent[slot]] + own[slot];
    } else {
      const at::Tensor level_parents = parents.select(0, 0).narrow(0, start, count);
      cum_logprobs.narrow(1, start, count)
          .copy_(cum_logprobs.index_select(1, level_parents).add_(logprobs.narrow(1, start, count)));
    }
  }
  if (dynamic) {
    const auto [mass, stops] =
        tokens.is_cpu() ? host_level_mass(start, count) : device_level_mass(start, count, {}, nullptr);
    level_masses_.push_back(mass);
    // (a feed's depth is that of the slots it feeds: this level's)
    if (stops == count || (level_stops != nullptr && next_count > 0 && !level_stops->pays(next_depth, mass, count))) {
      next_count = 0;
    }
  }
  std::optional<ForwardInputs> next;
  if (next_count > 0) next = feed(next_start, next_count, next_depth);
  return {alpha, next};
}

std::tuple<at::Tensor, std::optional<ForwardInputs>> TreeWorkspace::topk_expand(
    const at::Tensor& logits, int64_t frontier_count, int64_t frontier_start, int64_t k, double temperature,
    int64_t slot_start, int64_t num_slots, bool want_alpha, int64_t next_start, int64_t next_count,
    int64_t next_depth) {
  check_draft_logits(logits, frontier_count, "topk_expand");
  tree_written();
  auto [count, frontier_alpha] = op<"sage_ext::expand_level_", ExpandLevelSig>().call(
      tokens, parents, logprobs, cum_logprobs, frontier_rows(logits, frontier_count), frontier_start, k, temperature,
      slot_start, num_slots);
  at::Tensor alpha;
  if (want_alpha) {
    alpha = frontier_alpha.select(0, 0);
    if (frontier_start == 0) root_alpha_ = frontier_alpha.select(1, 0);
  }
  std::optional<ForwardInputs> next;
  if (next_count > 0) next = feed(next_start, next_count, next_depth);
  return {alpha, next};
}

void TreeWorkspace::use_slots(int64_t num_nodes) {
  TORCH_CHECK_VALUE(tree_kind_ == TreeKind::kSlots, "TreeWorkspace.use_slots: call start() first");
  TORCH_CHECK_VALUE(num_nodes >= 1 && num_nodes <= capacity_, "TreeWorkspace.use_slots: num_nodes must be in [1, ",
                    capacity_, "], got ", num_nodes);
  tree_nodes_ = num_nodes;
  if (!layout_.has_value()) return;
  const int64_t layout_nodes = layout_->parents.size(0);
  TORCH_CHECK_VALUE(num_nodes <= layout_nodes, "TreeWorkspace.use_slots: the fixed layout has ", layout_nodes,
                    " nodes, fewer than ", num_nodes);
  if (num_nodes < layout_nodes) {
    // a prefix of the layout (a fixed tree stopped early; its slots are in level order, so it holds every kept
    // node's parent): the draft fed only its first rows_used rows, the slots of the rows after those were not fed
    prefix_node_row_ = at::where(layout_->node_row.lt(rows_used), layout_->node_row, -1);
  }
}

void TreeWorkspace::rerank(int64_t num_slots, int64_t num_select) {
  TORCH_CHECK_VALUE(tree_kind_ == TreeKind::kSlots, "TreeWorkspace.rerank: call start() first");
  TORCH_CHECK_VALUE(num_slots >= 1 && num_slots <= capacity_ && num_select >= 1 && num_select <= num_slots,
                    "TreeWorkspace.rerank: need 1 <= num_select <= num_slots <= capacity (", capacity_, "), got ",
                    num_select, " and ", num_slots);
  std::tie(selected_tokens_, selected_parents_, selected_logprobs_, selected_rows_) =
      op<"sage_ext::rerank_select", RerankSelectSig>().call(
          tokens.narrow(1, 0, num_slots), parents.narrow(1, 0, num_slots), logprobs.narrow(1, 0, num_slots),
          cum_logprobs.narrow(1, 0, num_slots), node_row(), num_select);
  tree_kind_ = TreeKind::kSelected;
  tree_nodes_ = num_select;
}

// ---- the step's tree --------------------------------------------------------------------------------
at::Tensor TreeWorkspace::tree_tokens() const {
  switch (tree_kind_) {
    case TreeKind::kRoot:
      return sequence_.narrow(1, root_position_, 1);
    case TreeKind::kSlots:
      return tokens.narrow(1, 0, tree_nodes_);
    default:
      return selected_tokens_;
  }
}

at::Tensor TreeWorkspace::tree_parents() const {
  return tree_kind_ == TreeKind::kSelected ? selected_parents_ : parents.narrow(1, 0, tree_nodes_);
}

at::Tensor TreeWorkspace::tree_logprobs() const {
  switch (tree_kind_) {
    case TreeKind::kRoot:
      return at::Tensor();
    case TreeKind::kSlots:
      return logprobs.narrow(1, 0, tree_nodes_);
    default:
      return selected_logprobs_;
  }
}

at::Tensor TreeWorkspace::tree_node_row() const {
  // none without a draft, and none for the root alone: the draft ran no forward this step (its cache and draft_len
  // stay as the last drafted step left them; the tokens committed meanwhile are fed with the next step's root)
  if (!mask.defined() || tree_kind_ == TreeKind::kRoot) return at::Tensor();
  return tree_kind_ == TreeKind::kSelected ? selected_rows_ : node_row();
}

// ---- target side ------------------------------------------------------------------------------------
ForwardInputs TreeWorkspace::target_inputs(int64_t target_len) {
  const int64_t nodes = tree_nodes_;
  const at::Tensor tree = tree_tokens();
  const at::Tensor target_rows = target_mask_.select(0, 0).select(0, 0);
  auto clear_target_block = [&]() {
    if (target_block_size_ > 0) {
      target_rows.narrow(0, 0, target_block_size_).narrow(1, target_block_at_, target_block_size_).zero_();
      target_block_size_ = 0;
    }
  };
  if (nodes == 1) {  // the root alone: a row of zeros (the past and itself)
    clear_target_block();
    return {tree, positions_.narrow(1, target_len, 1),
            target_mask_.as_strided({1, 1, 1, target_len + 1}, target_mask_.strides(), target_mask_.storage_offset())};
  }
  if (tree_kind_ == TreeKind::kSlots && layout_.has_value()) {  // its precomputed [N, N] block after zeros
    // (the block's first N rows and columns: a tree that is a prefix of its layout)
    const int64_t size = nodes;
    if (target_mask_.size(2) < size) {  // once per generation
      target_mask_ = at::zeros({1, 1, size, target_mask_.size(3)}, target_mask_.options());
      target_block_size_ = 0;
    }
    clear_target_block();
    target_mask_.select(0, 0).select(0, 0).narrow(0, 0, size).narrow(1, target_len, size).copy_(
        layout_->target_block.narrow(0, 0, size).narrow(1, 0, size));
    target_block_at_ = target_len;
    target_block_size_ = size;
    return {tree, at::add(layout_->depth.narrow(1, 0, size), target_len),
            target_mask_.as_strided({1, 1, size, target_len + size}, target_mask_.strides(),
                                    target_mask_.storage_offset())};
  }
  // a tree built in place this step (slots 0 .. N-1, their draft mask rows all written by sage_level): with no
  // draft-side pruning the draft's past is the target's, so its mask is the target's
  if (tree_kind_ == TreeKind::kSlots && mask.defined() && slots_are_rows_ && nodes <= rows_ready_ &&
      draft_base == target_len && mask.scalar_type() == target_dtype_ && mask.device() == target_mask_.device()) {
    return {tree, at::add(depth_.narrow(1, 0, nodes), target_len),
            mask.as_strided({1, 1, nodes, target_len + nodes}, mask.strides(), mask.storage_offset())};
  }
  const auto buffers = op<"sage_ext::tree_buffers", TreeBuffersSig>().call(tree_parents(), target_len, target_dtype_);
  return {tree, std::get<1>(buffers), std::get<6>(buffers)};
}

CommitResult TreeWorkspace::commit(const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& accepted,
                                   const std::optional<at::Tensor>& accept_len, const std::optional<at::Tensor>& bonus,
                                   int64_t cur_len, const CacheGroups& target_caches, int64_t target_len,
                                   const CacheGroups& draft_caches) {
  const at::Tensor readback =
      commit_async(target, accepted, accept_len, bonus, cur_len, target_caches, target_len, draft_caches);
  return read_commit(readback.is_cpu() ? readback : readback.to(at::kCPU));  // the step's one sync
}

at::Tensor TreeWorkspace::commit_async(const std::optional<at::Tensor>& target,
                                       const std::optional<at::Tensor>& accepted,
                                       const std::optional<at::Tensor>& accept_len,
                                       const std::optional<at::Tensor>& bonus, int64_t cur_len,
                                       const CacheGroups& target_caches, int64_t target_len,
                                       const CacheGroups& draft_caches) {
  const at::Tensor tree_tokens_now = tree_tokens();
  const at::Tensor tree_parents_now = tree_parents();
  at::Tensor path, path_len, bonus_token;
  if (accepted.has_value()) {
    TORCH_CHECK_VALUE(accept_len.has_value() && bonus.has_value(),
                      "TreeWorkspace.commit: pass accepted, accept_len and bonus together");
    path = *accepted;
    path_len = *accept_len;
    bonus_token = *bonus;
  } else {
    TORCH_CHECK_VALUE(target.has_value(), "TreeWorkspace.commit: pass the target logits or the verification outputs");
    std::tie(path, path_len, bonus_token) =
        op<"sage_ext::verify_greedy", VerifyGreedySig>().call(tree_tokens_now, tree_parents_now, *target);
  }
  const at::Tensor draft_rows = tree_node_row();
  const bool root_alone = tree_nodes_ == 1;  // its cache rows are where they belong already
  // group 0 (the layers on the tree's device) goes through commit_tree_; any other group through kv_compact_ below
  const bool target_here = !root_alone && !target_caches.empty();
  const bool draft_here = !root_alone && draft_rows.defined() && !draft_caches.empty();
  const std::vector<at::Tensor> none;
  const at::Tensor readback = op<"sage_ext::commit_tree_", CommitTreeSig>().call(
      tree_tokens_now, tree_parents_now, path, path_len, bonus_token, sequence_, cur_len,
      target_here ? target_caches[0] : none, target_len, draft_here ? draft_caches[0] : none,
      draft_rows.defined() ? std::optional<at::Tensor>(draft_rows) : std::nullopt, draft_base,
      root_alpha_.defined() ? std::optional<at::Tensor>(root_alpha_) : std::nullopt);
  if (!root_alone) {  // groups on other devices (device_map): the same compaction, the path copied there
    for (size_t g = 1; g < target_caches.size(); ++g) {
      if (target_caches[g].empty()) continue;
      op<"sage_ext::kv_compact_", KvCompactSig>().call(target_caches[g], path.to(target_caches[g][0].device()),
                                                       target_len);
    }
    if (draft_rows.defined()) {
      at::Tensor held_rows;  // the draft row of each accepted node (-1 past the prefix the draft holds)
      for (size_t g = 1; g < draft_caches.size(); ++g) {
        if (draft_caches[g].empty()) continue;
        if (!held_rows.defined()) {
          // a -1 in the path picks node_row's last entry, which is -1
          held_rows = at::index(draft_rows, c10::List<std::optional<at::Tensor>>({std::nullopt, path.select(0, 0)}));
        }
        op<"sage_ext::kv_compact_", KvCompactSig>().call(draft_caches[g], held_rows.to(draft_caches[g][0].device()),
                                                         draft_base);
      }
    }
  }
  pending_accepted_ = path;
  return readback;
}

CommitResult TreeWorkspace::read_commit(const at::Tensor& host) {
  TORCH_CHECK_VALUE(pending_accepted_.defined(), "TreeWorkspace.read_commit: no commit_async to read");
  TORCH_CHECK_VALUE(host.is_cpu() && host.scalar_type() == at::kLong && host.is_contiguous() && host.numel() >= 5,
                    "TreeWorkspace.read_commit: the readback must be a contiguous CPU int64 tensor (commit_async's "
                    "row read to the host), got ", host.sizes());
  // the row (docs/OPS.md, commit_tree_): accept_len, draft-held nodes, real nodes, alpha's float32 bits as a
  // sign-extended int32, then the new tokens and -1 after them
  const int64_t* values = host.const_data_ptr<int64_t>();
  CommitResult result;
  result.accept_len = values[0];
  result.draft_held = values[1];
  result.real_nodes = values[2];
  if (root_alpha_.defined()) {
    const auto bits = static_cast<uint32_t>(static_cast<int32_t>(values[3]));
    float value;
    std::memcpy(&value, &bits, sizeof value);
    result.alpha = value;
  }
  TORCH_CHECK_VALUE(result.accept_len >= 0 && 5 + result.accept_len <= host.numel(),
                    "TreeWorkspace.read_commit: not a readback row of this workspace's commit");
  result.tokens.assign(values + 4, values + 5 + result.accept_len);
  result.accepted = pending_accepted_;
  pending_accepted_ = at::Tensor();
  // the draft keeps the rows of the accepted nodes it holds (a prefix of the path, compacted to the root row on)
  if (tree_node_row().defined()) draft_len = std::min(draft_len, draft_base + result.draft_held);
  return result;
}

}  // namespace sage_ext::session
