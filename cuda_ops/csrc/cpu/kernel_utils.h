// Low-overhead building blocks of the CPU kernels: a raw-pointer GEMM, per-thread float
// scratch, a parallel_for that stays inline when the work is small, and dtype conversion.
//
// A served CPU batch is small (e.g. 256 token rows of hidden 32 in 14 segments): an ATen
// temporary (narrow, .to, .t().contiguous(), at::mm) costs microseconds of dispatch and
// allocation each, more than the arithmetic it wraps. The kernels therefore work on the
// contiguous buffers' pointers and keep every intermediate in thread-local scratch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// Fortran BLAS single-precision GEMM, exported by libtorch_cpu (MKL or OpenBLAS) on the
// wheels we build against. Weak: when a torch build lacks it the symbol is null and
// gemm_nt falls back to at::mm, so the library still loads.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace petops {
namespace {

// Below this many elements (or multiply-adds) of work a call runs on the calling thread:
// waking the intra-op pool costs more than the work.
constexpr int64_t kParallelWork = 1 << 16;

// at::parallel_for over [0, n) when `work` (elements touched) is large, else f(0, n) inline.
template <typename F>
inline void parallel_if(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  if (work < kParallelWork || n == 1) {
    f(int64_t{0}, n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n * kParallelWork / std::max<int64_t>(work, 1));
  at::parallel_for(0, n, grain, f);
}

// Row-major C[m, n] = alpha * A[m, k] @ B[n, k]^T + beta * C, all float32 with row strides
// lda, ldb, ldc. beta = 0 ignores C's prior contents.
inline void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_ != nullptr) {
    // Column-major view: C^T[n, m] = B[n, k] @ A^T, i.e. op(B^T storage) = T, A^T as stored.
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_("T", "N", &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor at_ = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opt);
  at::Tensor bt = at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opt);
  at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  if (beta == 0.f) {
    ct.copy_(at::mm(at_, bt.t()).mul_(alpha));
  } else {
    ct.addmm_(at_, bt.t(), beta, alpha);
  }
}

// Per-thread float scratch; slot s of the calling thread, at least `n` floats. Valid until
// the same thread asks for slot s again.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[4];
  std::vector<float>& v = bufs[slot];
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// `rows` x `cols` values at p (row stride ld) as float32: p itself for float, else
// converted into scratch slot `slot` (row stride cols). Returns the pointer and its stride.
template <typename scalar_t>
inline const float* as_float(const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, int slot,
                             int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld_out = ld;
    return p;
  } else {
    float* f = scratch(slot, rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) f[r * cols + c] = static_cast<float>(p[r * ld + c]);
    *ld_out = cols;
    return f;
  }
}

// A value rounded to scalar_t's precision, as an intermediate buffer of that dtype would.
template <typename scalar_t>
inline float round_to(float v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<scalar_t>(v));
  }
}

}  // namespace
}  // namespace petops
