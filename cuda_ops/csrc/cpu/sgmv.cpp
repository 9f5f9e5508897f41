// CPU kernels for grouped low-rank projections: sgmv_shrink and sgmv_expand.
// Each item is one small fp32 GEMM on its segment's contiguous token rows, run on the
// buffers' pointers (gemm_nt) with no ATen temporaries; items (shrink) or segment groups
// (expand) run in parallel when the batch is large, so the per-task loop stays in C++.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../prepare.h"
#include "items.h"
#include "kernel_utils.h"

namespace petops {
namespace {

at::Tensor sgmv_shrink_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& seg_indptr,
                           const at::Tensor& item_seg, const at::Tensor& item_w_off,
                           const at::Tensor& item_rank, const OptTensor& bias,
                           const OptTensor& item_b_off, int64_t act, int64_t max_rank) {
  GroupedArgs a = prepare_shrink(x, w, seg_indptr, item_seg, item_w_off, item_rank, bias,
                                 item_b_off, act, max_rank);
  TORCH_INTERNAL_ASSERT(a.x.device().is_cpu());
  const int64_t n_tok = a.x.size(0), k = a.x.size(1), n_items = a.num_items;
  const int64_t n_seg = a.seg_indptr.numel() - 1;
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.item_seg, 0, n_seg, "item_seg", "a segment index");
  check_range_host<int32_t>(a.item_rank, 1, max_rank + 1, "item_rank", "a rank <= max_rank");
  const int32_t* ip = a.seg_indptr.data_ptr<int32_t>();
  const int32_t* is = a.item_seg.data_ptr<int32_t>();
  const int32_t* rk = a.item_rank.data_ptr<int32_t>();
  std::vector<int64_t> w_len(n_items), b_len(n_items);
  std::vector<char> seen(n_seg, 0);
  for (int64_t i = 0; i < n_items; ++i) {
    w_len[i] = static_cast<int64_t>(rk[i]) * k;
    b_len[i] = rk[i];
    PETOPS_CHECK(!seen[is[i]], "segment ", is[i], " has more than one sgmv_shrink item (item ", i,
                 "); give each segment at most one shrink item and concatenate q/k/v ranks");
    seen[is[i]] = 1;
  }
  check_spans_host(a.item_w_off, w_len.data(), a.w.numel(), "item_w_off");
  if (a.bias.defined()) check_spans_host(a.item_b_off, b_len.data(), a.bias.numel(), "item_b_off");

  at::Tensor out = at::zeros({n_tok, max_rank}, a.x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const int64_t* wo = a.item_w_off.data_ptr<int64_t>();
  const int64_t* bo = a.bias.defined() ? a.item_b_off.data_ptr<int64_t>() : nullptr;
  PETOPS_DISPATCH_FLOATS(a.x.scalar_type(), "sgmv_shrink_cpu", [&] {
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* wp = a.w.data_ptr<scalar_t>();
    const scalar_t* bp = bo ? a.bias.data_ptr<scalar_t>() : nullptr;
    parallel_if(n_items, n_tok * k * max_rank, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r0 = ip[is[i]], len = ip[is[i] + 1] - r0, r = rk[i];
        if (len == 0) continue;
        int64_t ldx = 0, ldw = 0;
        const float* xs = as_float(xp + r0 * k, len, k, k, 0, &ldx);
        const float* wa = as_float(wp + wo[i], r, k, k, 1, &ldw);
        float* h = op + r0 * max_rank;  // [len, r] with row stride max_rank
        gemm_nt(len, r, k, 1.f, xs, ldx, wa, ldw, 0.f, h, max_rank);
        for (int64_t t = 0; t < len; ++t) {
          float* hr = h + t * max_rank;
          if (bp) {
            for (int64_t j = 0; j < r; ++j) hr[j] += static_cast<float>(bp[bo[i] + j]);
          }
          if (act != kActNone) {
            for (int64_t j = 0; j < r; ++j) hr[j] = apply_act(hr[j], static_cast<int>(act));
          }
        }
      }
    });
  });
  return a.x.scalar_type() == at::kFloat ? out : out.to(a.x.scalar_type());
}

void sgmv_expand_cpu(const at::Tensor& y, const at::Tensor& tmp, const at::Tensor& w,
                     const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                     const at::Tensor& item_w_off, const at::Tensor& item_rank,
                     const at::Tensor& item_in_off, const at::Tensor& item_out_off,
                     const at::Tensor& item_out_dim, const at::Tensor& item_scale,
                     const OptTensor& bias, const OptTensor& item_b_off) {
  GroupedArgs a =
      prepare_expand(y, tmp, w, seg_indptr, item_seg, item_w_off, item_rank, item_in_off,
                     item_out_off, item_out_dim, item_scale, bias, item_b_off);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), r_tmp = a.x.size(1);
  const int64_t n_items = a.num_items, n_seg = a.seg_indptr.numel() - 1;
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.item_seg, 0, n_seg, "item_seg", "a segment index");
  const int32_t* rk = a.item_rank.data_ptr<int32_t>();
  const int32_t* j0 = a.item_in_off.data_ptr<int32_t>();
  const int32_t* c0 = a.item_out_off.data_ptr<int32_t>();
  const int32_t* nd = a.item_out_dim.data_ptr<int32_t>();
  std::vector<int64_t> w_len(n_items), b_len(n_items);
  for (int64_t i = 0; i < n_items; ++i) {
    PETOPS_CHECK(rk[i] >= 1 && j0[i] >= 0 && j0[i] + rk[i] <= r_tmp, "item ", i, ": tmp columns [",
                 j0[i], ", ", j0[i] + rk[i], ") (item_in_off, item_rank) must lie in [0, ", r_tmp,
                 ") with rank >= 1");
    PETOPS_CHECK(nd[i] >= 0 && c0[i] >= 0 && c0[i] + nd[i] <= n_out, "item ", i, ": y columns [",
                 c0[i], ", ", c0[i] + nd[i], ") (item_out_off, item_out_dim) must lie in [0, ",
                 n_out, ")");
    w_len[i] = static_cast<int64_t>(nd[i]) * rk[i];
    b_len[i] = nd[i];
  }
  check_spans_host(a.item_w_off, w_len.data(), a.w.numel(), "item_w_off");
  if (a.bias.defined()) check_spans_host(a.item_b_off, b_len.data(), a.bias.numel(), "item_b_off");

  const SegmentGroups g = group_by_segment(a.item_seg, n_seg);
  const int32_t* ip = a.seg_indptr.data_ptr<int32_t>();
  const int64_t* wo = a.item_w_off.data_ptr<int64_t>();
  const int64_t* bo = a.bias.defined() ? a.item_b_off.data_ptr<int64_t>() : nullptr;
  const float* sc = a.item_scale.data_ptr<float>();
  const int64_t n_groups = static_cast<int64_t>(g.seg.size());
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "sgmv_expand_cpu", [&] {
    scalar_t* yp = a.y.data_ptr<scalar_t>();
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* wp = a.w.data_ptr<scalar_t>();
    const scalar_t* bp = bo ? a.bias.data_ptr<scalar_t>() : nullptr;
    parallel_if(n_groups, n_tok * n_out * r_tmp, [&](int64_t lo, int64_t hi) {
      for (int64_t gi = lo; gi < hi; ++gi) {
        const int64_t r0 = ip[g.seg[gi]], len = ip[g.seg[gi] + 1] - r0;
        if (len == 0) continue;
        // fp32 accumulates in y itself; other dtypes in a float copy of the rows.
        int64_t ld_acc = 0;
        float* acc = const_cast<float*>(as_float(yp + r0 * n_out, len, n_out, n_out, 0, &ld_acc));
        for (int64_t e = g.begin[gi]; e < g.begin[gi + 1]; ++e) {
          const int64_t i = g.order[e], r = rk[i], n = nd[i];
          int64_t ldt = 0, ldw = 0;
          const float* t_in = as_float(xp + r0 * r_tmp + j0[i], len, r, r_tmp, 1, &ldt);
          const float* wb = as_float(wp + wo[i], n, r, r, 2, &ldw);
          gemm_nt(len, n, r, sc[i], t_in, ldt, wb, ldw, 1.f, acc + c0[i], ld_acc);
          if (bp) {
            const scalar_t* b = bp + bo[i];
            for (int64_t t = 0; t < len; ++t) {
              float* ar = acc + t * ld_acc + c0[i];
              for (int64_t c = 0; c < n; ++c) ar[c] += static_cast<float>(b[c]);
            }
          }
        }
        if constexpr (!std::is_same_v<scalar_t, float>) {
          scalar_t* rows = yp + r0 * n_out;
          for (int64_t e = 0; e < len * n_out; ++e) rows[e] = static_cast<scalar_t>(acc[e]);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CPU, m) {
  m.impl("sgmv_shrink", &sgmv_shrink_cpu);
  m.impl("sgmv_expand", &sgmv_expand_cpu);
}

}  // namespace petops
