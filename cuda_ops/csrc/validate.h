// Argument validation and normalisation shared by the CPU and CUDA kernels.
//
// Each prepare_<op> checks what a caller can get wrong (ranks, dtypes, devices, lengths) with
// a message naming the value, the expectation and the fix, then returns contiguous tensors
// with index tensors in their canonical dtype (int32 for counts/slots, int64 for offsets).
// Data-dependent checks (offsets inside the pools) run on CPU only, in check_*_host: the CUDA
// path must not synchronise with the host to read them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

#include "activations.h"
#include "check.h"

// Dispatch over the three supported activation dtypes (no double instantiations).
// clang-format off
#define PETOPS_DISPATCH_FLOATS(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// clang-format on

namespace petops {
// Internal linkage: cpu/*.cpp (g++) and cuda/*.cu (nvcc) objects must not share weak
// copies of these helpers.
namespace {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  PETOPS_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
               " must be float32, float16 or bfloat16, got ", st);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  PETOPS_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor ", shape, ", got shape ",
               t.sizes());
}

// `t` must share dtype and device with `ref` (pools are stored in the activation dtype).
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  PETOPS_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
               " (", ref.scalar_type(), "), got ", t.scalar_type(), "; cast it with .to(", ref_name,
               ".dtype)");
  PETOPS_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name,
               ", got ", t.device());
  return t.contiguous();
}

// A 1-D integer metadata tensor of length `len` (-1: any), converted to `st`.
inline at::Tensor index(const at::Tensor& t, at::ScalarType st, const at::Tensor& ref,
                        const char* name, int64_t len) {
  PETOPS_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
               " must be an int32 or int64 tensor, got ", t.scalar_type());
  check_dim(t, 1, name, "[n]");
  PETOPS_CHECK(len < 0 || t.size(0) == len, name, " must have ", len, " entries, got ", t.size(0));
  PETOPS_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(),
               " with the activations, got ", t.device(), "; build the batch metadata there");
  // Fast path without a dispatcher round trip: the engine already passes canonical dtypes.
  return (t.scalar_type() == st ? t : t.to(st)).contiguous();
}

// A 1-D pool of int16 entries, taken as is: a narrowing cast could wrap its values, and a
// widening one would copy the whole pool on every call.
inline at::Tensor int16_pool(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* how) {
  PETOPS_CHECK(t.scalar_type() == at::kShort, name, " must be an int16 tensor (", how, "), got ",
               t.scalar_type());
  check_dim(t, 1, name, "[pool_elems] (a flat 1-D pool)");
  PETOPS_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(),
               " with the activations, got ", t.device());
  return t.contiguous();
}

inline int64_t num_segments(const at::Tensor& seg_indptr) {
  PETOPS_CHECK(seg_indptr.dim() == 1 && seg_indptr.numel() >= 1,
               "seg_indptr must be a 1-D tensor [S + 1] with S >= 0, got shape ",
               seg_indptr.sizes());
  return seg_indptr.numel() - 1;
}

inline void check_act(int64_t act) {
  // Constants go into messages as prvalues (no reference binding to a header constexpr).
  PETOPS_CHECK(act >= 0 && act < kNumActs, "act must be an ACT_* code in [0, ",
               static_cast<int64_t>(kNumActs), "), got ", act,
               "; see petops.reference.ACTIVATIONS");
}

inline void check_pair(bool has_pool, bool has_index, const char* pool, const char* idx) {
  PETOPS_CHECK(has_pool == has_index, idx, " must be given exactly when ", pool, " is given (got ",
               pool, has_pool ? " set" : " None", ", ", idx, has_index ? " set" : " None", ")");
}

// ---- host-side data checks (CPU kernels only) ----

inline void check_indptr_host(const at::Tensor& seg_indptr, int64_t num_tokens) {
  const int32_t* p = seg_indptr.data_ptr<int32_t>();
  const int64_t s = seg_indptr.numel() - 1;
  PETOPS_CHECK(p[0] == 0, "seg_indptr[0] must be 0, got ", p[0]);
  for (int64_t i = 0; i < s; ++i) {
    PETOPS_CHECK(p[i] <= p[i + 1], "seg_indptr must be non-decreasing, got seg_indptr[", i,
                 "]=", p[i], " > seg_indptr[", i + 1, "]=", p[i + 1]);
  }
  PETOPS_CHECK(p[s] == num_tokens, "seg_indptr[-1] must equal the token count ", num_tokens,
               ", got ", p[s]);
}

template <typename I>
inline void check_range_host(const at::Tensor& t, int64_t lo, int64_t hi, const char* name,
                             const char* what) {
  const I* p = t.data_ptr<I>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    PETOPS_CHECK(p[i] >= lo && p[i] < hi, name, "[", i, "]=", p[i], " is out of range; expected ",
                 what, " in [", lo, ", ", hi, ")");
  }
}

// Per-item element ranges [off, off + len) must lie inside a pool of `pool_numel` elements.
inline void check_spans_host(const at::Tensor& off, const int64_t* len, int64_t pool_numel,
                             const char* name) {
  const int64_t* o = off.data_ptr<int64_t>();
  for (int64_t i = 0; i < off.numel(); ++i) {
    PETOPS_CHECK(o[i] >= 0 && o[i] + len[i] <= pool_numel, name, "[", i, "]=", o[i],
                 " with length ", len[i], " overruns its pool of ", pool_numel,
                 " elements; check the pool offsets");
  }
}

}  // namespace
}  // namespace petops
