// Shared parts of the adapter_residual_layernorm CUDA kernels (adapter_ln.cu): the block
// shape and the shapes both tensor-core kernels take, the kernel parameters, and the 16-bit
// device helpers of the bias pass, the up-projection add and the LayerNorm output.
#pragma once

#include "common.cuh"
#include "prepare.h"
#include "tc_common.cuh"

namespace petops {
namespace adapter_ln {

constexpr int kThreads = 256;  // 8 warps, 2 blocks per SM: more warps hide the latency of
                               // the row passes (H100, 64 segments: 4 warps 42 us, 8 warps 39)
constexpr int kWarps = kThreads / 32;
constexpr int kRank = 64;    // widest bottleneck of the tensor-core kernels
constexpr int kMaxN = 1024;  // widest hidden size of the tensor-core kernels

using tc::raw16;

// Arguments of the tensor-core kernels (one struct: both kernels take the same), 16-bit
// tensors as raw storage.
struct AdapterLnParams {
  const raw16 *y, *residual, *bias, *w, *gamma, *beta;
  const int *seg_indptr, *seg_bias, *seg_rank, *seg_act, *seg_ln;
  const int64_t* seg_w_off;
  raw16* out;
  size_t tiles;  // byte offset of the tile buffers (after the unit prefix)
  int n_seg, n;
  float eps;
  bool w_vec;  // the pool is 16-byte aligned (per-tile checks still apply)
};

// The kernel arguments of a validated call whose output is `out`; T is at::Half or BFloat16.
template <typename T>
AdapterLnParams make_params(const AdapterLnArgs& a, at::Tensor& out, int n_seg, int n, float eps) {
  const EpilogueArgs& e = a.ln;
  return AdapterLnParams{tc::raw_or_null<T>(e.y),
                         tc::raw_or_null<T>(e.residual),
                         tc::raw_or_null<T>(e.bias),
                         tc::raw_or_null<T>(a.w),
                         tc::raw_or_null<T>(e.gamma),
                         tc::raw_or_null<T>(e.beta),
                         e.seg_indptr.data_ptr<int>(),
                         e.seg_bias.data_ptr<int>(),
                         a.seg_rank.data_ptr<int>(),
                         a.seg_act.data_ptr<int>(),
                         e.seg_ln.data_ptr<int>(),
                         a.seg_w_off.data_ptr<int64_t>(),
                         reinterpret_cast<raw16*>(out.data_ptr<T>()),
                         tc::tile_smem(n_seg, 0),
                         n_seg,
                         n,
                         eps,
                         aligned16({&a.w})};
}

// dst[0, count) = src[0, count) by the block's kThreads threads: 16-byte cp.async when src
// is aligned and count % 8 == 0 (dst is), else plain copies.
__device__ __forceinline__ void load_vec(raw16* dst, const raw16* __restrict__ src, int count) {
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && count % 8 == 0) {
    for (int c = threadIdx.x * 8; c < count; c += kThreads * 8) {
      tc::cp_async16(dst + c, src + c, true);
    }
  } else {
    for (int c = threadIdx.x; c < count; c += kThreads) dst[c] = src[c];
  }
}

// v[0, 8) = the 8 packed 16-bit values of p as fp32.
template <typename MT>
__device__ __forceinline__ void unpack8(uint4 p, float (&v)[8]) {
  const uint32_t a[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    v[2 * q] = tc::lo_f<MT>(a[q]);
    v[2 * q + 1] = tc::hi_f<MT>(a[q]);
  }
}

// The LayerNorm output of 8 values: round((v - mean) * rstd * gamma + beta), packed.
template <typename MT>
__device__ __forceinline__ uint4 ln_pack8(const float (&v)[8], float mean, float rstd, uint4 g,
                                          uint4 b) {
  const uint32_t ga[4] = {g.x, g.y, g.z, g.w}, ba[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>((v[2 * q] - mean) * rstd * tc::lo_f<MT>(ga[q]) + tc::lo_f<MT>(ba[q]),
                         (v[2 * q + 1] - mean) * rstd * tc::hi_f<MT>(ga[q]) + tc::hi_f<MT>(ba[q]));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// *h = round(h + b) over 8 packed 16-bit values (the bias pass: h = round(y + bias)).
template <typename MT>
__device__ __forceinline__ void add_packed8(uint4* h, uint4 b) {
  const uint4 hv = *h;
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w}, ba[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>(tc::lo_f<MT>(ha[q]) + tc::lo_f<MT>(ba[q]),
                         tc::hi_f<MT>(ha[q]) + tc::hi_f<MT>(ba[q]));
  }
  *h = make_uint4(o[0], o[1], o[2], o[3]);
}

// *h = round(h + (c + b)) over 8 packed 16-bit values, c[0, 8) the fp32 up-projection of
// those columns (staged in shared memory) and b their up.bias: the adapter's one rounding.
template <typename MT>
__device__ __forceinline__ void add_up8(uint4* h, const float* c, uint4 b) {
  const uint4 hv = *h;
  const uint32_t ha[4] = {hv.x, hv.y, hv.z, hv.w}, ba[4] = {b.x, b.y, b.z, b.w};
  const float4 c0 = *reinterpret_cast<const float4*>(c);
  const float4 c1 = *reinterpret_cast<const float4*>(c + 4);
  const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = tc::pack2<MT>(tc::lo_f<MT>(ha[q]) + (cv[2 * q] + tc::lo_f<MT>(ba[q])),
                         tc::hi_f<MT>(ha[q]) + (cv[2 * q + 1] + tc::hi_f<MT>(ba[q])));
  }
  *h = make_uint4(o[0], o[1], o[2], o[3]);
}

}  // namespace adapter_ln
}  // namespace petops
