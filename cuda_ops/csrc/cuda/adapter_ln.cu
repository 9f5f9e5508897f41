// CUDA kernels for adapter_residual_layernorm: a bottleneck-adapter output site (bias, down,
// activation, up, residual, LayerNorm) in one launch, so h never leaves the SM between the
// four steps the unfused path runs as bias_act, sgmv_shrink, sgmv_expand and
// bias_residual_layernorm (four launches, three round trips of [T, N] through memory).
//
// Three kernels, one chosen per call from the dtype, the shapes and the GPU:
//   adapter_ln_tc.cuh       fp16/bf16, N % 64 == 0, N <= 1024, max_rank <= 64, 16-byte aligned
//                           operands, sm_80+: one block of 8 warps per 32-token unit, tensor
//                           cores;
//   adapter_ln_cluster.cuh  the same calls on sm_90+ while every unit gets its own resident
//                           cluster of four blocks (small batches): each block a quarter of the
//                           hidden columns, partial sums through distributed shared memory;
//   adapter_ln_rows.cuh     everything else (fp32, other shapes): one warp per token row.
// adapter_ln_common.cuh holds what they share.
#include <torch/library.h>

#include "adapter_ln_cluster.cuh"
#include "adapter_ln_common.cuh"
#include "adapter_ln_rows.cuh"
#include "adapter_ln_tc.cuh"

namespace petops {
namespace {

// The tensor-core kernels: the cluster kernel where launch_cluster finds it faster, else the
// one-block kernel.
template <typename T>
void launch_tensor_cores(const AdapterLnArgs& a, at::Tensor& out, int n_tok, int n_seg, int n,
                         float eps, cudaStream_t stream) {
  if (!adapter_ln::launch_cluster<T>(a, out, n_tok, n_seg, n, eps, stream)) {
    adapter_ln::launch_tc<T>(a, out, n_tok, n_seg, n, eps, stream);
  }
}

at::Tensor adapter_residual_layernorm_cuda(const at::Tensor& y, const OptTensor& residual,
                                           const at::Tensor& bias, const at::Tensor& seg_bias,
                                           const at::Tensor& w, const at::Tensor& seg_w_off,
                                           const at::Tensor& seg_rank, const at::Tensor& seg_act,
                                           const at::Tensor& gamma, const at::Tensor& beta,
                                           const at::Tensor& seg_indptr, const at::Tensor& seg_ln,
                                           int64_t max_rank, double eps) {
  AdapterLnArgs a = prepare_adapter_ln(y, residual, bias, seg_bias, w, seg_w_off, seg_rank, seg_act,
                                       gamma, beta, seg_indptr, seg_ln, max_rank);
  const EpilogueArgs& e = a.ln;
  TORCH_INTERNAL_ASSERT(e.y.is_cuda());
  const c10::cuda::CUDAGuard guard(e.y.device());
  at::Tensor out = at::empty_like(e.y);
  const int64_t n_tok = e.y.size(0), n = e.y.size(1);
  if (n_tok == 0 || n == 0) return out;
  const int n_seg = static_cast<int>(e.seg_indptr.numel() - 1);
  PETOPS_CHECK(n_seg > 0, "seg_indptr describes 0 segments but y has ", n_tok, " rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  const int t = static_cast<int>(n_tok), hidden = static_cast<int>(n);
  const float ep = static_cast<float>(eps);
  const bool tc_ok = tc::use_tensor_cores(e.y.scalar_type()) && n % adapter_ln::kBK == 0 &&
                     n <= adapter_ln::kMaxN && max_rank <= adapter_ln::kRank &&
                     n_seg <= kMaxItems &&
                     aligned16({&e.y, &e.residual, &e.bias, &e.gamma, &e.beta, &out});
  if (tc_ok) {
    PETOPS_DISPATCH_HALFS(e.y.scalar_type(), "adapter_ln_tc", [&] {
      launch_tensor_cores<scalar_t>(a, out, t, n_seg, hidden, ep, stream);
    });
    return out;
  }
  PETOPS_DISPATCH_FLOATS(e.y.scalar_type(), "adapter_ln_cuda", [&] {
    adapter_ln::launch_rows<scalar_t>(a, out, t, n_seg, hidden, ep, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CUDA, m) {
  m.impl("adapter_residual_layernorm", &adapter_residual_layernorm_cuda);
}

}  // namespace petops
