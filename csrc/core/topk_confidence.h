// Top-k confidence (SAGE Eq. 7-9) of one row of logits, torch-free and header-only.
//
// A single pass over the vocabulary keeps a small sorted buffer of the k best tokens and an online
// log-sum-exp, so the full softmax is never materialized. Several accumulators can cover disjoint
// vocabulary ranges of one row (a thread each) and be merged. Semantics (docs/OPS.md):
//   z = logit / temperature in float32; NaN -> -inf, +inf -> FLT_MAX;
//   topk_logprobs = log_softmax(z) of the k largest, descending, ties -> lower id;
//   alpha = clamp(1 - H(renormalized top-k) / log k, 0, 1), k == 1 -> 1, all -inf row -> 0.
// The scan runs W float lanes at a time (core/simd.h). The element type T is float, Float16Bits,
// BFloat16Bits or anything else convertible to float (read one lane at a time).
#pragma once

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "formulas.h"
#include "simd.h"

namespace sage_ext::core {

struct TokenScore {
  float value;
  int64_t id;
};

// Order of the top-k: larger value first, ties -> lower token id first.
inline bool ranks_before(const TokenScore& a, const TokenScore& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

class TopKAccumulator {
 public:
  explicit TopKAccumulator(int64_t k = 1) : k_(static_cast<int>(std::clamp<int64_t>(k, 1, kMaxTopK))) {}

  // Adds logits[begin, end) (token ids begin..end-1), scaling and sanitizing each.
  //
  // Block by block (L1-sized): load and sanitize the block into z, then add it to the log-sum-exp
  // with a vectorized exp, then offer to the top-k buffer only the groups of tokens whose max can
  // beat (or tie) the current k-th best, so that most tokens cost one vector compare.
  template <int W = simd::kPortableWidth, typename T>
  SAGE_EXT_SIMD_INLINE void add_range(const T* logits, int64_t begin, int64_t end, float temperature) {
    using Floats = simd::Floats<W>;
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    constexpr int kGroupVectors = 8;  // a group of 8 W tokens shares one max for the top-k test
    constexpr int kGroups = 8;
    constexpr int kGroupTokens = kGroupVectors * W;
    constexpr int kBlockTokens = kGroups * kGroupTokens;
    constexpr int kBlockVectors = kGroups * kGroupVectors;
    static_assert(kGroupVectors == 8, "the group max below is a tree over 8 vectors");
    Floats z[kBlockVectors];
    float group_max[kGroups];
    const bool scaled = temperature != 1.0f;  // x / 1 == x: skip the division
    const Floats temperatures = simd::splat<W>(temperature);

    for (int64_t start = begin; start < end; start += kBlockTokens) {
      const int n = static_cast<int>(std::min<int64_t>(kBlockTokens, end - start));
      const int vectors = (n + W - 1) / W;
      float block_max = kNegInf;
      for (int j = 0; j < vectors; ++j) {
        const T* at = logits + start + j * W;
        Floats v = (j + 1) * W <= n ? simd::load<W>(at) : simd::load_partial<W>(at, n - j * W, kNegInf);
        if (scaled) v = v / temperatures;
        v = simd::select<W>(v == v, v, simd::splat<W>(kNegInf));                         // NaN -> -inf
        z[j] = simd::select<W>(v == simd::splat<W>(-kNegInf), simd::splat<W>(FLT_MAX), v);  // +inf -> max
      }
      for (int j = vectors; j < kBlockVectors; ++j) z[j] = simd::splat<W>(kNegInf);  // the last block's tail
      for (int g = 0; g * kGroupTokens < n; ++g) {
        // A tree of maxes rather than a running max: no chain of dependent compares.
        const Floats* group = z + g * kGroupVectors;
        const Floats low = simd::max<W>(simd::max<W>(group[0], group[1]), simd::max<W>(group[2], group[3]));
        const Floats high = simd::max<W>(simd::max<W>(group[4], group[5]), simd::max<W>(group[6], group[7]));
        group_max[g] = simd::reduce_max<W>(simd::max<W>(low, high));
        block_max = std::max(block_max, group_max[g]);
      }
      auto token = [&](int i) { return z[i / W][i % W]; };

      if (block_max == kNegInf) {
        // Nothing to add to the log-sum-exp; -inf tokens still fill a not-yet-full buffer.
        for (int i = 0; i < n && count_ < k_; ++i) offer(TokenScore{token(i), start + i});
        continue;
      }
      if (block_max > max_) {
        sum_ *= std::exp(static_cast<double>(max_) - static_cast<double>(block_max));
        max_ = block_max;
      }
      const Floats shift = simd::splat<W>(max_);
      Floats block_sum = simd::splat<W>(0.0f);
      // -inf tokens (padding too) add FLT_MIN each: nothing next to the 1 of the max token.
      for (int j = 0; j < vectors; ++j) block_sum += simd::exp_nonpositive<W>(z[j] - shift);
      sum_ += simd::reduce_sum_as_double<W>(block_sum);

      if (count_ < k_) {
        for (int i = 0; i < n; ++i) offer(TokenScore{token(i), start + i});
        continue;
      }
      for (int g = 0; g * kGroupTokens < n; ++g) {
        if (group_max[g] < best_[k_ - 1].value) continue;
        for (int i = g * kGroupTokens; i < std::min(n, (g + 1) * kGroupTokens); ++i) {
          if (token(i) >= best_[k_ - 1].value) offer(TokenScore{token(i), start + i});
        }
      }
    }
  }

  // Folds another accumulator (covering a disjoint set of token ids) into this one.
  void merge(const TopKAccumulator& other) {
    if (other.max_ != -std::numeric_limits<float>::infinity()) {
      if (other.max_ > max_) {
        sum_ = sum_ * std::exp(static_cast<double>(max_) - other.max_) + other.sum_;
        max_ = other.max_;
      } else {
        sum_ += other.sum_ * std::exp(static_cast<double>(other.max_) - max_);
      }
    }
    for (int i = 0; i < other.count_; ++i) offer(other.best_[i]);
  }

  // Writes alpha, topk_logprobs[k] (descending) and topk_ids[k]. Needs k tokens added (k <= V).
  void finalize(float* alpha, float* topk_logprobs, int64_t* topk_ids) const {
    const bool empty_row = max_ == -std::numeric_limits<float>::infinity();
    // (z - max) - log(sum) as log_softmax does: stays exact when z and max are both FLT_MAX.
    const float log_sum = static_cast<float>(std::log(sum_));
    for (int i = 0; i < count_; ++i) {
      topk_logprobs[i] = empty_row ? -std::numeric_limits<float>::infinity() : (best_[i].value - max_) - log_sum;
      topk_ids[i] = best_[i].id;
    }
    *alpha = empty_row ? 0.0f : confidence_of_sorted(topk_logprobs, count_);
  }

  // alpha of k log-probs sorted descending (the first is finite): 1 - H(renormalized) / log k.
  static float confidence_of_sorted(const float* logprobs, int k) {
    if (k <= 1) return 1.0f;
    const double top = logprobs[0];
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += std::exp(static_cast<double>(logprobs[i]) - top);
    const double lse = top + std::log(sum);
    double entropy = 0.0;
    for (int i = 0; i < k; ++i) {
      const double log_p = static_cast<double>(logprobs[i]) - lse;
      const double p = std::exp(log_p);
      if (p > 0.0) entropy -= p * log_p;  // 0 log 0 = 0
    }
    const double alpha = 1.0 - entropy / std::log(static_cast<double>(k));
    return static_cast<float>(std::clamp(alpha, 0.0, 1.0));
  }

 private:
  // Inserts `s` into the sorted buffer if it belongs to the k best.
  void offer(const TokenScore& s) {
    if (count_ == k_ && !ranks_before(s, best_[count_ - 1])) return;
    int pos = count_ < k_ ? count_++ : count_ - 1;
    while (pos > 0 && ranks_before(s, best_[pos - 1])) {
      best_[pos] = best_[pos - 1];
      --pos;
    }
    best_[pos] = s;
  }

  int k_;
  int count_ = 0;
  std::array<TokenScore, kMaxTopK> best_{};
  float max_ = -std::numeric_limits<float>::infinity();
  double sum_ = 0.0;  // sum of exp(z - max_) over the added tokens
};

// The whole op for one row of V logits, single-threaded.
template <int W = simd::kPortableWidth, typename T>
SAGE_EXT_SIMD_INLINE void topk_confidence_row(const T* logits, int64_t vocab, int64_t k, float temperature,
                                              float* alpha, float* topk_logprobs, int64_t* topk_ids) {
  TopKAccumulator acc(k);
  acc.add_range<W>(logits, 0, vocab, temperature);
  acc.finalize(alpha, topk_logprobs, topk_ids);
}

}  // namespace sage_ext::core
