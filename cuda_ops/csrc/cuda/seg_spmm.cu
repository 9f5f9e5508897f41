// CUDA kernel for seg_spmm: y[rows] += x[rows] @ S_i.T with S_i in CSR over output rows.
//
// Unit = (item, TM-token tile). The tile's x rows are staged transposed ([K][TM]) in shared
// memory in x's own dtype: 16-bit inputs stay 16-bit, half the shared-memory bytes per
// non-zero (the walk waits on L1/TEX, which serves shared memory too; H100, bert-base MaskBERT
// site, 64 segments: 104 us against 195 us staged as float). Each thread owns output rows
// o and walks their CSR non-zeros kUnroll at a time: the index loads, then the value (or
// shared-weight) gathers, are issued together so the walk is not one dependent load chain per
// non-zero. Every non-zero updates TM tokens from one contiguous shared-memory row. Each
// (token, o) has one owner, so there are no atomics. Items sharing a segment must not be
// given (see ops.py). A call with too few token tiles to fill the GPU (one 128-token request
// is 8 tiles) also splits the output rows over several units per tile, each staging the tile
// again: one request's delta otherwise ran on 8 of the GPU's SMs.
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"

namespace petops {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                    // CSR non-zeros in flight per thread
constexpr int kMaxTM = 16;                    // tokens per tile, fewer for wide inputs
constexpr int64_t kMaxTileBytes = 96 * 1024;  // staged x tile; opt-in shared memory on sm_80+
constexpr int64_t kMinChunkRows = 128;        // output rows a unit takes at least

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

template <typename T, int TM>
__global__ void __launch_bounds__(kThreads)
    seg_spmm_kernel(T* __restrict__ y, const T* __restrict__ x, const int* __restrict__ seg_indptr,
                    const int* __restrict__ item_seg, const int64_t* __restrict__ rowptr_off,
                    const int64_t* __restrict__ rowptr, const int* __restrict__ indices,
                    const T* __restrict__ values, const T* __restrict__ dense_w, float alpha,
                    int n_items, int n_out, int k_dim, int n_chunks, bool x_vec) {
  extern __shared__ __align__(16) char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [k_dim][TM]
  int* prefix = reinterpret_cast<int*>(smem + static_cast<int64_t>(k_dim) * TM * sizeof(T));
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i];
        return (seg_indptr[s + 1] - seg_indptr[s] + TM - 1) / TM;
      },
      scratch);
  const int chunk_rows = (n_out + n_chunks - 1) / n_chunks;
  for (int u = blockIdx.x; u < total * n_chunks; u += gridDim.x) {
    const int tile_u = u / n_chunks, o0 = (u - tile_u * n_chunks) * chunk_rows;
    const int o1 = min(n_out, o0 + chunk_rows);
    const int i = upper_slot(prefix, n_items, tile_u);
    const int s = item_seg[i];
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(tile_u - prefix[i]) * TM;
    const int len = min(TM, static_cast<int>(seg_indptr[s + 1] - row0));
    __syncthreads();  // previous unit's tile fully consumed
    stage_tile<T, TM>(xs, x, row0, len, k_dim, x_vec);
    __syncthreads();
    const int64_t* rp = rowptr + rowptr_off[i];
    for (int o = o0 + threadIdx.x; o < o1; o += kThreads) {
      float acc[TM];
#pragma unroll
      for (int m = 0; m < TM; ++m) acc[m] = 0.f;
      const T* wrow = dense_w ? dense_w + static_cast<int64_t>(o) * k_dim : nullptr;
      int64_t p = rp[o];
      const int64_t p1 = rp[o + 1];
      for (; p + kUnroll <= p1; p += kUnroll) {
        int k[kUnroll];
        float v[kUnroll];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) k[q] = indices[p + q];
#pragma unroll
        for (int q = 0; q < kUnroll; ++q)
          v[q] = values ? to_f(values[p + q]) : alpha * to_f(wrow[k[q]]);
#pragma unroll
        for (int q = 0; q < kUnroll; ++q) axpy_row<TM>(acc, v[q], xs + k[q] * TM);
      }
      for (; p < p1; ++p) {
        const int k = indices[p];
        const float v = values ? to_f(values[p]) : alpha * to_f(wrow[k]);
        axpy_row<TM>(acc, v, xs + k * TM);
      }
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

// ---- 16-bit inputs up to 3072 columns: lanes over tokens ----
// The same units, but a warp walks one CSR row at a time with G lanes on the tile's tokens
// (TPL each, TM = G * TPL): the lanes of a row load the same index and value, one transaction
// where the kernel above issues one per lane (each of its threads walks another row), and a
// 64-token sequence walks each row once instead of four times. kRowBatch rows of results
// gather in shared memory, then update y a row-major stretch of columns at a time.
constexpr int kRowBatch = 32;
constexpr int kLDY = kRowBatch + 1;  // padded: the lanes of a row store to distinct banks

template <typename T, int G, int TPL>
__global__ void __launch_bounds__(kThreads)
    seg_spmm_lanes_kernel(T* __restrict__ y, const T* __restrict__ x,
                          const int* __restrict__ seg_indptr, const int* __restrict__ item_seg,
                          const int64_t* __restrict__ rowptr_off,
                          const int64_t* __restrict__ rowptr, const int* __restrict__ indices,
                          const T* __restrict__ values, const T* __restrict__ dense_w, float alpha,
                          int n_items, int n_out, int k_dim, int n_chunks, bool x_vec) {
  constexpr int TM = G * TPL, RW = 32 / G, kWarps = kThreads / 32;
  static_assert(32 % G == 0 && TPL >= 1, "a warp holds whole rows");
  extern __shared__ __align__(16) char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // [k_dim][TM]
  float* ys = reinterpret_cast<float*>(smem + static_cast<int64_t>(k_dim) * TM * sizeof(T));
  int* prefix = reinterpret_cast<int*>(ys + TM * kLDY);  // ys: [TM][kLDY]
  __shared__ int scratch[32];
  const int total = build_unit_prefix(
      prefix, n_items,
      [&](int i) {
        const int s = item_seg[i];
        return (seg_indptr[s + 1] - seg_indptr[s] + TM - 1) / TM;
      },
      scratch);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tl = lane % G, first = warp * RW + lane / G;  // token lane; first row of the lane
  const int chunk_rows = (n_out + n_chunks - 1) / n_chunks;
  for (int u = blockIdx.x; u < total * n_chunks; u += gridDim.x) {
    const int tile_u = u / n_chunks, o0 = (u - tile_u * n_chunks) * chunk_rows;
    const int o1 = min(n_out, o0 + chunk_rows);
    const int i = upper_slot(prefix, n_items, tile_u);
    const int s = item_seg[i];
    const int64_t row0 = seg_indptr[s] + static_cast<int64_t>(tile_u - prefix[i]) * TM;
    const int len = min(TM, static_cast<int>(seg_indptr[s + 1] - row0));
    __syncthreads();  // previous unit's tile fully consumed
    stage_tile<T, TM>(xs, x, row0, len, k_dim, x_vec);
    __syncthreads();
    const int64_t* rp = rowptr + rowptr_off[i];
    for (int b0 = o0; b0 < o1; b0 += kRowBatch) {
      const int nb = min(kRowBatch, o1 - b0);
      for (int r = first; r < nb; r += kWarps * RW) {
        const int o = b0 + r;
        float acc[TPL] = {};
        const T* wrow = dense_w ? dense_w + static_cast<int64_t>(o) * k_dim : nullptr;
        const T* xl = xs + tl * TPL;
        int64_t p = rp[o];
        const int64_t p1 = rp[o + 1];
        for (; p + kUnroll <= p1; p += kUnroll) {
          int k[kUnroll];
          float v[kUnroll];
#pragma unroll
          for (int q = 0; q < kUnroll; ++q) k[q] = indices[p + q];
#pragma unroll
          for (int q = 0; q < kUnroll; ++q)
            v[q] = values ? to_f(values[p + q]) : alpha * to_f(wrow[k[q]]);
#pragma unroll
          for (int q = 0; q < kUnroll; ++q) {
#pragma unroll
            for (int t = 0; t < TPL; ++t) acc[t] += v[q] * to_f(xl[k[q] * TM + t]);
          }
        }
        for (; p < p1; ++p) {
          const int k = indices[p];
          const float v = values ? to_f(values[p]) : alpha * to_f(wrow[k]);
#pragma unroll
          for (int t = 0; t < TPL; ++t) acc[t] += v * to_f(xl[k * TM + t]);
        }
#pragma unroll
        for (int t = 0; t < TPL; ++t) ys[(tl * TPL + t) * kLDY + r] = acc[t];
      }
      __syncthreads();
      for (int e = threadIdx.x; e < len * nb; e += kThreads) {
        const int m = e / nb, c = e - m * nb;
        T* dst = y + (row0 + m) * n_out + b0 + c;
        *dst = from_f<T>(to_f(*dst) + ys[m * kLDY + c]);
      }
      __syncthreads();  // ys consumed before the next batch of rows
    }
  }
}

// Output chunks per token tile: 1 while the tiles alone fill the SMs (`tiles` bounds them).
inline int spmm_chunks(int64_t tiles, int64_t n_out) {
  const int64_t sms = num_sms();
  if (tiles >= sms) return 1;
  return static_cast<int>(
      std::max<int64_t>(1, std::min(ceil_div(sms, tiles), ceil_div(n_out, kMinChunkRows))));
}

template <typename T, typename Kernel>
void launch_spmm_kernel(Kernel kernel, const GroupedArgs& a, double alpha, int tm,
                        size_t extra_smem, cudaStream_t stream) {
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  const int n_items = static_cast<int>(a.num_items);
  const size_t smem = k_dim * tm * sizeof(T) + extra_smem + (n_items + 1) * sizeof(int);
  const int64_t tiles = ceil_div(n_tok, tm) + n_items;
  const int chunks = spmm_chunks(tiles, n_out);
  const int grid = grouped_grid(kernel, kThreads, smem, tiles * chunks);
  kernel<<<grid, kThreads, smem, stream>>>(
      a.y.data_ptr<T>(), a.x.data_ptr<T>(), a.seg_indptr.data_ptr<int>(),
      a.item_seg.data_ptr<int>(), a.item_w_off.data_ptr<int64_t>(), a.rowptr.data_ptr<int64_t>(),
      a.indices.data_ptr<int>(), ptr_or_null<T>(a.values), ptr_or_null<T>(a.dense_w),
      static_cast<float>(alpha), n_items, static_cast<int>(n_out), static_cast<int>(k_dim), chunks,
      (k_dim * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.x.data_ptr()) % 16 == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TM>
void launch_seg_spmm(const GroupedArgs& a, double alpha, cudaStream_t stream) {
  launch_spmm_kernel<T>(seg_spmm_kernel<T, TM>, a, alpha, TM, 0, stream);
}

template <typename T, int G, int TPL>
void launch_seg_spmm_lanes(const GroupedArgs& a, double alpha, cudaStream_t stream) {
  launch_spmm_kernel<T>(seg_spmm_lanes_kernel<T, G, TPL>, a, alpha, G * TPL,
                        sizeof(float) * G * TPL * kLDY, stream);
}

// 16-bit inputs whose 16-token tile fits take the lanes kernel, with the widest tile that fits:
// 64 tokens (2 per lane), 32, or 16 (two rows per warp). Returns false for the others.
template <typename T>
bool run_seg_spmm_lanes(const GroupedArgs& a, double alpha, cudaStream_t stream) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    const int64_t row_bytes = a.x.size(1) * static_cast<int64_t>(sizeof(T));
    if (64 * row_bytes <= kMaxTileBytes) {
      launch_seg_spmm_lanes<T, 32, 2>(a, alpha, stream);
    } else if (32 * row_bytes <= kMaxTileBytes) {
      launch_seg_spmm_lanes<T, 32, 1>(a, alpha, stream);
    } else if (16 * row_bytes <= kMaxTileBytes) {
      launch_seg_spmm_lanes<T, 16, 1>(a, alpha, stream);
    } else {
      return false;
    }
    return true;
  }
}

// TM < 16 / sizeof(T) (inputs wider than 6144 columns) reads the staged rows element by
// element (axpy_row); wider tiles read them in 16-byte vectors.
template <typename T>
void run_seg_spmm(const GroupedArgs& a, double alpha, int tm, cudaStream_t stream) {
  switch (tm) {
    case 16:
      launch_seg_spmm<T, 16>(a, alpha, stream);
      break;
    case 8:
      launch_seg_spmm<T, 8>(a, alpha, stream);
      break;
    case 4:
      launch_seg_spmm<T, 4>(a, alpha, stream);
      break;
    case 2:
      launch_seg_spmm<T, 2>(a, alpha, stream);
      break;
    default:
      launch_seg_spmm<T, 1>(a, alpha, stream);
      break;
  }
}

void seg_spmm_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                   const at::Tensor& item_seg, const at::Tensor& item_rowptr_off,
                   const at::Tensor& rowptr, const at::Tensor& indices, const OptTensor& values,
                   const OptTensor& dense_w, double alpha) {
  GroupedArgs a =
      prepare_spmm(y, x, seg_indptr, item_seg, item_rowptr_off, rowptr, indices, values, dense_w);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  check_num_items(a.num_items, "seg_spmm");
  const c10::cuda::CUDAGuard guard(a.y.device());
  const int64_t k_dim = a.x.size(1);
  if (a.y.numel() == 0 || a.num_items == 0) return;
  // The largest power-of-two token tile, up to kMaxTM, whose transposed x block fits the
  // staged-tile budget.
  const int64_t bytes = a.x.element_size();
  int tm = kMaxTM;
  while (tm > 1 && k_dim * tm * bytes > kMaxTileBytes) tm /= 2;
  PETOPS_CHECK(k_dim * tm * bytes <= kMaxTileBytes, "seg_spmm: input width K=", k_dim,
               " exceeds the CUDA kernel limit of ", kMaxTileBytes / bytes,
               " columns; split the input columns over several calls");
  auto stream = at::cuda::getCurrentCUDAStream();
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_spmm", [&] {
    if (!run_seg_spmm_lanes<scalar_t>(a, alpha, stream))
      run_seg_spmm<scalar_t>(a, alpha, tm, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) { m.impl("seg_spmm", &seg_spmm_cuda); }

}  // namespace petops
