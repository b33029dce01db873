// Device helpers shared by the sage_ext CUDA kernels (csrc/cuda/*.cu):
//   - order-preserving 64-bit keys (float score + index) so that "larger value first, ties -> lower
//     index" becomes a plain unsigned comparison and every key is distinct;
//   - warp / block reductions and an exclusive block scan;
//   - a shared-memory bitonic sort;
//   - tree loading: one batch row of `parents` into shared memory, with every node that does not reach
//     the root through topological links turned into padding (CUDA ops never read data back to the
//     host to validate it, see docs/OPS.md), plus depths, by pointer jumping;
//   - float32 / float16 / bfloat16 dispatch for the host launchers.
// Every block-level helper must be called by all threads of the block (it synchronizes), and blocks
// are always a multiple of the warp size.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "../core/formulas.h"

namespace sage_ext::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxBlockThreads = 1024;
static_assert(core::kMaxTreeNodes <= kMaxBlockThreads, "tree kernels give every node its own thread");

// ---- launch arithmetic (host) -------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Grid size along x for `blocks` blocks (at most 2^31 - 1).
inline unsigned grid_dim(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= INT32_MAX, "sage_ext: cannot launch ", blocks, " CUDA blocks");
  return static_cast<unsigned>(blocks);
}
inline int round_up_to_warp(int64_t n) { return static_cast<int>(ceil_div(n < 1 ? 1 : n, kWarpSize) * kWarpSize); }

// Streaming multiprocessors of a device, queried once per process (a host-side query, no sync).
inline int multiprocessor_count(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<int> counts;
  std::call_once(once, [] {
    counts.resize(c10::cuda::device_count());
    for (size_t d = 0; d < counts.size(); ++d) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[d], cudaDevAttrMultiProcessorCount, static_cast<int>(d)));
    }
  });
  return counts.at(device);
}

__host__ __device__ inline int next_power_of_two(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// ---- order-preserving keys ----------------------------------------------------------------------
// uint32 whose unsigned order is the float order (-inf lowest, +inf highest); -0 and +0 map alike.
// NaN must be mapped by the caller (each op has its own NaN rule).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  if (x == 0.0f) x = 0.0f;  // -0 -> +0: equal floats must give equal bits (they tie)
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float float_from_ordered_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Key ranking (value descending, index ascending) as an unsigned 64-bit number, larger = first.
// Never 0 for a non-NaN value, so 0 serves as "no key".
__device__ __forceinline__ uint64_t score_key(float value, uint32_t index) {
  return (static_cast<uint64_t>(ordered_bits(value)) << 32) | static_cast<uint32_t>(~index);
}
__device__ __forceinline__ uint32_t key_index(uint64_t key) { return ~static_cast<uint32_t>(key); }
__device__ __forceinline__ float key_value(uint64_t key) {
  return float_from_ordered_bits(static_cast<uint32_t>(key >> 32));
}

// ---- reductions and scans ------------------------------------------------------------------------
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  return v;
}

// Reduction over the whole block; every thread gets the result. scratch: kWarpSize + 1 elements.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < num_warps ? scratch[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) scratch[kWarpSize] = w;
  }
  __syncthreads();
  return scratch[kWarpSize];
}

// Exclusive prefix sum over the threads of the block (thread order); *total gets the block sum.
// scratch: kWarpSize + 1 elements.
template <typename T>
__device__ T block_exclusive_sum(T v, T* scratch, T* total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  T inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const T up = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  T exclusive = __shfl_up_sync(kFullWarpMask, inclusive, 1);
  if (lane == 0) exclusive = T(0);
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const T warp_total = lane < num_warps ? scratch[lane] : T(0);
    T warp_inclusive = warp_total;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
      const T up = __shfl_up_sync(kFullWarpMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += up;
    }
    T warp_exclusive = __shfl_up_sync(kFullWarpMask, warp_inclusive, 1);
    if (lane == 0) warp_exclusive = T(0);
    scratch[lane] = warp_exclusive;
    if (lane == kWarpSize - 1) scratch[kWarpSize] = warp_inclusive;
  }
  __syncthreads();
  const T result = scratch[warp] + exclusive;
  *total = scratch[kWarpSize];
  __syncthreads();  // scratch may be reused right after
  return result;
}

// ---- bitonic sort --------------------------------------------------------------------------------
// Sorts keys[0, n) in shared memory (n a power of two), descending or ascending. The caller
// synchronizes after writing the keys; the sort ends with a barrier.
template <bool kDescending, typename K>
__device__ void bitonic_sort(K* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));  // first element of the i-th compared pair
        const int hi = lo + stride;
        // Sub-sequences alternate direction until the last merge, which goes the requested way.
        const bool block_descending = ((lo & size) == 0) == kDescending;
        const K a = keys[lo];
        const K b = keys[hi];
        if (block_descending ? (a < b) : (b < a)) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// ---- trees ---------------------------------------------------------------------------------------
constexpr int kNoLink = -1;    // root (or padding after loading): the chain ends here
constexpr int kBadLink = -2;   // padding or invalid parent while loading: the chain never reaches the root

// Pointer jumping over link[] (one node per thread, n <= blockDim.x): afterwards value[i] is the
// op-combination of the own values of i and of all its ancestors up to (excluding) the node whose
// link is negative, and link[i] is that final negative link.
template <typename T, typename Op>
__device__ void pointer_jump(int* link, T* value, int n, Op op) {
  const int i = threadIdx.x;
  for (int span = 1; span < n; span <<= 1) {
    int l = kNoLink;
    T v{};
    if (i < n) {
      l = link[i];
      v = value[i];
      if (l >= 0) {
        v = op(v, value[l]);
        l = link[l];
      }
    }
    __syncthreads();
    if (i < n) {
      link[i] = l;
      value[i] = v;
    }
    __syncthreads();
  }
}

struct TreeSmem {
  int parent[core::kMaxTreeNodes];  // -1 for the root and for padding
  int depth[core::kMaxTreeNodes];   // 0 for the root and for padding
  int link[core::kMaxTreeNodes];    // pointer-jumping scratch
};

// Loads parents[0, n) of one batch row (n <= blockDim.x). A node is real iff it is the root or its
// chain of parents reaches the root with 0 <= parent < index at every step; every other node is
// padding (the CPU ops raise on such input instead).
__device__ inline void load_tree(const int64_t* parents, int n, TreeSmem& tree) {
  const int i = threadIdx.x;
  int raw_parent = -1;
  if (i < n) {
    int link = kNoLink;
    if (i > 0) {
      const int64_t p = parents[i];
      const bool topological = p >= 0 && p < i;
      raw_parent = topological ? static_cast<int>(p) : -1;
      link = topological ? raw_parent : kBadLink;
    }
    tree.link[i] = link;
    tree.depth[i] = i > 0 ? 1 : 0;  // one link per non-root node; summed along the chain
  }
  __syncthreads();
  pointer_jump(tree.link, tree.depth, n, SumOp{});
  if (i < n) {
    const bool real = tree.link[i] == kNoLink;
    tree.parent[i] = real ? raw_parent : -1;
    if (!real) tree.depth[i] = 0;
  }
  __syncthreads();
}

// ---- dtype dispatch (host) -----------------------------------------------------------------------
// Calls fn(T{}) with T the C++ type of a float32 / float16 / bfloat16 dtype.
template <typename Fn>
void dispatch_float_dtype(c10::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case c10::kFloat:
      fn(float{});
      return;
    case c10::kHalf:
      fn(c10::Half{});
      return;
    case c10::kBFloat16:
      fn(c10::BFloat16{});
      return;
    default:
      TORCH_CHECK(false, what, " must have dtype float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace sage_ext::cuda
