// CUDA implementations of the tree ops of docs/OPS.md: build_static_tree, sage_tree, expand_tree,
// rerank_tree and tree_buffers. Trees have at most 1024 nodes, so each batch row is one block with
// a thread per node; results are deterministic and equal to the CPU ops (csrc/core/tree.cpp) on
// valid input. Invalid input is never read back to the host: a parent that is not topological
// makes its node padding (cuda_common.cuh: load_tree).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "cuda_common.cuh"
#include "launchers.h"

namespace sage_ext::cuda {
namespace {

using core::kMaxTreeNodes;

constexpr float kNegInf = -INFINITY;

// ==================================================================================================
// build_static_tree
// ==================================================================================================
// paths: [P, L] contiguous int64 (P + 1 <= 1024). grid 1, block round_up(P + 1, 32).
// Thread r places path r at 1 + (number of paths ordered before it: shorter, or as long and
// lexicographically smaller, or equal with a lower row), finds its parent as the position of the
// path equal to its prefix, and writes parents/ranks/depth [P + 1]. Rows that are empty or lack
// their prefix (the CPU op raises) become padding: parent -1, depth 0.
__device__ int path_length(const int64_t* path, int64_t path_len) {
  int len = 0;
  while (len < path_len && path[len] >= 0) ++len;
  return len;
}

// Whether path a (length len_a) sorts before path b: by length, then lexicographically.
__device__ bool path_before(const int64_t* a, int len_a, const int64_t* b, int len_b) {
  if (len_a != len_b) return len_a < len_b;
  for (int j = 0; j < len_a; ++j) {
    if (a[j] != b[j]) return a[j] < b[j];
  }
  return false;
}

__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    build_static_tree_kernel(const int64_t* __restrict__ paths, int num_paths, int64_t path_len,
                             int64_t* __restrict__ parents, int64_t* __restrict__ ranks, int64_t* __restrict__ depth) {
  __shared__ int length[kMaxTreeNodes];
  __shared__ int position[kMaxTreeNodes];
  const int r = threadIdx.x;
  const int64_t* mine = paths + (r < num_paths ? r : 0) * path_len;
  if (r < num_paths) length[r] = path_length(mine, path_len);
  __syncthreads();
  if (r < num_paths) {
    int before = 0;
    for (int s = 0; s < num_paths; ++s) {
      const int64_t* other = paths + s * path_len;
      const bool other_first = path_before(other, length[s], mine, length[r]) ||
                               (s < r && !path_before(mine, length[r], other, length[s]));
      before += other_first ? 1 : 0;
    }
    position[r] = 1 + before;
  }
  __syncthreads();
  if (r == 0) {
    parents[0] = -1;
    ranks[0] = -1;
    depth[0] = 0;
  }
  if (r < num_paths) {
    const int len = length[r];
    int parent = len == 1 ? 0 : -1;
    if (len > 1) {
      // The prefix row with the smallest position (unique on valid input).
      for (int s = 0; s < num_paths; ++s) {
        if (length[s] != len - 1) continue;
        const int64_t* other = paths + s * path_len;
        bool same = true;
        for (int j = 0; j < len - 1 && same; ++j) same = other[j] == mine[j];
        if (same && (parent < 0 || position[s] < parent)) parent = position[s];
      }
    }
    const int node = position[r];
    parents[node] = parent;
    ranks[node] = len > 0 ? mine[len - 1] : -1;
    depth[node] = parent >= 0 ? len : 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_static_tree_cuda(const at::Tensor& paths_in) {
  check_build_static_tree_args(paths_in);
  const c10::cuda::CUDAGuard guard(paths_in.device());
  const at::Tensor paths = paths_in.contiguous();
  const int64_t num_paths = paths.size(0);
  const auto long_options = paths.options().dtype(at::kLong);
  at::Tensor parents = at::empty({num_paths + 1}, long_options);
  at::Tensor ranks = at::empty({num_paths + 1}, long_options);
  at::Tensor depth = at::empty({num_paths + 1}, long_options);
  build_static_tree_kernel<<<1, round_up_to_warp(num_paths + 1), 0, c10::cuda::getCurrentCUDAStream()>>>(
      paths.const_data_ptr<int64_t>(), static_cast<int>(num_paths), paths.size(1), parents.data_ptr<int64_t>(),
      ranks.data_ptr<int64_t>(), depth.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {parents, ranks, depth};
}

// ==================================================================================================
// sage_tree
// ==================================================================================================
constexpr int kSageThreads = 256;

struct SageParams {
  int64_t level;
  int64_t k;
  float d_min, d_max, w_min, w_max, theta_scale;
};

// alpha [B], frontier_logprobs [B, F] contiguous. One thread per (b, f) (and one per b when F = 0).
// Writes widths [B, F]; the f = 0 thread of each row writes min_cum_logprob [B] and max_depth [B].
__global__ void sage_tree_kernel(const float* __restrict__ alpha, const float* __restrict__ frontier_logprobs,
                                 int64_t batch, int64_t num_frontier, SageParams params, int64_t* __restrict__ widths,
                                 float* __restrict__ min_cum_logprob, int64_t* __restrict__ max_depth) {
  const int64_t slots_per_row = num_frontier > 0 ? num_frontier : 1;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * slots_per_row) return;
  const int64_t b = index / slots_per_row;
  const int64_t f = index % slots_per_row;
  const float depth = core::sage_depth(alpha[b], params.d_min, params.d_max);
  const float width = core::sage_width(alpha[b], params.w_min, params.w_max);
  const int64_t rounded_depth = core::round_half_up(depth);
  if (f == 0) {
    max_depth[b] = rounded_depth;
    min_cum_logprob[b] = core::sage_min_cum_logprob(depth, params.level, params.theta_scale);
  }
  if (f < num_frontier) {
    const float lp = frontier_logprobs[b * num_frontier + f];
    const bool empty_slot = !(lp > kNegInf);  // -inf (or NaN) marks an empty frontier slot
    widths[b * num_frontier + f] = (params.level > rounded_depth || empty_slot)
                                       ? 0
                                       : core::sage_level_width(width, lp, params.level, params.k);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sage_tree_cuda(const at::Tensor& alpha_in,
                                                              const at::Tensor& frontier_logprobs_in, int64_t level,
                                                              int64_t k, double d_min, double d_max, double w_min,
                                                              double w_max, double theta_scale) {
  check_sage_tree_args(alpha_in, frontier_logprobs_in, level, k, d_min, d_max, w_min, w_max, theta_scale);
  const c10::cuda::CUDAGuard guard(alpha_in.device());
  const at::Tensor alpha = alpha_in.contiguous();
  const at::Tensor frontier_logprobs = frontier_logprobs_in.contiguous();
  const int64_t batch = alpha.size(0);
  const int64_t num_frontier = frontier_logprobs.size(1);
  at::Tensor widths = at::empty({batch, num_frontier}, alpha.options().dtype(at::kLong));
  at::Tensor min_cum_logprob = at::empty({batch}, alpha.options());
  at::Tensor max_depth = at::empty({batch}, alpha.options().dtype(at::kLong));
  if (batch == 0) return {widths, min_cum_logprob, max_depth};
  const SageParams params{level,
                          k,
                          static_cast<float>(d_min),
                          static_cast<float>(d_max),
                          static_cast<float>(w_min),
                          static_cast<float>(w_max),
                          static_cast<float>(theta_scale)};
  const int64_t threads = batch * std::max<int64_t>(num_frontier, 1);
  sage_tree_kernel<<<grid_dim(ceil_div(threads, kSageThreads)), kSageThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(
      alpha.const_data_ptr<float>(), frontier_logprobs.const_data_ptr<float>(), batch, num_frontier, params,
      widths.data_ptr<int64_t>(), min_cum_logprob.data_ptr<float>(), max_depth.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {widths, min_cum_logprob, max_depth};
}

namespace {


// ==================================================================================================
// expand_tree
// ==================================================================================================
// Candidates (f, r) of one batch row get distinct keys (cumulative log-prob descending, then
// f * K + r ascending). The block keeps the best num_slots keys sorted at the front of a shared
// buffer and streams the candidates through the rest of it, re-sorting after each chunk, so any
// F * K (up to 1024 * 64) fits in a fixed 32 KiB.
constexpr int kExpandThreads = kMaxBlockThreads;
constexpr int kExpandBufferKeys = 4096;
static_assert(kExpandBufferKeys > kMaxTreeNodes, "the buffer holds the kept keys plus a chunk");

struct ExpandArgs {
  int64_t* tokens;        // [B, Ncap]
  int64_t* parents;       // [B, Ncap]
  float* logprobs;        // [B, Ncap]
  float* cum_logprobs;    // [B, Ncap]
  const int64_t* frontier;        // [B, F]
  const float* topk_logprobs;     // [B, F, K]
  const int64_t* topk_ids;        // [B, F, K]
  const int64_t* widths;          // [B, F]
  const float* min_cum_logprob;   // [B]
  int64_t* count;                 // [B]
  int capacity, num_frontier, top_k, slot_start, num_slots;
};

// Key of candidate c = f * K + r of batch row b, 0 when it is not kept.
__device__ uint64_t expand_candidate_key(const ExpandArgs& args, int64_t b, int candidate) {
  const int f = candidate / args.top_k;
  const int r = candidate % args.top_k;
  const int64_t node = args.frontier[b * args.num_frontier + f];
  if (node < 0 || node >= args.capacity) return 0;
  const int64_t width = core::clamp_i64(args.widths[b * args.num_frontier + f], 0, args.top_k);
  if (r >= width) return 0;
  const float cum = args.cum_logprobs[b * args.capacity + node] +
                    args.topk_logprobs[(b * args.num_frontier + f) * args.top_k + r];
  if (!(cum > args.min_cum_logprob[b] && cum > kNegInf)) return 0;
  return score_key(cum, static_cast<uint32_t>(candidate));
}

// grid B, block kExpandThreads. Writes slots [slot_start, slot_start + num_slots) of row b and count[b].
__global__ void __launch_bounds__(kExpandThreads, 1) expand_tree_kernel(ExpandArgs args) {
  const int64_t b = blockIdx.x;
  __shared__ uint64_t keys[kExpandBufferKeys];
  __shared__ int scratch[kWarpSize + 1];
  const int num_candidates = args.num_frontier * args.top_k;
  const int chunk_capacity = kExpandBufferKeys - args.num_slots;

  int kept = 0;  // keys[0, kept) hold the best keys so far, sorted descending (0 = none)
  if (args.num_slots > 0) {
    for (int chunk_begin = 0; chunk_begin < num_candidates; chunk_begin += chunk_capacity) {
      const int chunk_len = min(chunk_capacity, num_candidates - chunk_begin);
      const int sort_len = next_power_of_two(kept + chunk_len);
      for (int t = threadIdx.x; t < sort_len - kept; t += blockDim.x) {
        keys[kept + t] = t < chunk_len ? expand_candidate_key(args, b, chunk_begin + t) : 0;
      }
      __syncthreads();
      bitonic_sort</*kDescending=*/true>(keys, sort_len);
      kept = min(args.num_slots, sort_len);
    }
  }
  // The reads of cum_logprobs above are complete (barrier in the sort) before any slot is written.
  int written = 0;
  for (int s = threadIdx.x; s < args.num_slots; s += blockDim.x) {
    const uint64_t key = s < kept ? keys[s] : 0;
    const int64_t slot = b * args.capacity + args.slot_start + s;
    if (key != 0) {
      const int candidate = static_cast<int>(key_index(key));
      const int f = candidate / args.top_k;
      const int64_t proposal = b * args.num_frontier * args.top_k + candidate;
      args.tokens[slot] = args.topk_ids[proposal];
      args.parents[slot] = args.frontier[b * args.num_frontier + f];
      args.logprobs[slot] = args.topk_logprobs[proposal];
      args.cum_logprobs[slot] = key_value(key);
      ++written;
    } else {
      args.tokens[slot] = 0;
      args.parents[slot] = -1;
      args.logprobs[slot] = kNegInf;
      args.cum_logprobs[slot] = kNegInf;
    }
  }
  written = block_reduce(written, SumOp{}, 0, scratch);
  if (threadIdx.x == 0) args.count[b] = written;
}

}  // namespace

at::Tensor expand_tree_cuda(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logprobs,
                            const at::Tensor& cum_logprobs, const at::Tensor& frontier_in,
                            const at::Tensor& topk_logprobs_in, const at::Tensor& topk_ids_in,
                            const at::Tensor& widths_in, const at::Tensor& min_cum_logprob_in, int64_t slot_start,
                            int64_t num_slots) {
  check_expand_tree_args(tokens, parents, logprobs, cum_logprobs, frontier_in, topk_logprobs_in, topk_ids_in,
                         widths_in, min_cum_logprob_in, slot_start, num_slots);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor frontier = frontier_in.contiguous();
  const at::Tensor topk_logprobs = topk_logprobs_in.contiguous();
  const at::Tensor topk_ids = topk_ids_in.contiguous();
  const at::Tensor widths = widths_in.contiguous();
  const at::Tensor min_cum_logprob = min_cum_logprob_in.contiguous();
  const int64_t batch = tokens.size(0);
  at::Tensor count = at::empty({batch}, tokens.options());
  if (batch == 0) return count;
  const ExpandArgs args{tokens.data_ptr<int64_t>(),
                        parents.data_ptr<int64_t>(),
                        logprobs.data_ptr<float>(),
                        cum_logprobs.data_ptr<float>(),
                        frontier.const_data_ptr<int64_t>(),
                        topk_logprobs.const_data_ptr<float>(),
                        topk_ids.const_data_ptr<int64_t>(),
                        widths.const_data_ptr<int64_t>(),
                        min_cum_logprob.const_data_ptr<float>(),
                        count.data_ptr<int64_t>(),
                        static_cast<int>(tokens.size(1)),
                        static_cast<int>(frontier.size(1)),
                        static_cast<int>(topk_logprobs.size(2)),
                        static_cast<int>(slot_start),
                        static_cast<int>(num_slots)};
  expand_tree_kernel<<<grid_dim(batch), kExpandThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count;
}

namespace {


// ==================================================================================================
// rerank_tree
// ==================================================================================================
// parents, cum_logprobs: [B, N] contiguous. grid B, block round_up(N, 32).
// Scores s = min of cum_logprobs along the path (root +inf, NaN -> -inf) by pointer jumping; the
// real nodes are sorted by (s descending, index ascending), the first num_select kept (the root is
// always first), and keep/new_parents [B, num_select] written in index order.
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    rerank_tree_kernel(const int64_t* __restrict__ parents, const float* __restrict__ cum_logprobs, int num_nodes,
                       int num_select, int64_t* __restrict__ keep, int64_t* __restrict__ new_parents) {
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  __shared__ TreeSmem tree;
  __shared__ float score[kMaxTreeNodes];
  __shared__ uint64_t keys[kMaxTreeNodes];
  __shared__ int position[kMaxTreeNodes];
  __shared__ int scratch[kWarpSize + 1];
  load_tree(parents + b * num_nodes, num_nodes, tree);

  const bool real = i < num_nodes && (i == 0 || tree.parent[i] >= 0);
  if (i < num_nodes) {
    const float cum = cum_logprobs[b * num_nodes + i];
    score[i] = i == 0 ? INFINITY : (real && !isnan(cum) ? cum : kNegInf);
    tree.link[i] = tree.parent[i];  // padding and the root end their chains
  }
  __syncthreads();
  pointer_jump(tree.link, score, num_nodes, MinOp{});

  const int sort_len = next_power_of_two(num_nodes);
  for (int t = i; t < sort_len; t += blockDim.x) {
    const bool sortable = t < num_nodes && (t == 0 || tree.parent[t] >= 0);
    keys[t] = sortable ? score_key(score[t], static_cast<uint32_t>(t)) : 0;
  }
  __syncthreads();
  bitonic_sort</*kDescending=*/true>(keys, sort_len);
  if (i < num_nodes) position[i] = 0;  // reused below as the "selected" flag, then the position
  __syncthreads();
  for (int t = i; t < num_select; t += blockDim.x) {
    if (keys[t] != 0) position[key_index(keys[t])] = 1;
  }
  __syncthreads();
  const int selected = i < num_nodes ? position[i] : 0;
  int num_selected;
  const int my_position = block_exclusive_sum(selected, scratch, &num_selected);
  if (selected) position[i] = my_position;
  __syncthreads();
  if (selected) {
    keep[b * num_select + my_position] = i;
    new_parents[b * num_select + my_position] = i == 0 ? -1 : position[tree.parent[i]];
  }
  for (int t = num_selected + i; t < num_select; t += blockDim.x) {
    keep[b * num_select + t] = -1;
    new_parents[b * num_select + t] = -1;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rerank_tree_cuda(const at::Tensor& parents_in, const at::Tensor& cum_logprobs_in,
                                                    int64_t num_select) {
  check_rerank_tree_args(parents_in, cum_logprobs_in, num_select);
  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor cum_logprobs = cum_logprobs_in.contiguous();
  const int64_t batch = parents.size(0);
  const int64_t nodes = parents.size(1);
  at::Tensor keep = at::empty({batch, num_select}, parents.options());
  at::Tensor new_parents = at::empty({batch, num_select}, parents.options());
  if (batch == 0) return {keep, new_parents};
  rerank_tree_kernel<<<grid_dim(batch), round_up_to_warp(nodes), 0, c10::cuda::getCurrentCUDAStream()>>>(
      parents.const_data_ptr<int64_t>(), cum_logprobs.const_data_ptr<float>(), static_cast<int>(nodes),
      static_cast<int>(num_select), keep.data_ptr<int64_t>(), new_parents.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, new_parents};
}

namespace {

// ==================================================================================================
// tree_buffers
// ==================================================================================================
constexpr int kMaskThreads = 256;
constexpr int kMaxMaskBytes = (kMaxTreeNodes + 7) / 8;
constexpr uint32_t kNoSiblingKey = 0xffffffffu;  // sorts after every (parent, index) key
constexpr int kSiblingIndexBits = 16;
static_assert(kMaxTreeNodes < (1 << kSiblingIndexBits), "node index fits the low half of a sibling key");

struct TreeBuffersArgs {
  const int64_t* parents;  // [B, N]
  int64_t past_len;
  int num_nodes;
  int mask_bytes;          // ceil(N / 8)
  int64_t* depth;          // [B, N]
  int64_t* positions;      // [B, N]
  int64_t* first_child;    // [B, N]
  int64_t* next_sibling;   // [B, N]
  int64_t* paths;          // [B, N, N]
  bool* is_leaf;           // [B, N]
  uint8_t* packed_mask;    // [B, N, mask_bytes]
};

// grid B, block round_up(N, 32). Everything but the float mask. Sibling links come from sorting
// (parent, index) keys of the real non-root nodes: a parent's children end up adjacent, ascending.
__global__ void __launch_bounds__(kMaxBlockThreads, 1) tree_structure_kernel(TreeBuffersArgs args) {
  const int64_t b = blockIdx.x;
  const int n = args.num_nodes;
  const int i = threadIdx.x;
  __shared__ TreeSmem tree;
  __shared__ uint32_t sibling_keys[kMaxTreeNodes];
  __shared__ int first_child[kMaxTreeNodes];
  __shared__ int next_sibling[kMaxTreeNodes];
  load_tree(args.parents + b * n, n, tree);
  const int64_t row = b * n + i;

  const int sort_len = next_power_of_two(n);
  for (int t = i; t < sort_len; t += blockDim.x) {
    const bool has_parent = t < n && tree.parent[t] >= 0;
    sibling_keys[t] = has_parent ? (static_cast<uint32_t>(tree.parent[t]) << kSiblingIndexBits) | t : kNoSiblingKey;
  }
  if (i < n) {
    first_child[i] = -1;
    next_sibling[i] = -1;
  }
  __syncthreads();
  bitonic_sort</*kDescending=*/false>(sibling_keys, sort_len);
  for (int t = i; t < n; t += blockDim.x) {
    const uint32_t key = sibling_keys[t];
    if (key == kNoSiblingKey) continue;
    const int parent = static_cast<int>(key >> kSiblingIndexBits);
    const int node = static_cast<int>(key & ((1u << kSiblingIndexBits) - 1));
    const uint32_t before = t > 0 ? sibling_keys[t - 1] : kNoSiblingKey;
    const uint32_t after = t + 1 < n ? sibling_keys[t + 1] : kNoSiblingKey;
    if (before == kNoSiblingKey || static_cast<int>(before >> kSiblingIndexBits) != parent) first_child[parent] = node;
    if (after != kNoSiblingKey && static_cast<int>(after >> kSiblingIndexBits) == parent) {
      next_sibling[node] = static_cast<int>(after & ((1u << kSiblingIndexBits) - 1));
    }
  }
  __syncthreads();

  if (i < n) {
    const bool real = i == 0 || tree.parent[i] >= 0;
    args.depth[row] = tree.depth[i];
    args.positions[row] = args.past_len + tree.depth[i];
    args.first_child[row] = first_child[i];
    args.next_sibling[row] = next_sibling[i];
    args.is_leaf[row] = real && first_child[i] < 0;

    // Ancestor-or-self bits of row i, LSB first; the chain visits indices in decreasing order, so
    // bytes are emitted from the last to the first.
    uint8_t* mask_row = args.packed_mask + row * args.mask_bytes;
    int byte = args.mask_bytes - 1;
    uint32_t bits = 0;
    for (int node = i; node >= 0; node = tree.parent[node]) {
      for (; byte > node / 8; --byte) {
        mask_row[byte] = static_cast<uint8_t>(bits);
        bits = 0;
      }
      bits |= 1u << (node % 8);
    }
    for (; byte >= 0; --byte) {
      mask_row[byte] = static_cast<uint8_t>(bits);
      bits = 0;
    }
  }

  // paths [N, N]: warp w fills rows w, w + warps, ...; lane 0 writes the root-to-i chain, all lanes
  // the -1 tail (padding rows: all -1).
  const int lane = i % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int r = i / kWarpSize; r < n; r += num_warps) {
    int64_t* path_row = args.paths + (b * n + r) * n;
    const bool real = r == 0 || tree.parent[r] >= 0;
    const int last = real ? tree.depth[r] : -1;  // path_row[0, last] is the chain
    for (int t = last + 1 + lane; t < n; t += kWarpSize) path_row[t] = -1;
    if (lane == 0 && real) {
      int pos = last;
      for (int node = r; node >= 0; node = tree.parent[node]) path_row[pos--] = node;
    }
  }
}

// packed_mask [B, N, mask_bytes]. grid B * N, block kMaskThreads; writes row (b, i) of
// float_mask [B, 1, N, past_len + N]: `attend` on past columns and ancestor-or-self columns.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaskThreads)
    float_mask_kernel(const uint8_t* __restrict__ packed_mask, int mask_bytes, int64_t past_len, int num_nodes,
                      scalar_t attend, scalar_t blocked, scalar_t* __restrict__ float_mask) {
  const int64_t row = blockIdx.x;
  __shared__ uint8_t bits[kMaxMaskBytes];
  for (int t = threadIdx.x; t < mask_bytes; t += blockDim.x) bits[t] = packed_mask[row * mask_bytes + t];
  __syncthreads();
  const int64_t width = past_len + num_nodes;
  scalar_t* out = float_mask + row * width;
  for (int64_t col = threadIdx.x; col < width; col += blockDim.x) {
    bool visible = true;
    if (col >= past_len) {
      const int64_t j = col - past_len;
      visible = (bits[j / 8] >> (j % 8)) & 1u;
    }
    out[col] = visible ? attend : blocked;
  }
}

using TreeBuffers = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>;

TreeBuffers tree_buffers_cuda(const at::Tensor& parents_in, int64_t past_len, c10::ScalarType mask_dtype) {
  check_tree_buffers_args(parents_in, past_len, mask_dtype);
  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  const int64_t batch = parents.size(0);
  const int64_t nodes = parents.size(1);
  const int64_t mask_bytes = (nodes + 7) / 8;
  const auto long_options = parents.options();
  at::Tensor depth = at::empty({batch, nodes}, long_options);
  at::Tensor positions = at::empty({batch, nodes}, long_options);
  at::Tensor first_child = at::empty({batch, nodes}, long_options);
  at::Tensor next_sibling = at::empty({batch, nodes}, long_options);
  at::Tensor paths = at::empty({batch, nodes, nodes}, long_options);
  at::Tensor is_leaf = at::empty({batch, nodes}, parents.options().dtype(at::kBool));
  at::Tensor float_mask = at::empty({batch, 1, nodes, past_len + nodes}, parents.options().dtype(mask_dtype));
  at::Tensor packed_mask = at::empty({batch, nodes, mask_bytes}, parents.options().dtype(at::kByte));
  if (batch == 0) return {depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed_mask};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const TreeBuffersArgs args{parents.const_data_ptr<int64_t>(), past_len, static_cast<int>(nodes),
                             static_cast<int>(mask_bytes),     depth.data_ptr<int64_t>(),
                             positions.data_ptr<int64_t>(),    first_child.data_ptr<int64_t>(),
                             next_sibling.data_ptr<int64_t>(), paths.data_ptr<int64_t>(),
                             is_leaf.data_ptr<bool>(),         packed_mask.data_ptr<uint8_t>()};
  tree_structure_kernel<<<grid_dim(batch), round_up_to_warp(nodes), 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  dispatch_float_dtype(mask_dtype, "tree_buffers: mask_dtype", [&](auto zero) {
    using scalar_t = decltype(zero);
    float_mask_kernel<scalar_t><<<grid_dim(batch * nodes), kMaskThreads, 0, stream>>>(
        packed_mask.const_data_ptr<uint8_t>(), static_cast<int>(mask_bytes), past_len, static_cast<int>(nodes),
        scalar_t(0.0f), std::numeric_limits<scalar_t>::lowest(), static_cast<scalar_t*>(float_mask.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {depth, positions, first_child, next_sibling, paths, is_leaf, float_mask, packed_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sage_ext, CUDA, m) {
  m.impl("build_static_tree", &build_static_tree_cuda);
  m.impl("sage_tree", &sage_tree_cuda);
  m.impl("expand_tree", &expand_tree_cuda);
  m.impl("rerank_tree", &rerank_tree_cuda);
  m.impl("tree_buffers", &tree_buffers_cuda);
}

}  // namespace sage_ext::cuda
