// CUDA kernels for grouped low-rank projections (mixed ranks and output widths, one launch).
//
// Work is cut into units: shrink = (item, 32-token tile), expand = (item, 32-token tile,
// 128-column tile). A persistent grid strides over units; each block maps a unit to its item
// through a per-block shared prefix of unit counts (common.cuh), so no host sync is needed.
// Tiles are staged in shared memory as float and reduced with float4 reads.
// float16/bfloat16 run the tensor-core kernels of sgmv_tc.cuh (same scheduling, WMMA tiles);
// float32 (and any dtype before sm_80) runs the CUDA-core kernels below.
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"
#include "sgmv_tc.cuh"

namespace petops {
namespace {

constexpr int kThreads = 128;
constexpr int kTileM = 32;      // token rows per unit
constexpr int kShrinkKC = 32;   // K chunk staged per step
constexpr int kExpandKC = 16;   // rank chunk staged per step
constexpr int kExpandTN = 128;  // output columns per unit (one per thread)
constexpr int kPad = 4;         // keeps float4 rows 16-byte aligned and spreads banks
constexpr int kShrinkMaxRank = 128;

struct ShrinkSmem {
  float x[kTileM][kShrinkKC + kPad];
  float w[kShrinkMaxRank][kShrinkKC + kPad];
};

// One unit of shrink for rank <= CW: thread (rl, c) owns column c and rows rl + m * RL.
template <typename T, int CW>
__device__ __forceinline__ void shrink_tile(ShrinkSmem& sm, const T* __restrict__ x,
                                            const T* __restrict__ wa, const T* __restrict__ bias,
                                            T* __restrict__ out, int64_t row0, int len, int r,
                                            int k_dim, int out_stride, int act) {
  constexpr int RL = kThreads / CW;
  constexpr int RM = kTileM / RL;
  const int c = threadIdx.x % CW, rl = threadIdx.x / CW;
  float acc[RM];
#pragma unroll
  for (int m = 0; m < RM; ++m) acc[m] = 0.f;
  for (int k0 = 0; k0 < k_dim; k0 += kShrinkKC) {
    __syncthreads();  // previous chunk fully consumed
    for (int e = threadIdx.x; e < kTileM * kShrinkKC; e += kThreads) {
      const int m = e / kShrinkKC, kk = e % kShrinkKC, k = k0 + kk;
      sm.x[m][kk] = (m < len && k < k_dim) ? to_f(x[(row0 + m) * k_dim + k]) : 0.f;
    }
    for (int e = threadIdx.x; e < CW * kShrinkKC; e += kThreads) {
      const int cc = e / kShrinkKC, kk = e % kShrinkKC, k = k0 + kk;
      sm.w[cc][kk] = (cc < r && k < k_dim) ? to_f(wa[static_cast<int64_t>(cc) * k_dim + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kShrinkKC; kk += 4) {
      const float4 wv = *reinterpret_cast<const float4*>(&sm.w[c][kk]);
#pragma unroll
      for (int m = 0; m < RM; ++m) {
        const float4 xv = *reinterpret_cast<const float4*>(&sm.x[m * RL + rl][kk]);
        acc[m] += xv.x * wv.x + xv.y * wv.y + xv.z * wv.z + xv.w * wv.w;
      }
    }
  }
  if (c >= r) return;
  const float b = bias ? to_f(bias[c]) : 0.f;
#pragma unroll
  for (int m = 0; m < RM; ++m) {
    const int row = m * RL + rl;
    if (row < len) out[(row0 + row) * out_stride + c] = from_f<T>(apply_act(acc[m] + b, act));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgmv_shrink_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                       const int* __restrict__ seg_indptr, const int* __restrict__ item_seg,
                       const int64_t* __restrict__ item_w_off, const int* __restrict__ item_rank,
                       const int64_t* __restrict__ item_b_off, T* __restrict__ out, int n_items,
                       int k_dim, int max_rank, int act) {
  extern __shared__ int prefix[];  // [n_items + 1]
  __shared__ __align__(16) ShrinkSmem sm;
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i], len = seg_indptr[s + 1] - seg_indptr[s];
        return item_rank[i] >= 1 ? (len + kTileM - 1) / kTileM : 0;
      },
      scratch);
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int s = item_seg[i];
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(u - prefix[i]) * kTileM;
    const int len = min(kTileM, static_cast<int>(seg_indptr[s + 1] - row0));
    const int r = min(item_rank[i], max_rank);
    const T* wa = w + item_w_off[i];
    const T* b = bias ? bias + item_b_off[i] : nullptr;
    if (r <= 16) {
      shrink_tile<T, 16>(sm, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
    } else if (r <= 32) {
      shrink_tile<T, 32>(sm, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
    } else if (r <= 64) {
      shrink_tile<T, 64>(sm, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
    } else {
      shrink_tile<T, 128>(sm, x, wa, b, out, row0, len, r, k_dim, max_rank, act);
    }
  }
}

struct ExpandSmem {
  float t[kTileM][kExpandKC + kPad];
  float w[kExpandTN][kExpandKC + kPad];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgmv_expand_kernel(T* __restrict__ y, const T* __restrict__ tmp, const T* __restrict__ w,
                       const T* __restrict__ bias, const int* __restrict__ seg_indptr,
                       const int* __restrict__ item_seg, const int64_t* __restrict__ item_w_off,
                       const int* __restrict__ item_rank, const int* __restrict__ item_in_off,
                       const int* __restrict__ item_out_off, const int* __restrict__ item_out_dim,
                       const float* __restrict__ item_scale, const int64_t* __restrict__ item_b_off,
                       int n_items, int n_cols, int tmp_cols) {
  extern __shared__ int prefix[];  // [n_items + 1]
  __shared__ __align__(16) ExpandSmem sm;
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i], len = seg_indptr[s + 1] - seg_indptr[s];
        const int col_tiles = (item_out_dim[i] + kExpandTN - 1) / kExpandTN;
        return item_rank[i] >= 1 ? ((len + kTileM - 1) / kTileM) * col_tiles : 0;
      },
      scratch);
  const int c = threadIdx.x;
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int s = item_seg[i], n = item_out_dim[i], r = item_rank[i];
    const int col_tiles = (n + kExpandTN - 1) / kExpandTN;
    const int local = u - prefix[i];
    const int col0 = (local % col_tiles) * kExpandTN;
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(local / col_tiles) * kTileM;
    const int len = min(kTileM, static_cast<int>(seg_indptr[s + 1] - row0));
    const T* wb = w + item_w_off[i];  // [n, r] row-major
    const int j0 = item_in_off[i];
    float acc[kTileM];
#pragma unroll
    for (int m = 0; m < kTileM; ++m) acc[m] = 0.f;
    for (int k0 = 0; k0 < r; k0 += kExpandKC) {
      __syncthreads();
      for (int e = threadIdx.x; e < kTileM * kExpandKC; e += kThreads) {
        const int m = e / kExpandKC, kk = e % kExpandKC, k = k0 + kk;
        sm.t[m][kk] = (m < len && k < r) ? to_f(tmp[(row0 + m) * tmp_cols + j0 + k]) : 0.f;
      }
      for (int e = threadIdx.x; e < kExpandTN * kExpandKC; e += kThreads) {
        const int cc = e / kExpandKC, kk = e % kExpandKC, k = k0 + kk;
        const bool ok = col0 + cc < n && k < r;
        sm.w[cc][kk] = ok ? to_f(wb[static_cast<int64_t>(col0 + cc) * r + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kExpandKC; kk += 4) {
        const float4 wv = *reinterpret_cast<const float4*>(&sm.w[c][kk]);
#pragma unroll
        for (int m = 0; m < kTileM; ++m) {
          const float4 tv = *reinterpret_cast<const float4*>(&sm.t[m][kk]);
          acc[m] += tv.x * wv.x + tv.y * wv.y + tv.z * wv.z + tv.w * wv.w;
        }
      }
    }
    const int col = col0 + c;
    if (col < n) {
      const float sc = item_scale[i];
      const float b = bias ? to_f(bias[item_b_off[i] + col]) : 0.f;
      const int64_t base = row0 * n_cols + item_out_off[i] + col;
#pragma unroll
      for (int m = 0; m < kTileM; ++m) {
        if (m < len) {
          T* dst = y + base + static_cast<int64_t>(m) * n_cols;
          *dst = from_f<T>(to_f(*dst) + (acc[m] * sc + b));
        }
      }
    }
  }
}

template <typename T, int RNMAX>
void launch_shrink_tc(const GroupedArgs& a, at::Tensor& out, int n_items, int k_dim, int max_rank,
                      int act, cudaStream_t stream) {
  using MT = typename tc::MmaType<T>::type;
  auto kernel = tc::sgmv_shrink_tc_kernel<MT, RNMAX>;
  const size_t smem = tc::tile_smem(n_items, tc::shrink_tile_smem<RNMAX>());
  const int grid =
      grouped_grid(kernel, tc::kThreads, smem, ceil_div(a.x.size(0), tc::kBM) + n_items);
  kernel<<<grid, tc::kThreads, smem, stream>>>(
      reinterpret_cast<const tc::raw16*>(a.x.data_ptr<T>()),
      reinterpret_cast<const tc::raw16*>(a.w.data_ptr<T>()), tc::raw_or_null<T>(a.bias),
      a.seg_indptr.data_ptr<int>(), a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(),
      a.item_rank.data_ptr<int>(), ptr_or_null<int64_t>(a.item_b_off),
      reinterpret_cast<tc::raw16*>(out.data_ptr<T>()), n_items, k_dim, max_rank, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Weight stages sized for the rank class of max_rank (every item's rank is <= max_rank).
template <typename T>
void run_shrink_tc(const GroupedArgs& a, at::Tensor& out, int n_items, int k_dim, int max_rank,
                   int act, cudaStream_t stream) {
  if (max_rank <= 16) {
    launch_shrink_tc<T, 16>(a, out, n_items, k_dim, max_rank, act, stream);
  } else if (max_rank <= 32) {
    launch_shrink_tc<T, 32>(a, out, n_items, k_dim, max_rank, act, stream);
  } else if (max_rank <= 64) {
    launch_shrink_tc<T, 64>(a, out, n_items, k_dim, max_rank, act, stream);
  } else {
    launch_shrink_tc<T, 128>(a, out, n_items, k_dim, max_rank, act, stream);
  }
}

template <typename T>
void launch_expand_tc(const GroupedArgs& a, int n_items, int n_cols, cudaStream_t stream) {
  using MT = typename tc::MmaType<T>::type;
  auto kernel = tc::sgmv_expand_tc_kernel<MT>;
  const size_t smem = tc::tile_smem(n_items, tc::expand_tile_smem());
  const int64_t bound =
      (ceil_div(a.y.size(0), tc::kBM) + n_items) * ceil_div(n_cols, tc::kExpandBN);
  const int grid = grouped_grid(kernel, tc::kThreads, smem, bound);
  kernel<<<grid, tc::kThreads, smem, stream>>>(
      reinterpret_cast<tc::raw16*>(a.y.data_ptr<T>()),
      reinterpret_cast<const tc::raw16*>(a.x.data_ptr<T>()),
      reinterpret_cast<const tc::raw16*>(a.w.data_ptr<T>()), tc::raw_or_null<T>(a.bias),
      a.seg_indptr.data_ptr<int>(), a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(),
      a.item_rank.data_ptr<int>(), a.item_in_off.data_ptr<int>(), a.item_out_off.data_ptr<int>(),
      a.item_out_dim.data_ptr<int>(), a.item_scale.data_ptr<float>(),
      ptr_or_null<int64_t>(a.item_b_off), n_items, n_cols, static_cast<int>(a.x.size(1)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& seg_indptr,
                            const at::Tensor& item_seg, const at::Tensor& item_w_off,
                            const at::Tensor& item_rank, const OptTensor& bias,
                            const OptTensor& item_b_off, int64_t act, int64_t max_rank) {
  GroupedArgs a = prepare_shrink(x, w, seg_indptr, item_seg, item_w_off, item_rank, bias,
                                 item_b_off, act, max_rank);
  TORCH_INTERNAL_ASSERT(a.x.is_cuda());
  PETOPS_CHECK(max_rank <= kShrinkMaxRank, "sgmv_shrink: max_rank ", max_rank,
               " exceeds the CUDA kernel limit of ", static_cast<int>(kShrinkMaxRank),
               "; split larger ranks across several items/calls");
  check_num_items(a.num_items, "sgmv_shrink");
  const c10::cuda::CUDAGuard guard(a.x.device());
  const int64_t n_tok = a.x.size(0), k_dim = a.x.size(1);
  at::Tensor out = at::zeros({n_tok, max_rank}, a.x.options());
  if (n_tok == 0 || max_rank == 0 || a.num_items == 0) return out;
  const int n_items = static_cast<int>(a.num_items);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (tc::use_tensor_cores(a.x.scalar_type())) {
    PETOPS_DISPATCH_HALFS(a.x.scalar_type(), "sgmv_shrink_tc", [&] {
      run_shrink_tc<scalar_t>(a, out, n_items, static_cast<int>(k_dim), static_cast<int>(max_rank),
                              static_cast<int>(act), stream);
    });
    return out;
  }
  const size_t smem = (n_items + 1) * sizeof(int);
  PETOPS_DISPATCH_FLOATS(a.x.scalar_type(), "sgmv_shrink", [&] {
    auto kernel = sgmv_shrink_kernel<scalar_t>;
    const int grid = grouped_grid(kernel, kThreads, smem, ceil_div(n_tok, kTileM) + n_items);
    kernel<<<grid, kThreads, smem, stream>>>(
        a.x.data_ptr<scalar_t>(), a.w.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.bias),
        a.seg_indptr.data_ptr<int>(), a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(),
        a.item_rank.data_ptr<int>(), ptr_or_null<int64_t>(a.item_b_off), out.data_ptr<scalar_t>(),
        n_items, static_cast<int>(k_dim), static_cast<int>(max_rank), static_cast<int>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void sgmv_expand_cuda(const at::Tensor& y, const at::Tensor& tmp, const at::Tensor& w,
                      const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                      const at::Tensor& item_w_off, const at::Tensor& item_rank,
                      const at::Tensor& item_in_off, const at::Tensor& item_out_off,
                      const at::Tensor& item_out_dim, const at::Tensor& item_scale,
                      const OptTensor& bias, const OptTensor& item_b_off) {
  GroupedArgs a =
      prepare_expand(y, tmp, w, seg_indptr, item_seg, item_w_off, item_rank, item_in_off,
                     item_out_off, item_out_dim, item_scale, bias, item_b_off);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  check_num_items(a.num_items, "sgmv_expand");
  const c10::cuda::CUDAGuard guard(a.y.device());
  const int64_t n_tok = a.y.size(0), n_cols = a.y.size(1);
  if (n_tok == 0 || a.num_items == 0) return;
  const int n_items = static_cast<int>(a.num_items);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (tc::use_tensor_cores(a.y.scalar_type())) {
    PETOPS_DISPATCH_HALFS(a.y.scalar_type(), "sgmv_expand_tc", [&] {
      launch_expand_tc<scalar_t>(a, n_items, static_cast<int>(n_cols), stream);
    });
    return;
  }
  const int64_t bound = (ceil_div(n_tok, kTileM) + n_items) * ceil_div(n_cols, kExpandTN);
  const size_t smem = (n_items + 1) * sizeof(int);
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "sgmv_expand", [&] {
    auto kernel = sgmv_expand_kernel<scalar_t>;
    kernel<<<grouped_grid(kernel, kThreads, smem, bound), kThreads, smem, stream>>>(
        a.y.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), a.w.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(a.bias), a.seg_indptr.data_ptr<int>(), a.item_seg.data_ptr<int>(),
        a.item_w_off.data_ptr<int64_t>(), a.item_rank.data_ptr<int>(),
        a.item_in_off.data_ptr<int>(), a.item_out_off.data_ptr<int>(),
        a.item_out_dim.data_ptr<int>(), a.item_scale.data_ptr<float>(),
        ptr_or_null<int64_t>(a.item_b_off), n_items, static_cast<int>(n_cols),
        static_cast<int>(a.x.size(1)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) {
  m.impl("sgmv_shrink", &sgmv_shrink_cuda);
  m.impl("sgmv_expand", &sgmv_expand_cuda);
}

}  // namespace petops
