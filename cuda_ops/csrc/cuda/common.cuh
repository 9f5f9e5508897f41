// Device helpers shared by the petops CUDA kernels: conversions, reductions, scans and the
// grouped-work scheduler that maps flat block work units onto (item, tile) pairs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>

#include "activations.h"
#include "check.h"

namespace petops {

constexpr unsigned kFullMask = 0xffffffffu;
// Items per grouped call: every block keeps a [I + 1] int prefix in shared memory.
constexpr int64_t kMaxItems = 4096;

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}

// Largest i in [0, n) with prefix[i] <= v, given prefix[0] <= v < prefix[n] and prefix
// non-decreasing. With seg_indptr it finds the (non-empty) segment of token v; with a unit
// prefix it finds the item owning unit v (items with zero units are skipped).
__device__ __forceinline__ int upper_slot(const int* prefix, int n, int v) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= v)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[wid] = v;
  __syncthreads();
  if (wid == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Inclusive prefix sum of one int per thread (blockDim.x a multiple of 32, <= 1024).
__device__ __forceinline__ int block_inclusive_scan(int v, int* scratch) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) scratch[wid] = v;
  __syncthreads();
  if (wid == 0) {
    const int nw = blockDim.x >> 5;
    int t = lane < nw ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += n;
    }
    if (lane < nw) scratch[lane] = t;
  }
  __syncthreads();
  if (wid > 0) v += scratch[wid - 1];
  __syncthreads();
  return v;
}

// Grouped scheduling without a host sync: every block computes prefix[i] = number of work
// units (tiles) of items < i, from device metadata, in shared memory; then blocks stride over
// the prefix[n_items] units. `units(i)` returns item i's tile count.
template <typename UnitsFn>
__device__ __forceinline__ int build_unit_prefix(int* prefix, int n_items, UnitsFn units,
                                                 int* scratch) {
  const int per = (n_items + blockDim.x - 1) / blockDim.x;
  const int begin = min(static_cast<int>(threadIdx.x) * per, n_items);
  const int end = min(begin + per, n_items);
  int local = 0;
  for (int i = begin; i < end; ++i) {
    prefix[i + 1] = units(i);
    local += prefix[i + 1];
  }
  int run = block_inclusive_scan(local, scratch) - local;
  for (int i = begin; i < end; ++i) {
    run += prefix[i + 1];
    prefix[i + 1] = run;
  }
  if (threadIdx.x == 0) prefix[0] = 0;
  __syncthreads();
  return prefix[n_items];
}

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of `kernel` resident on one SM at `threads` x `smem` bytes of dynamic shared memory
// (registers and shared memory both count), after opting the kernel into shared memory past
// 48 KB. Cached per device, kernel, block size and shared memory: it is asked on every launch.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem) {
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mu;
  static std::map<Key, int> cache;
  const Key key{c10::cuda::current_device(), reinterpret_cast<const void*>(kernel), threads, smem};
  const std::lock_guard<std::mutex> lock(mu);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (smem > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {  // only ever raised
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  PETOPS_CHECK(blocks >= 1, "a grouped kernel needs ", smem, " bytes of shared memory per block",
               " with ", threads, " threads, more than one SM of this GPU holds; use fewer",
               " items per call");
  cache.emplace(key, blocks);
  return blocks;
}

// Persistent grid for a grouped kernel: the blocks that fit on the GPU at once, never more
// than an upper bound on the work units. More would wait for a second round of residency and
// pay the per-block unit-prefix prologue again (H100, 64 segments: sgmv_expand's grid sized
// from shared memory alone, 6 blocks per SM where its registers allow 3, took 11.5 us
// against 10.9; docs/results/2026-11-27_h100_sgmv_variants_ab/h100_sgmv_variants_ab.csv).
template <typename Kernel>
int grouped_grid(Kernel kernel, int threads, size_t smem, int64_t unit_bound) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * resident_blocks(kernel, threads, smem);
  return static_cast<int>(std::max<int64_t>(1, std::min(unit_bound, cap)));
}

inline void check_num_items(int64_t n_items, const char* op) {
  PETOPS_CHECK(n_items <= kMaxItems, op, ": ", n_items, " items exceed the CUDA limit of ",
               static_cast<int64_t>(kMaxItems), " per call; split the batch into several calls");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether every defined tensor's data starts on a 16-byte boundary (16-byte vector access).
inline bool aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->defined() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace petops
