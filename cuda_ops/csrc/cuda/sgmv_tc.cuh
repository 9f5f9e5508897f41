// Tensor-core (WMMA m16n16k16, fp32 accumulation) kernels for sgmv_shrink / sgmv_expand on
// float16 and bfloat16. Same work units and device-side scheduling as the CUDA-core kernels in
// sgmv.cu (per-block shared prefix of unit counts, no host sync), with larger tiles:
//   shrink: unit = (item, 64-token tile); N = the item's rank rounded up to 16/32/64/128;
//           K (input dim) streamed in 64-wide chunks through a 4-stage cp.async pipeline.
//   expand: unit = (item, 64-token tile, 128-column tile); K = rank in 32-wide chunks.
// Operands are staged in shared memory as raw 16-bit values, [rows][BK + 8] (80/144-byte row
// strides: conflict-free fragment loads). 16-byte cp.async copies are used when the operand's
// base address, row stride and K extent are multiples of 8 elements (checked per tile, so
// arbitrary pool offsets still work through a scalar path). Out-of-range rows/K are zero-filled
// so padded rank columns, token rows and output columns contribute exact zeros; they are masked
// on store. Epilogues (bias, activation, scale, read-modify-write of y) run in fp32 from the
// accumulators staged in shared memory.
#pragma once

#include "tc_common.cuh"

namespace petops {
namespace tc {

constexpr int kShrinkBK = 64;
constexpr int kShrinkStages = 4;
constexpr int kExpandBK = 32;
constexpr int kExpandStages = 2;
constexpr int kExpandBN = kTileBN;  // output columns per unit (32 per warp)

// ---------------------------------------------------------------------------------------------
// shrink: out[row0 + m, c] = act(x[row0 + m, :] . W[c, :] + b[c]), m < len, c < r <= RN.

template <int RNMAX>
constexpr size_t shrink_tile_smem() {
  constexpr size_t pipe = size_t(kShrinkStages) * (kBM + RNMAX) * (kShrinkBK + 8) * 2;
  constexpr size_t epi = size_t(kBM) * (RNMAX + 4) * 4;
  return pipe > epi ? pipe : epi;
}

template <typename MT, int RN, int RNMAX>
__device__ __forceinline__ void shrink_tile(char* smem, const raw16* __restrict__ x,
                                            const raw16* __restrict__ wa,
                                            const raw16* __restrict__ bias, raw16* __restrict__ out,
                                            int64_t row0, int len, int r, int k_dim, int out_stride,
                                            int act) {
  using namespace nvcuda;
  constexpr int BK = kShrinkBK, LDS = BK + 8, S = kShrinkStages, NF = RN / 16;
  raw16* sa = reinterpret_cast<raw16*>(smem);  // [S][kBM][LDS]
  raw16* sb = sa + S * kBM * LDS;              // [S][RNMAX][LDS]
  const int warp = threadIdx.x >> 5;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) wmma::fill_fragment(acc[j], 0.f);

  const raw16* gx = x + row0 * k_dim;
  const bool xv = vec_ok(gx, k_dim, k_dim), wv = vec_ok(wa, k_dim, k_dim);
  const int nk = (k_dim + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nk) {
      load_tile<kBM, BK>(sa + s * kBM * LDS, gx, k_dim, len, s * BK, k_dim, xv);
      load_tile<RN, BK>(sb + s * RNMAX * LDS, wa, k_dim, r, s * BK, k_dim, wv);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();  // stage kt landed for everyone; stage kt - 1 fully consumed
    const int nx = kt + S - 1;
    if (nx < nk) {
      const int st = nx % S;
      load_tile<kBM, BK>(sa + st * kBM * LDS, gx, k_dim, len, nx * BK, k_dim, xv);
      load_tile<RN, BK>(sb + st * RNMAX * LDS, wa, k_dim, r, nx * BK, k_dim, wv);
    }
    cp_async_commit();
    const int st = kt % S;
    const MT* a_s = reinterpret_cast<const MT*>(sa + st * kBM * LDS + warp * 16 * LDS);
    const MT* b_s = reinterpret_cast<const MT*>(sb + st * RNMAX * LDS);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a_s + kk, LDS);
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b_s + j * 16 * LDS + kk, LDS);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers free: reuse them for the fp32 tile

  constexpr int LDC = RN + 4;
  float* sc = reinterpret_cast<float*>(smem);  // [kBM][LDC]
#pragma unroll
  for (int j = 0; j < NF; ++j)
    wmma::store_matrix_sync(sc + warp * 16 * LDC + j * 16, acc[j], LDC, wmma::mem_row_major);
  __syncthreads();
  // kThreads is a multiple of RN: each thread keeps one column c and strides over rows.
  const int c = threadIdx.x % RN;
  if (c < r) {
    const float b = bias ? raw_to_f<MT>(bias[c]) : 0.f;
    for (int m = threadIdx.x / RN; m < len; m += kThreads / RN)
      out[(row0 + m) * out_stride + c] = f_to_raw<MT>(apply_act(sc[m * LDC + c] + b, act));
  }
  __syncthreads();  // fp32 tile consumed before the next unit refills the pipeline
}

// RNMAX: rank class of max_rank (16/32/64/128); sizes the weight stages of shared memory.
template <typename MT, int RNMAX>
__global__ void __launch_bounds__(kThreads)
    sgmv_shrink_tc_kernel(const raw16* __restrict__ x, const raw16* __restrict__ w,
                          const raw16* __restrict__ bias, const int* __restrict__ seg_indptr,
                          const int* __restrict__ item_seg, const int64_t* __restrict__ item_w_off,
                          const int* __restrict__ item_rank, const int64_t* __restrict__ item_b_off,
                          raw16* __restrict__ out, int n_items, int k_dim, int max_rank, int act) {
  extern __shared__ __align__(kSmemAlign) char dsmem[];
  int* prefix = reinterpret_cast<int*>(dsmem);  // [n_items + 1]
  char* tile = dsmem + ((n_items + 1) * sizeof(int) + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i], len = seg_indptr[s + 1] - seg_indptr[s];
        return item_rank[i] >= 1 ? (len + kBM - 1) / kBM : 0;
      },
      scratch);
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int s = item_seg[i];
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(u - prefix[i]) * kBM;
    const int len = min(kBM, static_cast<int>(seg_indptr[s + 1] - row0));
    const int r = min(item_rank[i], max_rank);
    const raw16* wa = w + item_w_off[i];
    const raw16* b = bias ? bias + item_b_off[i] : nullptr;
    if (r <= 16) {
      shrink_tile<MT, 16, RNMAX>(tile, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
    } else if constexpr (RNMAX >= 32) {
      if (r <= 32) {
        shrink_tile<MT, 32, RNMAX>(tile, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
      } else if constexpr (RNMAX >= 64) {
        if (r <= 64) {
          shrink_tile<MT, 64, RNMAX>(tile, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
        } else if constexpr (RNMAX >= 128) {
          shrink_tile<MT, 128, RNMAX>(tile, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// expand: y[row0 + m, out_off + col0 + c] += scale * tmp[row0 + m, j0 : j0 + r] . B[col0 + c, :]
//         + bias[col0 + c], m < len, col0 + c < n.

constexpr size_t expand_tile_smem() {
  constexpr size_t pipe = size_t(kExpandStages) * (kBM + kExpandBN) * (kExpandBK + 8) * 2;
  constexpr size_t epi = size_t(kBM) * (kExpandBN + 4) * 4;
  return pipe > epi ? pipe : epi;
}

template <typename MT>
__global__ void __launch_bounds__(kThreads)
    sgmv_expand_tc_kernel(raw16* __restrict__ y, const raw16* __restrict__ tmp,
                          const raw16* __restrict__ w, const raw16* __restrict__ bias,
                          const int* __restrict__ seg_indptr, const int* __restrict__ item_seg,
                          const int64_t* __restrict__ item_w_off, const int* __restrict__ item_rank,
                          const int* __restrict__ item_in_off, const int* __restrict__ item_out_off,
                          const int* __restrict__ item_out_dim,
                          const float* __restrict__ item_scale,
                          const int64_t* __restrict__ item_b_off, int n_items, int n_cols,
                          int tmp_cols) {
  using namespace nvcuda;
  constexpr int BK = kExpandBK, LDS = BK + 8, S = kExpandStages, BN = kExpandBN;
  constexpr int LDC = BN + 4;
  extern __shared__ __align__(kSmemAlign) char dsmem[];
  int* prefix = reinterpret_cast<int*>(dsmem);  // [n_items + 1]
  char* tile = dsmem + ((n_items + 1) * sizeof(int) + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
  raw16* sa = reinterpret_cast<raw16*>(tile);  // [S][kBM][LDS]
  raw16* sb = sa + S * kBM * LDS;              // [S][BN][LDS]
  float* sc = reinterpret_cast<float*>(tile);  // [kBM][LDC], after the main loop
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i], len = seg_indptr[s + 1] - seg_indptr[s];
        const int col_tiles = (item_out_dim[i] + BN - 1) / BN;
        return item_rank[i] >= 1 ? ((len + kBM - 1) / kBM) * col_tiles : 0;
      },
      scratch);
  const int warp = threadIdx.x >> 5;
  const bool y_al = (reinterpret_cast<uintptr_t>(y) & 15) == 0 && (n_cols & 7) == 0;
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int s = item_seg[i], n = item_out_dim[i], r = item_rank[i];
    const int col_tiles = (n + BN - 1) / BN;
    const int local = u - prefix[i];
    const int col0 = (local % col_tiles) * BN;
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(local / col_tiles) * kBM;
    const int len = min(kBM, static_cast<int>(seg_indptr[s + 1] - row0));
    const int ncol = min(BN, n - col0);
    const raw16* ga = tmp + row0 * tmp_cols + item_in_off[i];
    const raw16* gb = w + item_w_off[i] + static_cast<int64_t>(col0) * r;  // [n, r] row-major
    const bool av = vec_ok(ga, tmp_cols, r), bv = vec_ok(gb, r, r);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[a][j], 0.f);

    const int nk = (r + BK - 1) / BK;
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
      if (st < nk) {
        load_tile<kBM, BK>(sa + st * kBM * LDS, ga, tmp_cols, len, st * BK, r, av);
        load_tile<BN, BK>(sb + st * BN * LDS, gb, r, ncol, st * BK, r, bv);
      }
      cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<S - 2>();
      __syncthreads();
      const int nx = kt + S - 1;
      if (nx < nk) {
        const int st = nx % S;
        load_tile<kBM, BK>(sa + st * kBM * LDS, ga, tmp_cols, len, nx * BK, r, av);
        load_tile<BN, BK>(sb + st * BN * LDS, gb, r, ncol, nx * BK, r, bv);
      }
      cp_async_commit();
      const int st = kt % S;
      const MT* a_s = reinterpret_cast<const MT*>(sa + st * kBM * LDS);
      const MT* b_s = reinterpret_cast<const MT*>(sb + st * BN * LDS + warp * 32 * LDS);
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b_s + j * 16 * LDS + kk, LDS);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, a_s + a * 16 * LDS + kk, LDS);
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[a][j], fa, fb[j], acc[a][j]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // pipeline buffers free
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sc + a * 16 * LDC + warp * 32 + j * 16, acc[a][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();

    // Read-modify-write of y in 8-column groups. kThreads is a multiple of G: each thread
    // keeps one group c and visits rows m0 + it * RS, all loads issued before the stores.
    constexpr int G = BN / 8, RS = kThreads / G, IT = kBM / RS;
    const int c = (threadIdx.x % G) * 8, m0 = threadIdx.x / G;
    if (c < ncol) {
      const float scale = item_scale[i];
      const raw16* bb = bias ? bias + item_b_off[i] + col0 + c : nullptr;
      float b[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) b[q] = (bb && c + q < ncol) ? raw_to_f<MT>(bb[q]) : 0.f;
      raw16* yt = y + row0 * n_cols + item_out_off[i] + col0 + c;
      if (y_al && ((item_out_off[i] + col0) & 7) == 0 && c + 8 <= ncol) {
        uint4 v[IT];
#pragma unroll
        for (int it = 0; it < IT; ++it) {
          const int m = m0 + it * RS;
          if (m < len)
            v[it] = *reinterpret_cast<const uint4*>(yt + static_cast<int64_t>(m) * n_cols);
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
          *reinterpret_cast<uint4*>(yt + static_cast<int64_t>(m) * n_cols) =
              make_uint4(wd[0], wd[1], wd[2], wd[3]);
        }
      } else {
        for (int m = m0; m < len; m += RS) {
          raw16* dst = yt + static_cast<int64_t>(m) * n_cols;
          const float* src = sc + m * LDC + c;
          for (int q = 0; q < 8 && c + q < ncol; ++q)
            dst[q] = f_to_raw<MT>(raw_to_f<MT>(dst[q]) + (src[q] * scale + b[q]));
        }
      }
    }
    __syncthreads();  // fp32 tile consumed before the next unit refills the pipeline
  }
}

}  // namespace tc
}  // namespace petops
