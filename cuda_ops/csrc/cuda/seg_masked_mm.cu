// CUDA kernels for seg_masked_mm: y[rows] += alpha * x[rows] @ (W * M_i).T, M_i an item's
// [N, K] bit mask over the shared weight W (one 32-bit word per 32 input columns of a row).
//
// A MaskBERT delta at a few percent density is a sparse matrix, but as a sparse product every
// token gathers every non-zero (seg_spmm waits on L1/TEX for it). Here the mask instead selects
// weights inside a dense tensor-core GEMM, whose cost does not depend on the density:
//   unit = (item, 64-token tile, 128-column tile); K streamed in 64-wide chunks (two mask
//   words per weight row per chunk) through a 2-stage cp.async pipeline that brings the x rows,
//   the W rows and the mask words; each thread then zeroes the unselected weights of one staged
//   W row in shared memory, and the 4 warps run WMMA on the masked tile (tc_common.cuh).
// A call with too few tiles to fill the GPU (one request: 128 tokens of one task are 2 x 6
// tiles at a 768-wide site) and a deep K (the FFN output's 3072) also splits K over several
// blocks per tile: each writes its fp32 partial tile to a workspace, and the tile's last block
// to finish (a per-tile counter) sums the partials in split order, so the result does not
// depend on which block came last.
// float32 (and any dtype before sm_80) runs a CUDA-core kernel with the same units on 32 x 32
// tiles. Items with item_mask_off < 0 have no mask at this site and get no units. Each
// (token, column) has one owner, so y takes no atomics; items sharing a segment must not be
// given (see ops.py).
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"
#include "tc_common.cuh"

namespace petops {
namespace {

// Work units of item i: (ROWS-token tile, column tile) pairs; none without a mask.
template <int ROWS>
__device__ __forceinline__ int item_units(int i, const int* seg_indptr, const int* item_seg,
                                          const int64_t* item_mask_off, int col_tiles) {
  const int s = item_seg[i], len = seg_indptr[s + 1] - seg_indptr[s];
  return item_mask_off[i] >= 0 ? ((len + ROWS - 1) / ROWS) * col_tiles : 0;
}

// ---- tensor cores (float16 / bfloat16) ----

constexpr int kBN = tc::kTileBN;
constexpr int kLDC = kBN + 4;
static_assert(kBN == tc::kThreads, "the mask pass gives each thread one staged weight row");

// Pipeline shape: kBK input columns (kWords mask words per weight row) per stage, kStages
// stages. H100, bert-base MaskBERT 5% site
// (docs/results/2026-11-26_h100_masked_cfg/h100_masked_cfg.csv), 64 x 2 against the shapes tried
// and dropped, 64 x 3 and 32 x 3: 19.7 vs 19.6 and 23.8 us at 1 segment, 67.2 vs 66.7 and 65.3 at
// 64, 200 vs 221 and 272 at 256.
constexpr int kBK = 64;
constexpr int kStages = 2;
constexpr int kWords = kBK / 32;
constexpr int kLDS = kBK + 8;
constexpr size_t kStageBytes = size_t(tc::kBM + kBN) * kLDS * 2 + size_t(kBN) * kWords * 4;
constexpr size_t kPipeBytes = kStages * kStageBytes, kEpiBytes = size_t(tc::kBM) * kLDC * 4;
constexpr size_t kTcSmem = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
// K chunks a split takes at least: fewer would leave the 2-stage pipeline mostly prologue.
constexpr int64_t kMinSplitChunks = 4;
// K chunks below which a call is never split. Measured on an H100 (bert-base fp16, one
// 128-token MaskBERT request, 12 tiles a site): K = 3072 (48 chunks) split 8 ways took the
// FFN-output site from 78 to 41 us, but K = 768 (12 chunks) split 3 ways took the other sites
// from 21 to 45 us: the partials' write, count and sum cost more than a shallow K saves.
constexpr int64_t kMinSplitDepth = 32;
// Rows of a split tile its last block sums at once. H100, one device call (8 MaskBERT tasks x
// 64 tokens, bert-base fp16): one row at a time left each thread on a chain of dependent
// loads, and summing 8 took the FFN-output site from 857 to 582 us a forward
// (docs/results/2026-12-08_h100_sparse_small_ab2; measured with the split bound at 8).
constexpr int kSumRows = 8;

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem),
               "r"(pred ? 4 : 0)
               : "memory");
}

// Zero the weights of a staged row (32 * W raw 16-bit values) whose bit in `words` is 0.
template <int W>
__device__ __forceinline__ void mask_row(tc::raw16* row, const uint32_t* words) {
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const uint32_t word = words[j];
    if (word == 0xffffffffu) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint4* p = reinterpret_cast<uint4*>(row + j * 32 + q * 8);
      uint4 v = *p;
      uint32_t wd[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const uint32_t b = word >> (q * 8 + 2 * h);
        wd[h] &= ((b & 1u) ? 0x0000ffffu : 0u) | ((b & 2u) ? 0xffff0000u : 0u);
      }
      *p = make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  }
}

template <typename MT>
__global__ void __launch_bounds__(tc::kThreads, tc::kMinBlocks)
    seg_masked_mm_tc_kernel(tc::raw16* __restrict__ y, const tc::raw16* __restrict__ x,
                            const tc::raw16* __restrict__ w, const uint32_t* __restrict__ mask,
                            const int* __restrict__ seg_indptr, const int* __restrict__ item_seg,
                            const int64_t* __restrict__ item_mask_off, float alpha, int n_items,
                            int n_out, int k_dim, int n_splits, int64_t n_tok,
                            float* __restrict__ ws, int* __restrict__ tile_done) {
  using tc::kBM;
  using tc::raw16;
  constexpr int BK = kBK, S = kStages, LDS = kLDS, W = kWords;
  extern __shared__ __align__(tc::kSmemAlign) char dsmem[];
  int* prefix = reinterpret_cast<int*>(dsmem);  // [n_items + 1]
  char* buf =
      dsmem + ((n_items + 1) * sizeof(int) + tc::kSmemAlign - 1) / tc::kSmemAlign * tc::kSmemAlign;
  raw16* sa = reinterpret_cast<raw16*>(buf);                       // [S][kBM][LDS]
  raw16* sb = sa + S * kBM * LDS;                                  // [S][kBN][LDS]
  uint32_t* sm = reinterpret_cast<uint32_t*>(sb + S * kBN * LDS);  // [S][kBN][W]
  float* sc = reinterpret_cast<float*>(buf);                       // [kBM][kLDC], after the loop
  __shared__ int scratch[32];
  __shared__ int last_split;
  const int col_tiles = (n_out + kBN - 1) / kBN;
  const int tiles = build_unit_prefix(
      prefix, n_items,
      [&](int i) { return item_units<kBM>(i, seg_indptr, item_seg, item_mask_off, col_tiles); },
      scratch);
  const int kw = (k_dim + 31) / 32, nk_all = (k_dim + BK - 1) / BK;
  const bool y_al = (reinterpret_cast<uintptr_t>(y) & 15) == 0 && (n_out & 7) == 0;
  const int t = threadIdx.x;  // the weight row this thread masks: one of its own warp's rows
  for (int u = blockIdx.x; u < tiles * n_splits; u += gridDim.x) {
    const int tile_u = u / n_splits, split = u - tile_u * n_splits;
    const int kt0 = split * nk_all / n_splits, nk = (split + 1) * nk_all / n_splits - kt0;
    const int i = upper_slot(prefix, n_items, tile_u);
    const int s = item_seg[i], local = tile_u - prefix[i];
    const int col0 = (local % col_tiles) * kBN;
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(local / col_tiles) * kBM;
    const int len = min(kBM, static_cast<int>(seg_indptr[s + 1] - row0));
    const int ncol = min(kBN, n_out - col0);
    const raw16* ga = x + row0 * k_dim;
    const raw16* gb = w + static_cast<int64_t>(col0) * k_dim;
    const uint32_t* gm =
        mask + item_mask_off[i] + static_cast<int64_t>(col0 + min(t, ncol - 1)) * kw;
    const bool av = tc::vec_ok(ga, k_dim, k_dim), bv = tc::vec_ok(gb, k_dim, k_dim);
    auto load_stage = [&](int st, int kt) {
      tc::load_tile<kBM, BK>(sa + st * kBM * LDS, ga, k_dim, len, kt * BK, k_dim, av);
      tc::load_tile<kBN, BK>(sb + st * kBN * LDS, gb, k_dim, ncol, kt * BK, k_dim, bv);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int wi = kt * W + j;
        cp_async4(sm + (st * kBN + t) * W + j, gm + min(wi, kw - 1), t < ncol && wi < kw);
      }
    };

    tc::WarpTile<MT> tile;
    tile.zero();
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
      if (st < nk) load_stage(st, kt0 + st);
      tc::cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
      const int st = kt % S;
      tc::cp_async_wait<S - 2>();
      __syncthreads();  // stage kt landed for every thread; stage kt - 1 fully consumed
      // Row t of the weight tile is read only by warp t / 32 (WarpTile's column slice), so
      // masking it needs no block-wide barrier.
      mask_row<W>(sb + (st * kBN + t) * LDS, sm + (st * kBN + t) * W);
      __syncwarp();
      const int nx = kt + S - 1;
      if (nx < nk) load_stage(nx % S, kt0 + nx);
      tc::cp_async_commit();
      tile.template mma<BK, LDS>(sa + st * kBM * LDS, sb + st * kBN * LDS);
    }
    tc::cp_async_wait<0>();
    __syncthreads();  // pipeline buffers free
    tile.template store<kLDC>(sc);
    __syncthreads();
    if (n_splits > 1) {  // thread t owns column col0 + t of the partial tiles
      float* part = ws + (static_cast<int64_t>(split) * n_tok + row0) * n_out + col0 + t;
      if (t < ncol)
        for (int m = 0; m < len; ++m) part[static_cast<int64_t>(m) * n_out] = sc[m * kLDC + t];
      __threadfence();  // this split's partial is visible before it is counted
      __syncthreads();
      if (t == 0) last_split = atomicAdd(tile_done + tile_u, 1) == n_splits - 1;
      __syncthreads();
      if (!last_split) continue;  // sc fully read above; the next unit may refill the pipeline
      __threadfence();
      if (t < ncol) {  // kSumRows rows at a time: their loads are in flight together
        const float* p0 = ws + row0 * n_out + col0 + t;
        for (int m0 = 0; m0 < len; m0 += kSumRows) {
          float acc[kSumRows] = {};
          for (int q = 0; q < n_splits; ++q) {  // split order: the same sum whoever comes last
            const float* pq = p0 + (static_cast<int64_t>(q) * n_tok + m0) * n_out;
#pragma unroll
            for (int r = 0; r < kSumRows; ++r)
              if (m0 + r < len) acc[r] += __ldcg(pq + static_cast<int64_t>(r) * n_out);
          }
#pragma unroll
          for (int r = 0; r < kSumRows; ++r)
            if (m0 + r < len) sc[(m0 + r) * kLDC + t] = acc[r];
        }
      }
      __syncthreads();
    }
    tc::add_tile<MT, kBM, kBN, kLDC>(y + row0 * n_out + col0, n_out, y_al && (col0 & 7) == 0, sc,
                                     len, ncol, alpha, nullptr);
    __syncthreads();  // fp32 tile consumed before the next unit refills the pipeline
  }
}

// ---- CUDA cores (any dtype) ----

constexpr int kThreads = 256;
constexpr int kTile = 32;  // tokens x columns per unit; K chunk

template <typename T>
__global__ void __launch_bounds__(kThreads)
    seg_masked_mm_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                         const uint32_t* __restrict__ mask, const int* __restrict__ seg_indptr,
                         const int* __restrict__ item_seg,
                         const int64_t* __restrict__ item_mask_off, float alpha, int n_items,
                         int n_out, int k_dim) {
  extern __shared__ int prefix[];  // [n_items + 1]
  __shared__ float xs[kTile][kTile + 1], ws[kTile][kTile + 1];
  __shared__ int scratch[32];
  const int col_tiles = (n_out + kTile - 1) / kTile;
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) { return item_units<kTile>(i, seg_indptr, item_seg, item_mask_off, col_tiles); },
      scratch);
  const int kw = (k_dim + 31) / 32;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // column, row group
  constexpr int kRows = kTile * kTile / kThreads;                // rows per thread
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int s = item_seg[i], local = u - prefix[i];
    const int col0 = (local % col_tiles) * kTile;
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(local / col_tiles) * kTile;
    const int len = min(kTile, static_cast<int>(seg_indptr[s + 1] - row0));
    const uint32_t* gm = mask + item_mask_off[i];
    float acc[kRows] = {};
    for (int k0 = 0; k0 < k_dim; k0 += kTile) {
      __syncthreads();  // previous chunk consumed
      const int k = k0 + tx;
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        const int r = ty + q * (kThreads / kTile);
        xs[r][tx] = (r < len && k < k_dim) ? to_f(x[(row0 + r) * k_dim + k]) : 0.f;
        const int o = col0 + r;
        const bool on = o < n_out && k < k_dim &&
                        ((gm[static_cast<int64_t>(o) * kw + (k >> 5)] >> (k & 31)) & 1u);
        ws[r][tx] = on ? to_f(w[static_cast<int64_t>(o) * k_dim + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTile; ++kk) {
        const float wv = ws[tx][kk];
#pragma unroll
        for (int q = 0; q < kRows; ++q) acc[q] += xs[ty + q * (kThreads / kTile)][kk] * wv;
      }
    }
    const int o = col0 + tx;
    if (o < n_out) {
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        const int r = ty + q * (kThreads / kTile);
        if (r < len) {
          T* dst = y + (row0 + r) * n_out + o;
          *dst = from_f<T>(to_f(*dst) + alpha * acc[q]);
        }
      }
    }
  }
}

// K splits per tile: 1 while the tiles alone fill the SMs or K is shallow (kMinSplitDepth),
// else enough to fill them, each split keeping at least kMinSplitChunks K chunks. `tiles`
// bounds the call's tiles from above.
inline int masked_splits(int64_t tiles, int64_t k_dim) {
  const int64_t sms = num_sms(), chunks = ceil_div(k_dim, kBK);
  if (tiles >= sms || chunks < kMinSplitDepth) return 1;
  return static_cast<int>(std::min(ceil_div(sms, tiles), chunks / kMinSplitChunks));  // >= 2
}

template <typename T>
void launch_tc(const GroupedArgs& a, double alpha, cudaStream_t stream) {
  using MT = typename tc::MmaType<T>::type;
  const int n_items = static_cast<int>(a.num_items);
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  auto kernel = seg_masked_mm_tc_kernel<MT>;
  const size_t smem = tc::tile_smem(n_items, kTcSmem);
  const int64_t tiles = (ceil_div(n_tok, tc::kBM) + n_items) * ceil_div(n_out, kBN);
  const int splits = masked_splits(tiles, k_dim);
  at::Tensor ws, tile_done;  // split partials [splits, n_tok, n_out] and per-tile counters
  if (splits > 1) {
    ws = at::empty({splits, n_tok, n_out}, a.y.options().dtype(at::kFloat));
    tile_done = at::zeros({tiles}, a.y.options().dtype(at::kInt));
  }
  kernel<<<grouped_grid(kernel, tc::kThreads, smem, tiles * splits), tc::kThreads, smem, stream>>>(
      reinterpret_cast<tc::raw16*>(a.y.data_ptr<T>()),
      reinterpret_cast<const tc::raw16*>(a.x.data_ptr<T>()),
      reinterpret_cast<const tc::raw16*>(a.dense_w.data_ptr<T>()),
      reinterpret_cast<const uint32_t*>(a.mask.data_ptr<int>()), a.seg_indptr.data_ptr<int>(),
      a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(), static_cast<float>(alpha),
      n_items, static_cast<int>(n_out), static_cast<int>(k_dim), splits, n_tok,
      ws.defined() ? ws.data_ptr<float>() : nullptr,
      tile_done.defined() ? tile_done.data_ptr<int>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void seg_masked_mm_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                        const at::Tensor& item_seg, const at::Tensor& item_mask_off,
                        const at::Tensor& mask, const at::Tensor& dense_w, double alpha) {
  GroupedArgs a = prepare_masked(y, x, seg_indptr, item_seg, item_mask_off, mask, dense_w);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  check_num_items(a.num_items, "seg_masked_mm");
  const c10::cuda::CUDAGuard guard(a.y.device());
  if (a.y.numel() == 0 || a.num_items == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (tc::use_tensor_cores(a.y.scalar_type())) {
    PETOPS_DISPATCH_HALFS(a.y.scalar_type(), "seg_masked_mm_tc",
                          [&] { launch_tc<scalar_t>(a, alpha, stream); });
    return;
  }
  const int n_items = static_cast<int>(a.num_items);
  const int64_t n_out = a.y.size(1);
  const int64_t bound = (ceil_div(a.y.size(0), kTile) + n_items) * ceil_div(n_out, kTile);
  const size_t smem = (n_items + 1) * sizeof(int);
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_masked_mm", [&] {
    auto kernel = seg_masked_mm_kernel<scalar_t>;
    kernel<<<grouped_grid(kernel, kThreads, smem, bound), kThreads, smem, stream>>>(
        a.y.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), a.dense_w.data_ptr<scalar_t>(),
        reinterpret_cast<const uint32_t*>(a.mask.data_ptr<int>()), a.seg_indptr.data_ptr<int>(),
        a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(), static_cast<float>(alpha),
        n_items, static_cast<int>(n_out), static_cast<int>(a.x.size(1)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) { m.impl("seg_masked_mm", &seg_masked_mm_cuda); }

}  // namespace petops
