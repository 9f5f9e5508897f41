// CPU kernels for the segmented epilogues: bias_act and bias_residual_layernorm.
// Both are row-parallel: every token row looks up its segment's pool rows and is independent.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../prepare.h"

namespace petops {
namespace {

constexpr int64_t kRowGrain = 16;

// Segment of every token, from a validated seg_indptr.
std::vector<int32_t> token_segments(const at::Tensor& seg_indptr, int64_t num_tokens) {
  std::vector<int32_t> seg(num_tokens);
  const int32_t* p = seg_indptr.data_ptr<int32_t>();
  for (int64_t s = 0; s + 1 < seg_indptr.numel(); ++s) {
    for (int32_t t = p[s]; t < p[s + 1]; ++t) seg[t] = static_cast<int32_t>(s);
  }
  return seg;
}

at::Tensor bias_act_cpu(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& seg_indptr,
                        const at::Tensor& seg_bias, const OptTensor& scale,
                        const OptTensor& seg_scale, int64_t act) {
  EpilogueArgs a = prepare_bias_act(y, bias, seg_indptr, seg_bias, scale, seg_scale, act);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n = a.y.size(1);
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.seg_bias, 0, a.bias.size(0), "seg_bias", "a row of bias");
  if (a.scale.defined()) {
    check_range_host<int32_t>(a.seg_scale, 0, a.scale.size(0), "seg_scale", "a row of scale");
  }
  const std::vector<int32_t> seg = token_segments(a.seg_indptr, n_tok);
  at::Tensor out = at::empty_like(a.y);
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "bias_act_cpu", [&] {
    const scalar_t* yp = a.y.data_ptr<scalar_t>();
    const scalar_t* bp = a.bias.data_ptr<scalar_t>();
    const scalar_t* sp = a.scale.defined() ? a.scale.data_ptr<scalar_t>() : nullptr;
    const int32_t* sb = a.seg_bias.data_ptr<int32_t>();
    const int32_t* ss = sp ? a.seg_scale.data_ptr<int32_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int ac = static_cast<int>(act);
    at::parallel_for(0, n_tok, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* b = bp + sb[seg[t]] * n;
        const scalar_t* sc = sp ? sp + ss[seg[t]] * n : nullptr;
        for (int64_t c = 0; c < n; ++c) {
          float v = apply_act(static_cast<float>(yp[t * n + c]) + static_cast<float>(b[c]), ac);
          if (sc) v *= static_cast<float>(sc[c]);
          op[t * n + c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

at::Tensor bias_residual_layernorm_cpu(const at::Tensor& y, const OptTensor& residual,
                                       const OptTensor& bias, const at::Tensor& gamma,
                                       const at::Tensor& beta, const at::Tensor& seg_indptr,
                                       const OptTensor& seg_bias, const at::Tensor& seg_ln,
                                       double eps) {
  EpilogueArgs a = prepare_layernorm(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n = a.y.size(1);
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.seg_ln, 0, a.gamma.size(0), "seg_ln", "a row of gamma/beta");
  if (a.bias.defined()) {
    check_range_host<int32_t>(a.seg_bias, 0, a.bias.size(0), "seg_bias", "a row of bias");
  }
  const std::vector<int32_t> seg = token_segments(a.seg_indptr, n_tok);
  at::Tensor out = at::empty_like(a.y);
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "brln_cpu", [&] {
    const scalar_t* yp = a.y.data_ptr<scalar_t>();
    const scalar_t* rp = a.residual.defined() ? a.residual.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = a.bias.defined() ? a.bias.data_ptr<scalar_t>() : nullptr;
    const int32_t* sb = bp ? a.seg_bias.data_ptr<int32_t>() : nullptr;
    const scalar_t* gp = a.gamma.data_ptr<scalar_t>();
    const scalar_t* ep = a.beta.data_ptr<scalar_t>();
    const int32_t* sl = a.seg_ln.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_tok, kRowGrain, [&](int64_t lo, int64_t hi) {
      std::vector<float> h(n);
      for (int64_t t = lo; t < hi; ++t) {
        const scalar_t* b = bp ? bp + sb[seg[t]] * n : nullptr;
        double sum = 0.0;
        for (int64_t c = 0; c < n; ++c) {
          float v = static_cast<float>(yp[t * n + c]);
          if (b) v += static_cast<float>(b[c]);
          if (rp) v += static_cast<float>(rp[t * n + c]);
          h[c] = v;
          sum += v;
        }
        const double mean = n ? sum / n : 0.0;
        double var = 0.0;  // two-pass: exact enough to match F.layer_norm in fp32
        for (int64_t c = 0; c < n; ++c) var += (h[c] - mean) * (h[c] - mean);
        const float rstd = static_cast<float>(1.0 / std::sqrt((n ? var / n : 0.0) + eps));
        const float m = static_cast<float>(mean);
        const scalar_t* g = gp + sl[seg[t]] * n;
        const scalar_t* e = ep + sl[seg[t]] * n;
        for (int64_t c = 0; c < n; ++c) {
          const float v = (h[c] - m) * rstd * static_cast<float>(g[c]) + static_cast<float>(e[c]);
          op[t * n + c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_residual_layernorm", &bias_residual_layernorm_cpu);
}

}  // namespace petops
