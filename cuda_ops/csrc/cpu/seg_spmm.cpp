// CPU kernel for seg_spmm: per segment, y[rows] += x[rows] @ S_i.T with S_i in CSR.
// Rows are processed transposed ([K, len] and [N, len]) so every non-zero is one contiguous
// axpy over the segment's tokens; segment groups run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../prepare.h"
#include "items.h"

namespace petops {
namespace {

// Validates item i's N + 1 row pointers and its column indices.
void check_item_csr(const GroupedArgs& a, int64_t i, int64_t n_out, int64_t k_dim) {
  const int64_t off = a.item_w_off.data_ptr<int64_t>()[i];
  PETOPS_CHECK(off >= 0 && off + n_out + 1 <= a.rowptr.numel(), "item_rowptr_off[", i, "]=", off,
               " needs N + 1 = ", n_out + 1, " row pointers but rowptr has ", a.rowptr.numel());
  const int64_t* rp = a.rowptr.data_ptr<int64_t>() + off;
  const int64_t nnz_pool =
      a.values.defined() ? std::min(a.indices.numel(), a.values.numel()) : a.indices.numel();
  PETOPS_CHECK(rp[0] >= 0 && rp[n_out] <= nnz_pool, "item ", i, ": non-zeros [", rp[0], ", ",
               rp[n_out], ") overrun the indices/values pools of ", nnz_pool, " entries");
  const int32_t* ix = a.indices.data_ptr<int32_t>();
  for (int64_t o = 0; o < n_out; ++o) {
    PETOPS_CHECK(rp[o] <= rp[o + 1], "item ", i, ": rowptr must be non-decreasing at row ", o);
    for (int64_t p = rp[o]; p < rp[o + 1]; ++p) {
      PETOPS_CHECK(ix[p] >= 0 && ix[p] < k_dim, "indices[", p, "]=", ix[p],
                   " is out of range; expected an input column in [0, ", k_dim, ")");
    }
  }
}

void seg_spmm_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& seg_indptr,
                  const at::Tensor& item_seg, const at::Tensor& item_rowptr_off,
                  const at::Tensor& rowptr, const at::Tensor& indices, const OptTensor& values,
                  const OptTensor& dense_w, double alpha) {
  GroupedArgs a =
      prepare_spmm(y, x, seg_indptr, item_seg, item_rowptr_off, rowptr, indices, values, dense_w);
  TORCH_INTERNAL_ASSERT(a.y.device().is_cpu());
  const int64_t n_tok = a.y.size(0), n_out = a.y.size(1), k_dim = a.x.size(1);
  const int64_t n_seg = a.seg_indptr.numel() - 1;
  check_indptr_host(a.seg_indptr, n_tok);
  check_range_host<int32_t>(a.item_seg, 0, n_seg, "item_seg", "a segment index");
  for (int64_t i = 0; i < a.num_items; ++i) check_item_csr(a, i, n_out, k_dim);

  const SegmentGroups g = group_by_segment(a.item_seg, n_seg);
  const int32_t* ip = a.seg_indptr.data_ptr<int32_t>();
  const int64_t* ro = a.item_w_off.data_ptr<int64_t>();
  const int32_t* ix = a.indices.data_ptr<int32_t>();
  const float al = static_cast<float>(alpha);
  PETOPS_DISPATCH_FLOATS(a.y.scalar_type(), "seg_spmm_cpu", [&] {
    const scalar_t* vp = a.values.defined() ? a.values.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dw = a.dense_w.defined() ? a.dense_w.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(g.seg.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t gi = lo; gi < hi; ++gi) {
        const int64_t r0 = ip[g.seg[gi]], len = ip[g.seg[gi] + 1] - r0;
        if (len == 0) continue;
        at::Tensor rows = a.y.narrow(0, r0, len);
        at::Tensor x_t = a.x.narrow(0, r0, len).to(at::kFloat).t().contiguous();  // [K, len]
        at::Tensor acc_t = rows.to(at::kFloat).t().contiguous();                  // [N, len]
        const float* xp = x_t.data_ptr<float>();
        float* ap = acc_t.data_ptr<float>();
        for (int64_t e = g.begin[gi]; e < g.begin[gi + 1]; ++e) {
          const int64_t* rp = a.rowptr.data_ptr<int64_t>() + ro[g.order[e]];
          for (int64_t o = 0; o < n_out; ++o) {
            float* arow = ap + o * len;
            for (int64_t p = rp[o]; p < rp[o + 1]; ++p) {
              const int64_t kk = ix[p];
              const float v =
                  vp ? static_cast<float>(vp[p]) : al * static_cast<float>(dw[o * k_dim + kk]);
              const float* xr = xp + kk * len;
              for (int64_t t = 0; t < len; ++t) arow[t] += v * xr[t];
            }
          }
        }
        rows.copy_(acc_t.t());
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(petops, CPU, m) { m.impl("seg_spmm", &seg_spmm_cpu); }

}  // namespace petops
