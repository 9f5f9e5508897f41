// Tensor-core building blocks of the WMMA kernels (sgmv_tc.cuh, seg_masked_mm.cu): raw 16-bit
// storage conversions, cp.async tile loads into padded shared-memory rows and the host-side
// launch helpers (element type map, tensor-core check, shared-memory sizing), shared by both; the
// 64 x 128 block tile of 4 warps (64 x 32 each) and its fp32 read-modify-write of y, used by
// seg_masked_mm. sgmv_expand_tc computes the same tile with the same code written in the kernel:
// routed through these helpers it took 164 -> 168 registers (capped; 234 uncapped) and ran 3-8%
// slower (H100, bert-base LoRA/adapter sites, 64 and 256 segments), so it keeps its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace petops {
namespace tc {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // token rows per unit (16 per warp in shrink)
constexpr int kSmemAlign = 128;
constexpr int kMinBlocks = 3;  // blocks per SM the 64 x 128 tile kernels are built for

using raw16 = uint16_t;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;  // src-size 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 16-bit storage <-> fp32 for the wmma element type MT (round to nearest even, like c10).
template <typename MT>
__device__ __forceinline__ float raw_to_f(raw16 u);
template <>
__device__ __forceinline__ float raw_to_f<__half>(raw16 u) {
  return __half2float(__ushort_as_half(u));
}
template <>
__device__ __forceinline__ float raw_to_f<__nv_bfloat16>(raw16 u) {
  return __bfloat162float(__ushort_as_bfloat16(u));
}
template <typename MT>
__device__ __forceinline__ raw16 f_to_raw(float v);
template <>
__device__ __forceinline__ raw16 f_to_raw<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <>
__device__ __forceinline__ raw16 f_to_raw<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// The low / high 16-bit value of a 32-bit word (two packed elements) as float, and two floats
// rounded and packed into one word: 16-byte vectors are handled as four such words.
template <typename MT>
__device__ __forceinline__ float lo_f(uint32_t v) {
  return raw_to_f<MT>(static_cast<raw16>(v & 0xffffu));
}
template <typename MT>
__device__ __forceinline__ float hi_f(uint32_t v) {
  return raw_to_f<MT>(static_cast<raw16>(v >> 16));
}
template <typename MT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(f_to_raw<MT>(lo)) | (static_cast<uint32_t>(f_to_raw<MT>(hi)) << 16);
}

// Whether rows g[row * ld + k], k in [0, kmax), can be copied as aligned 8-element groups
// that are either entirely inside or entirely outside [0, kmax).
__device__ __forceinline__ bool vec_ok(const raw16* g, int64_t ld, int kmax) {
  return (reinterpret_cast<uintptr_t>(g) & 15) == 0 && (ld & 7) == 0 && (kmax & 7) == 0;
}

// s[row][kk] = g[row * ld + k0 + kk] for row < nrows and k0 + kk < kmax, else 0;
// row in [0, ROWS), kk in [0, BK). s has row stride BK + 8. The 16-byte copies are spread
// over the THREADS threads of the block with a compile-time trip count, so the loop unrolls
// and its index arithmetic is loop-invariant across K-steps. These kernels are issue-bound
// (H100 ncu: one instruction per ~5.5 cycles per warp,
// docs/results/2026-11-26_h100_ncu_sgmv/h100_ncu_sgmv.txt); the runtime-bounded loop this replaces
// made sgmv_shrink 23% and seg_masked_mm 4% slower
// (docs/results/2026-11-27_h100_sgmv_variants_ab/h100_sgmv_variants_ab.csv).
template <int ROWS, int BK, int THREADS = kThreads>
__device__ __forceinline__ void load_tile(raw16* s, const raw16* __restrict__ g, int64_t ld,
                                          int nrows, int k0, int kmax, bool vec) {
  constexpr int LDS = BK + 8;
  if (vec) {
    constexpr int G = BK / 8, N = ROWS * G, IT = (N + THREADS - 1) / THREADS;
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int e = static_cast<int>(threadIdx.x) + it * THREADS;
      if (N % THREADS != 0 && e >= N) break;
      const int row = e / G, kk = (e % G) * 8, k = k0 + kk;
      const bool ok = row < nrows && k < kmax;
      cp_async16(s + row * LDS + kk, ok ? g + row * ld + k : g, ok);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * BK; e += THREADS) {
      const int row = e / BK, kk = e % BK, k = k0 + kk;
      s[row * LDS + kk] = (row < nrows && k < kmax) ? g[row * ld + k] : raw16(0);
    }
  }
}

// y[m * ld + c] += scale * sc[m * LDC + c] + bias[c] (bias may be null), m < len, c < ncol,
// for a BM x BN fp32 tile staged in shared memory. Threads own 8-column groups and visit rows
// m0 + it * RS; `vec` (y 16-byte aligned, ld % 8 == 0) allows 16-byte read-modify-writes of
// full groups; all of a thread's row loads are issued before its stores. Kernels that inline
// this cap their registers with __launch_bounds__(kThreads, kMinBlocks) (uncapped, ptxas can
// take 234: 2 blocks per SM).
template <typename MT, int BM, int BN, int LDC>
__device__ __forceinline__ void add_tile(raw16* __restrict__ y, int ld, bool vec,
                                         const float* __restrict__ sc, int len, int ncol,
                                         float scale, const raw16* __restrict__ bias) {
  constexpr int G = BN / 8, RS = kThreads / G, IT = BM / RS;
  static_assert(kThreads % G == 0 && BM % RS == 0, "tile must split evenly over the block");
  const int c = (threadIdx.x % G) * 8, m0 = threadIdx.x / G;
  if (c >= ncol) return;
  float b[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) b[q] = (bias && c + q < ncol) ? raw_to_f<MT>(bias[c + q]) : 0.f;
  raw16* yt = y + c;
  if (vec && c + 8 <= ncol) {
    uint4 v[IT];
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int m = m0 + it * RS;
      if (m < len) v[it] = *reinterpret_cast<const uint4*>(yt + static_cast<int64_t>(m) * ld);
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int m = m0 + it * RS;
      if (m >= len) continue;
      const float* src = sc + m * LDC + c;
      uint32_t wd[4] = {v[it].x, v[it].y, v[it].z, v[it].w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        wd[h] = pack2<MT>(lo_f<MT>(wd[h]) + (src[2 * h] * scale + b[2 * h]),
                          hi_f<MT>(wd[h]) + (src[2 * h + 1] * scale + b[2 * h + 1]));
      }
      *reinterpret_cast<uint4*>(yt + static_cast<int64_t>(m) * ld) =
          make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  } else {
    for (int m = m0; m < len; m += RS) {
      raw16* dst = yt + static_cast<int64_t>(m) * ld;
      const float* src = sc + m * LDC + c;
      for (int q = 0; q < 8 && c + q < ncol; ++q)
        dst[q] = f_to_raw<MT>(raw_to_f<MT>(dst[q]) + (src[q] * scale + b[q]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The 64 x 128 block tile: warp w owns rows [0, 64) x columns [32 w, 32 w + 32) as 4 x 2
// WMMA 16x16 fp32 accumulators.

constexpr int kTileBN = 128;

template <typename MT>
struct WarpTile {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[4][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[a][j], 0.f);
  }

  // acc += A[0:64, 0:BK] @ B[32 w : 32 w + 32, 0:BK].T from one pipeline stage: a_s is the
  // stage's [kBM][LDS] activation rows, b_s its [kTileBN][LDS] weight rows (both row-major).
  template <int BK, int LDS>
  __device__ __forceinline__ void mma(const raw16* a_s, const raw16* b_s) {
    using namespace nvcuda;
    const MT* a = reinterpret_cast<const MT*>(a_s);
    const MT* b = reinterpret_cast<const MT*>(b_s) + (threadIdx.x >> 5) * 32 * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + j * 16 * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a + i * 16 * LDS + kk, LDS);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
      }
    }
  }

  // sc[m * LDC + c] = tile[m, c] (fp32, row-major [kBM][LDC]).
  template <int LDC>
  __device__ __forceinline__ void store(float* sc) const {
    const int col = (threadIdx.x >> 5) * 32;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(sc + a * 16 * LDC + col + j * 16, acc[a][j], LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T>
struct MmaType;
template <>
struct MmaType<at::Half> {
  using type = __half;
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Whether a call on the current device takes the tensor-core kernels: float16 or bfloat16 on
// sm_80+. Everything else (float32, older GPUs) runs the CUDA-core kernels.
inline bool use_tensor_cores(at::ScalarType st) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// Dispatch over the tensor-core dtypes (after use_tensor_cores), scalar_t at::Half or
// at::BFloat16.
// clang-format off
#define PETOPS_DISPATCH_HALFS(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// clang-format on

template <typename T>
const raw16* raw_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const raw16*>(t.data_ptr<T>()) : nullptr;
}

// Dynamic shared memory of a tensor-core kernel: the unit prefix, then the tile buffers.
inline size_t tile_smem(int n_items, size_t tile_bytes) {
  const size_t prefix =
      (static_cast<size_t>(n_items + 1) * sizeof(int) + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
  return prefix + tile_bytes;
}

}  // namespace tc
}  // namespace petops
