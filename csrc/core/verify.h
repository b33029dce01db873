// Tree verification of docs/OPS.md, one batch row at a time, torch-free and header-only:
// verify_greedy (walk the children whose token equals the target's argmax) and verify_sampling
// (lossless tree rejection sampling, with or without draft probabilities). Both write
// accepted[N] = [0, i1, ..., ia, -1, ...] and return the accepted draft length a and the bonus token.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"
#include "tree.h"

namespace sage_ext::core {

struct VerifyResult {
  int64_t accept_len;  // accepted draft tokens (tau)
  int64_t bonus;       // the target's token after the last accepted node
};

// Index of the largest value, ties -> lowest index. NaN counts as larger than any number (first NaN
// wins), matching torch.argmax.
template <typename T>
int64_t argmax_row(const T* values, int64_t count) {
  int64_t best = 0;
  float best_value = static_cast<float>(values[0]);
  if (std::isnan(best_value)) return 0;
  for (int64_t i = 1; i < count; ++i) {
    const float v = static_cast<float>(values[i]);
    if (std::isnan(v)) return i;
    if (v > best_value) {
      best_value = v;
      best = i;
    }
  }
  return best;
}

// Children lists of a (validated) tree: children of u in increasing index are
// first_child[u], next_sibling[first_child[u]], ...
struct ChildLinks {
  std::vector<int64_t> first_child, next_sibling;
  ChildLinks(const int64_t* parents, int64_t num_nodes) : first_child(num_nodes, -1), next_sibling(num_nodes, -1) {
    for (int64_t i = num_nodes - 1; i >= 1; --i) {
      const int64_t p = parents[i];
      if (p < 0) continue;
      next_sibling[i] = first_child[p];
      first_child[p] = i;
    }
  }
};

// argmax_of(u) -> the target's argmax after node u; called only for nodes on the accepted path.
template <typename ArgmaxFn>
VerifyResult verify_greedy_row(const int64_t* tokens, const int64_t* parents, int64_t num_nodes, ArgmaxFn&& argmax_of,
                               int64_t* accepted) {
  const ChildLinks links(parents, num_nodes);
  std::fill(accepted, accepted + num_nodes, int64_t{-1});
  accepted[0] = 0;
  int64_t length = 0;
  int64_t node = 0;
  int64_t target_token = argmax_of(node);
  for (;;) {
    int64_t next = -1;
    for (int64_t c = links.first_child[node]; c != -1; c = links.next_sibling[c]) {
      if (tokens[c] == target_token) {
        next = c;
        break;
      }
    }
    if (next < 0) break;
    node = next;
    accepted[++length] = node;
    target_token = argmax_of(node);
  }
  return VerifyResult{length, target_token};
}

// Every real non-root node's token must index the vocabulary (sampling reads p[token]).
inline Status validate_tokens(const int64_t* tokens, const int64_t* parents, int64_t num_nodes, int64_t vocab) {
  for (int64_t i = 1; i < num_nodes; ++i) {
    if (parents[i] >= 0 && (tokens[i] < 0 || tokens[i] >= vocab)) {
      return Status::Error("tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  return Status::Ok();
}

namespace verify_detail {

// residual <- row (as float); returns its sum.
template <typename T>
float load_row(const T* row, int64_t vocab, std::vector<float>& residual) {
  double sum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    residual[v] = static_cast<float>(row[v]);
    sum += residual[v];
  }
  return static_cast<float>(sum);
}

// Smallest x with cumsum(p)[x] > u * mass; the last positive entry if rounding leaves none.
inline int64_t sample_from(const std::vector<float>& p, int64_t vocab, float mass, float uniform) {
  const double threshold = static_cast<double>(uniform) * mass;
  double cumulative = 0.0;
  int64_t last_positive = 0;
  for (int64_t x = 0; x < vocab; ++x) {
    cumulative += p[x];
    if (p[x] > 0.0f) last_positive = x;
    if (cumulative > threshold) return x;
  }
  return last_positive;
}

}  // namespace verify_detail

// target_probs [N, V] (row u: the target's distribution after node u, any positive scale);
// draft_probs [N, V] or nullptr (deterministic top-k draft, q = 1); uniforms [N] in [0, 1):
// uniforms[c] decides child c, uniforms[0] the bonus draw. `residual` is scratch (resized to V).
template <typename T>
VerifyResult verify_sampling_row(const int64_t* tokens, const int64_t* parents, int64_t num_nodes,
                                 const T* target_probs, const T* draft_probs, int64_t vocab, const float* uniforms,
                                 int64_t* accepted, std::vector<float>& residual) {
  const ChildLinks links(parents, num_nodes);
  residual.resize(static_cast<size_t>(vocab));
  std::fill(accepted, accepted + num_nodes, int64_t{-1});
  accepted[0] = 0;
  int64_t length = 0;
  int64_t node = 0;
  for (;;) {
    const T* target_row = target_probs + node * vocab;
    const T* draft_row = draft_probs ? draft_probs + node * vocab : nullptr;
    float mass = verify_detail::load_row(target_row, vocab, residual);
    int64_t next = -1;
    for (int64_t c = links.first_child[node]; c != -1; c = links.next_sibling[c]) {
      const int64_t x = tokens[c];
      if (draft_row == nullptr) {
        if (uniforms[c] < residual[x] / mass) {
          next = c;
          break;
        }
        mass -= residual[x];
        residual[x] = 0.0f;
      } else {
        const float q_x = static_cast<float>(draft_row[x]);
        if (q_x == 0.0f || uniforms[c] < std::min(1.0f, (residual[x] / mass) / q_x)) {
          next = c;
          break;
        }
        double sum = 0.0;
        for (int64_t v = 0; v < vocab; ++v) {
          residual[v] = std::max(0.0f, residual[v] / mass - static_cast<float>(draft_row[v]));
          sum += residual[v];
        }
        mass = static_cast<float>(sum);
      }
    }
    if (next < 0) {
      if (!(mass > 0.0f)) mass = verify_detail::load_row(target_row, vocab, residual);
      return VerifyResult{length, verify_detail::sample_from(residual, vocab, mass, uniforms[0])};
    }
    node = next;
    accepted[++length] = node;
  }
}

}  // namespace sage_ext::core
