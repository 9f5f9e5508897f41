// CUDA kernels for the segmented epilogues: one warp per token row, the row's segment found
// by binary search over seg_indptr, so every task's rows go through one launch.
#include <torch/library.h>

#include "common.cuh"
#include "prepare.h"

namespace petops {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per token row: many rows in flight per SM
constexpr int kRowThreads = 32 * kRowsPerBlock;

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    bias_act_kernel(const T* __restrict__ y, const T* __restrict__ bias,
                    const T* __restrict__ scale, const int* __restrict__ seg_indptr,
                    const int* __restrict__ seg_bias, const int* __restrict__ seg_scale,
                    T* __restrict__ out, int n_tok, int n_seg, int n, int act) {
  const int t = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= n_tok) return;
  const int lane = threadIdx.x & 31;
  const int s = upper_slot(seg_indptr, n_seg, t);
  const int64_t row = static_cast<int64_t>(t) * n;
  const T* b = bias + static_cast<int64_t>(seg_bias[s]) * n;
  const T* sc = scale ? scale + static_cast<int64_t>(seg_scale[s]) * n : nullptr;
  for (int c = lane; c < n; c += 32) {
    float v = apply_act(to_f(y[row + c]) + to_f(b[c]), act);
    if (sc) v *= to_f(sc[c]);
    out[row + c] = from_f<T>(v);
  }
}

// Warp per row, three passes over h = y (+ bias) (+ residual), re-read from L1/L2 instead of
// staged, so any hidden size works: mean, then the two-pass variance (like the fp32
// reference), then the normalised output.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    bias_residual_layernorm_kernel(const T* __restrict__ y, const T* __restrict__ residual,
                                   const T* __restrict__ bias, const T* __restrict__ gamma,
                                   const T* __restrict__ beta, const int* __restrict__ seg_indptr,
                                   const int* __restrict__ seg_bias,
                                   const int* __restrict__ seg_ln, T* __restrict__ out,
                                   int n_tok, int n_seg, int n, float eps) {
  const int t = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  if (t >= n_tok) return;
  const int lane = threadIdx.x & 31;
  const int s = upper_slot(seg_indptr, n_seg, t);
  const int64_t row = static_cast<int64_t>(t) * n;
  const T* b = bias ? bias + static_cast<int64_t>(seg_bias[s]) * n : nullptr;
  auto h_at = [&](int c) {
    float v = to_f(y[row + c]);
    if (b) v += to_f(b[c]);
    if (residual) v += to_f(residual[row + c]);
    return v;
  };
  float sum = 0.f;
  for (int c = lane; c < n; c += 32) sum += h_at(c);
  const float mean = warp_sum(sum) / n;
  float sq = 0.f;
  for (int c = lane; c < n; c += 32) {
    const float d = h_at(c) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(warp_sum(sq) / n + eps);
  const int64_t ln = static_cast<int64_t>(seg_ln[s]) * n;
  for (int c = lane; c < n; c += 32) {
    out[row + c] = from_f<T>((h_at(c) - mean) * rstd * to_f(gamma[ln + c]) + to_f(beta[ln + c]));
  }
}

at::Tensor bias_act_cuda(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& seg_indptr,
                         const at::Tensor& seg_bias, const OptTensor& scale,
                         const OptTensor& seg_scale, int64_t act) {
  EpilogueArgs a = prepare_bias_act(y, bias, seg_indptr, seg_bias, scale, seg_scale, act);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  const c10::cuda::CUDAGuard guard(a.y.device());
  at::Tensor out = at::empty_like(a.y);
  const int64_t n_tok = a.y.size(0), n = a.y.size(1);
  if (n_tok == 0 || n == 0) return out;
  const int n_seg = static_cast<int>(a.seg_indptr.numel() - 1);
  PETOPS_CHECK(n_seg > 0, "seg_indptr describes 0 segments but y has ", n_tok, " rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "bias_act_cuda", [&] {
    bias_act_kernel<scalar_t><<<ceil_div(n_tok, kRowsPerBlock), kRowThreads, 0, stream>>>(
        a.y.data_ptr<scalar_t>(), a.bias.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.scale),
        a.seg_indptr.data_ptr<int>(), a.seg_bias.data_ptr<int>(), ptr_or_null<int>(a.seg_scale),
        out.data_ptr<scalar_t>(), static_cast<int>(n_tok), n_seg, static_cast<int>(n),
        static_cast<int>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor bias_residual_layernorm_cuda(const at::Tensor& y, const OptTensor& residual,
                                        const OptTensor& bias, const at::Tensor& gamma,
                                        const at::Tensor& beta, const at::Tensor& seg_indptr,
                                        const OptTensor& seg_bias, const at::Tensor& seg_ln,
                                        double eps) {
  EpilogueArgs a = prepare_layernorm(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln);
  TORCH_INTERNAL_ASSERT(a.y.is_cuda());
  const c10::cuda::CUDAGuard guard(a.y.device());
  at::Tensor out = at::empty_like(a.y);
  const int64_t n_tok = a.y.size(0), n = a.y.size(1);
  if (n_tok == 0 || n == 0) return out;
  const int n_seg = static_cast<int>(a.seg_indptr.numel() - 1);
  PETOPS_CHECK(n_seg > 0, "seg_indptr describes 0 segments but y has ", n_tok, " rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "brln_cuda", [&] {
    bias_residual_layernorm_kernel<scalar_t>
        <<<ceil_div(n_tok, kRowsPerBlock), kRowThreads, 0, stream>>>(
        a.y.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.residual),
        ptr_or_null<scalar_t>(a.bias), a.gamma.data_ptr<scalar_t>(),
        a.beta.data_ptr<scalar_t>(), a.seg_indptr.data_ptr<int>(), ptr_or_null<int>(a.seg_bias),
        a.seg_ln.data_ptr<int>(), out.data_ptr<scalar_t>(), static_cast<int>(n_tok), n_seg,
        static_cast<int>(n), static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_residual_layernorm", &bias_residual_layernorm_cuda);
}

}  // namespace petops
