// SAGE scalar formulas (paper Eq. 7-12), shared by the CPU core and the CUDA kernels.
// Torch-free; every function is usable on host and device.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SAGE_HD __host__ __device__ __forceinline__
#else
#define SAGE_HD inline
#endif

namespace sage_ext::core {

constexpr int64_t kMaxTreeNodes = 1024;  // largest N any op accepts
constexpr int64_t kMaxTopK = 64;         // largest k any op accepts

// round(x) as floor(x + 0.5): the rounding rule of docs/OPS.md.
SAGE_HD int64_t round_half_up(float x) { return static_cast<int64_t>(floorf(x + 0.5f)); }

SAGE_HD int64_t clamp_i64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// D(alpha) = Dmin + alpha (Dmax - Dmin)   (Eq. 10)
SAGE_HD float sage_depth(float alpha, float d_min, float d_max) { return d_min + alpha * (d_max - d_min); }

// W(alpha) = Wmin + (1 - alpha)(Wmax - Wmin)   (Eq. 11)
SAGE_HD float sage_width(float alpha, float w_min, float w_max) { return w_min + (1.0f - alpha) * (w_max - w_min); }

// Children of a frontier node creating depth `level`: level 1 gets round(W); deeper levels decay
// with the parent's conditional probability and the level (Eq. 12). Clamped to [1, k].
SAGE_HD int64_t sage_level_width(float width, float parent_logprob, int64_t level, int64_t k) {
  if (level <= 1) return clamp_i64(round_half_up(width), 1, k);
  const float p_parent = expf(parent_logprob);
  return clamp_i64(round_half_up(width * (0.5f + p_parent) / static_cast<float>(level)), 1, k);
}

// log(theta_l) with theta_l = theta_scale * l / D(alpha): candidates need cumulative prob > theta_l.
SAGE_HD float sage_min_cum_logprob(float depth, int64_t level, float theta_scale) {
  return logf(theta_scale * static_cast<float>(level) / depth);
}

}  // namespace sage_ext::core
