// CPU kernel for seg_spmm: per segment, y[rows] += x[rows] @ S_i.T with S_i in sliced ELL.
// Rows are processed transposed ([K, len] and [N, len], fp32, in per-thread scratch) so every
// non-zero is one contiguous axpy over the segment's tokens; segment groups run in parallel
// when the batch is large.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../prepare.h"
#include "items.h"
#include "kernel_utils.h"

namespace petops {
namespace {

// Validates item i's spmm_slices(N) + 1 slice pointers and its column indices (K: padding).
void check_item_slices(const GroupedArgs& a, int64_t i, int64_t n_out, int64_t k_dim) {
  const int64_t n_sl = spmm_slices(n_out);
  const int64_t off = a.item_w_off.data_ptr<int64_t>()[i];
  PETOPS_CHECK(off >= 0 && off + n_sl + 1 <= a.slice_ptr.numel(), "item_slice_off[", i, "]=", off,
               " needs ceil(N / ", static_cast<int64_t>(kSliceRows), ") + 1 = ", n_sl + 1,
               " slice pointers but slice_ptr has ", a.slice_ptr.numel());
  const int64_t* sp = a.slice_ptr.data_ptr<int64_t>() + off;
  const int64_t pool =
      a.values.defined() ? std::min(a.indices.numel(), a.values.numel()) : a.indices.numel();
  PETOPS_CHECK(sp[0] >= 0 && sp[n_sl] <= pool, "item ", i, ": entries [", sp[0], ", ", sp[n_sl],
               ") overrun the indices/values pools of ", pool, " entries");
  const int16_t* ix = a.indices.data_ptr<int16_t>();
  for (int64_t s = 0; s < n_sl; ++s) {
    PETOPS_CHECK(sp[s] <= sp[s + 1] && (sp[s + 1] - sp[s]) % kSliceRows == 0, "item ", i,
                 ": slice ", s, " spans [", sp[s], ", ", sp[s + 1], "); expected a non-negative",
                 " multiple of ", static_cast<int64_t>(kSliceRows),
                 " entries (petops.reference.pack_sliced_ell)");
    for (int64_t p = sp[s]; p < sp[s + 1]; ++p) {
      PETOPS_CHECK(ix[p] >= 0 && ix[p] <= k_dim, "indices[", p, "]=", ix[p],
                   " is out of range; expected an input column in [0, ", k_dim, ") or ", k_dim,
                   " for padding");
    }
  }
}

void seg_spmm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                  const at::Tensor& item_seg, const at::Tensor& item_slice_off,
                  const at::Tensor& slice_ptr, const at::Tensor& indices,
                  const at::Tensor& values) {
  GroupedArgs a =
      prepare_spmm(y, x, seg_indptr, item_seg, item_slice_off, slice_ptr, indices, values);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  const int64_t n_seg = a.seg_indptr.numel() - 1;
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.item_seg, 0, n_seg, "item_seg", "a segment index");
  for (int64_t i = 0; i < a.num_items; ++i) check_item_slices(a, i, n_out, k_dim);

  const SegmentGroups g = group_by_segment(a.item_seg, n_seg);
  const int32_t* ip = a.seg_indptr.data_ptr<int32_t>();
  const int64_t* ro = a.item_w_off.data_ptr<int64_t>();
  const int16_t* ix = a.indices.data_ptr<int16_t>();
  const int64_t* spool = a.slice_ptr.data_ptr<int64_t>();
  const int64_t n_groups = static_cast<int64_t>(g.seg.size());
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_spmm_cpu", [&] {
    scalar_t* yp = a.y.data_ptr<scalar_t>();
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* vp = a.values.data_ptr<scalar_t>();
    parallel_if(n_groups, n_tok * (n_out + k_dim), [&](int64_t lo, int64_t hi) {
      for (int64_t gi = lo; gi < hi; ++gi) {
        const int64_t r0 = ip[g.seg[gi]], len = ip[g.seg[gi] + 1] - r0;
        if (len == 0) continue;
        float* x_t = scratch(0, k_dim * len);    // [K, len]
        float* acc_t = scratch(1, n_out * len);  // [N, len]
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t* xr = xp + (r0 + t) * k_dim;
          for (int64_t kk = 0; kk < k_dim; ++kk) x_t[kk * len + t] = static_cast<float>(xr[kk]);
          const scalar_t* yr = yp + (r0 + t) * n_out;
          for (int64_t o = 0; o < n_out; ++o) acc_t[o * len + t] = static_cast<float>(yr[o]);
        }
        for (int64_t e = g.begin[gi]; e < g.begin[gi + 1]; ++e) {
          const int64_t* sp = spool + ro[g.order[e]];
          for (int64_t o = 0; o < n_out; ++o) {
            float* __restrict__ arow = acc_t + o * len;
            const int64_t s = o / kSliceRows;
            for (int64_t p = sp[s] + o % kSliceRows; p < sp[s + 1]; p += kSliceRows) {
              const int64_t kk = ix[p];
              if (kk == k_dim) continue;  // padding
              const float v = static_cast<float>(vp[p]);
              const float* __restrict__ xr = x_t + kk * len;
              for (int64_t t = 0; t < len; ++t) arow[t] += v * xr[t];
            }
          }
        }
        for (int64_t t = 0; t < len; ++t) {
          scalar_t* yr = yp + (r0 + t) * n_out;
          for (int64_t o = 0; o < n_out; ++o) yr[o] = static_cast<scalar_t>(acc_t[o * len + t]);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CPU, m) { m.impl("seg_spmm", &seg_spmm_cpu); }

}  // namespace petops
