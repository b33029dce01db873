// TreeWorkspace (tree_workspace.h): the tensor work between two model forwards, one native call per gap.
// The sage_ext ops are called through the dispatcher (their CPU or CUDA kernel runs, as from Python,
// minus the Python argument parsing), the glue (views, copies, fills) through ATen.
#include "tree_workspace.h"

#include "../core/tree.h"
#include "../cpu/step_cpu.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

namespace sage_ext::session {
namespace {

// ---- the sage_ext ops, resolved once (signatures of their registered kernels) ----------------------
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TopkSig = TensorTriple(const at::Tensor&, int64_t, double);
using SageLevelSig = TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, double, double, double, double, double,
                                  double);
using TreeBuffersSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor>(const at::Tensor&, int64_t, c10::ScalarType);
using VerifyGreedySig = TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using ExpandSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, int64_t);
using RerankSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t);
using CommitSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, int64_t, at::TensorList, int64_t, at::TensorList,
                             const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&);

// op<"sage_ext::name", Sig>(): the operator's typed handle, looked up once per operator.
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

// The op path's top-k of the last `frontier_count` rows of draft logits [1, T, V].
std::tuple<at::Tensor, at::Tensor, at::Tensor> frontier_topk(const at::Tensor& logits, int64_t frontier_count,
                                                             int64_t k, double temperature) {
  const at::Tensor rows = logits.narrow(1, logits.size(1) - frontier_count, frontier_count).select(0, 0);
  return op<"sage_ext::topk_confidence", TopkSig>().call(rows, k, temperature);
}

void check_draft_logits(const at::Tensor& logits, int64_t frontier_count, const char* what) {
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(0) == 1 && frontier_count >= 1 && logits.size(1) >= frontier_count,
                    "TreeWorkspace.", what, ": logits must be [1, T, V] with T >= frontier_count (", frontier_count,
                    "), got shape ", logits.sizes());
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

}  // namespace

TreeWorkspace::TreeWorkspace(int64_t capacity, int64_t max_cache_len, int64_t chain_rows, const at::Tensor& sequence,
                             std::optional<c10::ScalarType> draft_dtype, c10::ScalarType target_dtype,
                             const std::optional<at::Tensor>& row_table, bool direct_cpu)
    : capacity_(capacity), direct_cpu_(direct_cpu), sequence_(sequence), target_dtype_(target_dtype) {
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
  self_columns_ = at::full({capacity, capacity}, blocked, mask_options).fill_diagonal_(0);
  chain_ = at::zeros({1, 1, chain_rows, aligned_width(max_cache_len + chain_rows)}, mask_options);
  chain_block_ = at::full({chain_rows, chain_rows}, blocked, mask_options).triu_(1);
}

bool TreeWorkspace::direct(const at::Tensor& logits) const {
  return direct_cpu_ && tokens.is_cpu() && logits.is_cpu() && (logits.size(2) <= 1 || logits.stride(2) == 1);
}

at::Tensor TreeWorkspace::node_row() const {
  if (fixed_node_row_.defined()) return fixed_node_row_;
  return slots_are_rows_ ? row_table_.select(0, rows_used) : node_row_;
}

void TreeWorkspace::tree_written() { layout_parents_ = at::Tensor(); }

// ---- draft side -------------------------------------------------------------------------------------
void TreeWorkspace::start_generation(int64_t draft_cache_len) {
  TORCH_CHECK_VALUE(draft_cache_len >= 0, "TreeWorkspace.start_generation: draft_cache_len must be >= 0, got ",
                    draft_cache_len);
  draft_len = draft_cache_len;
  draft_base = 0;
  rows_used = 0;
}

ForwardInputs TreeWorkspace::start(int64_t cur_len, int64_t draft_done, const std::optional<at::Tensor>& layout_parents,
                                   const std::optional<at::Tensor>& layout_node_row,
                                   const std::optional<at::Tensor>& layout_draft_block) {
  TORCH_CHECK(mask.defined(), "TreeWorkspace.start: the workspace was made without a draft");
  const int64_t rows = cur_len - draft_done;  // pending committed tokens + the root
  TORCH_CHECK_VALUE(rows >= 1 && draft_done >= 0, "TreeWorkspace.start: need 0 <= draft_done < cur_len, got ",
                    draft_done, " and ", cur_len);
  tokens.narrow(1, 0, 1).copy_(sequence_.narrow(1, cur_len - 1, 1));
  root_position_ = cur_len - 1;
  const bool fixed = layout_parents.has_value();
  if (fixed) {
    TORCH_CHECK_VALUE(layout_node_row.has_value() && layout_draft_block.has_value(),
                      "TreeWorkspace.start: a fixed layout needs its parents, node_row and draft block");
    if (!layout_parents_.defined() || !layout_parents_.is_same(*layout_parents)) {
      parents.select(0, 0).narrow(0, 0, layout_parents->size(0)).copy_(*layout_parents);
      layout_parents_ = *layout_parents;
    }
    fixed_node_row_ = *layout_node_row;
  } else {
    fixed_node_row_ = at::Tensor();
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
  if (fixed) {
    const int64_t size = layout_draft_block->size(1);
    block_.narrow(1, 0, size).narrow(2, 0, size).copy_(*layout_draft_block);
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

namespace {

// CPU path of write_feed_rows: draft row first + j = the row of slot (slot_start + j)'s parent (the padding
// row when the parent is padding or was not fed) with its own column opened.
template <typename T>
void feed_rows(T* block, int64_t row_stride, int64_t width, const int64_t* parents, const int64_t* node_row,
               int64_t slot_start, int64_t first, int64_t count, int64_t padding_row) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = first + j;
    const int64_t parent = parents[slot_start + j];
    int64_t parent_row = parent < 0 ? padding_row : (node_row != nullptr ? node_row[parent] : parent);
    if (parent_row < 0) parent_row = padding_row;
    // the tree-mask row rule; the padding row is a real (all-blocked) row of the block, so there is always a
    // parent row to copy
    core::tree_mask_row(block + parent_row * row_stride, row, T(0.0f), std::numeric_limits<T>::lowest(),
                        block + row * row_stride, width);
  }
}

}  // namespace

void TreeWorkspace::write_feed_rows(int64_t slot_start, int64_t count) {
  const int64_t first = rows_used;
  const bool slot_is_row = slots_are_rows_ && slot_start == first;  // slot == row for every fed node so far
  if (!slot_is_row && slots_are_rows_) {  // the first feed where slots and rows part: write the map once
    slots_are_rows_ = false;
    node_row_.copy_(row_table_.select(0, first));
  }
  const at::Tensor map = node_row_.select(0, 0);
  const at::Tensor block = block_.select(0, 0);
  if (direct_cpu_ && block.is_cpu()) {
    int64_t* rows = map.data_ptr<int64_t>();
    if (!slot_is_row) std::iota(rows + slot_start, rows + slot_start + count, first);
    const int64_t* parent_slots = parents.const_data_ptr<int64_t>();
    const int64_t* row_of = slot_is_row ? nullptr : rows;
    switch (block.scalar_type()) {
      case c10::kFloat:
        feed_rows(block.data_ptr<float>(), block.stride(0), capacity_, parent_slots, row_of, slot_start, first, count,
                  capacity_);
        break;
      case c10::kHalf:
        feed_rows(block.data_ptr<c10::Half>(), block.stride(0), capacity_, parent_slots, row_of, slot_start, first,
                  count, capacity_);
        break;
      default:
        feed_rows(block.data_ptr<c10::BFloat16>(), block.stride(0), capacity_, parent_slots, row_of, slot_start,
                  first, count, capacity_);
        break;
    }
  } else {
    const at::Tensor slot_parents = parents.select(0, 0).narrow(0, slot_start, count);
    at::Tensor parent_rows = slot_parents;
    if (!slot_is_row) {
      map.narrow(0, slot_start, count).copy_(arange_.narrow(0, first, count));
      parent_rows = at::index(map, c10::List<std::optional<at::Tensor>>({slot_parents}));
    }
    // core::tree_mask_row as tensor ops: a row = its parent's row (a parent of -1, padding, picks the
    // all-blocked last row) with its own column opened: max(parent row, [blocked except 0 on the diagonal])
    at::Tensor rows = block.narrow(0, first, count);
    at::maximum_out(rows, at::index(block, c10::List<std::optional<at::Tensor>>({parent_rows})),
                    self_columns_.narrow(0, first, count));
  }
  rows_written_ = std::max(rows_written_, first + count);
}

ForwardInputs TreeWorkspace::feed(int64_t slot_start, int64_t count, int64_t node_depth) {
  TORCH_CHECK(mask.defined(), "TreeWorkspace.feed: the workspace was made without a draft");
  const int64_t first = rows_used, last = rows_used + count;
  TORCH_CHECK_VALUE(count >= 1 && slot_start >= 1 && slot_start + count <= capacity_ && last <= capacity_,
                    "TreeWorkspace.feed: slots [", slot_start, ", ", slot_start + count, ") after ", first,
                    " fed rows exceed the draft tree's capacity (", capacity_, ")");
  // a fixed layout's rows were all written by start(); sage_level wrote the rows of the slots it expanded
  // while slots were rows
  if (!fixed_node_row_.defined() && !(slots_are_rows_ && slot_start == first && last <= rows_ready_)) {
    write_feed_rows(slot_start, count);
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
    int64_t known_max_depth) {
  check_draft_logits(logits, frontier_count, "sage_level");
  const int64_t first_row = logits.size(1) - frontier_count;
  tree_written();
  std::optional<at::Tensor> rows_mask;
  if (mask.defined() && slots_are_rows_ && !fixed_node_row_.defined() && slot_start <= rows_ready_) {
    rows_mask = block_;  // the new slots' rows come with the expansion
    rows_ready_ = slot_start + num_slots;
    rows_written_ = std::max(rows_written_, rows_ready_);
  }
  at::Tensor frontier_alpha;  // returned for the root level only
  int64_t count = 0, max_depth = 0;
  if (direct(logits)) {
    float* alpha_out = alpha_output(level == 1, frontier_count, frontier_alpha, {1, frontier_count});
    cpu::sage_level_into(tokens, parents, logprobs, cum_logprobs, rows_mask, logits, first_row, frontier_count, alpha,
                         frontier_start, level, slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max,
                         theta_scale, &count, alpha_out, &max_depth);
    std::fill_n(depth_.data_ptr<int64_t>() + slot_start, num_slots, level);
  } else {
    auto [count_t, alpha_t, max_depth_t] = op<"sage_ext::sage_level_", SageLevelSig>().call(
        tokens, parents, logprobs, cum_logprobs, rows_mask, logits.narrow(1, first_row, frontier_count), alpha,
        frontier_start, level, slot_start, num_slots, k, temperature, d_min, d_max, w_min, w_max, theta_scale);
    if (level == 1) frontier_alpha = alpha_t;
    if (num_slots > 0) depth_.narrow(1, slot_start, num_slots).fill_(level);
    // counts the host does not know are read (free on the CPU, a sync elsewhere: SagePolicy reads them only
    // with static_shapes=False, the default on the CPU); both in one copy, so one sync per level, not two
    if (known_count < 0 && known_max_depth < 0) {
      const at::Tensor both = at::cat({count_t.reshape({1}), max_depth_t.reshape({1}).to(count_t.dtype())}).cpu();
      count = both[0].item<int64_t>();
      max_depth = both[1].item<int64_t>();
    } else if (known_count < 0) {
      count = count_t.item<int64_t>();
    } else if (known_max_depth < 0) {
      max_depth = max_depth_t.item<int64_t>();
    }
  }
  if (known_count >= 0) count = known_count;  // static shapes: the level's slots, padding included
  if (known_max_depth >= 0) max_depth = known_max_depth;
  std::optional<ForwardInputs> next;
  if (count > 0 && level < max_depth && used + count < n_max) next = feed(slot_start, count, level);
  return {count, frontier_alpha, max_depth, next};
}

std::tuple<at::Tensor, std::optional<ForwardInputs>> TreeWorkspace::static_level(
    const at::Tensor& logits, int64_t frontier_count, const at::Tensor& child_index, int64_t start, int64_t k,
    double temperature, bool want_alpha, int64_t next_start, int64_t next_count, int64_t next_depth) {
  check_draft_logits(logits, frontier_count, "static_level");
  const int64_t first_row = logits.size(1) - frontier_count;
  at::Tensor alpha;
  if (direct(logits) && child_index.is_cpu() && child_index.is_contiguous()) {
    float* alpha_out = alpha_output(want_alpha, frontier_count, alpha, {frontier_count});
    cpu::topk_gather_into(tokens, logprobs, logits, first_row, frontier_count, k, temperature, child_index, start,
                          alpha_out);
  } else {
    auto [alpha_t, topk_logprobs, topk_ids] = frontier_topk(logits, frontier_count, k, temperature);
    const int64_t children = child_index.size(0);
    at::Tensor child_tokens = tokens.select(0, 0).narrow(0, start, children);
    at::Tensor child_logprobs = logprobs.select(0, 0).narrow(0, start, children);
    at::index_select_out(child_tokens, topk_ids.reshape({-1}), 0, child_index);
    at::index_select_out(child_logprobs, topk_logprobs.reshape({-1}), 0, child_index);
    if (want_alpha) alpha = alpha_t;
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
  TORCH_CHECK_VALUE(frontier_start >= 0 && frontier_start + frontier_count <= slot_start && slot_start >= 1 &&
                        num_slots >= 0 && slot_start + num_slots <= capacity_,
                    "TreeWorkspace.topk_expand: the frontier [", frontier_start, ", ", frontier_start + frontier_count,
                    ") must precede the slots [", slot_start, ", ", slot_start + num_slots, ") within the capacity (",
                    capacity_, ")");
  const int64_t first_row = logits.size(1) - frontier_count;
  tree_written();
  at::Tensor alpha;
  if (direct(logits)) {
    float* alpha_out = alpha_output(want_alpha, frontier_count, alpha, {frontier_count});
    cpu::topk_expand_into(tokens, parents, logprobs, cum_logprobs, logits, first_row, frontier_count, frontier_start,
                          k, temperature, slot_start, num_slots, alpha_out);
  } else {
    auto [alpha_t, topk_logprobs, topk_ids] = frontier_topk(logits, frontier_count, k, temperature);
    const at::Tensor frontier =
        at::arange(frontier_start, frontier_start + frontier_count, tokens.options()).unsqueeze(0);
    const at::Tensor widths = at::full({1, frontier_count}, k, tokens.options());
    const at::Tensor no_threshold = at::full({1}, -std::numeric_limits<double>::infinity(), logprobs.options());
    op<"sage_ext::expand_tree", ExpandSig>().call(tokens, parents, logprobs, cum_logprobs, frontier,
                                                  topk_logprobs.unsqueeze(0), topk_ids.unsqueeze(0), widths,
                                                  no_threshold, slot_start, num_slots);
    if (want_alpha) alpha = alpha_t;
  }
  std::optional<ForwardInputs> next;
  if (next_count > 0) next = feed(next_start, next_count, next_depth);
  return {alpha, next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> TreeWorkspace::rerank(int64_t num_slots,
                                                                                  int64_t num_select) {
  TORCH_CHECK_VALUE(num_slots >= 1 && num_slots <= capacity_ && num_select >= 1 && num_select <= num_slots,
                    "TreeWorkspace.rerank: need 1 <= num_select <= num_slots <= capacity (", capacity_, "), got ",
                    num_select, " and ", num_slots);
  if (direct_cpu_ && tokens.is_cpu()) {  // core's rerank and the gathers as loops: four small outputs, no dispatch
    at::Tensor kept_tokens = at::empty({1, num_select}, tokens.options());
    at::Tensor kept_parents = at::empty({1, num_select}, tokens.options());
    at::Tensor kept_logprobs = at::empty({1, num_select}, logprobs.options());
    at::Tensor kept_rows = at::empty({1, num_select + 1}, tokens.options());
    thread_local std::vector<int64_t> keep;
    keep.resize(num_select);
    core::rerank_tree_row(parents.const_data_ptr<int64_t>(), cum_logprobs.const_data_ptr<float>(), num_slots,
                          num_select, keep.data(), kept_parents.data_ptr<int64_t>());
    const int64_t* slot_rows = node_row().const_data_ptr<int64_t>();
    for (int64_t j = 0; j < num_select; ++j) {
      const int64_t slot = keep[j] >= 0 ? keep[j] : capacity_ - 1;  // padding (-1): the last slot, as indexing
      kept_tokens.data_ptr<int64_t>()[j] = tokens.const_data_ptr<int64_t>()[slot];
      kept_logprobs.data_ptr<float>()[j] = logprobs.const_data_ptr<float>()[slot];
      kept_rows.data_ptr<int64_t>()[j] = keep[j] >= 0 ? slot_rows[slot] : -1;
    }
    kept_rows.data_ptr<int64_t>()[num_select] = -1;
    return {kept_tokens, kept_parents, kept_logprobs, kept_rows};
  }
  auto [keep, new_parents] = op<"sage_ext::rerank_tree", RerankSig>().call(
      parents.narrow(1, 0, num_slots), cum_logprobs.narrow(1, 0, num_slots), num_select);
  // keep is -1 padded: a -1 picks the last slot's token (padding is never accepted) and node_row's -1 entry
  const c10::List<std::optional<at::Tensor>> columns({std::nullopt, keep.select(0, 0)});
  const at::Tensor rows = node_row();
  return {at::index(tokens, columns), new_parents, at::index(logprobs, columns),
          at::cat({at::index(rows, columns), rows.narrow(1, capacity_, 1)}, 1)};
}

float* TreeWorkspace::alpha_output(bool wanted, int64_t count, at::Tensor& alpha, at::IntArrayRef shape) {
  if (wanted) {
    alpha = at::empty(shape, logprobs.options());
    return alpha.data_ptr<float>();
  }
  alpha_scratch_.resize(std::max<int64_t>(count, 1));
  return alpha_scratch_.data();
}

// ---- target side ------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> TreeWorkspace::target_inputs(const at::Tensor& tree_parents, int64_t target_len,
                                                                const std::optional<at::Tensor>& layout_depth,
                                                                const std::optional<at::Tensor>& layout_target_block) {
  const int64_t nodes = tree_parents.size(1);
  const at::Tensor target_rows = target_mask_.select(0, 0).select(0, 0);
  auto clear_target_block = [&]() {
    if (target_block_size_ > 0) {
      target_rows.narrow(0, 0, target_block_size_).narrow(1, target_block_at_, target_block_size_).zero_();
      target_block_size_ = 0;
    }
  };
  if (nodes == 1) {  // the root alone: a row of zeros (the past and itself)
    clear_target_block();
    return {positions_.narrow(1, target_len, 1),
            target_mask_.as_strided({1, 1, 1, target_len + 1}, target_mask_.strides(), target_mask_.storage_offset())};
  }
  if (layout_depth.has_value()) {  // a fixed layout: its precomputed [N, N] block after zeros for the past
    TORCH_CHECK_VALUE(layout_target_block.has_value(),
                      "TreeWorkspace.target_inputs: a fixed layout needs its target block");
    const int64_t size = layout_target_block->size(0);
    if (target_mask_.size(2) < size) {  // once per generation
      target_mask_ = at::zeros({1, 1, size, target_mask_.size(3)}, target_mask_.options());
      target_block_size_ = 0;
      return target_inputs(tree_parents, target_len, layout_depth, layout_target_block);
    }
    clear_target_block();
    target_rows.narrow(0, 0, size).narrow(1, target_len, size).copy_(*layout_target_block);
    target_block_at_ = target_len;
    target_block_size_ = size;
    return {at::add(*layout_depth, target_len),
            target_mask_.as_strided({1, 1, size, target_len + size}, target_mask_.strides(),
                                    target_mask_.storage_offset())};
  }
  // a tree built in place this step (slots 0 .. N-1 are the tree, their draft mask rows all written by
  // sage_level): with no draft-side pruning the draft's past is the target's, so its mask is the target's
  const bool in_place = tree_parents.is_alias_of(parents) && tree_parents.storage_offset() == parents.storage_offset();
  if (in_place && mask.defined() && slots_are_rows_ && !fixed_node_row_.defined() && nodes <= rows_ready_ &&
      draft_base == target_len && mask.scalar_type() == target_dtype_ && mask.device() == target_mask_.device()) {
    return {at::add(depth_.narrow(1, 0, nodes), target_len),
            mask.as_strided({1, 1, nodes, target_len + nodes}, mask.strides(), mask.storage_offset())};
  }
  const auto buffers = op<"sage_ext::tree_buffers", TreeBuffersSig>().call(tree_parents, target_len, target_dtype_);
  return {std::get<1>(buffers), std::get<6>(buffers)};
}

CommitResult TreeWorkspace::commit(
    const at::Tensor& tree_tokens, const at::Tensor& tree_parents, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& accepted, const std::optional<at::Tensor>& accept_len,
    const std::optional<at::Tensor>& bonus, int64_t cur_len, const std::vector<at::Tensor>& target_caches,
    int64_t target_len, const std::vector<at::Tensor>& draft_caches, const std::optional<at::Tensor>& draft_rows,
    const std::optional<at::Tensor>& alpha) {
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
        op<"sage_ext::verify_greedy", VerifyGreedySig>().call(tree_tokens, tree_parents, *target);
  }
  const at::Tensor readback =
      op<"sage_ext::commit_tree_", CommitSig>().call(tree_tokens, tree_parents, path, path_len, bonus_token,
                                                     sequence_, cur_len, target_caches, target_len, draft_caches,
                                                     draft_rows, draft_base, alpha);
  const at::Tensor host = readback.is_cpu() ? readback : readback.to(at::kCPU);  // the step's one sync
  // the row (docs/OPS.md, commit_tree_): accept_len, draft-held nodes, real nodes, alpha's float32 bits as a
  // sign-extended int32, then the new tokens and -1 after them
  const int64_t* values = host.const_data_ptr<int64_t>();
  CommitResult result;
  result.accept_len = values[0];
  result.draft_held = values[1];
  result.real_nodes = values[2];
  if (alpha.has_value()) {
    const auto bits = static_cast<uint32_t>(static_cast<int32_t>(values[3]));
    float value;
    std::memcpy(&value, &bits, sizeof value);
    result.alpha = value;
  }
  result.tokens.assign(values + 4, values + 5 + result.accept_len);
  result.accepted = path;
  // the draft keeps the rows of the accepted nodes it holds (a prefix of the path, compacted to the root row on)
  if (draft_rows.has_value()) draft_len = std::min(draft_len, draft_base + result.draft_held);
  return result;
}

}  // namespace sage_ext::session
