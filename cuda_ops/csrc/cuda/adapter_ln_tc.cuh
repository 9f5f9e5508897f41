// The one-block tensor-core kernel of adapter_residual_layernorm (fp16/bf16, N % 64 == 0,
// N <= 1024, max_rank <= 64): persistent blocks of 8 warps over units = (segment, 32-token
// tile), scheduled like the sgmv kernels (a shared unit prefix built per block, no host sync).
// A unit keeps its h tile [32][N] in shared memory:
//   1. h = round(y + bias): y by cp.async, the segment's bias added in shared memory;
//   2. down: d = h @ Wd.T over K = N in 64-wide steps (WMMA m16n16k16, fp32 accumulators);
//   3. d = round(act(d + bd)) into shared memory, zero past the rank;
//   4. up: h += d @ Wu.T + bu in 64-column steps, rounded once per element;
//   5. LayerNorm of h + residual, one warp per row, written with 16-byte stores.
// y, the residual and the weights arrive by cp.async; down and up weight tiles ([64][64]) share
// one 4-stage pipeline, so the first up tiles load while the last down steps compute. Segments
// of rank 0 run steps 1 and 5 only.
#pragma once

#include "adapter_ln_common.cuh"

namespace petops {
namespace adapter_ln {

constexpr int kBM = 32;               // token rows per unit
constexpr int kBK = 64;               // down: K step; up: output columns per step and the rank
constexpr int kLDS = kBK + 8;         // weight tile row stride (conflict-free fragment loads)
constexpr int kStages = 4;            // weight tiles in flight: 3 ahead of the one computed
constexpr int kLDC = kBK + 4;         // fp32 accumulator staging row stride
constexpr int kStage = kRank * kLDS;  // raw16 elements per weight tile

// Shared memory after the unit prefix: the h tile, then a region that holds the weight
// pipeline, the bottleneck and the accumulator staging while the adapter runs, and the
// residual tile for the LayerNorm afterwards.
struct TcLayout {
  size_t hs, ws, ds, cs, bs, rs, total;  // byte offsets, and the bytes of all tiles
};

__host__ __device__ inline TcLayout tc_layout(int n) {
  const size_t tile = static_cast<size_t>(kBM) * (n + 8) * sizeof(raw16);  // [kBM][n + 8]
  TcLayout l{};
  l.hs = 0;
  l.ws = l.rs = tile;
  l.ds = l.ws + static_cast<size_t>(kStages) * kStage * sizeof(raw16);
  l.cs = l.ds + static_cast<size_t>(kBM) * kLDS * sizeof(raw16);
  l.bs = l.cs + static_cast<size_t>(kBM) * kLDC * sizeof(float);  // down.b [64], up.b [n]
  const size_t adapter = l.bs + static_cast<size_t>(kRank + n) * sizeof(raw16);
  l.total = adapter > l.rs + tile ? adapter : l.rs + tile;
  return l;
}

template <typename MT>
__global__ void __launch_bounds__(kThreads, 2) adapter_ln_tc_kernel(const AdapterLnParams p) {
  using namespace nvcuda;
  extern __shared__ __align__(tc::kSmemAlign) char smem[];
  __shared__ int scratch[32];
  const int n = p.n, ldh = n + 8, groups = n / 8;
  int* prefix = reinterpret_cast<int*>(smem);
  const TcLayout lay = tc_layout(n);
  raw16* hs = reinterpret_cast<raw16*>(smem + p.tiles + lay.hs);
  raw16* ws = reinterpret_cast<raw16*>(smem + p.tiles + lay.ws);
  raw16* ds = reinterpret_cast<raw16*>(smem + p.tiles + lay.ds);
  float* cs = reinterpret_cast<float*>(smem + p.tiles + lay.cs);
  raw16* rs = reinterpret_cast<raw16*>(smem + p.tiles + lay.rs);
  raw16* bs = reinterpret_cast<raw16*>(smem + p.tiles + lay.bs);  // [kRank] down.b, [n] up.b

  const int total = build_unit_prefix(
      prefix, p.n_seg,
      [&](int s) { return (p.seg_indptr[s + 1] - p.seg_indptr[s] + kBM - 1) / kBM; }, scratch);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rf = warp & 1, cq = warp >> 1;  // MMA: 16-row half of the tile, 16-column quarter
  const int k_steps = n / kBK;              // down steps; the up has as many 64-column steps

  // Row-tile passes: a thread owns one 8-value group (column gc) of rows gm, gm + g_rows, ...
  // (n <= kMaxN: at least two rows per pass; no division inside the loops).
  const int g_rows = kThreads / groups, gc = (threadIdx.x % groups) * 8;
  const int gm = threadIdx.x < g_rows * groups ? static_cast<int>(threadIdx.x) / groups : kBM;
  // [kBM][n] rows of g (row stride n) into t ([kBM][n + 8]); rows >= len zero-filled.
  auto load_rows = [&](raw16* t, const raw16* g, int len) {
    for (int m = gm; m < kBM; m += g_rows) {
      tc::cp_async16(t + m * ldh + gc, m < len ? g + static_cast<int64_t>(m) * n + gc : g, m < len);
    }
  };

  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int s = upper_slot(prefix, p.n_seg, u);
    const int row0 = p.seg_indptr[s] + (u - prefix[s]) * kBM;
    const int len = min(kBM, p.seg_indptr[s + 1] - row0);
    const int64_t grow = static_cast<int64_t>(row0) * n;
    const int r = p.seg_rank[s];
    const int64_t* off = p.seg_w_off + static_cast<int64_t>(s) * kAdapterParts;
    const raw16* wd = p.w + off[0];
    const raw16* wu = p.w + off[2];
    const bool wd_vec = p.w_vec && tc::vec_ok(wd, n, n);
    const bool wu_vec = p.w_vec && tc::vec_ok(wu, r, r);
    const int steps = r > 0 ? 2 * k_steps : 0;  // weight tiles: down K steps, then up steps
    auto issue = [&](int i) {  // weight tile i into stage i % kStages (one commit group)
      if (i < steps) {
        raw16* st = ws + (i % kStages) * kStage;
        if (i < k_steps) {
          tc::load_tile<kRank, kBK, kThreads>(st, wd, n, r, i * kBK, n, wd_vec);
        } else {
          const int n0 = (i - k_steps) * kBK;
          tc::load_tile<kBK, kBK, kThreads>(st, wu + static_cast<int64_t>(n0) * r, r, kBK, 0, r,
                                            wu_vec);
        }
      }
      tc::cp_async_commit();
    };

    // 1. h = round(y + bias). y lands by cp.async while the first weight tiles stream in.
    load_rows(hs, p.y + grow, len);
    if (steps == 0 && p.residual) load_rows(rs, p.residual + grow, len);  // region is free
    if (steps > 0) {  // the biases of the adapter, staged with y
      load_vec(bs, p.w + off[1], r);
      load_vec(bs + kRank, p.w + off[3], n);
    }
    tc::cp_async_commit();
    if (steps > 0) {
      for (int i = 0; i < kStages - 1; ++i) issue(i);
      tc::cp_async_wait<kStages - 1>();
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();
    const raw16* bias = p.bias + static_cast<int64_t>(p.seg_bias[s]) * n;
    const uint4 bg = __ldg(reinterpret_cast<const uint4*>(bias + gc));
    for (int m = gm; m < len; m += g_rows) {
      add_packed8<MT>(reinterpret_cast<uint4*>(hs + m * ldh + gc), bg);
    }

    // 2-4. down, activation, up over the weight tiles; warp (rf, cq) owns one 16 x 16 block.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    const bool down_cols = cq * 16 < r;         // this warp's 16 bottleneck columns hold any rank
    const int rk = (r + 15) / 16 * 16;          // up: K extent (rank rounded up to the MMA step)
    float* cw = cs + rf * 16 * kLDC + cq * 16;  // the warp's fp32 staging block
    for (int i = 0; i < steps; ++i) {
      tc::cp_async_wait<kStages - 2>();
      __syncthreads();  // tile i (and the h tile) visible; stage (i - 1) % kStages consumed
      issue(i + kStages - 1);
      const MT* st = reinterpret_cast<const MT*>(ws + (i % kStages) * kStage) + cq * 16 * kLDS;
      if (i < k_steps) {
        if (down_cols) {
          const MT* a = reinterpret_cast<const MT*>(hs) + rf * 16 * ldh + i * kBK;
#pragma unroll
          for (int kk = 0; kk < kBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb;
            wmma::load_matrix_sync(fa, a + kk, ldh);
            wmma::load_matrix_sync(fb, st + kk, kLDS);
            wmma::mma_sync(acc, fa, fb, acc);
          }
        }
        if (i == k_steps - 1) {  // 3. bottleneck: d = round(act(h @ Wd.T + bd)), 0 past r
          if (down_cols) wmma::store_matrix_sync(cw, acc, kLDC, wmma::mem_row_major);
          __syncthreads();
          const int act = p.seg_act[s], c = threadIdx.x % kRank;
          const float bd = c < r ? tc::raw_to_f<MT>(bs[c]) : 0.f;
          for (int m = threadIdx.x / kRank; m < kBM; m += kThreads / kRank) {
            const float v = c < r ? apply_act(cs[m * kLDC + c] + bd, act) : 0.f;
            ds[m * kLDS + c] = tc::f_to_raw<MT>(v);
          }
          __syncthreads();
        }
      } else {  // 4. up step: h[:, n0 : n0 + 64] += d @ Wu[n0 : n0 + 64].T + bu
        const int n0 = (i - k_steps) * kBK;
        wmma::fill_fragment(acc, 0.f);
        const MT* a = reinterpret_cast<const MT*>(ds) + rf * 16 * kLDS;
        for (int kk = 0; kk < rk; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb;
          wmma::load_matrix_sync(fa, a + kk, kLDS);
          wmma::load_matrix_sync(fb, st + kk, kLDS);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        // Each warp adds its own 16 x 16 block, staged in its part of cs: no block barrier.
        wmma::store_matrix_sync(cw, acc, kLDC, wmma::mem_row_major);
        __syncwarp();
        const int m = lane >> 1, c = (lane & 1) * 8;  // 16 rows x 2 groups of 8 columns
        if (rf * 16 + m < len) {
          const int col = n0 + cq * 16 + c;
          add_up8<MT>(reinterpret_cast<uint4*>(hs + (rf * 16 + m) * ldh + col), cw + m * kLDC + c,
                      *reinterpret_cast<const uint4*>(bs + kRank + col));
        }
      }
    }
    if (steps > 0) {  // the adapter's region becomes the residual tile
      tc::cp_async_wait<0>();
      __syncthreads();
      if (p.residual) {
        load_rows(rs, p.residual + grow, len);
        tc::cp_async_commit();
        tc::cp_async_wait<0>();
      }
    }
    __syncthreads();  // h (bias pass or up steps) and the residual tile visible to every warp

    // 5. out = LayerNorm(h + residual) * gamma + beta, one warp per row; gamma and beta are
    // the segment's, loaded once per warp.
    const int64_t ln = static_cast<int64_t>(p.seg_ln[s]) * n;
    constexpr int NP = kMaxN / 256;  // 8-value packs per lane
    uint4 gv[NP], bv[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int c = (j * 32 + lane) * 8;
      if (c < n) {
        gv[j] = __ldg(reinterpret_cast<const uint4*>(p.gamma + ln + c));
        bv[j] = __ldg(reinterpret_cast<const uint4*>(p.beta + ln + c));
      }
    }
    for (int m = warp; m < len; m += kWarps) {
      float h[NP][8];
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int c = (j * 32 + lane) * 8;
        if (c < n) {
          unpack8<MT>(*reinterpret_cast<const uint4*>(hs + m * ldh + c), h[j]);
          if (p.residual) {
            float rv[8];
            unpack8<MT>(*reinterpret_cast<const uint4*>(rs + m * ldh + c), rv);
#pragma unroll
            for (int q = 0; q < 8; ++q) h[j][q] += rv[q];
          }
#pragma unroll
          for (int q = 0; q < 8; ++q) sum += h[j][q];
        }
      }
      const float mean = warp_sum(sum) / n;
      float sq = 0.f;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        if ((j * 32 + lane) * 8 < n) {
#pragma unroll
          for (int q = 0; q < 8; ++q) sq += (h[j][q] - mean) * (h[j][q] - mean);
        }
      }
      const float rstd = rsqrtf(warp_sum(sq) / n + p.eps);
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int c = (j * 32 + lane) * 8;
        if (c < n) {
          *reinterpret_cast<uint4*>(p.out + grow + static_cast<int64_t>(m) * n + c) =
              ln_pack8<MT>(h[j], mean, rstd, gv[j], bv[j]);
        }
      }
    }
    __syncthreads();  // the h and residual tiles are rewritten by the next unit
  }
}

// The one-block kernel over every unit of the call, on a persistent grid sized by occupancy.
template <typename T>
void launch_tc(const AdapterLnArgs& a, at::Tensor& out, int n_tok, int n_seg, int n, float eps,
               cudaStream_t stream) {
  using MT = typename tc::MmaType<T>::type;
  const AdapterLnParams p = make_params<T>(a, out, n_seg, n, eps);
  const size_t smem = p.tiles + tc_layout(n).total;
  auto kernel = adapter_ln_tc_kernel<MT>;
  const int grid = grouped_grid(kernel, kThreads, smem, ceil_div(n_tok, kBM) + n_seg);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adapter_ln
}  // namespace petops
