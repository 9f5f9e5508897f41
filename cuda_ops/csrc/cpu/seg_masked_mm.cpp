// CPU kernel for seg_masked_mm: per item, y[rows] += alpha * x[rows] @ (W * M_i).T with M_i
// the item's [N, K] bit mask. The masked weight is expanded once per item into per-thread
// float32 scratch and the product is one fp32 GEMM on the rows' pointers (accumulated into y
// itself for fp32); segment groups run in parallel when the batch is large.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../prepare.h"
#include "items.h"
#include "kernel_utils.h"

namespace petops {
namespace {

void seg_masked_mm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                       const at::Tensor& item_seg, const at::Tensor& item_mask_off,
                       const at::Tensor& mask, const at::Tensor& dense_w, double alpha) {
  GroupedArgs a = prepare_masked(y, x, seg_indptr, item_seg, item_mask_off, mask, dense_w);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  const int64_t n_seg = a.seg_indptr.numel() - 1, kw = mask_words(k_dim);
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.item_seg, 0, n_seg, "item_seg", "a segment index");
  const int64_t* mo = a.item_w_off.data_ptr<int64_t>();
  for (int64_t i = 0; i < a.num_items; ++i) {
    PETOPS_CHECK(mo[i] == -1 || (mo[i] >= 0 && mo[i] + n_out * kw <= a.mask.numel()),
                 "item_mask_off[", i, "]=", mo[i], " needs N * ceil(K / 32) = ", n_out * kw,
                 " mask words but the mask pool has ", a.mask.numel(),
                 "; pass -1 for an item without a mask");
  }
  if (a.y.numel() == 0 || a.num_items == 0) return;

  const SegmentGroups g = group_by_segment(a.item_seg, n_seg);
  const int32_t* ip = a.seg_indptr.data_ptr<int32_t>();
  const at::Tensor w = a.dense_w.scalar_type() == at::kFloat ? a.dense_w : a.dense_w.to(at::kFloat);
  const float* wp = w.data_ptr<float>();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(a.mask.data_ptr<int32_t>());
  const float al = static_cast<float>(alpha);
  const int64_t n_groups = static_cast<int64_t>(g.seg.size());
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_masked_mm_cpu", [&] {
    scalar_t* yp = a.y.data_ptr<scalar_t>();
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    parallel_if(n_groups, n_tok * n_out * k_dim, [&](int64_t lo, int64_t hi) {
      float* mp = scratch(2, n_out * k_dim);  // the item's W * M_i
      for (int64_t gi = lo; gi < hi; ++gi) {
        const int64_t r0 = ip[g.seg[gi]], len = ip[g.seg[gi] + 1] - r0;
        if (len == 0) continue;
        int64_t ldx = 0, ld_acc = 0;
        const float* xr = as_float(xp + r0 * k_dim, len, k_dim, k_dim, 0, &ldx);
        float* acc = const_cast<float*>(as_float(yp + r0 * n_out, len, n_out, n_out, 1, &ld_acc));
        for (int64_t e = g.begin[gi]; e < g.begin[gi + 1]; ++e) {
          const int64_t off = mo[g.order[e]];
          if (off < 0) continue;
          for (int64_t o = 0; o < n_out; ++o) {  // W * M_i, as the reference multiplies
            const uint32_t* row = words + off + o * kw;
            const float* wr = wp + o * k_dim;
            float* mr = mp + o * k_dim;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t k0 = j * 32, nb = std::min<int64_t>(32, k_dim - k0);
              const uint32_t word = row[j];
              for (int64_t b = 0; b < nb; ++b)
                mr[k0 + b] = wr[k0 + b] * static_cast<float>((word >> b) & 1u);
            }
          }
          gemm_nt(len, n_out, k_dim, al, xr, ldx, mp, k_dim, 1.f, acc, ld_acc);
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

TORCH_LIBRARY_IMPL(petops, CPU, m) { m.impl("seg_masked_mm", &seg_masked_mm_cpu); }

}  // namespace petops
