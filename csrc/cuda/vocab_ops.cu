// CUDA implementations of the vocabulary-wide ops of docs/OPS.md: topk_confidence, verify_greedy,
// verify_sampling and verify_traversal. Nothing here reads device data on the host; every kernel runs on the
// current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace sage_ext::cuda {
namespace {

using core::kMaxTopK;

constexpr float kNegInf = -INFINITY;

// ==================================================================================================
// topk_confidence
// ==================================================================================================
// A row [V] is cut into `splits` chunks; block (row, split) of topk_partial_kernel keeps, per
// thread, a min-heap of its k best keys and an online (max, sum exp(z - max)); the block merges its
// threads' lists (warp by warp, then across warps) and writes its k best keys and its stats to a
// workspace. topk_finalize_kernel (one warp per row) merges the splits and applies the formulas.
constexpr int kTopkThreads = 256;
constexpr int kTopkWarps = kTopkThreads / kWarpSize;
constexpr int kTopkLoadsPerStep = 4;        // independent loads in flight per thread
constexpr int64_t kTopkMinChunk = 8192;     // a split covers at least this many tokens
constexpr int kTopkMaxSplits = kWarpSize;   // the finalize warp gives each split a lane
static_assert(kTopkWarps <= kWarpSize, "warp 0 merges the warps' lists, one lane each");

// z = logit / temperature with NaN -> -inf and +inf -> FLT_MAX (core::sanitize_scaled_logit).
__device__ __forceinline__ float sanitize_scaled_logit(float logit, float temperature) {
  const float z = logit / temperature;
  if (isnan(z)) return kNegInf;
  if (z == INFINITY) return FLT_MAX;
  return z;
}

// Online log-sum-exp state: sum of exp(z - max) over the tokens seen (max = -inf: none finite).
struct LseState {
  float max = kNegInf;
  float sum = 0.0f;

  __device__ __forceinline__ void add(float z) {
    if (z > max) {
      sum = sum * expf(max - z) + 1.0f;  // expf(-inf) = 0 for the first finite token
      max = z;
    } else if (z > kNegInf) {
      sum += expf(z - max);
    }
  }
  // Symmetric in its operands (a + b == b + a), so all lanes of a butterfly agree.
  __device__ __forceinline__ void merge(float other_max, float other_sum) {
    if (other_max == kNegInf) return;
    if (max == kNegInf) {
      max = other_max;
      sum = other_sum;
    } else if (other_max > max) {
      sum = sum * expf(max - other_max) + other_sum;
      max = other_max;
    } else {
      sum += other_sum * expf(other_max - max);
    }
  }
  __device__ __forceinline__ void warp_merge() {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      const float m = __shfl_xor_sync(kFullWarpMask, max, offset);
      const float s = __shfl_xor_sync(kFullWarpMask, sum, offset);
      merge(m, s);
    }
  }
};

// The k best keys one thread has seen, as a min-heap (heap[0] = the worst kept key).
struct ThreadTopK {
  uint64_t heap[kMaxTopK];
  int size = 0;
  uint64_t floor = 0;  // a key must exceed this to enter (0 until the heap is full)

  __device__ void offer(uint64_t key, int k) {
    if (size < k) {
      int pos = size++;
      while (pos > 0) {
        const int up = (pos - 1) / 2;
        if (heap[up] <= key) break;
        heap[pos] = heap[up];
        pos = up;
      }
      heap[pos] = key;
      if (size == k) floor = heap[0];
    } else if (key > heap[0]) {
      heap[0] = key;
      sift_down(size);
      floor = heap[0];
    }
  }

  // Restores the heap property of heap[0, n) after heap[0] changed.
  __device__ void sift_down(int n) {
    const uint64_t key = heap[0];
    int pos = 0;
    for (;;) {
      int child = 2 * pos + 1;
      if (child >= n) break;
      if (child + 1 < n && heap[child + 1] < heap[child]) ++child;
      if (heap[child] >= key) break;
      heap[pos] = heap[child];
      pos = child;
    }
    heap[pos] = key;
  }

  // Heap sort: heap[0, size) becomes sorted descending.
  __device__ void sort_descending() {
    for (int end = size - 1; end > 0; --end) {
      const uint64_t smallest = heap[0];
      heap[0] = heap[end];
      heap[end] = smallest;
      sift_down(end);
    }
  }
};

// Each lane owns a list of `len` keys sorted descending, read through list_at(j). Writes the k
// largest keys of the union, descending, to out[0, k) (0 where the lists run out). Keys are
// distinct, so exactly one lane owns each extracted key and advances.
template <typename ListAt>
__device__ void warp_merge_descending(ListAt list_at, int len, int k, uint64_t* out) {
  const int lane = threadIdx.x % kWarpSize;
  int head = 0;
  uint64_t mine = len > 0 ? list_at(0) : 0;
  for (int r = 0; r < k; ++r) {
    const uint64_t best = warp_reduce(mine, MaxOp{});
    if (lane == 0) out[r] = best;
    if (best != 0 && mine == best) {
      ++head;
      mine = head < len ? list_at(head) : 0;
    }
  }
}

// logits: [R, V] with row stride `row_stride` (last dim contiguous). grid (R, splits),
// block kTopkThreads. Block (r, s) covers tokens [s * chunk, min(V, (s + 1) * chunk)) and writes
// part_keys[r, s, 0:k] (descending, 0-padded) and part_stats[r, s] = (max, sum exp(z - max)).
template <typename scalar_t>
__global__ void __launch_bounds__(kTopkThreads)
    topk_partial_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t vocab, int64_t chunk, int k,
                        float temperature, uint64_t* __restrict__ part_keys, float2* __restrict__ part_stats) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int num_splits = gridDim.y;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const scalar_t* x = logits + row * row_stride;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < vocab ? begin + chunk : vocab;

  ThreadTopK top;
  LseState lse;
  for (int64_t base = begin + threadIdx.x; base < end; base += kTopkThreads * kTopkLoadsPerStep) {
    float z[kTopkLoadsPerStep];
#pragma unroll
    for (int j = 0; j < kTopkLoadsPerStep; ++j) {
      const int64_t id = base + j * kTopkThreads;
      z[j] = id < end ? sanitize_scaled_logit(static_cast<float>(x[id]), temperature) : kNegInf;
    }
#pragma unroll
    for (int j = 0; j < kTopkLoadsPerStep; ++j) {
      const int64_t id = base + j * kTopkThreads;
      if (id < end) {
        lse.add(z[j]);
        const uint64_t key = score_key(z[j], static_cast<uint32_t>(id));
        if (key > top.floor) top.offer(key, k);
      }
    }
  }
  top.sort_descending();

  __shared__ uint64_t warp_lists[kTopkWarps][kMaxTopK];
  __shared__ float2 warp_stats[kTopkWarps];
  warp_merge_descending([&](int j) { return top.heap[j]; }, top.size, k, warp_lists[warp]);
  lse.warp_merge();
  if (lane == 0) warp_stats[warp] = make_float2(lse.max, lse.sum);
  __syncthreads();

  if (warp == 0) {
    const int64_t slot = row * num_splits + split;
    warp_merge_descending([&](int j) { return warp_lists[lane][j]; }, lane < kTopkWarps ? k : 0, k,
                          part_keys + slot * k);
    LseState block_lse;
    if (lane < kTopkWarps) block_lse.merge(warp_stats[lane].x, warp_stats[lane].y);
    block_lse.warp_merge();
    if (lane == 0) part_stats[slot] = make_float2(block_lse.max, block_lse.sum);
  }
}

// grid R, block kWarpSize. Merges the row's splits and writes alpha [R], topk_logprobs [R, k],
// topk_ids [R, k] (formulas of core::TopKAccumulator::finalize, alpha in double like the CPU).
__global__ void __launch_bounds__(kWarpSize)
    topk_finalize_kernel(const uint64_t* __restrict__ part_keys, const float2* __restrict__ part_stats, int num_splits,
                         int k, float* __restrict__ alpha, float* __restrict__ topk_logprobs,
                         int64_t* __restrict__ topk_ids) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  const uint64_t* lists = part_keys + row * num_splits * k;
  __shared__ uint64_t best[kMaxTopK];
  warp_merge_descending([&](int j) { return lists[lane * k + j]; }, lane < num_splits ? k : 0, k, best);

  LseState lse;
  if (lane < num_splits) {
    const float2 stats = part_stats[row * num_splits + lane];
    lse.merge(stats.x, stats.y);
  }
  lse.warp_merge();
  __syncwarp();

  const bool empty_row = lse.max == kNegInf;
  // (z - max) - log(sum), as log_softmax and the CPU (core::TopKAccumulator::finalize) do: exact when z
  // and max are both FLT_MAX (several +inf logits, e.g. fp16 overflow), where z - (max + log(sum)) gives 0.
  const float log_sum = empty_row ? 0.0f : logf(lse.sum);
  // Lane l handles ranks l and l + 32 (k <= 64).
  constexpr int kRanksPerLane = kMaxTopK / kWarpSize;
  float lp[kRanksPerLane];
#pragma unroll
  for (int t = 0; t < kRanksPerLane; ++t) {
    const int rank = lane + t * kWarpSize;
    lp[t] = kNegInf;
    if (rank < k) {
      const uint64_t key = best[rank];
      lp[t] = empty_row ? kNegInf : (key_value(key) - lse.max) - log_sum;
      topk_logprobs[row * k + rank] = lp[t];
      topk_ids[row * k + rank] = key_index(key);
    }
  }

  // alpha = clamp(1 - H / log k, 0, 1) of the renormalized top-k; H in double.
  const double top = __shfl_sync(kFullWarpMask, lp[0], 0);
  double sum = 0.0;
#pragma unroll
  for (int t = 0; t < kRanksPerLane; ++t) sum += exp(static_cast<double>(lp[t]) - top);
  sum = warp_reduce(sum, SumOp{});
  const double lse_topk = top + log(sum);
  double entropy = 0.0;
#pragma unroll
  for (int t = 0; t < kRanksPerLane; ++t) {
    const double log_p = static_cast<double>(lp[t]) - lse_topk;
    const double p = exp(log_p);
    if (p > 0.0) entropy -= p * log_p;  // 0 log 0 = 0
  }
  entropy = warp_reduce(entropy, SumOp{});
  if (lane == 0) {
    double a = 0.0;
    if (!empty_row) a = k <= 1 ? 1.0 : fmin(fmax(1.0 - entropy / log(static_cast<double>(k)), 0.0), 1.0);
    alpha[row] = static_cast<float>(a);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_confidence_cuda(const at::Tensor& logits_in, int64_t k,
                                                                    double temperature) {
  check_topk_confidence_args(logits_in, k, temperature);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits =
      (logits_in.size(1) <= 1 || logits_in.stride(1) == 1) ? logits_in : logits_in.contiguous();
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab <= INT32_MAX, "topk_confidence: logits must have fewer than 2^31 columns, got ", vocab);
  const auto float_options = logits.options().dtype(at::kFloat);
  at::Tensor alpha = at::empty({rows}, float_options);
  at::Tensor topk_logprobs = at::empty({rows, k}, float_options);
  at::Tensor topk_ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  if (rows == 0) return {alpha, topk_logprobs, topk_ids};

  // Split rows across blocks until every SM has about two blocks, keeping chunks large.
  const int64_t sm_count = multiprocessor_count(logits.get_device());
  const int64_t splits_for_occupancy = ceil_div(2 * sm_count, rows);
  const int64_t splits_for_vocab = ceil_div(vocab, kTopkMinChunk);
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({splits_for_occupancy, splits_for_vocab, kTopkMaxSplits}));
  const int64_t chunk = ceil_div(vocab, splits);

  at::Tensor part_keys = at::empty({rows, splits, k}, logits.options().dtype(at::kLong));
  at::Tensor part_stats = at::empty({rows, splits, 2}, float_options);
  auto* keys_ptr = reinterpret_cast<uint64_t*>(part_keys.data_ptr<int64_t>());
  auto* stats_ptr = reinterpret_cast<float2*>(part_stats.data_ptr<float>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(logits.scalar_type(), "topk_confidence: logits", [&](auto zero) {
    using scalar_t = decltype(zero);
    topk_partial_kernel<scalar_t><<<dim3(grid_dim(rows), static_cast<unsigned>(splits)), kTopkThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits.const_data_ptr()), logits.stride(0), vocab, chunk, static_cast<int>(k),
        static_cast<float>(temperature), keys_ptr, stats_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  topk_finalize_kernel<<<grid_dim(rows), kWarpSize, 0, stream>>>(keys_ptr, stats_ptr, static_cast<int>(splits),
                                                                 static_cast<int>(k), alpha.data_ptr<float>(),
                                                                 topk_logprobs.data_ptr<float>(),
                                                                 topk_ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {alpha, topk_logprobs, topk_ids};
}

namespace {


// ==================================================================================================
// verify_greedy
// ==================================================================================================
constexpr int kArgmaxThreads = 256;

// Key of torch.argmax's order: larger value first, NaN above everything, ties -> lower index.
__device__ __forceinline__ uint64_t argmax_key(float value, uint32_t index) {
  const uint32_t bits = isnan(value) ? 0xffffffffu : ordered_bits(value);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~index);
}

// logits: [B, N, V] with strides (stride_b, stride_n, 1). grid B * N, block kArgmaxThreads.
// argmax[b * N + n] = index of the largest logit of row (b, n).
template <typename scalar_t>
__global__ void __launch_bounds__(kArgmaxThreads)
    row_argmax_kernel(const scalar_t* __restrict__ logits, int64_t stride_b, int64_t stride_n, int num_nodes,
                      int64_t vocab, int64_t* __restrict__ argmax) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + (row / num_nodes) * stride_b + (row % num_nodes) * stride_n;
  uint64_t best = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kArgmaxThreads) {
    const uint64_t key = argmax_key(static_cast<float>(x[v]), static_cast<uint32_t>(v));
    best = key > best ? key : best;
  }
  __shared__ uint64_t scratch[kWarpSize + 1];
  best = block_reduce(best, MaxOp{}, uint64_t{0}, scratch);
  if (threadIdx.x == 0) argmax[row] = key_index(best);
}

// tokens, parents, argmax: [B, N] contiguous. grid B, block round_up(N, 32).
// From the root, repeatedly move to the lowest-index child whose token is argmax[u].
// Writes accepted [B, N] (path, -1 padded), accept_len [B], bonus [B] = argmax of the last node.
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    verify_greedy_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents,
                         const int64_t* __restrict__ argmax, int num_nodes, int64_t* __restrict__ accepted,
                         int64_t* __restrict__ accept_len, int64_t* __restrict__ bonus) {
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  __shared__ TreeSmem tree;
  __shared__ int path[core::kMaxTreeNodes];
  __shared__ int scratch[kWarpSize + 1];
  load_tree(parents + b * num_nodes, num_nodes, tree);
  const int64_t my_token = i < num_nodes ? tokens[b * num_nodes + i] : 0;
  const int64_t* row_argmax = argmax + b * num_nodes;

  int node = 0;
  int length = 0;
  for (;;) {
    const int64_t wanted = row_argmax[node];
    const bool match = i < num_nodes && tree.parent[i] == node && my_token == wanted;
    const int next = block_reduce(match ? i : INT32_MAX, MinOp{}, INT32_MAX, scratch);
    if (next == INT32_MAX) break;
    node = next;
    ++length;
    if (i == 0) path[length] = node;
  }
  __syncthreads();
  if (i < num_nodes) accepted[b * num_nodes + i] = i == 0 ? 0 : (i <= length ? path[i] : -1);
  if (i == 0) {
    accept_len[b] = length;
    bonus[b] = row_argmax[node];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tokens_in,
                                                                  const at::Tensor& parents_in,
                                                                  const at::Tensor& target_in) {
  check_verify_greedy_args(tokens_in, parents_in, target_in);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  const auto long_options = tokens.options().dtype(at::kLong);
  at::Tensor accepted = at::empty({batch, nodes}, long_options);
  at::Tensor accept_len = at::empty({batch}, long_options);
  at::Tensor bonus = at::empty({batch}, long_options);
  if (batch == 0) return {accepted, accept_len, bonus};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor argmax;
  if (target_in.dim() == 2) {
    argmax = target_in.contiguous();
  } else {
    const at::Tensor target =
        (target_in.size(2) <= 1 || target_in.stride(2) == 1) ? target_in : target_in.contiguous();
    const int64_t vocab = target.size(2);
    TORCH_CHECK(vocab <= INT32_MAX, "verify_greedy: target must have fewer than 2^31 columns, got ", vocab);
    argmax = at::empty({batch, nodes}, long_options);
    dispatch_float_dtype(target.scalar_type(), "verify_greedy: target", [&](auto zero) {
      using scalar_t = decltype(zero);
      row_argmax_kernel<scalar_t><<<grid_dim(batch * nodes), kArgmaxThreads, 0, stream>>>(
          static_cast<const scalar_t*>(target.const_data_ptr()), target.stride(0), target.stride(1),
          static_cast<int>(nodes), vocab, argmax.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  verify_greedy_kernel<<<grid_dim(batch), round_up_to_warp(nodes), 0, stream>>>(
      tokens.const_data_ptr<int64_t>(), parents.const_data_ptr<int64_t>(), argmax.const_data_ptr<int64_t>(),
      static_cast<int>(nodes), accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(),
      bonus.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, accept_len, bonus};
}

// ==================================================================================================
// verify_sampling
// ==================================================================================================
// One block per batch row walks the tree like core::verify_sampling_row. The residual distribution
// of the current node lives in a float32 workspace row [V]; vocabulary-wide steps (load + sum,
// q-form residual update, inverse CDF) use the whole block, sums are accumulated in double.
constexpr int kSamplingThreads = kMaxBlockThreads;

struct SamplingSmem {
  TreeSmem tree;
  double sums[kWarpSize + 1];
  int ints[kWarpSize + 1];
  int path[core::kMaxTreeNodes];
  float mass;      // broadcast of the residual mass decided by thread 0
  int accepted;    // broadcast of thread 0's accept decision
};

// residual <- row (as float32); returns sum(row) (double accumulation, rounded to float).
template <typename scalar_t>
__device__ float load_residual(const scalar_t* __restrict__ row, int vocab, float* __restrict__ residual,
                               SamplingSmem& smem) {
  double sum = 0.0;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float p = static_cast<float>(row[v]);
    residual[v] = p;
    sum += p;
  }
  return static_cast<float>(block_reduce(sum, SumOp{}, 0.0, smem.sums));
}

// Smallest x with cumsum(w)[x] > threshold (cumulative sums in double), w[x] = weight(x) as float;
// the last positive entry when rounding leaves none, -1 when none is positive (core::verify_detail::
// inverse_cdf: the caller then draws from the target row, block_bonus_or_target_row). Each thread
// scans a contiguous segment starting from the block-wide prefix of the segments before it.
// sums, ints: kWarpSize + 1 elements of shared scratch each.
template <typename WeightFn>
__device__ int block_inverse_cdf_of(int vocab, double threshold, double* sums, int* ints, WeightFn weight) {
  const int segment = (vocab + blockDim.x - 1) / blockDim.x;
  const int begin = threadIdx.x * segment;
  const int end = min(begin + segment, vocab);
  double segment_sum = 0.0;
  int last_positive = -1;
  for (int v = begin; v < end; ++v) {
    const float p = weight(v);
    segment_sum += p;
    if (p > 0.0f) last_positive = v;
  }
  double total;
  double cumulative = block_exclusive_sum(segment_sum, sums, &total);
  int found = INT32_MAX;
  for (int v = begin; v < end; ++v) {
    cumulative += weight(v);
    if (cumulative > threshold) {
      found = v;
      break;
    }
  }
  found = block_reduce(found, MinOp{}, INT32_MAX, ints);
  if (found != INT32_MAX) return found;
  return block_reduce(last_positive, MaxOp{}, -1, ints);
}

// `token` (a residual draw, -1 when it had no positive entry: the residual vanished numerically) or a draw
// from the target row itself (core::verify_detail::draw_bonus; -1 when that row has no positive entry: not a
// distribution). Block-wide; every thread returns the token.
template <typename T>
__device__ int block_bonus_or_target_row(int token, const T* __restrict__ target_row, int vocab, float uniform,
                                         double* sums, int* ints) {
  if (token >= 0) return token;
  double sum = 0.0;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) sum += static_cast<float>(target_row[v]);
  const float row_mass = static_cast<float>(block_reduce(sum, SumOp{}, 0.0, sums));
  return block_inverse_cdf_of(vocab, static_cast<double>(uniform) * row_mass, sums, ints,
                              [target_row](int v) { return static_cast<float>(target_row[v]); });
}

// block_inverse_cdf_of over an array w[0, vocab).
template <typename T>
__device__ int block_inverse_cdf(const T* __restrict__ w, int vocab, double threshold, SamplingSmem& smem) {
  return block_inverse_cdf_of(vocab, threshold, smem.sums, smem.ints, [w](int v) { return static_cast<float>(w[v]); });
}

// tokens, parents, uniforms: [B, N]; target_probs, draft_probs (or null): [B, N, V] contiguous;
// residual: [B, V] float32 workspace. grid B, block kSamplingThreads (>= N).
template <typename scalar_t>
__global__ void __launch_bounds__(kSamplingThreads, 1)
    verify_sampling_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents,
                           const scalar_t* __restrict__ target_probs, const scalar_t* __restrict__ draft_probs,
                           const float* __restrict__ uniforms, int num_nodes, int vocab,
                           float* __restrict__ residual_workspace, int64_t* __restrict__ accepted,
                           int64_t* __restrict__ accept_len, int64_t* __restrict__ bonus) {
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  __shared__ SamplingSmem smem;
  load_tree(parents + b * num_nodes, num_nodes, smem.tree);
  float* residual = residual_workspace + b * vocab;
  const int64_t* row_tokens = tokens + b * num_nodes;
  const float* row_uniforms = uniforms + b * num_nodes;

  int node = 0;
  int length = 0;
  float mass;
  for (;;) {
    const scalar_t* target_row = target_probs + (b * num_nodes + node) * vocab;
    const scalar_t* draft_row = draft_probs != nullptr ? draft_probs + (b * num_nodes + node) * vocab : nullptr;
    mass = load_residual(target_row, vocab, residual, smem);  // ends with a barrier: residual visible
    int next = -1;
    int child = node;  // children are visited in increasing index, all after their parent
    for (;;) {
      const bool is_child = i < num_nodes && i > child && smem.tree.parent[i] == node;
      child = block_reduce(is_child ? i : INT32_MAX, MinOp{}, INT32_MAX, smem.ints);
      if (child == INT32_MAX) break;
      const int64_t x = row_tokens[child];
      const bool in_vocab = x >= 0 && x < vocab;  // the CPU op raises otherwise; here: never accepted
      if (i == 0) {
        bool accept = false;
        if (in_vocab) {
          const float p_x = residual[x];
          if (draft_row == nullptr) {
            accept = row_uniforms[child] < p_x / mass;
            if (!accept) {
              mass -= p_x;
              residual[x] = 0.0f;
            }
          } else {
            const float q_x = static_cast<float>(draft_row[x]);
            const float ratio = (p_x / mass) / q_x;
            accept = q_x == 0.0f || row_uniforms[child] < (ratio < 1.0f ? ratio : 1.0f);  // std::min(1, ratio)
          }
        }
        smem.accepted = accept;
        smem.mass = mass;
      }
      __syncthreads();
      const bool accept = smem.accepted;
      mass = smem.mass;
      __syncthreads();  // smem.accepted / smem.mass are rewritten for the next child
      if (accept) {
        next = child;
        break;
      }
      if (draft_row != nullptr && in_vocab) {
        // p <- relu(p / mass - q) (std::max(0, .) like the CPU), mass <- sum(p).
        double sum = 0.0;
        for (int v = i; v < vocab; v += blockDim.x) {
          const float d = residual[v] / mass - static_cast<float>(draft_row[v]);
          const float p = 0.0f < d ? d : 0.0f;
          residual[v] = p;
          sum += p;
        }
        mass = static_cast<float>(block_reduce(sum, SumOp{}, 0.0, smem.sums));
      }
    }
    if (next < 0) break;
    node = next;
    ++length;
    if (i == 0) smem.path[length] = node;
  }

  const scalar_t* target_row = target_probs + (b * num_nodes + node) * vocab;
  // from the residual, or from the target row when the residual vanished numerically (mass, block-uniform)
  int token = mass > 0.0f ? block_inverse_cdf(residual, vocab, static_cast<double>(row_uniforms[0]) * mass, smem) : -1;
  token = block_bonus_or_target_row(token, target_row, vocab, row_uniforms[0], smem.sums, smem.ints);
  __syncthreads();
  if (i < num_nodes) accepted[b * num_nodes + i] = i == 0 ? 0 : (i <= length ? smem.path[i] : -1);
  if (i == 0) {
    accept_len[b] = length;
    bonus[b] = token;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cuda(const at::Tensor& tokens_in,
                                                                    const at::Tensor& parents_in,
                                                                    const at::Tensor& target_probs_in,
                                                                    const std::optional<at::Tensor>& draft_probs_in,
                                                                    const at::Tensor& uniforms_in) {
  check_verify_sampling_args(tokens_in, parents_in, target_probs_in, draft_probs_in, uniforms_in);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  const at::Tensor target_probs = target_probs_in.contiguous();
  at::Tensor draft_probs;  // undefined: deterministic draft (q = 1)
  if (draft_probs_in.has_value()) draft_probs = draft_probs_in->contiguous();
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  const int64_t vocab = target_probs.size(2);
  TORCH_CHECK(vocab <= INT32_MAX, "verify_sampling: target_probs must have fewer than 2^31 columns, got ", vocab);
  const auto long_options = tokens.options().dtype(at::kLong);
  at::Tensor accepted = at::empty({batch, nodes}, long_options);
  at::Tensor accept_len = at::empty({batch}, long_options);
  at::Tensor bonus = at::empty({batch}, long_options);
  if (batch == 0) return {accepted, accept_len, bonus};
  at::Tensor residual = at::empty({batch, vocab}, target_probs.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(target_probs.scalar_type(), "verify_sampling: target_probs", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* draft =
        draft_probs.defined() ? static_cast<const scalar_t*>(draft_probs.const_data_ptr()) : nullptr;
    verify_sampling_kernel<scalar_t><<<grid_dim(batch), kSamplingThreads, 0, stream>>>(
        tokens.const_data_ptr<int64_t>(), parents.const_data_ptr<int64_t>(),
        static_cast<const scalar_t*>(target_probs.const_data_ptr()), draft, uniforms.const_data_ptr<float>(),
        static_cast<int>(nodes), static_cast<int>(vocab), residual.data_ptr<float>(), accepted.data_ptr<int64_t>(),
        accept_len.data_ptr<int64_t>(), bonus.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {accepted, accept_len, bonus};
}

// ==================================================================================================
// verify_traversal
// ==================================================================================================
// One block per batch row. Thread 0 walks the tree in post-order like core::verify_traversal_row,
// with each node's alpha, coef and mass in shared memory; whenever the walk needs a vocabulary-wide
// pass (a target row's sum, the mass of relu(t - coef q) after a rejection, the bonus draw) it posts
// a request that the whole block runs, sums accumulated in double. A row whose walk needs no pass
// (the deterministic draft's rejections) costs no block-wide step.
constexpr int kTraversalThreads = kMaxBlockThreads;

enum TraversalRequest : int {
  kRequestRowSum = 0,       // sum(target row of request_node)
  kRequestClippedMass = 1,  // sum(max(0, t - request_coef q)) of request_node
  kRequestBonus = 2,        // inverse CDF over request_source at request_threshold
  kRequestDone = 3,
};
enum BonusSource : int {
  kBonusRow = 0,      // the target row
  kBonusClipped = 1,  // max(0, t - coef q)
  kBonusZeroed = 2,   // the target row with the tokens of the node's children zeroed
};

struct TraversalSmem {
  TreeSmem tree;  // tree.link holds the accepted path after the walk
  int first_child[core::kMaxTreeNodes];
  int next_sibling[core::kMaxTreeNodes];
  int cursor[core::kMaxTreeNodes];  // next child to enter, -1 when all were entered
  float alpha[core::kMaxTreeNodes];
  float coef[core::kMaxTreeNodes];
  float mass[core::kMaxTreeNodes];
  bool mass_known[core::kMaxTreeNodes];
  double sums[kWarpSize + 1];
  int ints[kWarpSize + 1];
  // posted by thread 0 for the whole block
  int request;
  int request_node;
  int request_source;
  float request_coef;
  double request_threshold;
  int path_length;
};

// An acceptance probability: x clamped to [0, 1], NaN -> 0 (core::verify_detail::unit_clamp).
__device__ __forceinline__ float unit_clamp(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

// Thread 0's walk (core::verify_traversal_row step by step). advance() consumes the result of the
// request it posted last, moves on until the next vocabulary-wide pass is needed, and posts it.
template <typename scalar_t>
struct TraversalWalk {
  enum Pending : int { kNothing, kMass, kReject, kFallback, kBonus };
  const int64_t* tokens;     // [N] of this row
  const scalar_t* target;    // [N, V] of this row
  const scalar_t* draft;     // [N, V] of this row, or null (deterministic draft)
  const float* uniforms;     // [N] of this row
  int vocab;
  int node = 0;       // the open node the walk is at
  int accepted = -1;  // the accepted node once decided
  int pending = kNothing;

  __device__ bool in_vocab(int64_t x) const { return x >= 0 && x < vocab; }

  // r_u(x) while the children of u before `child` have been rejected (x in the vocabulary).
  __device__ float residual_at(const TraversalSmem& smem, int u, int64_t x, int child) const {
    const scalar_t* t = target + static_cast<int64_t>(u) * vocab;
    if (draft != nullptr) {
      const float r = static_cast<float>(t[x]) - smem.coef[u] * static_cast<float>(draft[static_cast<int64_t>(u) * vocab + x]);
      return 0.0f < r ? r : 0.0f;
    }
    for (int c = smem.first_child[u]; c != child; c = smem.next_sibling[c]) {
      if (tokens[c] == x) return 0.0f;
    }
    return static_cast<float>(t[x]);
  }

  __device__ float child_alpha(const TraversalSmem& smem, int u, int child) const {
    const float alpha = smem.alpha[u], mass = smem.mass[u];
    const int64_t x = tokens[child];
    if (!(alpha > 0.0f) || !(mass > 0.0f) || !in_vocab(x)) return 0.0f;  // out of vocabulary: never accepted
    const float weight = alpha * (residual_at(smem, u, x, child) / mass);
    if (draft == nullptr) return unit_clamp(weight);
    const float q_x = static_cast<float>(draft[static_cast<int64_t>(u) * vocab + x]);
    if (q_x == 0.0f) return weight > 0.0f ? 1.0f : 0.0f;
    return unit_clamp(weight / q_x);
  }

  // alpha_u and m_u after a rejection that leaves the residual mass new_mass.
  __device__ static void finish_reject(TraversalSmem& smem, int u, float new_mass) {
    const float alpha = smem.alpha[u], mass = smem.mass[u];
    const float kept = alpha * (new_mass / mass);
    const float denominator = (1.0f - alpha) + kept;
    smem.alpha[u] = denominator > 0.0f ? kept / denominator : (alpha >= 1.0f ? 1.0f : 0.0f);
    smem.mass[u] = new_mass;
  }

  __device__ void post(TraversalSmem& smem, int request, int request_node, int source = kBonusRow, float coef = 0.0f,
                       double threshold = 0.0) {
    smem.request = request;
    smem.request_node = request_node;
    smem.request_source = source;
    smem.request_coef = coef;
    smem.request_threshold = threshold;
  }

  __device__ void advance(TraversalSmem& smem, float result) {
    switch (pending) {
      case kMass:
        smem.mass[node] = result;
        smem.mass_known[node] = true;
        break;
      case kReject:
        finish_reject(smem, node, result);
        break;
      case kFallback:  // the residual vanished numerically: draw from the target row itself
        pending = kBonus;
        post(smem, kRequestBonus, node, kBonusRow, 0.0f, static_cast<double>(uniforms[0]) * result);
        return;
      case kBonus:
        post(smem, kRequestDone, node);
        return;
      default:
        break;
    }
    pending = kNothing;
    while (accepted < 0) {
      const int u = node;
      const int child = smem.cursor[u];
      if (child >= 0) {
        if (!smem.mass_known[u]) {
          pending = kMass;
          post(smem, kRequestRowSum, u);
          return;
        }
        smem.cursor[u] = smem.next_sibling[child];
        smem.alpha[child] = child_alpha(smem, u, child);
        node = child;
        continue;
      }
      if (u == 0 || uniforms[u] < smem.alpha[u]) {  // every child of u was rejected
        accepted = u;
        break;
      }
      const int parent = smem.tree.parent[u];
      node = parent;
      const float alpha = smem.alpha[parent], mass = smem.mass[parent];
      const int64_t x = tokens[u];
      if (!(alpha > 0.0f) || !(mass > 0.0f) || !in_vocab(x)) continue;
      if (draft != nullptr) {
        smem.coef[parent] = smem.coef[parent] + mass / alpha;
        pending = kReject;
        post(smem, kRequestClippedMass, parent, kBonusRow, smem.coef[parent]);
        return;
      }
      const float left = mass - residual_at(smem, parent, x, u);
      finish_reject(smem, parent, 0.0f < left ? left : 0.0f);
    }
    node = accepted;
    if (!smem.mass_known[node]) {
      pending = kMass;
      post(smem, kRequestRowSum, node);
      return;
    }
    const float mass = smem.mass[node];
    if (mass > 0.0f) {
      const int source = draft != nullptr ? (smem.coef[node] != 0.0f ? kBonusClipped : kBonusRow)
                                          : (smem.first_child[node] >= 0 ? kBonusZeroed : kBonusRow);
      pending = kBonus;
      post(smem, kRequestBonus, node, source, smem.coef[node], static_cast<double>(uniforms[0]) * mass);
      return;
    }
    pending = kFallback;
    post(smem, kRequestRowSum, node);
  }
};

// tokens, parents, uniforms: [B, N]; target_probs, draft_probs (or null): [B, N, V] contiguous;
// zeroed_workspace: [B, V] float32 (deterministic draft) or null. grid B, block kTraversalThreads (>= N).
template <typename scalar_t>
__global__ void __launch_bounds__(kTraversalThreads, 1)
    verify_traversal_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents,
                            const scalar_t* __restrict__ target_probs, const scalar_t* __restrict__ draft_probs,
                            const float* __restrict__ uniforms, int num_nodes, int vocab,
                            float* __restrict__ zeroed_workspace, int64_t* __restrict__ accepted,
                            int64_t* __restrict__ accept_len, int64_t* __restrict__ bonus) {
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  __shared__ TraversalSmem smem;
  load_tree(parents + b * num_nodes, num_nodes, smem.tree);  // ends with a barrier
  const int64_t* row_tokens = tokens + b * num_nodes;
  const scalar_t* row_target = target_probs + b * num_nodes * static_cast<int64_t>(vocab);
  const scalar_t* row_draft =
      draft_probs != nullptr ? draft_probs + b * num_nodes * static_cast<int64_t>(vocab) : nullptr;
  if (i < num_nodes) {
    smem.first_child[i] = -1;
    smem.next_sibling[i] = -1;
    smem.alpha[i] = 0.0f;
    smem.coef[i] = 0.0f;
    smem.mass[i] = 0.0f;
    smem.mass_known[i] = false;
  }
  __syncthreads();
  if (i == 0) {  // children lists in increasing index
    for (int c = num_nodes - 1; c >= 1; --c) {
      const int p = smem.tree.parent[c];
      if (p < 0) continue;
      smem.next_sibling[c] = smem.first_child[p];
      smem.first_child[p] = c;
    }
    smem.alpha[0] = 1.0f;
  }
  __syncthreads();
  if (i < num_nodes) smem.cursor[i] = smem.first_child[i];
  __syncthreads();

  TraversalWalk<scalar_t> walk{row_tokens, row_target, row_draft, uniforms + b * num_nodes, vocab};
  float result = 0.0f;
  int token = 0;
  for (;;) {
    if (i == 0) walk.advance(smem, result);
    __syncthreads();
    const int request = smem.request;
    if (request == kRequestDone) break;
    const int node = smem.request_node;
    const scalar_t* t = row_target + static_cast<int64_t>(node) * vocab;
    const scalar_t* q = row_draft != nullptr ? row_draft + static_cast<int64_t>(node) * vocab : nullptr;
    const float coef = smem.request_coef;
    if (request == kRequestRowSum) {
      double sum = 0.0;
      for (int v = i; v < vocab; v += blockDim.x) sum += static_cast<float>(t[v]);
      result = static_cast<float>(block_reduce(sum, SumOp{}, 0.0, smem.sums));
    } else if (request == kRequestClippedMass) {
      double sum = 0.0;
      for (int v = i; v < vocab; v += blockDim.x) {
        const float d = static_cast<float>(t[v]) - coef * static_cast<float>(q[v]);
        sum += 0.0f < d ? d : 0.0f;
      }
      result = static_cast<float>(block_reduce(sum, SumOp{}, 0.0, smem.sums));
    } else {  // kRequestBonus
      const int source = smem.request_source;
      const double threshold = smem.request_threshold;
      if (source == kBonusZeroed) {
        float* w = zeroed_workspace + b * vocab;
        for (int v = i; v < vocab; v += blockDim.x) w[v] = static_cast<float>(t[v]);
        __syncthreads();
        if (i < num_nodes && smem.tree.parent[i] == node) {
          const int64_t x = row_tokens[i];
          if (x >= 0 && x < vocab) w[x] = 0.0f;
        }
        __syncthreads();
        token = block_inverse_cdf_of(vocab, threshold, smem.sums, smem.ints, [w](int v) { return w[v]; });
      } else if (source == kBonusClipped) {
        token = block_inverse_cdf_of(vocab, threshold, smem.sums, smem.ints, [t, q, coef](int v) {
          const float d = static_cast<float>(t[v]) - coef * static_cast<float>(q[v]);
          return 0.0f < d ? d : 0.0f;
        });
      } else {
        token = block_inverse_cdf_of(vocab, threshold, smem.sums, smem.ints,
                                     [t](int v) { return static_cast<float>(t[v]); });
      }
      token = block_bonus_or_target_row(token, t, vocab, uniforms[b * num_nodes], smem.sums, smem.ints);
    }
    __syncthreads();  // every thread has read the request before thread 0 posts the next one
  }

  if (i == 0) {
    int u = walk.accepted;
    const int length = smem.tree.depth[u];
    for (int j = length; j >= 0; --j) {
      smem.tree.link[j] = u;
      u = smem.tree.parent[u];
    }
    smem.path_length = length;
  }
  __syncthreads();
  const int length = smem.path_length;
  if (i < num_nodes) accepted[b * num_nodes + i] = i <= length ? smem.tree.link[i] : -1;
  if (i == 0) {
    accept_len[b] = length;
    bonus[b] = token;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_traversal_cuda(const at::Tensor& tokens_in,
                                                                     const at::Tensor& parents_in,
                                                                     const at::Tensor& target_probs_in,
                                                                     const std::optional<at::Tensor>& draft_probs_in,
                                                                     const at::Tensor& uniforms_in) {
  check_verify_sampling_args(tokens_in, parents_in, target_probs_in, draft_probs_in, uniforms_in, "verify_traversal");
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  const at::Tensor target_probs = target_probs_in.contiguous();
  at::Tensor draft_probs;  // undefined: deterministic draft
  if (draft_probs_in.has_value()) draft_probs = draft_probs_in->contiguous();
  const int64_t batch = tokens.size(0);
  const int64_t nodes = tokens.size(1);
  const int64_t vocab = target_probs.size(2);
  TORCH_CHECK(vocab <= INT32_MAX, "verify_traversal: target_probs must have fewer than 2^31 columns, got ", vocab);
  const auto long_options = tokens.options().dtype(at::kLong);
  at::Tensor accepted = at::empty({batch, nodes}, long_options);
  at::Tensor accept_len = at::empty({batch}, long_options);
  at::Tensor bonus = at::empty({batch}, long_options);
  if (batch == 0) return {accepted, accept_len, bonus};
  at::Tensor zeroed;  // the deterministic draft's bonus row (target row with the children's tokens zeroed)
  if (!draft_probs.defined()) zeroed = at::empty({batch, vocab}, target_probs.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float_dtype(target_probs.scalar_type(), "verify_traversal: target_probs", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* draft =
        draft_probs.defined() ? static_cast<const scalar_t*>(draft_probs.const_data_ptr()) : nullptr;
    verify_traversal_kernel<scalar_t><<<grid_dim(batch), kTraversalThreads, 0, stream>>>(
        tokens.const_data_ptr<int64_t>(), parents.const_data_ptr<int64_t>(),
        static_cast<const scalar_t*>(target_probs.const_data_ptr()), draft, uniforms.const_data_ptr<float>(),
        static_cast<int>(nodes), static_cast<int>(vocab), zeroed.defined() ? zeroed.data_ptr<float>() : nullptr,
        accepted.data_ptr<int64_t>(), accept_len.data_ptr<int64_t>(), bonus.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {accepted, accept_len, bonus};
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CUDA, m) {
  m.impl("topk_confidence", &topk_confidence_cuda);
  m.impl("verify_greedy", &verify_greedy_cuda);
  m.impl("verify_sampling", &verify_sampling_cuda);
  m.impl("verify_traversal", &verify_traversal_cuda);
}

}  // namespace sage_ext::cuda
