// Top-k confidence (SAGE Eq. 7-9) of one row of logits, torch-free and header-only.
//
// A single pass over the vocabulary keeps a small sorted buffer of the k best tokens and an online
// log-sum-exp, so the full softmax is never materialized. Several accumulators can cover disjoint
// vocabulary ranges of one row (a thread each) and be merged. Semantics (docs/OPS.md):
//   z = logit / temperature in float32; NaN -> -inf, +inf -> FLT_MAX;
//   topk_logprobs = log_softmax(z) of the k largest, descending, ties -> lower id;
//   alpha = clamp(1 - H(renormalized top-k) / log k, 0, 1), k == 1 -> 1, all -inf row -> 0.
// The element type T is anything convertible to float (float, c10::Half, c10::BFloat16, ...).
#pragma once

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

#include "formulas.h"

namespace sage_ext::core {

// z = logit / temperature with the NaN / +inf rules applied.
inline float sanitize_scaled_logit(float logit, float temperature) {
  const float z = logit / temperature;
  if (std::isnan(z)) return -std::numeric_limits<float>::infinity();
  if (z == std::numeric_limits<float>::infinity()) return FLT_MAX;
  return z;
}

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

  int k() const { return k_; }
  int size() const { return count_; }
  const TokenScore& operator[](int i) const { return best_[i]; }
  float running_max() const { return max_; }

  // Adds one already-sanitized score.
  void add(float z, int64_t id) {
    add_to_logsumexp(z);
    offer(TokenScore{z, id});
  }

  // Adds logits[begin, end) (token ids begin..end-1), scaling and sanitizing each.
  template <typename T>
  void add_range(const T* logits, int64_t begin, int64_t end, float temperature) {
    constexpr int64_t kBlock = 256;
    std::array<float, kBlock> z;
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t n = std::min(kBlock, end - start);
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        z[i] = sanitize_scaled_logit(static_cast<float>(logits[start + i]), temperature);
        block_max = std::max(block_max, z[i]);
      }
      if (block_max == -std::numeric_limits<float>::infinity()) {
        // Nothing to add to the log-sum-exp; -inf tokens still fill a not-yet-full buffer.
        for (int64_t i = 0; i < n && count_ < k_; ++i) offer(TokenScore{z[i], start + i});
        continue;
      }
      if (block_max > max_) {
        sum_ *= std::exp(static_cast<double>(max_) - static_cast<double>(block_max));
        max_ = block_max;
      }
      float block_sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) block_sum += std::exp(z[i] - max_);
      sum_ += block_sum;
      // The buffer only changes when a token can beat (or tie) the current k-th best.
      if (count_ < k_ || block_max >= best_[count_ - 1].value) {
        for (int64_t i = 0; i < n; ++i) offer(TokenScore{z[i], start + i});
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

  // log(sum exp z) over every token added; -inf when all were -inf.
  float logsumexp() const {
    if (max_ == -std::numeric_limits<float>::infinity()) return max_;
    return max_ + static_cast<float>(std::log(sum_));
  }

  // Writes alpha, topk_logprobs[k] (descending) and topk_ids[k]. Needs size() == k (k <= V tokens added).
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
  void add_to_logsumexp(float z) {
    if (z == -std::numeric_limits<float>::infinity()) return;
    if (z > max_) {
      sum_ = sum_ * std::exp(static_cast<double>(max_) - z) + 1.0;
      max_ = z;
    } else {
      sum_ += std::exp(static_cast<double>(z) - max_);
    }
  }

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
template <typename T>
void topk_confidence_row(const T* logits, int64_t vocab, int64_t k, float temperature, float* alpha,
                         float* topk_logprobs, int64_t* topk_ids) {
  TopKAccumulator acc(k);
  acc.add_range(logits, 0, vocab, temperature);
  acc.finalize(alpha, topk_logprobs, topk_ids);
}

}  // namespace sage_ext::core
