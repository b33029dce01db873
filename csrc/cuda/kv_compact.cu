// CUDA implementation of kv_compact_ (docs/OPS.md): after verification, move the accepted tree rows
// of every KV-cache tensor to contiguous positions, in place, with a single kernel launch for the
// whole list (several only when the list exceeds kMaxCachesPerLaunch).
//
// Each thread owns one fixed-width unit (up to 16 bytes) of the D dimension of one (cache, b, h)
// slice and walks j in increasing order: row past_len + j <- row past_len + accepted[b, j]. That is
// safe in place because accepted[b, j] >= j, and no two threads touch the same bytes.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace sage_ext::cuda {
namespace {

constexpr int kKvThreads = 256;
constexpr int kMaxCopyUnitBytes = 16;
// Kernel parameters may take 32 KiB since CUDA 12.1 (4 KiB before).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxCachesPerLaunch = 256;
#else
constexpr int kMaxCachesPerLaunch = 48;
#endif

// One cache tensor [B, H, L, D] seen as bytes.
struct CacheSlices {
  char* data;
  int64_t stride_b, stride_h, stride_l;  // in bytes
  int64_t first_block;                   // first block of the launch working on this cache
  int64_t units;                         // B * H * units_per_row: threads needed
  int32_t heads;
  int32_t rows;                          // L
  int32_t units_per_row;                 // row bytes / unit_bytes
  int32_t unit_bytes;                    // 16, 8, 4, 2 or 1: every address and stride is a multiple
};

struct KvCompactParams {
  CacheSlices caches[kMaxCachesPerLaunch];
  int num_caches;
};
static_assert(sizeof(KvCompactParams) <= (kMaxCachesPerLaunch > 48 ? 32764 : 4096) - 64, "kernel parameter limit");

template <typename Unit>
__device__ void compact_unit(char* slice, int64_t stride_l, int rows, const int64_t* accepted, int64_t accepted_stride,
                             int num_accepted, int64_t past_len) {
  for (int j = 0; j < num_accepted; ++j) {
    const int64_t source = accepted[j * accepted_stride];
    if (source < 0 || source == j) continue;
    const int64_t from = past_len + source;
    const int64_t to = past_len + j;
    if (from >= rows || to >= rows) continue;  // the CPU op raises; never touch memory outside the cache
    *reinterpret_cast<Unit*>(slice + to * stride_l) = *reinterpret_cast<const Unit*>(slice + from * stride_l);
  }
}

// accepted: [B, A] int64 with strides (accepted_stride_b, accepted_stride_a). 1-D grid: the blocks
// of cache c are [first_block, first_block + ceil(units / kKvThreads)); thread -> (b, h, unit).
__global__ void __launch_bounds__(kKvThreads)
    kv_compact_kernel(const __grid_constant__ KvCompactParams params, const int64_t* __restrict__ accepted,
                      int64_t accepted_stride_b, int64_t accepted_stride_a, int num_accepted, int64_t past_len) {
  // Last cache whose first block is <= blockIdx.x (uniform across the block).
  int lo = 0;
  int hi = params.num_caches - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (params.caches[mid].first_block <= blockIdx.x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const CacheSlices& cache = params.caches[lo];
  const int64_t item = (static_cast<int64_t>(blockIdx.x) - cache.first_block) * kKvThreads + threadIdx.x;
  if (item >= cache.units) return;
  const int64_t unit = item % cache.units_per_row;
  const int64_t head_row = item / cache.units_per_row;
  const int64_t h = head_row % cache.heads;
  const int64_t b = head_row / cache.heads;
  char* slice = cache.data + b * cache.stride_b + h * cache.stride_h + unit * cache.unit_bytes;
  const int64_t* row_accepted = accepted + b * accepted_stride_b;
  switch (cache.unit_bytes) {
    case 16:
      compact_unit<uint4>(slice, cache.stride_l, cache.rows, row_accepted, accepted_stride_a, num_accepted, past_len);
      break;
    case 8:
      compact_unit<uint2>(slice, cache.stride_l, cache.rows, row_accepted, accepted_stride_a, num_accepted, past_len);
      break;
    case 4:
      compact_unit<uint32_t>(slice, cache.stride_l, cache.rows, row_accepted, accepted_stride_a, num_accepted,
                             past_len);
      break;
    case 2:
      compact_unit<uint16_t>(slice, cache.stride_l, cache.rows, row_accepted, accepted_stride_a, num_accepted,
                             past_len);
      break;
    default:
      compact_unit<uint8_t>(slice, cache.stride_l, cache.rows, row_accepted, accepted_stride_a, num_accepted,
                            past_len);
      break;
  }
}

// Largest power-of-two unit (<= 16 bytes) dividing the row size, the base address and the strides.
int copy_unit_bytes(const at::Tensor& cache) {
  const int64_t item = cache.element_size();
  const int64_t row_bytes = cache.size(3) * item;
  const auto address = reinterpret_cast<uintptr_t>(cache.data_ptr());
  int unit = kMaxCopyUnitBytes;
  while (unit > 1 && (row_bytes % unit != 0 || address % unit != 0 || (cache.stride(0) * item) % unit != 0 ||
                      (cache.stride(1) * item) % unit != 0 || (cache.stride(2) * item) % unit != 0)) {
    unit /= 2;
  }
  return unit;
}

}  // namespace

void compact_caches_cuda(at::TensorList caches, const at::Tensor& accepted, int64_t past_len) {
  const int64_t batch = accepted.size(0);
  const int64_t num_accepted = accepted.size(1);
  if (caches.empty() || batch == 0 || num_accepted == 0) return;
  const c10::cuda::CUDAGuard guard(accepted.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  KvCompactParams params{};
  int64_t total_blocks = 0;
  auto launch = [&]() {
    if (params.num_caches == 0) return;
    kv_compact_kernel<<<grid_dim(total_blocks), kKvThreads, 0, stream>>>(
        params, accepted.const_data_ptr<int64_t>(), accepted.stride(0), accepted.stride(1),
        static_cast<int>(num_accepted), past_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    params.num_caches = 0;
    total_blocks = 0;
  };
  for (const at::Tensor& cache : caches) {
    if (cache.numel() == 0) continue;
    TORCH_CHECK(cache.size(1) <= INT32_MAX && cache.size(2) <= INT32_MAX,
                "kv_compact_: cache dimensions too large, got shape ", cache.sizes());
    const int64_t item = cache.element_size();
    const int unit = copy_unit_bytes(cache);
    const int64_t units_per_row = cache.size(3) * item / unit;
    const int64_t units = batch * cache.size(1) * units_per_row;
    CacheSlices& slices = params.caches[params.num_caches++];
    slices = CacheSlices{static_cast<char*>(cache.data_ptr()),
                         cache.stride(0) * item,
                         cache.stride(1) * item,
                         cache.stride(2) * item,
                         total_blocks,
                         units,
                         static_cast<int32_t>(cache.size(1)),
                         static_cast<int32_t>(cache.size(2)),
                         static_cast<int32_t>(units_per_row),
                         unit};
    total_blocks += ceil_div(units, kKvThreads);
    if (params.num_caches == kMaxCachesPerLaunch) launch();
  }
  launch();
}

namespace {

void kv_compact_cuda(at::TensorList caches, const at::Tensor& accepted, int64_t past_len) {
  check_kv_compact_args(caches, accepted, past_len);
  compact_caches_cuda(caches, accepted, past_len);
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CUDA, m) { m.impl("kv_compact_", &kv_compact_cuda); }

}  // namespace sage_ext::cuda
