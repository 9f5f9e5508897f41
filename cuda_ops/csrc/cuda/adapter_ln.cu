// CUDA kernels for adapter_residual_layernorm: a bottleneck-adapter output site (bias, down,
// activation, up, residual, LayerNorm) in one launch, so h never leaves the SM between the
// four steps the unfused path runs as bias_act, sgmv_shrink, sgmv_expand and
// bias_residual_layernorm (four launches, three round trips of [T, N] through memory).
//
// Tensor-core kernel (fp16/bf16, N % 64 == 0, N <= 1024, max_rank <= 64): persistent blocks
// of 8 warps over units = (segment, 32-token tile), scheduled like the sgmv kernels (a shared
// unit prefix built per block, no host sync). A unit keeps its h tile [32][N] in shared memory:
//   1. h = round(y + bias): y by cp.async, the segment's bias added in shared memory;
//   2. down: d = h @ Wd.T over K = N in 64-wide steps (WMMA m16n16k16, fp32 accumulators);
//   3. d = round(act(d + bd)) into shared memory, zero past the rank;
//   4. up: h += d @ Wu.T + bu in 64-column steps, rounded once per element;
//   5. LayerNorm of h + residual, one warp per row, written with 16-byte stores.
// y, the residual and the weights arrive by cp.async; down and up weight tiles ([64][64]) share
// one 4-stage pipeline, so the first up tiles load while the last down steps compute. Segments
// of rank 0 run steps 1 and 5 only.
//
// Cluster kernel (sm_90+, same shapes; chosen when each 32-token unit gets its own cluster, or
// always with PETOPS_ADAPTER_CLUSTER=1): four blocks share a unit, each with a quarter of the
// hidden columns; partial down projections and LayerNorm statistics are combined through
// distributed shared memory. Fewer serial steps per unit, more instructions per row: it wins
// while the batch fills at most one round of clusters (see cluster_mode).
//
// Generic kernel (fp32, other shapes, PETOPS_ADAPTER_TC=0): one warp per token row with the
// row and its bottleneck in shared memory; same roundings, CUDA cores.
#include <cooperative_groups.h>
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"
#include "tc_common.cuh"

namespace petops {
namespace {

constexpr int kThreads = 256;    // 8 warps, 2 blocks per SM: more warps hide the latency of
                                 // the row passes (H100, 64 segments: 4 warps 42 us, 8 warps 39)
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;          // token rows per unit
constexpr int kRank = 64;        // widest bottleneck of the tensor-core kernel
constexpr int kBK = 64;          // down: K step; up: output columns per step and the rank
constexpr int kLDS = kBK + 8;    // weight tile row stride (conflict-free fragment loads)
constexpr int kStages = 4;       // weight tiles in flight: 3 ahead of the one computed
constexpr int kLDC = kBK + 4;    // fp32 accumulator staging row stride
constexpr int kMaxN = 1024;      // LayerNorm: 4 packs of 8 values per lane
constexpr int kStage = kRank * kLDS;  // raw16 elements per weight tile

using tc::raw16;

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

struct AdapterLnParams {
  const raw16 *y, *residual, *bias, *w, *gamma, *beta;
  const int *seg_indptr, *seg_bias, *seg_rank, *seg_act, *seg_ln;
  const int64_t* seg_w_off;
  raw16* out;
  size_t tiles;  // byte offset of the tile buffers (after the unit prefix)
  int n_seg, n;
  float eps;
  bool w_vec;  // the pool is 16-byte aligned (per-tile checks still apply)
};

// dst[0, count) = src[0, count) by the block's kThreads threads: 16-byte cp.async when src
// is aligned and count % 8 == 0 (dst is), else plain copies.
__device__ __forceinline__ void load_vec(raw16* dst, const raw16* __restrict__ src, int count) {
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && count % 8 == 0) {
    for (int c = threadIdx.x * 8; c < count; c += kThreads * 8) {
      tc::cp_async16(dst + c, src + c, true);
    }
  } else {
    for (int c = threadIdx.x; c < count; c += kThreads) dst[c] = src[c];
  }
}

// v[0, 8) = the 8 packed 16-bit values of p as fp32.
template <typename MT>
__device__ __forceinline__ void unpack8(uint4 p, float (&v)[8]) {
  const uint32_t a[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    v[2 * q] = tc::lo_f<MT>(a[q]);
    v[2 * q + 1] = tc::hi_f<MT>(a[q]);
  }
}

// The LayerNorm output of 8 values: round((v - mean) * rstd * gamma + beta), packed.
template <typename MT>
__device__ __forceinline__ uint4 ln_pack8(const float (&v)[8], float mean, float rstd, uint4 g,
                                          uint4 b) {
  const uint32_t ga[4] = {g.x, g.y, g.z, g.w}, ba[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>((v[2 * q] - mean) * rstd * tc::lo_f<MT>(ga[q]) + tc::lo_f<MT>(ba[q]),
                         (v[2 * q + 1] - mean) * rstd * tc::hi_f<MT>(ga[q]) + tc::hi_f<MT>(ba[q]));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// *h = round(h + b) over 8 packed 16-bit values (the bias pass: h = round(y + bias)).
template <typename MT>
__device__ __forceinline__ void add_packed8(uint4* h, uint4 b) {
  const uint4 hv = *h;
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w}, ba[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>(tc::lo_f<MT>(ha[q]) + tc::lo_f<MT>(ba[q]),
                         tc::hi_f<MT>(ha[q]) + tc::hi_f<MT>(ba[q]));
  }
  *h = make_uint4(o[0], o[1], o[2], o[3]);
}

// *h = round(h + (c + b)) over 8 packed 16-bit values, c[0, 8) the fp32 up-projection of
// those columns (staged in shared memory) and b their up.bias: the adapter's one rounding.
template <typename MT>
__device__ __forceinline__ void add_up8(uint4* h, const float* c, uint4 b) {
  const uint4 hv = *h;
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w}, ba[4] = {b.x, b.y, b.z, b.w};
  const float4 c0 = *reinterpret_cast<const float4*>(c);
  const float4 c1 = *reinterpret_cast<const float4*>(c + 4);
  const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>(tc::lo_f<MT>(ha[q]) + (cv[2 * q] + tc::lo_f<MT>(ba[q])),
                         tc::hi_f<MT>(ha[q]) + (cv[2 * q + 1] + tc::hi_f<MT>(ba[q])));
  }
  *h = make_uint4(o[0], o[1], o[2], o[3]);
}

template <typename MT>
__global__ void __launch_bounds__(kThreads, 2)
    adapter_ln_tc_kernel(const AdapterLnParams p) {
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
      tc::cp_async16(t + m * ldh + gc, m < len ? g + static_cast<int64_t>(m) * n + gc : g,
                     m < len);
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
    const bool down_cols = cq * 16 < r;  // this warp's 16 bottleneck columns hold any rank
    const int rk = (r + 15) / 16 * 16;   // up: K extent (rank rounded up to the MMA step)
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

// ---------------------------------------------------------------------------------- cluster
// sm_90+: the same unit computed by a cluster of kCS blocks, each owning n / kCS hidden
// columns of a 32-token tile. A block loads its y, residual and weight slices at once
// (everything the unit needs is in flight together), computes a partial down projection over
// its columns, and the cluster sums the partials through distributed shared memory; the up
// projection and the LayerNorm then run on each block's columns, the row statistics combined
// across the cluster the same way (Chan's parallel variance: per-block mean and M2). Two
// cluster barriers per unit; the partial and statistics buffers alternate between units so a
// block may run ahead into the next unit while its peers still read the last one.

constexpr int kCS = 4;              // blocks per cluster
constexpr int kCBM = 32;            // token rows per unit (64: 254 registers, one block per SM,
                                    // 1.3-1.6x slower; h100_sgmv_variants_ab.csv)
constexpr int kCRB = kCBM / 16;     // 16-row MMA blocks per unit
constexpr int kCWR = kWarps / kCRB; // warps per 16-row block
constexpr int kCDownFr = kRank / 16 / kCWR;  // down-projection fragments per warp
constexpr int kCLDR = kRank + 8;    // row stride (raw16) of [.][kRank] tiles: Wu slice, d
constexpr int kCLDP = kRank + 4;    // row stride (float) of the partial down tile
constexpr int kStgLD = 20;          // row stride (float) of a warp's 16 x 16 staging block

struct ClusterLayout {
  size_t hs, wd, wu, pd, ds, stg, st, bd, bu, total;  // byte offsets (32-byte multiples)
};

// nc = n / kCS columns per block (a multiple of 16).
__host__ __device__ inline ClusterLayout cluster_layout(int nc) {
  const size_t ldh = nc + 8;
  ClusterLayout l{};
  l.hs = 0;                                                  // [kCBM][nc + 8] h tile
  l.wd = l.hs + kCBM * ldh * sizeof(raw16);                  // [kRank][nc + 8] Wd columns
  l.wu = l.wd + kRank * ldh * sizeof(raw16);                 // [nc][kCLDR] Wu rows
  l.pd = l.wu + static_cast<size_t>(nc) * kCLDR * sizeof(raw16);  // [2][kCBM][kCLDP] partials
  l.ds = l.pd + 2 * kCBM * kCLDP * sizeof(float);            // [kCBM][kCLDR] bottleneck d
  l.stg = l.ds + kCBM * kCLDR * sizeof(raw16);               // [kWarps][16][kStgLD] up staging
  l.st = l.stg + kWarps * 16 * kStgLD * sizeof(float);       // [2][kCBM] (mean, M2) per row
  l.bd = l.st + 2 * kCBM * sizeof(float2);                   // [kRank] down.b
  l.bu = l.bd + kRank * sizeof(raw16);                       // [nc] up.b columns
  l.total = l.bu + (static_cast<size_t>(nc) * sizeof(raw16) + 31) / 32 * 32;
  return l;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // device code of the sm_90 kernel only
// s[i * lds + k] = g[i * ld + k] for i < nrows, k < kmax; zero for the rest of [rows][cols]
// (cols % 8 == 0). `vec`: g and ld allow 16-byte groups that lie wholly inside or outside kmax.
__device__ __forceinline__ void load_block(raw16* s, int lds, const raw16* __restrict__ g,
                                           int64_t ld, int rows, int nrows, int cols, int kmax,
                                           bool vec) {
  if (vec) {
    const int groups = cols / 8;
    for (int e = threadIdx.x; e < rows * groups; e += kThreads) {
      const int i = e / groups, k = (e - i * groups) * 8;
      const bool ok = i < nrows && k < kmax;
      tc::cp_async16(s + i * lds + k, ok ? g + i * ld + k : g, ok);
    }
  } else {
    for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
      const int i = e / cols, k = e - i * cols;
      s[i * lds + k] = (i < nrows && k < kmax) ? g[i * ld + k] : raw16(0);
    }
  }
}
#endif

template <typename MT>
__global__ void __launch_bounds__(kThreads, 2)
    adapter_ln_cluster_kernel(const AdapterLnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace nvcuda;
  namespace cg = cooperative_groups;
  constexpr int kCRows = kCBM / kWarps;  // LayerNorm rows per warp
  extern __shared__ __align__(tc::kSmemAlign) char smem[];
  __shared__ int scratch[32];
  cg::cluster_group cluster = cg::this_cluster();
  const int crank = static_cast<int>(cluster.block_rank());
  const int cid = static_cast<int>(blockIdx.x) / kCS, n_clusters = gridDim.x / kCS;
  const int n = p.n, nc = n / kCS, c0 = crank * nc, ldh = nc + 8, groups = nc / 8;
  int* prefix = reinterpret_cast<int*>(smem);
  const ClusterLayout lay = cluster_layout(nc);
  char* tiles = smem + p.tiles;
  raw16* hs = reinterpret_cast<raw16*>(tiles + lay.hs);
  raw16* wds = reinterpret_cast<raw16*>(tiles + lay.wd);
  raw16* wus = reinterpret_cast<raw16*>(tiles + lay.wu);
  float* pd = reinterpret_cast<float*>(tiles + lay.pd);
  raw16* ds = reinterpret_cast<raw16*>(tiles + lay.ds);
  float* stg = reinterpret_cast<float*>(tiles + lay.stg) + (threadIdx.x >> 5) * 16 * kStgLD;
  float2* st = reinterpret_cast<float2*>(tiles + lay.st);
  raw16* bds = reinterpret_cast<raw16*>(tiles + lay.bd);
  raw16* bus = reinterpret_cast<raw16*>(tiles + lay.bu);

  const int total = build_unit_prefix(
      prefix, p.n_seg,
      [&](int s) { return (p.seg_indptr[s + 1] - p.seg_indptr[s] + kCBM - 1) / kCBM; },
      scratch);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rb = warp % kCRB, cw = warp / kCRB;  // MMA: 16-row block, first column block
  const bool lane_cols = lane < groups;       // LayerNorm: lane owns columns c0 + 8 lane + [0, 8)
  int buf = 0;
  for (int u = cid; u < total; u += n_clusters, buf ^= 1) {
    const int s = upper_slot(prefix, p.n_seg, u);
    const int row0 = p.seg_indptr[s] + (u - prefix[s]) * kCBM;
    const int len = min(kCBM, p.seg_indptr[s + 1] - row0);
    const int64_t grow = static_cast<int64_t>(row0) * n;
    const int r = p.seg_rank[s], rk = (r + 15) / 16 * 16;
    const int64_t* off = p.seg_w_off + static_cast<int64_t>(s) * kAdapterParts;

    // 0. Everything the unit reads, issued at once: y and Wd columns (group 0), Wu rows and
    // the adapter biases (group 1), the residual into registers.
    for (int e = threadIdx.x; e < kCBM * groups; e += kThreads) {
      const int m = e / groups, g = (e - m * groups) * 8;
      tc::cp_async16(hs + m * ldh + g, m < len ? p.y + grow + static_cast<int64_t>(m) * n + c0 + g
                                               : p.y,
                     m < len);
    }
    if (r > 0) {
      const raw16* wd = p.w + off[0] + c0;
      load_block(wds, ldh, wd, n, rk, r, nc, nc, p.w_vec && tc::vec_ok(wd, n, nc));
    }
    tc::cp_async_commit();
    if (r > 0) {
      const raw16* wu = p.w + off[2] + static_cast<int64_t>(c0) * r;
      load_block(wus, kCLDR, wu, r, nc, nc, rk, r, p.w_vec && tc::vec_ok(wu, r, r));
      load_vec(bds, p.w + off[1], r);
      load_vec(bus, p.w + off[3] + c0, nc);
    }
    tc::cp_async_commit();
    uint4 res[kCRows];
#pragma unroll
    for (int i = 0; i < kCRows; ++i) {
      const int m = warp + i * kWarps;
      res[i] = make_uint4(0, 0, 0, 0);
      if (p.residual && lane_cols && m < len) {
        res[i] = __ldg(reinterpret_cast<const uint4*>(p.residual + grow +
                                                      static_cast<int64_t>(m) * n + c0 + lane * 8));
      }
    }
    tc::cp_async_wait<1>();
    __syncthreads();

    // 1. h = round(y + bias) on this block's columns.
    const raw16* bias = p.bias + static_cast<int64_t>(p.seg_bias[s]) * n + c0;
    for (int e = threadIdx.x; e < len * groups; e += kThreads) {
      const int m = e / groups, g = (e - m * groups) * 8;
      add_packed8<MT>(reinterpret_cast<uint4*>(hs + m * ldh + g),
                      __ldg(reinterpret_cast<const uint4*>(bias + g)));
    }
    __syncthreads();

    // 2. Partial down projection over this block's columns: pd = h[:, cols] @ Wd[:, cols].T,
    // warp (rb, cw) owning 16 rows and rank column blocks cw, cw + kCWR, ...
    float* pdb = pd + buf * kCBM * kCLDP;
    if (r > 0 && cw * 16 < rk) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kCDownFr];
#pragma unroll
      for (int f = 0; f < kCDownFr; ++f) wmma::fill_fragment(acc[f], 0.f);
      const MT* a = reinterpret_cast<const MT*>(hs) + rb * 16 * ldh;
      const MT* b = reinterpret_cast<const MT*>(wds) + cw * 16 * ldh;
      for (int k = 0; k < nc; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a + k, ldh);
#pragma unroll
        for (int f = 0; f < kCDownFr; ++f) {
          if ((cw + f * kCWR) * 16 < rk) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, b + f * kCWR * 16 * ldh + k, ldh);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
      }
#pragma unroll
      for (int f = 0; f < kCDownFr; ++f) {
        if ((cw + f * kCWR) * 16 < rk) {
          wmma::store_matrix_sync(pdb + rb * 16 * kCLDP + (cw + f * kCWR) * 16, acc[f], kCLDP,
                                  wmma::mem_row_major);
        }
      }
    }
    cluster.sync();  // every block's partials visible to the cluster

    if (r > 0) {
      tc::cp_async_wait<0>();
      __syncthreads();  // Wu rows and the biases landed
      // 3. d = round(act(sum of the kCS partials + bd)), zero past r. Each thread owns
      // kRedIt groups of 4 bottleneck columns; all its remote loads are issued together (a
      // load from a peer's shared memory costs hundreds of cycles).
      constexpr int kQ = kRank / 4, kRedIt = kCBM * kQ / kThreads;
      const float* parts[kCS];
#pragma unroll
      for (int c = 0; c < kCS; ++c) parts[c] = cluster.map_shared_rank(pdb, c);
      float4 sum4[kRedIt];
#pragma unroll
      for (int it = 0; it < kRedIt; ++it) sum4[it] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int c = 0; c < kCS; ++c) {
#pragma unroll
        for (int it = 0; it < kRedIt; ++it) {
          const int e = threadIdx.x + it * kThreads, m = e / kQ, j = (e % kQ) * 4;
          if (m < len && j < rk) {
            const float4 v = *reinterpret_cast<const float4*>(parts[c] + m * kCLDP + j);
            sum4[it].x += v.x;
            sum4[it].y += v.y;
            sum4[it].z += v.z;
            sum4[it].w += v.w;
          }
        }
      }
      const int act = p.seg_act[s];
#pragma unroll
      for (int it = 0; it < kRedIt; ++it) {
        const int e = threadIdx.x + it * kThreads, m = e / kQ, j = (e % kQ) * 4;
        const float v[4] = {sum4[it].x, sum4[it].y, sum4[it].z, sum4[it].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool on = j + q < r && m < len;
          ds[m * kCLDR + j + q] =
              tc::f_to_raw<MT>(on ? apply_act(v[q] + tc::raw_to_f<MT>(bds[j + q]), act) : 0.f);
        }
      }
      __syncthreads();

      // 4. up: h[:, cols] = round(h + (d @ Wu[cols].T + bu)), warp (rb, cw) on column
      // blocks cw, cw + kCWR, ... of its 16 rows, staged per warp: no block barrier.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa[kRank / 16];
#pragma unroll
      for (int q = 0; q < kRank / 16; ++q) {
        if (q * 16 < rk) {
          wmma::load_matrix_sync(fa[q], reinterpret_cast<const MT*>(ds) + rb * 16 * kCLDR + q * 16,
                                 kCLDR);
        }
      }
      const int m = lane >> 1, cg8 = (lane & 1) * 8;  // 16 rows x 2 groups of 8 columns
      for (int cb = cw; cb < nc / 16; cb += kCWR) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        const MT* b = reinterpret_cast<const MT*>(wus) + cb * 16 * kCLDR;
#pragma unroll
        for (int q = 0; q < kRank / 16; ++q) {
          if (q * 16 < rk) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, b + q * 16, kCLDR);
            wmma::mma_sync(acc, fa[q], fb, acc);
          }
        }
        wmma::store_matrix_sync(stg, acc, kStgLD, wmma::mem_row_major);
        __syncwarp();
        if (rb * 16 + m < len) {
          const int col = cb * 16 + cg8;
          add_up8<MT>(reinterpret_cast<uint4*>(hs + (rb * 16 + m) * ldh + col),
                      stg + m * kStgLD + cg8, *reinterpret_cast<const uint4*>(bus + col));
        }
        __syncwarp();  // staging block read before the next column block overwrites it
      }
    }
    __syncthreads();  // h final on this block's columns

    // 5. LayerNorm of h + residual, warp per row: this block's mean and M2 per row, combined
    // over the cluster, then normalized and written. The rows of a warp are independent: the
    // loops are unrolled so their reductions and remote loads overlap.
    float2* stb = st + buf * kCBM;
    float v[kCRows][8];
#pragma unroll
    for (int i = 0; i < kCRows; ++i) {
      const int m = warp + i * kWarps;
      if (lane_cols && m < len) {
        float rv[8];
        unpack8<MT>(*reinterpret_cast<const uint4*>(hs + m * ldh + lane * 8), v[i]);
        unpack8<MT>(res[i], rv);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[i][q] += rv[q];
      } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) v[i][q] = 0.f;
      }
    }
    float mean_c[kCRows];
#pragma unroll
    for (int i = 0; i < kCRows; ++i) {
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < 8; ++q) sum += v[i][q];
      mean_c[i] = warp_sum(sum) / nc;
    }
#pragma unroll
    for (int i = 0; i < kCRows; ++i) {
      float sq = 0.f;
      if (lane_cols) {
#pragma unroll
        for (int q = 0; q < 8; ++q) sq += (v[i][q] - mean_c[i]) * (v[i][q] - mean_c[i]);
      }
      sq = warp_sum(sq);
      const int m = warp + i * kWarps;
      if (lane == 0 && m < len) stb[m] = make_float2(mean_c[i], sq);
    }
    cluster.sync();  // every block's row statistics visible to the cluster

    float2 part[kCRows][kCS];
#pragma unroll
    for (int c = 0; c < kCS; ++c) {
      const float2* stats = cluster.map_shared_rank(stb, c);
#pragma unroll
      for (int i = 0; i < kCRows; ++i) {
        const int m = warp + i * kWarps;
        part[i][c] = m < len ? stats[m] : make_float2(0.f, 0.f);
      }
    }
    const int64_t ln = static_cast<int64_t>(p.seg_ln[s]) * n + c0 + lane * 8;
    uint4 gv = make_uint4(0, 0, 0, 0), bv = gv;
    if (lane_cols) {
      gv = __ldg(reinterpret_cast<const uint4*>(p.gamma + ln));
      bv = __ldg(reinterpret_cast<const uint4*>(p.beta + ln));
    }
#pragma unroll
    for (int i = 0; i < kCRows; ++i) {
      const int m = warp + i * kWarps;
      float mean = 0.f;
#pragma unroll
      for (int c = 0; c < kCS; ++c) mean += part[i][c].x;
      mean *= 1.f / kCS;
      float m2 = 0.f;
#pragma unroll
      for (int c = 0; c < kCS; ++c) {
        const float dm = part[i][c].x - mean;
        m2 += part[i][c].y + static_cast<float>(nc) * dm * dm;
      }
      const float rstd = rsqrtf(m2 / n + p.eps);
      if (lane_cols && m < len) {
        *reinterpret_cast<uint4*>(p.out + grow + static_cast<int64_t>(m) * n + c0 + lane * 8) =
            ln_pack8<MT>(v[i], mean, rstd, gv, bv);
      }
    }
    __syncthreads();  // the h tile and weight slices are refilled by the next unit
  }
  cluster.sync();  // peers may still be reading this block's statistics
#endif
}

// ---------------------------------------------------------------------------------- generic

constexpr int kRowWarps = 4;

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

// One warp per token row t; the row h [N] and bottleneck d [R] live in shared memory.
template <typename T>
__global__ void __launch_bounds__(32 * kRowWarps)
    adapter_ln_rows_kernel(const T* __restrict__ y, const T* __restrict__ residual,
                           const T* __restrict__ bias, const T* __restrict__ w,
                           const T* __restrict__ gamma, const T* __restrict__ beta,
                           const int* __restrict__ seg_indptr, const int* __restrict__ seg_bias,
                           const int* __restrict__ seg_rank, const int* __restrict__ seg_act,
                           const int* __restrict__ seg_ln, const int64_t* __restrict__ seg_w_off,
                           T* __restrict__ out, int n_tok, int n_seg, int n, int max_rank,
                           float eps) {
  extern __shared__ float rows[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kRowWarps + warp;
  if (t >= n_tok) return;  // no block-wide barriers below
  float* h = rows + static_cast<size_t>(warp) * (n + max_rank);
  float* d = h + n;
  const int s = upper_slot(seg_indptr, n_seg, t);
  const int64_t row = static_cast<int64_t>(t) * n;
  const T* b = bias + static_cast<int64_t>(seg_bias[s]) * n;
  for (int c = lane; c < n; c += 32) h[c] = round_to<T>(to_f(y[row + c]) + to_f(b[c]));
  const int r = seg_rank[s];
  if (r > 0) {
    const int64_t* off = seg_w_off + static_cast<int64_t>(s) * kAdapterParts;
    const T *wd = w + off[0], *bd = w + off[1], *wu = w + off[2], *bu = w + off[3];
    const int act = seg_act[s];
    __syncwarp();
    for (int j = 0; j < r; ++j) {
      float acc = 0.f;
      for (int c = lane; c < n; c += 32) acc += h[c] * to_f(wd[static_cast<int64_t>(j) * n + c]);
      acc = warp_sum(acc);
      if (lane == 0) d[j] = round_to<T>(apply_act(acc + to_f(bd[j]), act));
    }
    __syncwarp();
    for (int c = lane; c < n; c += 32) {
      float acc = 0.f;
      for (int j = 0; j < r; ++j) acc += d[j] * to_f(wu[static_cast<int64_t>(c) * r + j]);
      h[c] = round_to<T>(h[c] + (acc + to_f(bu[c])));
    }
  }
  __syncwarp();
  float sum = 0.f;
  for (int c = lane; c < n; c += 32) {
    if (residual) h[c] += to_f(residual[row + c]);
    sum += h[c];
  }
  const float mean = warp_sum(sum) / n;
  float sq = 0.f;
  for (int c = lane; c < n; c += 32) sq += (h[c] - mean) * (h[c] - mean);
  const float rstd = rsqrtf(warp_sum(sq) / n + eps);
  const int64_t ln = static_cast<int64_t>(seg_ln[s]) * n;
  for (int c = lane; c < n; c += 32)
    out[row + c] = from_f<T>((h[c] - mean) * rstd * to_f(gamma[ln + c]) + to_f(beta[ln + c]));
}

template <typename T>
AdapterLnParams make_params(const AdapterLnArgs& a, at::Tensor& out, int n_seg, int n,
                            float eps) {
  const EpilogueArgs& e = a.ln;
  return AdapterLnParams{tc::raw_or_null<T>(e.y),     tc::raw_or_null<T>(e.residual),
                         tc::raw_or_null<T>(e.bias),  tc::raw_or_null<T>(a.w),
                         tc::raw_or_null<T>(e.gamma), tc::raw_or_null<T>(e.beta),
                         e.seg_indptr.data_ptr<int>(), e.seg_bias.data_ptr<int>(),
                         a.seg_rank.data_ptr<int>(),  a.seg_act.data_ptr<int>(),
                         e.seg_ln.data_ptr<int>(),    a.seg_w_off.data_ptr<int64_t>(),
                         reinterpret_cast<raw16*>(out.data_ptr<T>()),
                         tc::tile_smem(n_seg, 0), n_seg, n, eps, aligned16({&a.w})};
}

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

// Launch configuration of the cluster kernel: kCS-block clusters of kThreads threads.
inline cudaLaunchConfig_t cluster_config(int grid, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = kCS;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Clusters of `kernel` resident on the GPU at once with `smem` bytes per block (0: none fit),
// after opting the kernel into that much shared memory. Cached per device, kernel and size.
template <typename Kernel>
int resident_clusters(Kernel kernel, size_t smem) {
  using Key = std::tuple<int, const void*, size_t>;
  static std::mutex mu;
  static std::map<Key, int> cache;
  const Key key{c10::cuda::current_device(), reinterpret_cast<const void*>(kernel), smem};
  const std::lock_guard<std::mutex> lock(mu);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  int clusters = 0;
  if (smem <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    if (smem > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {  // only ever raised:
      // a launch of a larger, cached size must stay valid
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    cudaLaunchAttribute cluster{};
    const cudaLaunchConfig_t cfg = cluster_config(kCS, smem, nullptr, &cluster);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
  }
  cache.emplace(key, clusters);
  return clusters;
}

// Which kernel a tensor-core call runs on sm_90+: PETOPS_ADAPTER_CLUSTER=0 the one-block
// kernel, =1 the cluster kernel, unset (auto) the cluster kernel when every unit gets its own
// resident cluster (one round). The cluster kernel shortens a unit's critical path but runs
// more instructions per row, so past one round the one-block kernel is faster. H100,
// bert-base adapter r=64 site, fused op (docs/results/h100_sgmv_variants_ab.csv): 1 segment
// 13.2 vs 22.8 us, 8 segments 14.5 vs 24.8, 64 segments 47.8 vs 35.1 (auto keeps the
// one-block kernel there). Read per call, for A/B timing and tests.
enum class ClusterMode { kOff, kOn, kAuto };
inline ClusterMode cluster_mode() {
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return ClusterMode::kOff;
  const char* env = std::getenv("PETOPS_ADAPTER_CLUSTER");
  if (env == nullptr || env[0] == '\0') return ClusterMode::kAuto;
  return env[0] == '0' ? ClusterMode::kOff : ClusterMode::kOn;
}

// The cluster kernel (sm_90+), when `mode` selects it for this call; false when it does not
// or no cluster of it fits this GPU (the caller then runs the one-block kernel).
template <typename T>
bool launch_cluster(ClusterMode mode, const AdapterLnArgs& a, at::Tensor& out, int n_tok,
                    int n_seg, int n, float eps, cudaStream_t stream) {
  if (mode == ClusterMode::kOff) return false;
  using MT = typename tc::MmaType<T>::type;
  const AdapterLnParams p = make_params<T>(a, out, n_seg, n, eps);
  const size_t smem = p.tiles + cluster_layout(n / kCS).total;
  auto kernel = adapter_ln_cluster_kernel<MT>;
  const int clusters = resident_clusters(kernel, smem);
  const int64_t units = ceil_div(n_tok, kCBM) + n_seg;  // bound on the units
  if (clusters < 1 || (mode == ClusterMode::kAuto && units > clusters)) return false;
  const int grid = kCS * static_cast<int>(std::min<int64_t>(units, clusters));
  cudaLaunchAttribute cluster{};
  const cudaLaunchConfig_t cfg = cluster_config(grid, smem, stream, &cluster);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  return true;
}

at::Tensor adapter_residual_layernorm_cuda(
    const at::Tensor& y, const OptTensor& residual, const at::Tensor& bias,
    const at::Tensor& seg_bias, const at::Tensor& w, const at::Tensor& seg_w_off,
    const at::Tensor& seg_rank, const at::Tensor& seg_act, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& seg_indptr, const at::Tensor& seg_ln,
    int64_t max_rank, double eps) {
  AdapterLnArgs a = prepare_adapter_ln(y, residual, bias, seg_bias, w, seg_w_off, seg_rank,
                                       seg_act, gamma, beta, seg_indptr, seg_ln, max_rank);
  const EpilogueArgs& e = a.ln;
  TORCH_INTERNAL_ASSERT(e.y.is_cuda());
  const c10::cuda::CUDAGuard guard(e.y.device());
  at::Tensor out = at::empty_like(e.y);
  const int64_t n_tok = e.y.size(0), n = e.y.size(1);
  if (n_tok == 0 || n == 0) return out;
  const int n_seg = static_cast<int>(e.seg_indptr.numel() - 1);
  PETOPS_CHECK(n_seg > 0, "seg_indptr describes 0 segments but y has ", n_tok, " rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool tc_ok = tc::enabled(e.y.scalar_type(), "PETOPS_ADAPTER_TC") && n % kBK == 0 &&
                     n <= kMaxN && max_rank <= kRank && n_seg <= kMaxItems &&
                     aligned16({&e.y, &e.residual, &e.bias, &e.gamma, &e.beta, &out});
  if (tc_ok) {  // tc::enabled: float16 or bfloat16
    const bool half = e.y.scalar_type() == at::kHalf;
    const int t = static_cast<int>(n_tok), hidden = static_cast<int>(n);
    const float ep = static_cast<float>(eps);
    if ((half ? launch_cluster<at::Half> : launch_cluster<at::BFloat16>)(
            cluster_mode(), a, out, t, n_seg, hidden, ep, stream)) {
      return out;
    }
    (half ? launch_tc<at::Half> : launch_tc<at::BFloat16>)(a, out, t, n_seg, hidden, ep, stream);
    return out;
  }
  PETOPS_DISPATCH_FLOATS(e.y.scalar_type(), "adapter_ln_cuda", [&] {
    const size_t smem = static_cast<size_t>(kRowWarps) * (n + max_rank) * sizeof(float);
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    PETOPS_CHECK(smem <= prop->sharedMemPerBlockOptin, "adapter_residual_layernorm: hidden size ",
                 n, " with max_rank ", max_rank, " needs ", smem, " bytes of shared memory per ",
                 "block, more than this GPU's ", prop->sharedMemPerBlockOptin,
                 "; use the unfused ops (sgmv_shrink / sgmv_expand) for such shapes");
    auto kernel = adapter_ln_rows_kernel<scalar_t>;
    resident_blocks(kernel, 32 * kRowWarps, smem);  // opts the kernel into smem past 48 KB
    kernel<<<ceil_div(n_tok, kRowWarps), 32 * kRowWarps, smem, stream>>>(
        e.y.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(e.residual), e.bias.data_ptr<scalar_t>(),
        a.w.data_ptr<scalar_t>(), e.gamma.data_ptr<scalar_t>(), e.beta.data_ptr<scalar_t>(),
        e.seg_indptr.data_ptr<int>(), e.seg_bias.data_ptr<int>(), a.seg_rank.data_ptr<int>(),
        a.seg_act.data_ptr<int>(), e.seg_ln.data_ptr<int>(), a.seg_w_off.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), static_cast<int>(n_tok), n_seg, static_cast<int>(n),
        static_cast<int>(max_rank), static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) {
  m.impl("adapter_residual_layernorm", &adapter_residual_layernorm_cuda);
}

}  // namespace petops
