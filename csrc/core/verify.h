// Tree verification of docs/OPS.md, one batch row at a time, torch-free and header-only:
// verify_greedy (walk the children whose token equals the target's argmax), verify_sampling
// (lossless tree rejection sampling, with or without draft probabilities, root to leaf) and
// verify_traversal (Traversal Verification: lossless sequence-level acceptance, leaf to root). All
// write accepted[N] = [0, i1, ..., ia, -1, ...] and return the accepted draft length a and the bonus token.
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
// in `zeroed` (sorted, no duplicates); the last positive entry if rounding leaves none; -1 when no
// entry is positive (a residual whose mass is float rounding left over: the caller draws from the
// target row instead, see draw_bonus). Whole blocks are summed W lanes at a time; only the block
// where the sum crosses the threshold (or one holding a zeroed token) is walked token by token.
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
  for (int64_t x = vocab - 1; x >= 0; --x) {
    if (simd::load_scalar(p + x) > 0.0f && !std::binary_search(zeroed.begin(), zeroed.end(), x)) return x;
  }
  return -1;
}

// The bonus token: drawn from the residual by `draw` (inverse_cdf over it; -1 when it has no positive
// entry), or from the target row itself when the residual vanished numerically: its mass is not
// positive, or rejecting the children left only float rounding (a child whose exact acceptance
// probability is 1 can be rejected when the running mass rounds above its probability, and the
// leftover mass then sits on zeroed tokens). Either way the token has positive target probability;
// -1 when the target row has no positive entry (NaN, all zero: not a distribution; the engine raises, as
// sampling from it does in transformers).
template <int W, typename T, typename Draw>
SAGE_EXT_SIMD_INLINE int64_t draw_bonus(double mass, const T* target_row, int64_t vocab, float uniform, Draw draw) {
  const int64_t token = mass > 0.0 ? draw(static_cast<double>(uniform) * mass) : -1;
  if (token >= 0) return token;
  const double row_mass = static_cast<float>(simd::sum<W>(target_row, vocab));
  return inverse_cdf<W>(target_row, vocab, {}, static_cast<double>(uniform) * row_mass);
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
      std::sort(zeroed.begin(), zeroed.end());
      zeroed.erase(std::unique(zeroed.begin(), zeroed.end()), zeroed.end());  // children may share a token
      const int64_t bonus = verify_detail::draw_bonus<W>(mass, target_row, vocab, uniforms[0], [&](double threshold) {
        return in_buffer ? verify_detail::inverse_cdf<W>(residual.data(), vocab, zeroed, threshold)
                         : verify_detail::inverse_cdf<W>(target_row, vocab, zeroed, threshold);
      });
      return VerifyResult{length, bonus};
    }
    node = next;
    accepted[++length] = node;
  }
}

// ---- verify_traversal -------------------------------------------------------------------------
// Traversal Verification (Weng et al., NeurIPS 2025), with the draft model of verify_sampling:
// the children of u are drawn independently, each from q_u (draft_probs row u), or each is a fixed
// token x_c (draft_probs == nullptr: a deterministic top-k draft, whose "distribution" for child c
// is the point mass on x_c). The tree is visited in post-order (children in increasing index, a
// child's whole subtree before the next child): a node is decided only once all its children were
// rejected, so the first decision falls on the first leaf and acceptance is decided for the whole
// path root..node at once.
//
// State of a node u while it is open: alpha_u in [0, 1] and the residual r_u (mass m_u, normalized
// p_u = r_u / m_u). The root starts with alpha = 1, every node with r_u = target row u.
//   entering child c (token x):  alpha_c = min(1, alpha_u p_u(x) / q(x))   (q(x) = 0: 1 if alpha_u p_u(x) > 0, else 0)
//   deciding u (its children all rejected): accept iff uniforms[u] < alpha_u (the root always)
//   rejecting child c of u:      r_u <- relu(alpha_u p_u - q),  m_u <- sum(r_u) = R,
//                                alpha_u <- R / (1 - alpha_u + R)
//   accepted u: bonus ~ p_u (the target row if m_u vanished numerically).
// With q given, r_u stays of the form relu(t_u - coef_u q_u): one float coef_u per node instead of
// a vocabulary-sized buffer (relu(alpha relu(t - c q) / m - q) = (alpha / m) relu(t - (c + m / alpha) q)).
// With the point-mass draft, relu(alpha p - delta_x) = alpha p with p(x) zeroed: r_u is t_u with
// the tokens of the rejected children zeroed, R = alpha (m - r(x)) / m.
//
// Why it is lossless (sketch). Claim, by induction over the subtree of u: for an open node u with
// state (alpha, p), "visit u" (its remaining children's subtrees in turn, then u itself) accepts a
// path whose next emitted token is x, followed by a continuation s, with probability
// alpha p(x) P_target(s | path, x), and rejects u with probability 1 - alpha. A leaf: accept with
// alpha, bonus ~ p. A child c drawn from q: by induction it is accepted (with token x and a correct
// continuation) with probability q(x) min(1, alpha p(x) / q(x)) = min(alpha p(x), q(x)), and
// rejected with probability 1 - sum_x min(alpha p(x), q(x)) = 1 - alpha + R. What u must still
// produce after the rejection is alpha p(x) - min(alpha p(x), q(x)) = relu(alpha p(x) - q(x)), which
// is (1 - alpha + R) alpha' p'(x) for the updated state (alpha', p'); the later children are
// independent of this one, so the claim for them (induction on the number of remaining children)
// completes it. The root has alpha = 1: the emitted tokens follow the target exactly. Each
// uniform is read at most once (uniforms[c] decides node c, uniforms[0] draws the bonus).
// On a chain this is Block Verification (Sun et al. 2024), which accepts at least as many tokens
// in expectation as token-by-token rejection sampling; at depth 1 it is verify_sampling exactly.

namespace verify_detail {

// out[v] = max(0, t[v] - coef q[v]) lane by lane (out may be null); returns sum(out) in double.
// NaN counts as 0.
template <int W, typename T>
SAGE_EXT_SIMD_INLINE double clipped_residual(const T* t, const T* q, float coef, float* out, int64_t vocab) {
  const simd::Floats<W> coefs = simd::splat<W>(coef);
  const simd::Floats<W> zero = simd::splat<W>(0.0f);
  simd::Doubles<W> low{}, high{};
  int64_t v = 0;
  for (; v + W <= vocab; v += W) {
    const simd::Floats<W> r = simd::load<W>(t + v) - coefs * simd::load<W>(q + v);
    const simd::Floats<W> relu = simd::select<W>(zero < r, r, zero);
    if (out != nullptr) simd::store<W>(out + v, relu);
    simd::add_as_doubles<W>(low, high, relu);
  }
  double sum = simd::reduce_sum<W>(low + high);
  for (; v < vocab; ++v) {
    const float r = simd::load_scalar(t + v) - coef * simd::load_scalar(q + v);
    const float relu = 0.0f < r ? r : 0.0f;
    if (out != nullptr) out[v] = relu;
    sum += relu;
  }
  return sum;
}

// x clamped to [0, 1], NaN -> 0 (an acceptance probability).
inline float unit_clamp(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

}  // namespace verify_detail

// Per-node scratch of verify_traversal_row (grown on demand, reusable across rows).
struct TraversalScratch {
  std::vector<float> alpha, coef, mass;
  std::vector<unsigned char> mass_known;
  std::vector<int64_t> cursor;   // next child to enter, -1 when all were entered
  std::vector<int64_t> zeroed;   // bonus draw: the rejected children's tokens (no draft_probs)
  std::vector<float> residual;   // bonus draw: relu(t - coef q) (draft_probs)
};

// target_probs [N, V] (row u: the target's distribution after node u, any positive scale);
// draft_probs [N, V] or nullptr (deterministic top-k draft); uniforms [N] in [0, 1): uniforms[c]
// decides node c (read only if the traversal reaches it), uniforms[0] draws the bonus.
template <int W = simd::kPortableWidth, typename T>
SAGE_EXT_SIMD_INLINE VerifyResult verify_traversal_row(const int64_t* tokens, const int64_t* parents,
                                                       int64_t num_nodes, const T* target_probs, const T* draft_probs,
                                                       int64_t vocab, const float* uniforms, int64_t* accepted,
                                                       TraversalScratch& s) {
  const ChildLinks links(parents, num_nodes);
  const size_t n = static_cast<size_t>(num_nodes);
  s.alpha.assign(n, 0.0f);
  s.coef.assign(n, 0.0f);
  s.mass.assign(n, 0.0f);
  s.mass_known.assign(n, 0);
  s.cursor.assign(links.first_child.begin(), links.first_child.end());
  auto target_row = [&](int64_t u) { return target_probs + u * vocab; };
  auto draft_row = [&](int64_t u) { return draft_probs + u * vocab; };
  auto ensure_mass = [&](int64_t u) {
    if (s.mass_known[u]) return;
    s.mass[u] = static_cast<float>(simd::sum<W>(target_row(u), vocab));
    s.mass_known[u] = 1;
  };
  // r_u(x) while the children of u before `child` have been rejected.
  auto residual_at = [&](int64_t u, int64_t x, int64_t child) -> float {
    if (draft_probs != nullptr) {
      const float r = simd::load_scalar(target_row(u) + x) - s.coef[u] * simd::load_scalar(draft_row(u) + x);
      return 0.0f < r ? r : 0.0f;
    }
    for (int64_t c = links.first_child[u]; c != child; c = links.next_sibling[c]) {
      if (tokens[c] == x) return 0.0f;  // an earlier sibling with this token was rejected
    }
    return simd::load_scalar(target_row(u) + x);
  };
  auto child_alpha = [&](int64_t u, int64_t child) -> float {
    const float alpha = s.alpha[u], mass = s.mass[u];
    if (!(alpha > 0.0f) || !(mass > 0.0f)) return 0.0f;  // nothing left to accept below u
    const int64_t x = tokens[child];
    const float weight = alpha * (residual_at(u, x, child) / mass);
    if (draft_probs == nullptr) return verify_detail::unit_clamp(weight);
    const float q_x = simd::load_scalar(draft_row(u) + x);
    if (q_x == 0.0f) return weight > 0.0f ? 1.0f : 0.0f;
    return verify_detail::unit_clamp(weight / q_x);
  };
  auto reject_child = [&](int64_t u, int64_t child) {
    const float alpha = s.alpha[u], mass = s.mass[u];
    if (!(alpha > 0.0f) || !(mass > 0.0f)) return;  // r_u is already 0 where it matters
    float new_mass;
    if (draft_probs != nullptr) {
      s.coef[u] = s.coef[u] + mass / alpha;
      new_mass = static_cast<float>(
          verify_detail::clipped_residual<W>(target_row(u), draft_row(u), s.coef[u], nullptr, vocab));
    } else {
      new_mass = std::max(0.0f, mass - residual_at(u, tokens[child], child));
    }
    const float kept = alpha * (new_mass / mass);  // R = sum relu(alpha p - q)
    const float denominator = (1.0f - alpha) + kept;
    s.alpha[u] = denominator > 0.0f ? kept / denominator : (alpha >= 1.0f ? 1.0f : 0.0f);
    s.mass[u] = new_mass;
  };

  s.alpha[0] = 1.0f;
  int64_t node = 0;
  for (;;) {
    const int64_t child = s.cursor[node];
    if (child != -1) {
      s.cursor[node] = links.next_sibling[child];
      ensure_mass(node);
      s.alpha[child] = child_alpha(node, child);
      node = child;
      continue;
    }
    if (node == 0 || uniforms[node] < s.alpha[node]) break;  // every child of `node` was rejected
    const int64_t parent = parents[node];
    reject_child(parent, node);
    node = parent;
  }

  std::fill(accepted, accepted + num_nodes, int64_t{-1});
  int64_t length = 0;
  for (int64_t u = node; u != 0; u = parents[u]) ++length;
  for (int64_t u = node, j = length; j >= 0; --j, u = parents[u]) accepted[j] = u;

  ensure_mass(node);
  const T* t = target_row(node);
  s.zeroed.clear();
  const int64_t bonus = verify_detail::draw_bonus<W>(s.mass[node], t, vocab, uniforms[0], [&](double threshold) {
    if (draft_probs != nullptr && s.coef[node] != 0.0f) {
      s.residual.resize(static_cast<size_t>(vocab));
      verify_detail::clipped_residual<W>(t, draft_row(node), s.coef[node], s.residual.data(), vocab);
      return verify_detail::inverse_cdf<W>(s.residual.data(), vocab, s.zeroed, threshold);
    }
    if (draft_probs == nullptr) {  // all children of `node` were rejected: their tokens are zeroed
      for (int64_t c = links.first_child[node]; c != -1; c = links.next_sibling[c]) s.zeroed.push_back(tokens[c]);
      std::sort(s.zeroed.begin(), s.zeroed.end());
      s.zeroed.erase(std::unique(s.zeroed.begin(), s.zeroed.end()), s.zeroed.end());
    }
    return verify_detail::inverse_cdf<W>(t, vocab, s.zeroed, threshold);
  });
  return VerifyResult{length, bonus};
}

}  // namespace sage_ext::core
