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

// out[t] = act(y[t] + bias[seg_bias[seg[t]]]) * scale[...], the activation fixed at compile
// time so the inner loop has no branch.
template <typename scalar_t, int Act>
void bias_act_rows(const EpilogueArgs& a, const std::vector<int32_t>& seg, at::Tensor& out) {
  const int64_t n_tok = a.y.size(0), n = a.y.size(1);
  const scalar_t* yp = a.y.data_ptr<scalar_t>();
  const scalar_t* bp = a.bias.data_ptr<scalar_t>();
  const scalar_t* sp = a.scale.defined() ? a.scale.data_ptr<scalar_t>() : nullptr;
  const int32_t* sb = a.seg_bias.data_ptr<int32_t>();
  const int32_t* ss = sp ? a.seg_scale.data_ptr<int32_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, n_tok, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const scalar_t* b = bp + sb[seg[t]] * n;
      const scalar_t* sc = sp ? sp + ss[seg[t]] * n : nullptr;
      for (int64_t c = 0; c < n; ++c) {
        float v = apply_act(static_cast<float>(yp[t * n + c]) + static_cast<float>(b[c]), Act);
        if (sc) v *= static_cast<float>(sc[c]);
        op[t * n + c] = static_cast<scalar_t>(v);
      }
    }
  });
}

// float32 with an activation: the bias rows are added here, then ATen's own activation
// kernel (vectorised, the same one F.gelu & co run, so the reference matches exactly) works
// in place, then the scale. A scalar erff per element costs about ten times as much.
void bias_act_float_aten(const EpilogueArgs& a, const std::vector<int32_t>& seg, at::Tensor& out,
                         int64_t act) {
  EpilogueArgs plain = a;  // the bias alone: the scale comes after the activation
  plain.scale = at::Tensor();
  plain.seg_scale = at::Tensor();
  bias_act_rows<float, static_cast<int>(kActNone)>(plain, seg, out);
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
  const int64_t n_tok = out.size(0), n = out.size(1);
  const float* sp = a.scale.data_ptr<float>();
  const int32_t* ss = a.seg_scale.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_tok, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* sc = sp + ss[seg[t]] * n;
      for (int64_t c = 0; c < n; ++c) op[t * n + c] *= sc[c];
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
  const std::vector<int32_t> seg = token_segments(a.seg_indptr, n_tok);
  at::Tensor out = at::empty_like(a.y);
  if (a.y.scalar_type() == at::kFloat && act != kActNone) {
    bias_act_float_aten(a, seg, out, act);
    return out;
  }
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "bias_act_cpu", [&] {
    switch (act) {
      case kActGelu:
        bias_act_rows<scalar_t, static_cast<int>(kActGelu)>(a, seg, out);
        break;
      case kActRelu:
        bias_act_rows<scalar_t, static_cast<int>(kActRelu)>(a, seg, out);
        break;
      case kActSilu:
        bias_act_rows<scalar_t, static_cast<int>(kActSilu)>(a, seg, out);
        break;
      case kActGeluTanh:
        bias_act_rows<scalar_t, static_cast<int>(kActGeluTanh)>(a, seg, out);
        break;
      default:
        bias_act_rows<scalar_t, static_cast<int>(kActNone)>(a, seg, out);
        break;
    }
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

// Per segment with an adapter: two at::mm on its contiguous rows in fp32, rounded where the
// unfused ops write a buffer; segments run in parallel. Then the LayerNorm epilogue above.
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
  // h = round(y + bias): the adapter's input, as bias_act writes it.
  at::Tensor h = bias_act_cpu(a.ln.y, a.ln.bias, a.ln.seg_indptr, a.ln.seg_bias, std::nullopt,
                              std::nullopt, kActNone);
  const int32_t* ip = a.ln.seg_indptr.data_ptr<int32_t>();
  const auto dt = h.scalar_type();
  at::parallel_for(0, n_seg, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t r = rk[s], r0 = ip[s], rows = ip[s + 1] - r0;
      if (r == 0 || rows == 0) continue;
      const int64_t* o = wo + s * kAdapterParts;
      auto part = [&](int64_t p, at::IntArrayRef shape) {
        return a.w.narrow(0, o[p], c10::multiply_integers(shape)).view(shape).to(at::kFloat);
      };
      at::Tensor hs = h.narrow(0, r0, rows);
      at::Tensor hf = hs.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);  // not hs (fp32)
      at::Tensor d = at::mm(hf, part(0, {r, n}).t()).add_(part(1, {r}));
      float* dp = d.data_ptr<float>();
      for (int64_t e = 0; e < d.numel(); ++e) dp[e] = apply_act(dp[e], ac[s]);
      d = d.to(dt).to(at::kFloat);
      hs.copy_(hf.add_(at::mm(d, part(2, {n, r}).t())).add_(part(3, {n})));
    }
  });
  return bias_residual_layernorm_cpu(
      h, a.ln.residual.defined() ? OptTensor(a.ln.residual) : std::nullopt, std::nullopt,
      a.ln.gamma, a.ln.beta, a.ln.seg_indptr, std::nullopt, a.ln.seg_ln, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_residual_layernorm", &bias_residual_layernorm_cpu);
  m.impl("adapter_residual_layernorm", &adapter_residual_layernorm_cpu);
}

}  // namespace petops
