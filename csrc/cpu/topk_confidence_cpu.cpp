// CPU implementation of topk_confidence (docs/OPS.md), built on core/topk_confidence.h with the
// widest SIMD the CPU has. Rows are processed in parallel when there is enough work; when there are
// fewer rows than threads and the vocabulary is large, each row's vocabulary is also split across
// threads and the partial results merged.

// The W = 8 SIMD kernels are instantiated in templates built without AVX, for which GCC notes the
// AVX ABI (at the end of the file); no vector is passed out of line (core/simd.h).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../core/topk_confidence.h"
#include "cpu_utils.h"

namespace sage_ext::cpu {
namespace {

// acc.add_range(logits, begin, end, temperature) with the widest SIMD of this CPU (cpu_utils.h).
template <typename T>
SAGE_EXT_AVX2_FMA void add_range_avx2_fma(core::TopKAccumulator& acc, const T* logits, int64_t begin, int64_t end,
                                          float temperature) {
  acc.add_range<8>(logits, begin, end, temperature);
}

template <typename T>
void add_range_simd(core::TopKAccumulator& acc, const T* logits, int64_t begin, int64_t end, float temperature) {
  if (cpu_has_avx2_fma()) {
    add_range_avx2_fma(acc, logits, begin, end, temperature);
  } else {
    acc.add_range<core::simd::kPortableWidth>(logits, begin, end, temperature);
  }
}

}  // namespace

void topk_confidence_rows(c10::ScalarType dtype, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                          int64_t k, float temperature, float* alpha_out, float* logprob_out, int64_t* id_out) {
  if (rows == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks =
      rows >= threads ? 1 : std::clamp<int64_t>(vocab / kParallelGrainWork, 1, (2 * threads + rows - 1) / rows);

  dispatch_vocab_dtype(dtype, "topk_confidence", [&](auto zero) {
    using T = decltype(zero);
    const T* data = static_cast<const T*>(logits);
    if (chunks == 1) {
      parallel_for_work(rows, vocab, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          core::TopKAccumulator acc(k);
          add_range_simd(acc, data + r * row_stride, 0, vocab, temperature);
          acc.finalize(alpha_out + r, logprob_out + r * k, id_out + r * k);
        }
      });
      return;
    }
    std::vector<core::TopKAccumulator> partial(rows * chunks, core::TopKAccumulator(k));
    parallel_for_work(rows * chunks, vocab / chunks, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / chunks, c = task % chunks;
        add_range_simd(partial[task], data + r * row_stride, c * vocab / chunks, (c + 1) * vocab / chunks,
                       temperature);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      core::TopKAccumulator& total = partial[r * chunks];
      for (int64_t c = 1; c < chunks; ++c) total.merge(partial[r * chunks + c]);
      total.finalize(alpha_out + r, logprob_out + r * k, id_out + r * k);
    }
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_confidence_cpu(const at::Tensor& logits_in, int64_t k,
                                                                   double temperature) {
  check_topk_confidence_args(logits_in, k, temperature);
  const at::Tensor logits = with_contiguous_last_dim(logits_in);
  const int64_t rows = logits.size(0);
  at::Tensor alpha = empty_on(logits, {rows}, c10::kFloat);
  at::Tensor topk_logprobs = empty_on(logits, {rows, k}, c10::kFloat);
  at::Tensor topk_ids = empty_on(logits, {rows, k}, c10::kLong);
  topk_confidence_rows(logits.scalar_type(), logits.const_data_ptr(), rows, logits.size(1), logits.stride(0), k,
                       static_cast<float>(temperature), alpha.data_ptr<float>(), topk_logprobs.data_ptr<float>(),
                       topk_ids.data_ptr<int64_t>());
  return {alpha, topk_logprobs, topk_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CPU, m) { m.impl("topk_confidence", &topk_confidence_cpu); }

}  // namespace sage_ext::cpu
