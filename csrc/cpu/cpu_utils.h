// Helpers shared by the ATen CPU implementations in csrc/cpu/: float-dtype dispatch without
// ATen/Dispatch.h, the SIMD width of the vocabulary-wide loops, when to go parallel, raising a
// core::Status as a Python exception, the common output factory, and the row loops of two ops that
// the fused engine-step ops (step_cpu.cpp) reuse.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <utility>

#include "../core/simd.h"
#include "../core/status.h"
#include "../core/tree.h"

namespace sage_ext::cpu {

// Calls fn(T{}) with T the C++ type of a float32 / float16 / bfloat16 dtype.
template <typename Fn>
decltype(auto) dispatch_float_dtype(c10::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case c10::kFloat:
      return fn(float{});
    case c10::kHalf:
      return fn(c10::Half{});
    case c10::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Calls fn(T{}) with T the storage type the core's vocabulary loops read for a float32 / float16 /
// bfloat16 dtype: float, or the raw 16 bits that c10::Half / c10::BFloat16 hold.
template <typename Fn>
decltype(auto) dispatch_vocab_dtype(c10::ScalarType dtype, const char* op, Fn&& fn) {
  static_assert(sizeof(c10::Half) == 2 && sizeof(c10::BFloat16) == 2, "read as 16 raw bits");
  switch (dtype) {
    case c10::kFloat:
      return fn(float{});
    case c10::kHalf:
      return fn(core::Float16Bits{});
    case c10::kBFloat16:
      return fn(core::BFloat16Bits{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// The vocabulary-wide loops of csrc/core are templates on the number of float lanes W
// (core/simd.h). Each op compiles them twice: W = 8 in a function marked SAGE_EXT_AVX2_FMA, called
// when cpu_has_avx2_fma(), and the portable W = core::simd::kPortableWidth otherwise.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SAGE_EXT_AVX2_FMA __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#else
#define SAGE_EXT_AVX2_FMA
inline bool cpu_has_avx2_fma() { return false; }
#endif

// Elements of work (values read or written) that a thread must get before a call goes parallel.
// Waking the OpenMP team costs microseconds on an idle machine, and a scheduler time slice
// (~10-30 ms) when the cores are busy; ATen's at::internal::GRAIN_SIZE (32768) is only ~10 us of
// the vectorized loops here, this is ~100 us.
constexpr int64_t kParallelGrainWork = int64_t{1} << 18;

// at::parallel_for over `count` items of about `work_per_item` elements of work each, in chunks of
// at least kParallelGrainWork elements (so a small call runs inline on the calling thread).
template <typename Fn>
void parallel_for_work(int64_t count, int64_t work_per_item, const Fn& fn) {
  const int64_t per_item = std::max<int64_t>(1, work_per_item);
  at::parallel_for(0, count, (kParallelGrainWork + per_item - 1) / per_item, fn);
}

// Raises ValueError "<op>: <status message>" (row-qualified when the op is batched).
inline void raise_if_error(const core::Status& status, const char* op, int64_t batch_row = -1) {
  if (status.ok()) return;
  if (batch_row >= 0) {
    TORCH_CHECK_VALUE(false, op, ": batch row ", batch_row, ": ", status.message());
  }
  TORCH_CHECK_VALUE(false, op, ": ", status.message());
}

// Raises (naming `parents` and the batch row) unless every row of the contiguous [B, N] int64
// tensor is a valid tree.
inline void validate_parent_rows(const char* op, const at::Tensor& parents) {
  const int64_t* data = parents.const_data_ptr<int64_t>();
  const int64_t n = parents.size(1);
  for (int64_t b = 0; b < parents.size(0); ++b) raise_if_error(core::validate_parents(data + b * n, n), op, b);
}

// Uninitialized tensor of `sizes` and `dtype` on the device of `like`.
inline at::Tensor empty_on(const at::Tensor& like, at::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).device(like.device()));
}

// A tensor whose innermost dimension is contiguous (a copy only when it is not): rows may then be
// read with the outer strides, so e.g. logits[:, -1, :] of a [B, T, V] tensor is never copied.
inline at::Tensor with_contiguous_last_dim(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// The SAGE shape parameters of sage_tree / sage_level_ as the core takes them (float32 formulas).
inline core::SageParams sage_params(int64_t level, int64_t k, double d_min, double d_max, double w_min, double w_max,
                                    double theta_scale) {
  return core::SageParams{level,
                          k,
                          static_cast<float>(d_min),
                          static_cast<float>(d_max),
                          static_cast<float>(w_min),
                          static_cast<float>(w_max),
                          static_cast<float>(theta_scale)};
}

// topk_confidence over `rows` rows of `vocab` logits of `dtype` (float32/float16/bfloat16), row r at
// logits + r * row_stride elements, into alpha[rows], topk_logprobs[rows * k], topk_ids[rows * k]: parallel
// over rows, and over vocabulary chunks when there are fewer rows than threads (topk_confidence_cpu.cpp).
// Arguments are checked by the caller.
void topk_confidence_rows(c10::ScalarType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                          int64_t k, float temperature, float* alpha, float* topk_logprobs, int64_t* topk_ids);

// kv_compact_ over `caches` with the accepted rows accepted[B * A] (row-major [B, A], validated by the
// caller): row past_len + j <- past_len + accepted[b, j], in parallel over (cache, b, head) slices
// when there is enough work (verify_cpu.cpp).
void compact_caches(at::TensorList caches, const int64_t* accepted, int64_t batch, int64_t num_accepted,
                    int64_t past_len);

}  // namespace sage_ext::cpu
