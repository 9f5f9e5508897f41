// The sm_90 cluster kernel of adapter_residual_layernorm (the shapes of the one-block kernel,
// adapter_ln_tc.cuh): the same unit computed by a cluster of kCS blocks, each owning n / kCS
// hidden columns of a 32-token tile. A block loads its y, residual and weight slices at once
// (everything the unit needs is in flight together), computes a partial down projection over
// its columns, and the cluster sums the partials through distributed shared memory; the up
// projection and the LayerNorm then run on each block's columns, the row statistics combined
// across the cluster the same way (Chan's parallel variance: per-block mean and M2). Two
// cluster barriers per unit; the partial and statistics buffers alternate between units so a
// block may run ahead into the next unit while its peers still read the last one.
//
// Fewer serial steps per unit, more instructions per row: it wins only while the batch fills
// at most one round of clusters, which launch_cluster checks.
#pragma once

#include <cooperative_groups.h>

#include "adapter_ln_common.cuh"

namespace petops {
namespace adapter_ln {

// Token rows per unit: 32. At 64, 254 registers allowed one block per SM and every case ran
// 1.3-1.6x slower (docs/results/2026-11-27_h100_sgmv_variants_ab/h100_sgmv_variants_ab.csv).
constexpr int kCS = 4;                       // blocks per cluster
constexpr int kCBM = 32;                     // token rows per unit
constexpr int kCRB = kCBM / 16;              // 16-row MMA blocks per unit
constexpr int kCWR = kWarps / kCRB;          // warps per 16-row block
constexpr int kCDownFr = kRank / 16 / kCWR;  // down-projection fragments per warp
constexpr int kCLDR = kRank + 8;             // row stride (raw16) of [.][kRank] tiles: Wu slice, d
constexpr int kCLDP = kRank + 4;             // row stride (float) of the partial down tile
constexpr int kStgLD = 20;                   // row stride (float) of a warp's 16 x 16 staging block

struct ClusterLayout {
  size_t hs, wd, wu, pd, ds, stg, st, bd, bu, total;  // byte offsets (32-byte multiples)
};

// nc = n / kCS columns per block (a multiple of 16).
__host__ __device__ inline ClusterLayout cluster_layout(int nc) {
  const size_t ldh = nc + 8;
  ClusterLayout l{};
  l.hs = 0;                                                       // [kCBM][nc + 8] h tile
  l.wd = l.hs + kCBM * ldh * sizeof(raw16);                       // [kRank][nc + 8] Wd columns
  l.wu = l.wd + kRank * ldh * sizeof(raw16);                      // [nc][kCLDR] Wu rows
  l.pd = l.wu + static_cast<size_t>(nc) * kCLDR * sizeof(raw16);  // [2][kCBM][kCLDP] partials
  l.ds = l.pd + 2 * kCBM * kCLDP * sizeof(float);                 // [kCBM][kCLDR] bottleneck d
  l.stg = l.ds + kCBM * kCLDR * sizeof(raw16);                    // [kWarps][16][kStgLD] up staging
  l.st = l.stg + kWarps * 16 * kStgLD * sizeof(float);            // [2][kCBM] (mean, M2) per row
  l.bd = l.st + 2 * kCBM * sizeof(float2);                        // [kRank] down.b
  l.bu = l.bd + kRank * sizeof(raw16);                            // [nc] up.b columns
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
__global__ void __launch_bounds__(kThreads, 2) adapter_ln_cluster_kernel(const AdapterLnParams p) {
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
      [&](int s) { return (p.seg_indptr[s + 1] - p.seg_indptr[s] + kCBM - 1) / kCBM; }, scratch);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rb = warp % kCRB, cw = warp / kCRB;  // MMA: 16-row block, first column block
  const bool lane_cols = lane < groups;  // LayerNorm: lane owns columns c0 + 8 lane + [0, 8)
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
      tc::cp_async16(hs + m * ldh + g,
                     m < len ? p.y + grow + static_cast<int64_t>(m) * n + c0 + g : p.y, m < len);
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

// Runs the cluster kernel and returns true when it is the faster kernel for this call: on
// sm_90+, when every unit of the call gets its own resident cluster (one round). It shortens a
// unit's critical path but runs more instructions per row, so past one round the one-block
// kernel is faster. H100, bert-base adapter r=64 site
// (docs/results/2026-11-27_h100_sgmv_variants_ab/h100_sgmv_variants_ab.csv), cluster vs one-block
// kernel: 1 segment 13.2 vs 22.8 us, 8 segments 14.5 vs 24.8, 64 segments 47.8 vs 35.1. Returns
// false (the caller runs the one-block kernel) before sm_90, past one round, or when no cluster of
// the kernel fits this GPU.
template <typename T>
bool launch_cluster(const AdapterLnArgs& a, at::Tensor& out, int n_tok, int n_seg, int n, float eps,
                    cudaStream_t stream) {
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return false;
  using MT = typename tc::MmaType<T>::type;
  const AdapterLnParams p = make_params<T>(a, out, n_seg, n, eps);
  const size_t smem = p.tiles + cluster_layout(n / kCS).total;
  auto kernel = adapter_ln_cluster_kernel<MT>;
  const int clusters = resident_clusters(kernel, smem);
  const int64_t units = ceil_div(n_tok, kCBM) + n_seg;  // bound on the units
  if (clusters < 1 || units > clusters) return false;
  const int grid = kCS * static_cast<int>(units);
  cudaLaunchAttribute cluster{};
  const cudaLaunchConfig_t cfg = cluster_config(grid, smem, stream, &cluster);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  return true;
}

}  // namespace adapter_ln
}  // namespace petops
