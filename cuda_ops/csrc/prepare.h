// Per-op argument structs: validated, contiguous, index tensors in canonical dtypes.
// Shared by cpu/*.cpp and cuda/*.cu so both backends accept and reject the same calls.
#pragma once

#include "validate.h"

namespace petops {
// Internal linkage: cpu/*.cpp (g++) and cuda/*.cu (nvcc) objects must not share weak
// copies of these helpers.
namespace {

using OptTensor = std::optional<at::Tensor>;

struct EpilogueArgs {
  at::Tensor y, residual, bias, gamma, beta, scale;  // optional ones are undefined
  at::Tensor seg_indptr, seg_bias, seg_ln, seg_scale;
};

// [P, N] pool of per-task rows, N = y.size(1).
inline at::Tensor row_pool(const at::Tensor& t, const at::Tensor& y, const char* name) {
  check_dim(t, 2, name, "[pool_rows, N]");
  PETOPS_CHECK(t.size(1) == y.size(1), name, " must have N = y.size(1) = ", y.size(1),
               " columns, got shape ", t.sizes());
  return like(t, y, name, "y");
}

inline EpilogueArgs prepare_bias_act(const at::Tensor& y, const at::Tensor& bias,
                                     const at::Tensor& seg_indptr, const at::Tensor& seg_bias,
                                     const OptTensor& scale, const OptTensor& seg_scale,
                                     int64_t act) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[T, N]");
  check_act(act);
  check_pair(scale.has_value(), seg_scale.has_value(), "scale", "seg_scale");
  const int64_t s = num_segments(seg_indptr);
  EpilogueArgs a;
  a.y = y.contiguous();
  a.bias = row_pool(bias, y, "bias");
  a.seg_indptr = index(seg_indptr, at::kInt, y, "seg_indptr", s + 1);
  a.seg_bias = index(seg_bias, at::kInt, y, "seg_bias", s);
  if (scale) {
    a.scale = row_pool(*scale, y, "scale");
    a.seg_scale = index(*seg_scale, at::kInt, y, "seg_scale", s);
  }
  return a;
}

inline EpilogueArgs prepare_layernorm(const at::Tensor& y, const OptTensor& residual,
                                      const OptTensor& bias, const at::Tensor& gamma,
                                      const at::Tensor& beta, const at::Tensor& seg_indptr,
                                      const OptTensor& seg_bias, const at::Tensor& seg_ln) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[T, N]");
  check_pair(bias.has_value(), seg_bias.has_value(), "bias", "seg_bias");
  const int64_t s = num_segments(seg_indptr);
  EpilogueArgs a;
  a.y = y.contiguous();
  if (residual) {
    PETOPS_CHECK(residual->sizes() == y.sizes(), "residual must have the shape of y ", y.sizes(),
                 ", got ", residual->sizes());
    a.residual = like(*residual, y, "residual", "y");
  }
  if (bias) {
    a.bias = row_pool(*bias, y, "bias");
    a.seg_bias = index(*seg_bias, at::kInt, y, "seg_bias", s);
  }
  a.gamma = row_pool(gamma, y, "gamma");
  a.beta = row_pool(beta, y, "beta");
  PETOPS_CHECK(gamma.size(0) == beta.size(0), "gamma and beta pools must have the same rows, got ",
               gamma.size(0), " and ", beta.size(0));
  a.seg_indptr = index(seg_indptr, at::kInt, y, "seg_indptr", s + 1);
  a.seg_ln = index(seg_ln, at::kInt, y, "seg_ln", s);
  return a;
}

struct GroupedArgs {
  at::Tensor y, x, w, bias;  // y: expand/spmm output; x: input rows
  at::Tensor seg_indptr, item_seg, item_w_off, item_rank, item_b_off;
  at::Tensor item_in_off, item_out_off, item_out_dim, item_scale;  // expand only
  at::Tensor slice_ptr, indices, values, dense_w;  // seg_spmm; seg_masked_mm: dense_w
  at::Tensor mask;                                 // seg_masked_mm: int32 word pool
  int64_t num_items = 0;
};

inline at::Tensor flat_pool(const at::Tensor& t, const at::Tensor& ref, const char* name,
                            const char* ref_name) {
  check_dim(t, 1, name, "[pool_elems] (a flat 1-D pool)");
  return like(t, ref, name, ref_name);
}

// Items shared by the three grouped ops: segment + weight offset per item.
inline GroupedArgs prepare_items(const at::Tensor& ref, const at::Tensor& seg_indptr,
                                 const at::Tensor& item_seg, const at::Tensor& item_w_off,
                                 const char* off_name = "item_w_off") {
  const int64_t s = num_segments(seg_indptr);
  GroupedArgs a;
  a.seg_indptr = index(seg_indptr, at::kInt, ref, "seg_indptr", s + 1);
  a.item_seg = index(item_seg, at::kInt, ref, "item_seg", -1);
  a.num_items = a.item_seg.numel();
  a.item_w_off = index(item_w_off, at::kLong, ref, off_name, a.num_items);
  return a;
}

inline void prepare_item_bias(GroupedArgs& a, const at::Tensor& ref, const OptTensor& bias,
                              const OptTensor& item_b_off) {
  check_pair(bias.has_value(), item_b_off.has_value(), "bias", "item_b_off");
  if (bias) {
    a.bias = flat_pool(*bias, ref, "bias", "the activations");
    a.item_b_off = index(*item_b_off, at::kLong, ref, "item_b_off", a.num_items);
  }
}

inline GroupedArgs prepare_shrink(const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                                  const at::Tensor& item_w_off, const at::Tensor& item_rank,
                                  const OptTensor& bias, const OptTensor& item_b_off, int64_t act,
                                  int64_t max_rank) {
  check_float(x, "x");
  check_dim(x, 2, "x", "[T, K]");
  check_act(act);
  PETOPS_CHECK(max_rank >= 0, "max_rank must be >= 0, got ", max_rank);
  GroupedArgs a = prepare_items(x, seg_indptr, item_seg, item_w_off);
  a.x = x.contiguous();
  a.w = flat_pool(w, x, "w", "x");
  a.item_rank = index(item_rank, at::kInt, x, "item_rank", a.num_items);
  prepare_item_bias(a, x, bias, item_b_off);
  return a;
}

// y [T, N] updated in place, and the op's input rows x [T, K] (named `x_name`).
inline void check_accumulate(const at::Tensor& y, const at::Tensor& x, const char* x_name,
                             const char* x_shape) {
  check_float(y, "y");
  check_dim(y, 2, "y", "[T, N]");
  PETOPS_CHECK(y.is_contiguous(),
               "y is updated in place and must be contiguous; pass "
               "y.contiguous() and use the result");
  check_dim(x, 2, x_name, x_shape);
  PETOPS_CHECK(x.size(0) == y.size(0), x_name, " must have T = y.size(0) = ", y.size(0),
               " rows, got shape ", x.sizes());
}

inline GroupedArgs prepare_expand(const at::Tensor& y, const at::Tensor& tmp, const at::Tensor& w,
                                  const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                                  const at::Tensor& item_w_off, const at::Tensor& item_rank,
                                  const at::Tensor& item_in_off, const at::Tensor& item_out_off,
                                  const at::Tensor& item_out_dim, const at::Tensor& item_scale,
                                  const OptTensor& bias, const OptTensor& item_b_off) {
  check_accumulate(y, tmp, "tmp", "[T, R]");
  GroupedArgs a = prepare_items(y, seg_indptr, item_seg, item_w_off);
  a.y = y;
  a.x = like(tmp, y, "tmp", "y");
  a.w = flat_pool(w, y, "w", "y");
  a.item_rank = index(item_rank, at::kInt, y, "item_rank", a.num_items);
  a.item_in_off = index(item_in_off, at::kInt, y, "item_in_off", a.num_items);
  a.item_out_off = index(item_out_off, at::kInt, y, "item_out_off", a.num_items);
  a.item_out_dim = index(item_out_dim, at::kInt, y, "item_out_dim", a.num_items);
  check_dim(item_scale, 1, "item_scale", "[I]");
  PETOPS_CHECK(item_scale.size(0) == a.num_items && item_scale.is_floating_point() &&
                   item_scale.device() == y.device(),
               "item_scale must be a float tensor [I] = [", a.num_items, "] on ", y.device(),
               ", got ", item_scale.scalar_type(), " ", item_scale.sizes(), " on ",
               item_scale.device());
  // No dispatcher round trip when the engine already passes float32 (as index() does).
  a.item_scale = (item_scale.scalar_type() == at::kFloat ? item_scale : item_scale.to(at::kFloat))
                     .contiguous();
  prepare_item_bias(a, y, bias, item_b_off);
  return a;
}

// Output rows per slice of a seg_spmm sliced-ELL matrix (petops.reference.SPMM_SLICE): one
// warp's rows on CUDA, so its lanes read an entry column of the slice as one contiguous run.
constexpr int64_t kSliceRows = 32;

// Widest input of a sliced-ELL matrix: its column indices are int16 and K marks padding
// (petops.reference.SPMM_MAX_K).
constexpr int64_t kMaxSliceK = (1 << 15) - 1;

inline int64_t spmm_slices(int64_t n_out) { return (n_out + kSliceRows - 1) / kSliceRows; }

inline GroupedArgs prepare_spmm(const at::Tensor& y, const at::Tensor& x,
                                const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                                const at::Tensor& item_slice_off, const at::Tensor& slice_ptr,
                                const at::Tensor& indices, const at::Tensor& values) {
  check_accumulate(y, x, "x", "[T, K]");
  GroupedArgs a = prepare_items(y, seg_indptr, item_seg, item_slice_off, "item_slice_off");
  a.y = y;
  a.x = like(x, y, "x", "y");
  a.slice_ptr = index(slice_ptr, at::kLong, y, "slice_ptr", -1);
  a.indices = int16_pool(indices, y, "indices", "petops.reference.pack_sliced_ell");
  PETOPS_CHECK(x.size(1) <= kMaxSliceK, "seg_spmm: input width K=", x.size(1), " exceeds ",
               static_cast<int64_t>(kMaxSliceK),
               ", the widest int16 column indices (K marks padding) ",
               "address; split the input columns over several calls");
  a.values = flat_pool(values, y, "values", "y");
  return a;
}

// 32-bit mask words per weight row of a [N, K] bit mask.
inline int64_t mask_words(int64_t k_dim) { return (k_dim + 31) / 32; }

inline GroupedArgs prepare_masked(const at::Tensor& y, const at::Tensor& x,
                                  const at::Tensor& seg_indptr, const at::Tensor& item_seg,
                                  const at::Tensor& item_mask_off, const at::Tensor& mask,
                                  const at::Tensor& dense_w) {
  check_accumulate(y, x, "x", "[T, K]");
  GroupedArgs a = prepare_items(y, seg_indptr, item_seg, item_mask_off, "item_mask_off");
  a.y = y;
  a.x = like(x, y, "x", "y");
  check_dim(mask, 1, "mask", "[pool_words] (a flat 1-D pool)");
  PETOPS_CHECK(mask.scalar_type() == at::kInt, "mask must be an int32 pool of 32-bit words, got ",
               mask.scalar_type(), "; view packed bits with .view(torch.int32)");
  PETOPS_CHECK(mask.device() == y.device(), "mask must be on ", y.device(),
               " with the activations, got ", mask.device());
  a.mask = mask.contiguous();
  check_dim(dense_w, 2, "dense_w", "[N, K]");
  PETOPS_CHECK(dense_w.size(0) == y.size(1) && dense_w.size(1) == x.size(1),
               "dense_w must be [N, K] = [", y.size(1), ", ", x.size(1), "], got ",
               dense_w.sizes());
  a.dense_w = like(dense_w, y, "dense_w", "y");
  return a;
}

// adapter_residual_layernorm: the LayerNorm epilogue (bias required) plus per-segment adapters.
struct AdapterLnArgs {
  EpilogueArgs ln;  // y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln
  at::Tensor w, seg_w_off, seg_rank, seg_act;
  int64_t max_rank = 0;
};

// Adapter weights per segment: seg_w_off[s] = offsets of down.w, down.b, up.w, up.b.
constexpr int64_t kAdapterParts = 4;

inline AdapterLnArgs prepare_adapter_ln(const at::Tensor& y, const OptTensor& residual,
                                        const at::Tensor& bias, const at::Tensor& seg_bias,
                                        const at::Tensor& w, const at::Tensor& seg_w_off,
                                        const at::Tensor& seg_rank, const at::Tensor& seg_act,
                                        const at::Tensor& gamma, const at::Tensor& beta,
                                        const at::Tensor& seg_indptr, const at::Tensor& seg_ln,
                                        int64_t max_rank) {
  AdapterLnArgs a;
  a.ln = prepare_layernorm(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln);
  const int64_t s = a.ln.seg_indptr.numel() - 1;
  PETOPS_CHECK(max_rank >= 0, "max_rank must be >= 0, got ", max_rank);
  a.max_rank = max_rank;
  a.w = flat_pool(w, y, "w", "y");
  check_dim(seg_w_off, 2, "seg_w_off", "[S, 4]");
  PETOPS_CHECK(seg_w_off.size(0) == s && seg_w_off.size(1) == kAdapterParts,
               "seg_w_off must be [S, 4] = [", s, ", 4] (down.w, down.b, up.w, up.b offsets), got ",
               seg_w_off.sizes());
  PETOPS_CHECK((seg_w_off.scalar_type() == at::kLong || seg_w_off.scalar_type() == at::kInt) &&
                   seg_w_off.device() == y.device(),
               "seg_w_off must be an int64 (or int32) tensor on ", y.device(), ", got ",
               seg_w_off.scalar_type(), " on ", seg_w_off.device());
  a.seg_w_off =
      (seg_w_off.scalar_type() == at::kLong ? seg_w_off : seg_w_off.to(at::kLong)).contiguous();
  a.seg_rank = index(seg_rank, at::kInt, y, "seg_rank", s);
  a.seg_act = index(seg_act, at::kInt, y, "seg_act", s);
  return a;
}

}  // namespace
}  // namespace petops
