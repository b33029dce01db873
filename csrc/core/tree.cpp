// Implementations of the tree algorithms declared in tree.h (see there and docs/OPS.md).
#include "tree.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <sstream>

#include "formulas.h"

namespace sage_ext::core {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::string format_path(const std::vector<int64_t>& path) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < path.size(); ++i) out << (i ? ", " : "") << path[i];
  out << "]";
  return out.str();
}

}  // namespace

Status validate_parents(const int64_t* parents, int64_t num_nodes, const char* arg_name) {
  if (num_nodes < 1) return Status::Error(std::string(arg_name) + " must hold at least the root node");
  if (parents[0] != -1) {
    return Status::Error(std::string(arg_name) + "[0] (the root) must be -1, got " + std::to_string(parents[0]));
  }
  for (int64_t i = 1; i < num_nodes; ++i) {
    const int64_t p = parents[i];
    if (p == -1) continue;  // padding slot
    if (p < -1 || p >= i) {
      return Status::Error(std::string(arg_name) + "[" + std::to_string(i) + "] = " + std::to_string(p) +
                           " is not topological: a parent must be -1 (padding) or an earlier node in [0, " +
                           std::to_string(i) + ")");
    }
    if (!is_real_node(parents, p)) {
      return Status::Error(std::string(arg_name) + "[" + std::to_string(i) + "] = " + std::to_string(p) +
                           " points at a padding node (padding nodes have no children)");
    }
  }
  return Status::Ok();
}

Status build_static_tree(const int64_t* paths, int64_t num_paths, int64_t path_len, StaticTree* out) {
  struct Row {
    std::vector<int64_t> ranks;
    int64_t row;
  };
  std::vector<Row> rows(num_paths);
  for (int64_t r = 0; r < num_paths; ++r) {
    const int64_t* entries = paths + r * path_len;
    int64_t len = 0;
    while (len < path_len && entries[len] != -1) ++len;
    if (len == 0) return Status::Error("paths row " + std::to_string(r) + " is empty (a path needs at least one rank)");
    for (int64_t j = 0; j < path_len; ++j) {
      const int64_t v = entries[j];
      if (j >= len && v != -1) {
        return Status::Error("paths row " + std::to_string(r) + " has rank " + std::to_string(v) +
                             " after -1 padding (padding must be at the end)");
      }
      if (j < len && (v < 0 || v >= kMaxTopK)) {
        return Status::Error("paths row " + std::to_string(r) + " has rank " + std::to_string(v) +
                             " outside [0, " + std::to_string(kMaxTopK) + ")");
      }
    }
    rows[r] = Row{std::vector<int64_t>(entries, entries + len), r};
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    if (a.ranks.size() != b.ranks.size()) return a.ranks.size() < b.ranks.size();
    return a.ranks < b.ranks;
  });

  std::map<std::vector<int64_t>, int64_t> node_of_path;  // rank path -> node index
  out->parents.assign(num_paths + 1, -1);
  out->ranks.assign(num_paths + 1, -1);
  out->depth.assign(num_paths + 1, 0);
  for (int64_t n = 0; n < num_paths; ++n) {
    const Row& row = rows[n];
    const int64_t node = n + 1;
    if (!node_of_path.emplace(row.ranks, node).second) {
      return Status::Error("paths row " + std::to_string(row.row) + " " + format_path(row.ranks) +
                           " is a duplicate");
    }
    int64_t parent = 0;
    if (row.ranks.size() > 1) {
      const std::vector<int64_t> prefix(row.ranks.begin(), row.ranks.end() - 1);
      auto it = node_of_path.find(prefix);  // shorter paths were inserted first
      if (it == node_of_path.end()) {
        return Status::Error("paths must be ancestor-closed: row " + std::to_string(row.row) + " " +
                             format_path(row.ranks) + " lacks its prefix " + format_path(prefix));
      }
      parent = it->second;
    }
    out->parents[node] = parent;
    out->ranks[node] = row.ranks.back();
    out->depth[node] = static_cast<int64_t>(row.ranks.size());
  }
  return Status::Ok();
}

void sage_tree_row(float alpha, const float* frontier_logprobs, int64_t num_frontier, const SageParams& params,
                   int64_t* widths, float* min_cum_logprob, int64_t* max_depth) {
  const float depth = sage_depth(alpha, params.d_min, params.d_max);
  const float width = sage_width(alpha, params.w_min, params.w_max);
  *max_depth = round_half_up(depth);
  *min_cum_logprob = sage_min_cum_logprob(depth, params.level, params.theta_scale);
  const bool beyond_depth = params.level > *max_depth;
  for (int64_t f = 0; f < num_frontier; ++f) {
    const float lp = frontier_logprobs[f];
    const bool empty_slot = !(lp > kNegInf);  // -inf (or NaN) marks an empty frontier slot
    widths[f] = (beyond_depth || empty_slot) ? 0 : sage_level_width(width, lp, params.level, params.k);
  }
}

Status validate_frontier(const int64_t* frontier, int64_t num_frontier, int64_t slot_start) {
  for (int64_t f = 0; f < num_frontier; ++f) {
    if (frontier[f] < -1 || frontier[f] >= slot_start) {
      return Status::Error("frontier[" + std::to_string(f) + "] = " + std::to_string(frontier[f]) +
                           " must be -1 or a node before slot_start (" + std::to_string(slot_start) + ")");
    }
  }
  return Status::Ok();
}

int64_t expand_tree_row(const TreeRow& tree, const FrontierRow& proposals, int64_t slot_start, int64_t num_slots) {
  struct Candidate {
    float cum;
    int32_t f;
    int32_t r;
  };
  std::vector<Candidate> candidates;
  candidates.reserve(static_cast<size_t>(proposals.num_frontier * proposals.top_k));
  for (int64_t f = 0; f < proposals.num_frontier; ++f) {
    const int64_t node = proposals.frontier[f];
    if (node < 0) continue;
    const float base = tree.cum_logprobs[node];
    const int64_t width = clamp_i64(proposals.widths[f], 0, proposals.top_k);
    const float* child_logprobs = proposals.topk_logprobs + f * proposals.top_k;
    for (int64_t r = 0; r < width; ++r) {
      const float cum = base + child_logprobs[r];
      if (cum > proposals.min_cum_logprob && cum > kNegInf) {
        candidates.push_back({cum, static_cast<int32_t>(f), static_cast<int32_t>(r)});
      }
    }
  }
  const int64_t count = std::min<int64_t>(static_cast<int64_t>(candidates.size()), num_slots);
  std::partial_sort(candidates.begin(), candidates.begin() + count, candidates.end(),
                    [](const Candidate& a, const Candidate& b) {
                      if (a.cum != b.cum) return a.cum > b.cum;
                      if (a.f != b.f) return a.f < b.f;
                      return a.r < b.r;
                    });
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t slot = slot_start + s;
    if (s < count) {
      const Candidate& c = candidates[s];
      const int64_t index = static_cast<int64_t>(c.f) * proposals.top_k + c.r;
      tree.tokens[slot] = proposals.topk_ids[index];
      tree.parents[slot] = proposals.frontier[c.f];
      tree.logprobs[slot] = proposals.topk_logprobs[index];
      tree.cum_logprobs[slot] = c.cum;
    } else {
      tree.tokens[slot] = 0;
      tree.parents[slot] = -1;
      tree.logprobs[slot] = kNegInf;
      tree.cum_logprobs[slot] = kNegInf;
    }
  }
  return count;
}

void rerank_tree_row(const int64_t* parents, const float* cum_logprobs, int64_t num_nodes, int64_t num_select,
                     int64_t* keep, int64_t* new_parents) {
  std::vector<float> score(num_nodes, kNegInf);
  std::vector<int64_t> real_nodes;
  real_nodes.reserve(num_nodes);
  score[0] = std::numeric_limits<float>::infinity();
  for (int64_t i = 1; i < num_nodes; ++i) {
    if (!is_real_node(parents, i)) continue;
    const float own = std::isnan(cum_logprobs[i]) ? kNegInf : cum_logprobs[i];
    score[i] = std::min(own, score[parents[i]]);
    real_nodes.push_back(i);
  }
  const int64_t chosen = std::min<int64_t>(num_select - 1, static_cast<int64_t>(real_nodes.size()));
  std::partial_sort(real_nodes.begin(), real_nodes.begin() + chosen, real_nodes.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  std::vector<int64_t> selected{0};
  selected.insert(selected.end(), real_nodes.begin(), real_nodes.begin() + chosen);
  std::sort(selected.begin(), selected.end());

  std::vector<int64_t> position(num_nodes, -1);
  for (size_t j = 0; j < selected.size(); ++j) position[selected[j]] = static_cast<int64_t>(j);
  for (int64_t j = 0; j < num_select; ++j) {
    if (j < static_cast<int64_t>(selected.size())) {
      const int64_t node = selected[j];
      keep[j] = node;
      new_parents[j] = node == 0 ? -1 : position[parents[node]];
    } else {
      keep[j] = -1;
      new_parents[j] = -1;
    }
  }
}

void tree_links_row(const int64_t* parents, int64_t num_nodes, int64_t* depth, int64_t* first_child,
                    int64_t* next_sibling, bool* is_leaf) {
  for (int64_t i = 0; i < num_nodes; ++i) {
    depth[i] = (i > 0 && is_real_node(parents, i)) ? depth[parents[i]] + 1 : 0;
    first_child[i] = -1;
    next_sibling[i] = -1;
  }
  // Walking down the indices makes each parent's list start at its smallest child.
  for (int64_t i = num_nodes - 1; i >= 1; --i) {
    if (!is_real_node(parents, i)) continue;
    next_sibling[i] = first_child[parents[i]];
    first_child[parents[i]] = i;
  }
  for (int64_t i = 0; i < num_nodes; ++i) is_leaf[i] = is_real_node(parents, i) && first_child[i] == -1;
}

void tree_paths_row(const int64_t* parents, const int64_t* depth, int64_t num_nodes, int64_t* paths) {
  for (int64_t i = 0; i < num_nodes; ++i) {
    int64_t* row = paths + i * num_nodes;
    std::fill(row, row + num_nodes, -1);
    if (!is_real_node(parents, i)) continue;
    for (int64_t node = i, pos = depth[i]; node >= 0; node = parents[node], --pos) row[pos] = node;
  }
}

void ancestor_bits_row(const int64_t* parents, int64_t num_nodes, uint64_t* bits) {
  const int64_t words = ancestor_words(num_nodes);
  for (int64_t i = 0; i < num_nodes; ++i) {
    uint64_t* row = bits + i * words;
    if (i > 0 && is_real_node(parents, i)) {
      std::copy(bits + parents[i] * words, bits + (parents[i] + 1) * words, row);
    } else {
      std::fill(row, row + words, uint64_t{0});
    }
    row[i >> 6] |= uint64_t{1} << (i & 63);
  }
}

void packed_mask_row(const uint64_t* bits, int64_t num_nodes, uint8_t* packed) {
  const int64_t words = ancestor_words(num_nodes);
  const int64_t bytes = (num_nodes + 7) / 8;
  for (int64_t i = 0; i < num_nodes; ++i) {
    const uint64_t* row_bits = bits + i * words;
    uint8_t* row = packed + i * bytes;
    for (int64_t b = 0; b < bytes; ++b) row[b] = static_cast<uint8_t>(row_bits[b >> 3] >> ((b & 7) * 8));
  }
}

}  // namespace sage_ext::core
