// CPU kernels for the segmented epilogues: bias_act, bias_residual_layernorm and
// adapter_residual_layernorm. Row-parallel when the batch is large; a small batch runs on the
// calling thread with no ATen temporaries (raw pointers, per-thread scratch).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../prepare.h"
#include "kernel_utils.h"

namespace petops {
namespace {

// f(t0, t1, s) for every run of token rows [t0, t1) of segment s, rows split over threads
// when n_tok * n is large (each chunk finds its first segment by binary search).
template <typename F>
void for_segment_rows(const int32_t* ip, int64_t n_seg, int64_t n_tok, int64_t n, const F& f) {
  parallel_if(n_tok, n_tok * n, [&](int64_t lo, int64_t hi) {
    int64_t s = std::upper_bound(ip, ip + n_seg + 1, static_cast<int32_t>(lo)) - ip - 1;
    for (int64_t t = lo; t < hi && s < n_seg; ++s) {
      const int64_t end = std::min<int64_t>(hi, ip[s + 1]);
      if (end > t) f(t, end, s);
      t = std::max<int64_t>(t, end);
    }
  });
}

// out[t] = act(y[t] + bias[seg_bias[s]]) * scale[seg_scale[s]], the activation fixed at
// compile time so the inner loop has no branch.
template <typename scalar_t, int Act>
void bias_act_rows(const EpilogueArgs& a, bool with_scale, scalar_t* op) {
  const int64_t n_tok = a.y.size(0), n = a.y.size(1), n_seg = a.seg_indptr.numel() - 1;
  const scalar_t* yp = a.y.data_ptr<scalar_t>();
  const scalar_t* bp = a.bias.data_ptr<scalar_t>();
  const scalar_t* sp = with_scale ? a.scale.data_ptr<scalar_t>() : nullptr;
  const int32_t* sb = a.seg_bias.data_ptr<int32_t>();
  const int32_t* ss = sp ? a.seg_scale.data_ptr<int32_t>() : nullptr;
  for_segment_rows(
      a.seg_indptr.data_ptr<int32_t>(), n_seg, n_tok, n, [&](int64_t t0, int64_t t1, int64_t s) {
        const scalar_t* __restrict__ b = bp + sb[s] * n;
        if (sp) {
          const scalar_t* __restrict__ sc = sp + ss[s] * n;
          for (int64_t t = t0; t < t1; ++t) {
            const scalar_t* __restrict__ yr = yp + t * n;
            scalar_t* __restrict__ o = op + t * n;
            for (int64_t c = 0; c < n; ++c) {
              const float v = apply_act(static_cast<float>(yr[c]) + static_cast<float>(b[c]), Act);
              o[c] = static_cast<scalar_t>(v * static_cast<float>(sc[c]));
            }
          }
          return;
        }
        for (int64_t t = t0; t < t1; ++t) {
          const scalar_t* __restrict__ yr = yp + t * n;
          scalar_t* __restrict__ o = op + t * n;
          for (int64_t c = 0; c < n; ++c) {
            o[c] = static_cast<scalar_t>(
                apply_act(static_cast<float>(yr[c]) + static_cast<float>(b[c]), Act));
          }
        }
      });
}

// float32 with an activation: the bias rows are added here, then ATen's own activation
// kernel (vectorised, the same one F.gelu & co run, so the reference matches exactly) works
// in place on the whole buffer, then the scale. A scalar erff per element costs about ten
// times as much.
void bias_act_float_aten(const EpilogueArgs& a, at::Tensor& out, int64_t act) {
  float* op = out.data_ptr<float>();
  bias_act_rows<float, static_cast<int>(kActNone)>(a, false, op);
  switch (act) {
    case kActGelu:
      at::gelu_(out);
      break;
    case kActRelu:
      at::relu_(out);
      break;
    case kActSilu:
      at::silu_(out);
      break;
    case kActGeluTanh:
      at::gelu_(out, "tanh");
      break;
    default:
      break;
  }
  if (!a.scale.defined()) return;
  const int64_t n_tok = out.size(0), n = out.size(1), n_seg = a.seg_indptr.numel() - 1;
  const float* sp = a.scale.data_ptr<float>();
  const int32_t* ss = a.seg_scale.data_ptr<int32_t>();
  for_segment_rows(a.seg_indptr.data_ptr<int32_t>(), n_seg, n_tok, n,
                   [&](int64_t t0, int64_t t1, int64_t s) {
                     const float* __restrict__ sc = sp + ss[s] * n;
                     for (int64_t t = t0; t < t1; ++t) {
                       float* __restrict__ o = op + t * n;
                       for (int64_t c = 0; c < n; ++c) o[c] *= sc[c];
                     }
                   });
}

at::Tensor bias_act_cpu(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& seg_indptr,
                        const at::Tensor& seg_bias, const OptTensor& scale,
                        const OptTensor& seg_scale, int64_t act) {
  EpilogueArgs a = prepare_bias_act(y, bias, seg_indptr, seg_bias, scale, seg_scale, act);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0);
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.seg_bias, 0, a.bias.size(0), "seg_bias", "a row of bias");
  if (a.scale.defined()) {
    check_range_host<int32_t>(a.seg_scale, 0, a.scale.size(0), "seg_scale", "a row of scale");
  }
  at::Tensor out = at::empty_like(a.y);
  if (a.y.scalar_type() == at::kFloat && act != kActNone) {
    bias_act_float_aten(a, out, act);
    return out;
  }
  const bool sc = a.scale.defined();
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "bias_act_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    switch (act) {
      case kActGelu:
        bias_act_rows<scalar_t, static_cast<int>(kActGelu)>(a, sc, op);
        break;
      case kActRelu:
        bias_act_rows<scalar_t, static_cast<int>(kActRelu)>(a, sc, op);
        break;
      case kActSilu:
        bias_act_rows<scalar_t, static_cast<int>(kActSilu)>(a, sc, op);
        break;
      case kActGeluTanh:
        bias_act_rows<scalar_t, static_cast<int>(kActGeluTanh)>(a, sc, op);
        break;
      default:
        bias_act_rows<scalar_t, static_cast<int>(kActNone)>(a, sc, op);
        break;
    }
  });
  return out;
}

// LayerNorm of one row h[0, n) (float) with gamma g and beta e into o. Sums in double over
// eight independent lanes (two-pass variance): as exact as F.layer_norm in fp32, and the
// lanes keep the additions from forming one long dependency chain.
template <typename scalar_t>
inline void layernorm_row(const float* __restrict__ h, int64_t n, const scalar_t* __restrict__ g,
                          const scalar_t* __restrict__ e, double eps, scalar_t* __restrict__ o) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int k = 0; k < 8; ++k) l[k] += h[c + k];
  double sum = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
  for (; c < n; ++c) sum += h[c];
  const double mean = n ? sum / n : 0.0;
  const float m = static_cast<float>(mean);
  for (int k = 0; k < 8; ++k) l[k] = 0;
  for (c = 0; c + 8 <= n; c += 8)
    for (int k = 0; k < 8; ++k) l[k] += (h[c + k] - mean) * (h[c + k] - mean);
  double var = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
  for (; c < n; ++c) var += (h[c] - mean) * (h[c] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt((n ? var / n : 0.0) + eps));
  for (c = 0; c < n; ++c) {
    const float v = (h[c] - m) * rstd * static_cast<float>(g[c]) + static_cast<float>(e[c]);
    o[c] = static_cast<scalar_t>(v);
  }
}

at::Tensor bias_residual_layernorm_cpu(const at::Tensor& y, const OptTensor& residual,
                                       const OptTensor& bias, const at::Tensor& gamma,
                                       const at::Tensor& beta, const at::Tensor& seg_indptr,
                                       const OptTensor& seg_bias, const at::Tensor& seg_ln,
                                       double eps) {
  EpilogueArgs a = prepare_layernorm(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n = a.y.size(1), n_seg = a.seg_indptr.numel() - 1;
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.seg_ln, 0, a.gamma.size(0), "seg_ln", "a row of gamma/beta");
  if (a.bias.defined()) {
    check_range_host<int32_t>(a.seg_bias, 0, a.bias.size(0), "seg_bias", "a row of bias");
  }
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
    for_segment_rows(a.seg_indptr.data_ptr<int32_t>(), n_seg, n_tok, n,
                     [&](int64_t t0, int64_t t1, int64_t s) {
                       float* __restrict__ h = scratch(0, n);
                       const scalar_t* b = bp ? bp + sb[s] * n : nullptr;
                       for (int64_t t = t0; t < t1; ++t) {
                         const scalar_t* __restrict__ yr = yp + t * n;
                         for (int64_t c = 0; c < n; ++c) h[c] = static_cast<float>(yr[c]);
                         if (b) {
                           for (int64_t c = 0; c < n; ++c) h[c] += static_cast<float>(b[c]);
                         }
                         if (rp) {
                           const scalar_t* __restrict__ rr = rp + t * n;
                           for (int64_t c = 0; c < n; ++c) h[c] += static_cast<float>(rr[c]);
                         }
                         layernorm_row(h, n, gp + sl[s] * n, ep + sl[s] * n, eps, op + t * n);
                       }
                     });
  });
  return out;
}

// One segment's adapter on its rows: h[len, n] (float, rounded to scalar_t like the unfused
// ops' buffers) += up(round(act(down(h) + down.b))) + up.b, then rounded again. Both
// projections are fp32 GEMMs on the rows in place; the weights come from the flat pool.
template <typename scalar_t>
void adapter_rows(float* h, int64_t len, int64_t n, int64_t r, int act, const scalar_t* wp,
                  const int64_t* o) {
  int64_t ld_d = 0, ld_u = 0, ld_b = 0;
  const float* wd = as_float(wp + o[0], r, n, n, 1, &ld_d);  // down.w [r, n]
  const float* wu = as_float(wp + o[2], n, r, r, 2, &ld_u);  // up.w [n, r]
  float* d = scratch(3, len * r);
  gemm_nt(len, r, n, 1.f, h, n, wd, ld_d, 0.f, d, r);
  const float* bd = as_float(wp + o[1], 1, r, r, 1, &ld_b);  // wd is no longer read
  for (int64_t t = 0; t < len; ++t) {
    float* dr = d + t * r;
    for (int64_t j = 0; j < r; ++j) dr[j] = round_to<scalar_t>(apply_act(dr[j] + bd[j], act));
  }
  gemm_nt(len, n, r, 1.f, d, r, wu, ld_u, 1.f, h, n);
  const scalar_t* bu = wp + o[3];
  for (int64_t t = 0; t < len; ++t) {
    float* hr = h + t * n;
    for (int64_t c = 0; c < n; ++c) hr[c] = round_to<scalar_t>(hr[c] + static_cast<float>(bu[c]));
  }
}

// Per segment: h = round(y + bias); with an adapter, the two fp32 GEMMs above; then the
// LayerNorm epilogue (residual, per-task gamma/beta) straight into the output. Segments run
// in parallel when the batch is large.
at::Tensor adapter_residual_layernorm_cpu(const at::Tensor& y, const OptTensor& residual,
                                          const at::Tensor& bias, const at::Tensor& seg_bias,
                                          const at::Tensor& w, const at::Tensor& seg_w_off,
                                          const at::Tensor& seg_rank, const at::Tensor& seg_act,
                                          const at::Tensor& gamma, const at::Tensor& beta,
                                          const at::Tensor& seg_indptr, const at::Tensor& seg_ln,
                                          int64_t max_rank, double eps) {
  AdapterLnArgs a = prepare_adapter_ln(y, residual, bias, seg_bias, w, seg_w_off, seg_rank, seg_act,
                                       gamma, beta, seg_indptr, seg_ln, max_rank);
  TORCH_INTERNAL_ASSERT(a.ln.y.device().is_cpu());
  const int64_t n_tok = a.ln.y.size(0), n = a.ln.y.size(1), n_seg = a.seg_rank.numel();
  check_indptr_host(a.ln.seg_indptr, n_tok);
  check_range_host<int32_t>(a.seg_rank, 0, max_rank + 1, "seg_rank", "a rank <= max_rank");
  check_range_host<int32_t>(a.ln.seg_bias, 0, a.ln.bias.size(0), "seg_bias", "a row of bias");
  check_range_host<int32_t>(a.ln.seg_ln, 0, a.ln.gamma.size(0), "seg_ln", "a row of gamma/beta");
  const int32_t* rk = a.seg_rank.data_ptr<int32_t>();
  const int32_t* ac = a.seg_act.data_ptr<int32_t>();
  const int64_t* wo = a.seg_w_off.data_ptr<int64_t>();
  for (int64_t s = 0; s < n_seg; ++s) {
    if (rk[s] == 0) continue;
    PETOPS_CHECK(ac[s] >= 0 && ac[s] < kNumActs, "seg_act[", s, "]=", ac[s],
                 " is not an ACT_* code in [0, ", static_cast<int64_t>(kNumActs),
                 "); see petops.reference.ACTIVATIONS");
    const int64_t len[kAdapterParts] = {rk[s] * n, rk[s], n * rk[s], n};
    for (int64_t p = 0; p < kAdapterParts; ++p) {
      PETOPS_CHECK(
          wo[s * kAdapterParts + p] >= 0 && wo[s * kAdapterParts + p] + len[p] <= a.w.numel(),
          "seg_w_off[", s, ", ", p, "]=", wo[s * kAdapterParts + p], " with length ", len[p],
          " overruns the adapter pool of ", a.w.numel(), " elements; check the pool offsets");
    }
  }
  at::Tensor out = at::empty_like(a.ln.y);
  const int32_t* ip = a.ln.seg_indptr.data_ptr<int32_t>();
  PETOPS_DISPATCH_FLOATS(a.ln.y.scalar_type(), "adapter_ln_cpu", [&] {
    const scalar_t* yp = a.ln.y.data_ptr<scalar_t>();
    const scalar_t* rp = a.ln.residual.defined() ? a.ln.residual.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = a.ln.bias.data_ptr<scalar_t>();
    const scalar_t* gp = a.ln.gamma.data_ptr<scalar_t>();
    const scalar_t* ep = a.ln.beta.data_ptr<scalar_t>();
    const scalar_t* wp = a.w.data_ptr<scalar_t>();
    const int32_t* sb = a.ln.seg_bias.data_ptr<int32_t>();
    const int32_t* sl = a.ln.seg_ln.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_if(n_seg, n_tok * n * (1 + 2 * max_rank), [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t r0 = ip[s], len = ip[s + 1] - r0;
        if (len == 0) continue;
        float* h = scratch(0, len * n);
        const scalar_t* __restrict__ b = bp + sb[s] * n;
        for (int64_t t = 0; t < len; ++t) {  // h = round(y + bias), as bias_act writes it
          const scalar_t* __restrict__ yr = yp + (r0 + t) * n;
          float* __restrict__ hr = h + t * n;
          for (int64_t c = 0; c < n; ++c)
            hr[c] = round_to<scalar_t>(static_cast<float>(yr[c]) + static_cast<float>(b[c]));
        }
        if (rk[s] > 0) adapter_rows<scalar_t>(h, len, n, rk[s], ac[s], wp, wo + s * kAdapterParts);
        for (int64_t t = 0; t < len; ++t) {
          float* __restrict__ hr = h + t * n;
          if (rp) {
            const scalar_t* __restrict__ rr = rp + (r0 + t) * n;
            for (int64_t c = 0; c < n; ++c) hr[c] += static_cast<float>(rr[c]);
          }
          layernorm_row(hr, n, gp + sl[s] * n, ep + sl[s] * n, eps, op + (r0 + t) * n);
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
  m.impl("adapter_residual_layernorm", &adapter_residual_layernorm_cpu);
}

}  // namespace petops
