// The generic kernel of adapter_residual_layernorm, for what the tensor-core kernels do not
// take (fp32, hidden sizes that are not a multiple of 64 or above 1024, bottlenecks above 64,
// unaligned operands, more than 4096 segments, GPUs before sm_80): one warp per token row with
// the row and its bottleneck in shared memory; the same roundings as the tensor-core kernels,
// on CUDA cores.
#pragma once

#include "adapter_ln_common.cuh"

namespace petops {
namespace adapter_ln {

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

// The generic kernel, kRowWarps token rows per block; raises when the rows and
// bottlenecks of a block do not fit the GPU's shared memory.
template <typename T>
void launch_rows(const AdapterLnArgs& a, at::Tensor& out, int n_tok, int n_seg, int n, float eps,
                 cudaStream_t stream) {
  const EpilogueArgs& e = a.ln;
  const int64_t max_rank = a.max_rank;
  const size_t smem = static_cast<size_t>(kRowWarps) * (n + max_rank) * sizeof(float);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  PETOPS_CHECK(smem <= prop->sharedMemPerBlockOptin, "adapter_residual_layernorm: hidden size ", n,
               " with max_rank ", max_rank, " needs ", smem, " bytes of shared memory per ",
               "block, more than this GPU's ", prop->sharedMemPerBlockOptin,
               "; use the unfused ops (sgmv_shrink / sgmv_expand) for such shapes");
  auto kernel = adapter_ln_rows_kernel<T>;
  resident_blocks(kernel, 32 * kRowWarps, smem);  // opts the kernel into smem past 48 KB
  kernel<<<ceil_div(n_tok, kRowWarps), 32 * kRowWarps, smem, stream>>>(
      e.y.data_ptr<T>(), ptr_or_null<T>(e.residual), e.bias.data_ptr<T>(), a.w.data_ptr<T>(),
      e.gamma.data_ptr<T>(), e.beta.data_ptr<T>(), e.seg_indptr.data_ptr<int>(),
      e.seg_bias.data_ptr<int>(), a.seg_rank.data_ptr<int>(), a.seg_act.data_ptr<int>(),
      e.seg_ln.data_ptr<int>(), a.seg_w_off.data_ptr<int64_t>(), out.data_ptr<T>(), n_tok, n_seg, n,
      static_cast<int>(max_rank), eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adapter_ln
}  // namespace petops
