// Tree verification of docs/OPS.md, one batch row at a time, torch-free and header-only:
// verify_greedy (walk the children whose token equals the target's argmax) and verify_sampling
// (lossless tree rejection sampling, with or without draft probabilities). Both write
// accepted[N] = [0, i1, ..., ia, -1, ...] and return the accepted draft length a and the bonus token.
// The vocabulary-wide loops (argmax, probability sums, the residual update, the bonus draw) run W
// float lanes at a time (core/simd.h); the element type T is as in core/topk_confidence.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "simd.h"
#include "status.h"
#include "tree.h"

namespace sage_ext::core {

struct VerifyResult {
  int64_t accept_len;  // accepted draft tokens (tau)
  int64_t bonus;       // the target's token after the last accepted node
};

// Index of the largest value, ties -> lowest index. NaN counts as larger than any number (first NaN
// wins), matching torch.argmax. Blocks are reduced W lanes at a time; a block is searched token by
// token only when it holds a NaN or a new maximum.
template <int W = simd::kPortableWidth, typename T>
SAGE_EXT_SIMD_INLINE int64_t argmax_row(const T* values, int64_t count) {
  constexpr int64_t kBlock = 64 * W;
  int64_t best = 0;
  float best_value = -std::numeric_limits<float>::infinity();
  for (int64_t start = 0; start < count; start += kBlock) {
    const int64_t n = std::min(kBlock, count - start);
    // Two running maxes, so that consecutive compares do not wait on each other.
    simd::Floats<W> max_even = simd::splat<W>(best_value), max_odd = max_even;
    simd::Ints<W> is_nan = simd::splat_int<W>(0);
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const simd::Floats<W> even = simd::load<W>(values + start + i);
      const simd::Floats<W> odd = simd::load<W>(values + start + i + W);
      is_nan |= (even != even) | (odd != odd);
      max_even = simd::max<W>(max_even, even);
      max_odd = simd::max<W>(max_odd, odd);
    }
    float new_max = simd::reduce_max<W>(simd::max<W>(max_even, max_odd));
    bool any_nan = simd::any<W>(is_nan);
    for (; i < n; ++i) {
      const float v = simd::load_scalar(values + start + i);
      any_nan |= std::isnan(v);
      new_max = std::max(new_max, v);
    }
    if (any_nan) {
      for (int64_t x = start;; ++x) {
        if (std::isnan(simd::load_scalar(values + x))) return x;
      }
    }
    if (new_max > best_value) {
      best = start;
      while (simd::load_scalar(values + best) != new_max) ++best;
      best_value = new_max;
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

// out = max(0, p / mass - q) lane by lane (p may be out itself); returns sum(out) in double.
template <int W, typename P, typename Q>
SAGE_EXT_SIMD_INLINE double subtract_draft(const P* p, const Q* q, float mass, float* out, int64_t vocab) {
  const simd::Floats<W> masses = simd::splat<W>(mass);
  const simd::Floats<W> zero = simd::splat<W>(0.0f);
  simd::Doubles<W> low{}, high{};
  int64_t v = 0;
  for (; v + W <= vocab; v += W) {
    const simd::Floats<W> r = simd::load<W>(p + v) / masses - simd::load<W>(q + v);
    const simd::Floats<W> relu = simd::select<W>(zero < r, r, zero);
    simd::store<W>(out + v, relu);
    simd::add_as_doubles<W>(low, high, relu);
  }
  double sum = simd::reduce_sum<W>(low + high);
  for (; v < vocab; ++v) {
    out[v] = std::max(0.0f, simd::load_scalar(p + v) / mass - simd::load_scalar(q + v));
    sum += out[v];
  }
  return sum;
}

// Smallest x with cumsum(p)[x] > threshold (float64 accumulation), reading p[x] as 0 for the tokens
// in `zeroed` (sorted, no duplicates); the last positive entry if rounding leaves none. Whole blocks are summed W
// lanes at a time; only the block where the sum crosses the threshold (or one holding a zeroed
// token) is walked token by token.
template <int W, typename T>
SAGE_EXT_SIMD_INLINE int64_t inverse_cdf(const T* p, int64_t vocab, const std::vector<int64_t>& zeroed,
                                         double threshold) {
  constexpr int64_t kBlock = 64 * W;
  double cumulative = 0.0;
  size_t next_zeroed = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t end = std::min(vocab, start + kBlock);
    if (next_zeroed == zeroed.size() || zeroed[next_zeroed] >= end) {
      const double block = simd::sum<W>(p + start, end - start);
      if (!(cumulative + block > threshold)) {
        cumulative += block;
        continue;
      }
    }
    for (int64_t x = start; x < end; ++x) {
      if (next_zeroed < zeroed.size() && zeroed[next_zeroed] == x) {
        ++next_zeroed;
        continue;
      }
      cumulative += simd::load_scalar(p + x);
      if (cumulative > threshold) return x;
    }
  }
  for (int64_t x = vocab - 1; x > 0; --x) {
    if (simd::load_scalar(p + x) > 0.0f && !std::binary_search(zeroed.begin(), zeroed.end(), x)) return x;
  }
  return 0;
}

}  // namespace verify_detail

// target_probs [N, V] (row u: the target's distribution after node u, any positive scale);
// draft_probs [N, V] or nullptr (deterministic top-k draft, q = 1); uniforms [N] in [0, 1):
// uniforms[c] decides child c, uniforms[0] the bonus draw. `residual` is scratch.
//
// The residual p of a node is never copied while it equals the target row up to a few zeroed
// tokens (q = 1, and the q rule before its first rejection); the q rule writes relu(p / m - q)
// into `residual`.
template <int W = simd::kPortableWidth, typename T>
SAGE_EXT_SIMD_INLINE VerifyResult verify_sampling_row(const int64_t* tokens, const int64_t* parents,
                                                      int64_t num_nodes, const T* target_probs, const T* draft_probs,
                                                      int64_t vocab, const float* uniforms, int64_t* accepted,
                                                      std::vector<float>& residual) {
  const ChildLinks links(parents, num_nodes);
  std::fill(accepted, accepted + num_nodes, int64_t{-1});
  accepted[0] = 0;
  int64_t length = 0;
  int64_t node = 0;
  std::vector<int64_t> zeroed;  // q = 1: the rejected tokens, whose residual is 0
  for (;;) {
    const T* target_row = target_probs + node * vocab;
    const T* draft_row = draft_probs ? draft_probs + node * vocab : nullptr;
    float mass = static_cast<float>(simd::sum<W>(target_row, vocab));
    bool in_buffer = false;  // the residual is `residual`, not target_row minus `zeroed`
    zeroed.clear();
    auto residual_at = [&](int64_t x) {
      if (in_buffer) return residual[x];
      return std::find(zeroed.begin(), zeroed.end(), x) != zeroed.end() ? 0.0f : simd::load_scalar(target_row + x);
    };
    int64_t next = -1;
    for (int64_t c = links.first_child[node]; c != -1; c = links.next_sibling[c]) {
      const int64_t x = tokens[c];
      const float p_x = residual_at(x);
      if (draft_row == nullptr) {
        if (uniforms[c] < p_x / mass) {
          next = c;
          break;
        }
        mass -= p_x;
        zeroed.push_back(x);
      } else {
        const float q_x = simd::load_scalar(draft_row + x);
        if (q_x == 0.0f || uniforms[c] < std::min(1.0f, (p_x / mass) / q_x)) {
          next = c;
          break;
        }
        residual.resize(static_cast<size_t>(vocab));
        const double sum = in_buffer ? verify_detail::subtract_draft<W>(residual.data(), draft_row, mass,
                                                                        residual.data(), vocab)
                                     : verify_detail::subtract_draft<W>(target_row, draft_row, mass,
                                                                        residual.data(), vocab);
        in_buffer = true;
        mass = static_cast<float>(sum);
      }
    }
    if (next < 0) {
      if (!(mass > 0.0f)) {  // the residual vanished numerically: draw from the target row itself
        in_buffer = false;
        zeroed.clear();
        mass = static_cast<float>(simd::sum<W>(target_row, vocab));
      }
      const double threshold = static_cast<double>(uniforms[0]) * mass;
      std::sort(zeroed.begin(), zeroed.end());
      zeroed.erase(std::unique(zeroed.begin(), zeroed.end()), zeroed.end());  // children may share a token
      const int64_t bonus = in_buffer ? verify_detail::inverse_cdf<W>(residual.data(), vocab, zeroed, threshold)
                                      : verify_detail::inverse_cdf<W>(target_row, vocab, zeroed, threshold);
      return VerifyResult{length, bonus};
    }
    node = next;
    accepted[++length] = node;
  }
}

}  // namespace sage_ext::core
