// CUDA kernel for seg_spmm: y[rows] += x[rows] @ S_i.T with S_i in sliced ELL (32-row slices).
//
// Unit = (item, TM-token tile, chunk of output slices). The tile's x rows are staged transposed
// ([K + 1][TM], the last row zeros for padding entries) in shared memory in x's own dtype:
// 16-bit inputs stay 16-bit, half the shared-memory bytes per non-zero. Each warp owns one
// 32-row slice at a time and lane l walks row 32 * s + l: entry j of every row of the slice
// lies in one contiguous run of 32 (sliced ELL), so a warp's index and value loads are one
// 64-byte access each (int16 indices). (In CSR each lane read its own row's run: 32 cache lines a
// load, and the walk waited on L1/TEX for them.) Lanes issue kUnroll entries' index loads,
// then their value loads, before the multiply-adds. Every entry updates TM
// tokens from one contiguous shared-memory row; a padding entry (index K) reads the zero row.
// A call with fewer token tiles than SMs (one request) also splits the slices over blocks, so
// the walk is spread over the GPU instead of a handful of SMs. Each (token, o) has one owner,
// so there are no atomics. Items sharing a segment must not be given (see ops.py).
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"

namespace petops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = static_cast<int>(kSliceRows);  // one warp walks one slice's rows
constexpr int kUnroll = 4;                           // entries in flight per lane
static_assert(kWarp == 32 && kThreads % kWarp == 0, "a slice is one warp's rows");
constexpr int kMaxTM = 16;                    // tokens per tile, fewer for wide inputs
constexpr int64_t kMaxTileBytes = 96 * 1024;  // staged x tile; opt-in shared memory on sm_80+

// acc[m] += v * xr[m] for m < TM, reading xr (16-byte aligned) in 16-byte vectors.
template <int TM, typename XS>
__device__ __forceinline__ void axpy_row(float (&acc)[TM], float v, const XS* __restrict__ xr) {
  constexpr int V = 16 / sizeof(XS);
  if constexpr (TM % V == 0) {
#pragma unroll
    for (int m = 0; m < TM; m += V) {
      alignas(16) XS xv[V];
      *reinterpret_cast<uint4*>(xv) = *reinterpret_cast<const uint4*>(xr + m);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[m + q] += v * to_f(xv[q]);
    }
  } else {
#pragma unroll
    for (int m = 0; m < TM; ++m) acc[m] += v * to_f(xr[m]);
  }
}

// Stage rows [row0, row0 + len) of x (zeros past len) transposed into xs[k * TM + m]. With
// 16-byte rows (every BERT width) each thread brings whole 16-byte vectors along k, kBatch of
// them in flight before it scatters them: a 2-byte load per element, one at a time, left the
// walk waiting on the staging (up to 3072 x 16 elements per tile, 192 loads per thread).
// Neighbouring threads take neighbouring tokens, so the scattered stores hit few banks twice.
template <typename T, int TM>
__device__ __forceinline__ void stage_tile(T* __restrict__ xs, const T* __restrict__ x,
                                           int64_t row0, int len, int k_dim, bool vec) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kBatch = 4;
  if (vec) {
    const int n = TM * (k_dim / V);  // (token, vector) pairs, token fastest
    for (int e0 = threadIdx.x; e0 < n; e0 += kBatch * kThreads) {
      uint4 v[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int e = e0 + b * kThreads, m = e % TM, c = e / TM;
        v[b] = e < n && m < len ? *reinterpret_cast<const uint4*>(x + (row0 + m) * k_dim + c * V)
                                : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int e = e0 + b * kThreads, m = e % TM, c = e / TM;
        if (e < n) {
          const T* u = reinterpret_cast<const T*>(&v[b]);
#pragma unroll
          for (int j = 0; j < V; ++j) xs[(c * V + j) * TM + m] = u[j];
        }
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < TM * k_dim; e += kThreads) {
    const int m = e / k_dim, k = e % k_dim;
    xs[k * TM + m] = m < len ? x[(row0 + m) * k_dim + k] : T(0.f);
  }
}

// Shared-memory bytes before the unit prefix: the staged tile and its zero row, 16-aligned.
template <typename T, int TM>
__host__ __device__ __forceinline__ int64_t staged_bytes(int k_dim) {
  return (static_cast<int64_t>(k_dim + 1) * TM * sizeof(T) + 15) / 16 * 16;
}

template <typename T, int TM>
__global__ void __launch_bounds__(kThreads)
    seg_spmm_kernel(T* __restrict__ y, const T* __restrict__ x, const int* __restrict__ seg_indptr,
                    const int* __restrict__ item_seg, const int64_t* __restrict__ slice_off,
                    const int64_t* __restrict__ slice_ptr, const int16_t* __restrict__ indices,
                    const T* __restrict__ values, int n_items, int n_out, int k_dim, int chunks,
                    int chunk_slices, bool x_vec) {
  extern __shared__ __align__(16) char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [k_dim + 1][TM]
  int* prefix = reinterpret_cast<int*>(smem + staged_bytes<T, TM>(k_dim));
  __shared__ int scratch[32];
  if (threadIdx.x < TM) xs[k_dim * TM + threadIdx.x] = T(0.f);  // padding entries read it
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i];
        return (seg_indptr[s + 1] - seg_indptr[s] + TM - 1) / TM * chunks;
      },
      scratch);
  const int n_sl = (n_out + kWarp - 1) / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const int i = upper_slot(prefix, n_items, u);
    const int local = u - prefix[i], chunk = local % chunks;
    const int s = item_seg[i];
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(local / chunks) * TM;
    const int len = min(TM, static_cast<int>(seg_indptr[s + 1] - row0));
    __syncthreads();  // previous unit's tile fully consumed
    stage_tile<T, TM>(xs, x, row0, len, k_dim, x_vec);
    __syncthreads();
    const int64_t* sp = slice_ptr + slice_off[i];
    const int sl_end = min(n_sl, (chunk + 1) * chunk_slices);
    for (int sl = chunk * chunk_slices + warp; sl < sl_end; sl += kThreads / kWarp) {
      const int o = sl * kWarp + lane;
      float acc[TM];
#pragma unroll
      for (int m = 0; m < TM; ++m) acc[m] = 0.f;
      int64_t p = sp[sl] + lane;
      const int64_t p1 = sp[sl + 1];
      for (; p + (kUnroll - 1) * kWarp < p1; p += kUnroll * kWarp) {
        int k[kUnroll];
        float v[kUnroll];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) k[q] = indices[p + q * kWarp];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) v[q] = to_f(values[p + q * kWarp]);
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) axpy_row<TM>(acc, v[q], xs + k[q] * TM);
      }
      for (; p < p1; p += kWarp) {
        const int k = indices[p];
        const float v = to_f(values[p]);
        axpy_row<TM>(acc, v, xs + k * TM);
      }
      if (o < n_out) {
#pragma unroll
        for (int m = 0; m < TM; ++m) {
          if (m < len) {
            T* dst = y + (row0 + m) * n_out + o;
            *dst = from_f<T>(to_f(*dst) + acc[m]);
          }
        }
      }
    }
  }
}

template <typename T, int TM>
void launch_seg_spmm(const GroupedArgs& a, cudaStream_t stream) {
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  const int n_items = static_cast<int>(a.num_items);
  const size_t smem = staged_bytes<T, TM>(static_cast<int>(k_dim)) + (n_items + 1) * sizeof(int);
  // Slices per block: all of them, unless the call has fewer token tiles than SMs; then
  // enough chunks that the tiles x chunks fill the SMs.
  const int64_t n_sl = spmm_slices(n_out), tiles = ceil_div(n_tok, TM);
  const int64_t want = tiles < num_sms() ? std::min(n_sl, ceil_div(num_sms(), tiles)) : 1;
  const int64_t chunk_slices = ceil_div(n_sl, want), chunks = ceil_div(n_sl, chunk_slices);
  auto kernel = seg_spmm_kernel<T, TM>;
  const int grid = grouped_grid(kernel, kThreads, smem, (tiles + n_items) * chunks);
  kernel<<<grid, kThreads, smem, stream>>>(
      a.y.data_ptr<T>(), a.x.data_ptr<T>(), a.seg_indptr.data_ptr<int>(),
      a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(), a.slice_ptr.data_ptr<int64_t>(),
      a.indices.data_ptr<int16_t>(), a.values.data_ptr<T>(), n_items, static_cast<int>(n_out),
      static_cast<int>(k_dim), static_cast<int>(chunks), static_cast<int>(chunk_slices),
      (k_dim * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.x.data_ptr()) % 16 == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// TM < 16 / sizeof(T) (inputs wider than 6144 columns) reads the staged rows element by
// element (axpy_row); wider tiles read them in 16-byte vectors.
template <typename T>
void run_seg_spmm(const GroupedArgs& a, int tm, cudaStream_t stream) {
  switch (tm) {
    case 16:
      launch_seg_spmm<T, 16>(a, stream);
      break;
    case 8:
      launch_seg_spmm<T, 8>(a, stream);
      break;
    case 4:
      launch_seg_spmm<T, 4>(a, stream);
      break;
    case 2:
      launch_seg_spmm<T, 2>(a, stream);
      break;
    default:
      launch_seg_spmm<T, 1>(a, stream);
      break;
  }
}

void seg_spmm_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                   const at::Tensor& item_seg, const at::Tensor& item_slice_off,
                   const at::Tensor& slice_ptr, const at::Tensor& indices,
                   const at::Tensor& values) {
  GroupedArgs a =
      prepare_spmm(y, x, seg_indptr, item_seg, item_slice_off, slice_ptr, indices, values);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  check_num_items(a.num_items, "seg_spmm");
  const c10::cuda::CUDAGuard guard(a.y.device());
  const int64_t k_dim = a.x.size(1);
  if (a.y.numel() == 0 || a.num_items == 0 || k_dim == 0) return;  // nothing to add
  // The largest power-of-two token tile, up to kMaxTM, whose transposed x block fits the
  // staged-tile budget (the zero row for padding entries comes on top).
  const int64_t bytes = a.x.element_size();
  int tm = kMaxTM;
  while (tm > 1 && k_dim * tm * bytes > kMaxTileBytes) tm /= 2;
  PETOPS_CHECK(k_dim * tm * bytes <= kMaxTileBytes, "seg_spmm: input width K=", k_dim,
               " exceeds the CUDA kernel limit of ", kMaxTileBytes / bytes,
               " columns; split the input columns over several calls");
  auto stream = at::cuda::getCurrentCUDAStream();
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_spmm",
                         [&] { run_seg_spmm<scalar_t>(a, tm, stream); });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) { m.impl("seg_spmm", &seg_spmm_cuda); }

}  // namespace petops
