// Activation codes shared by the CPU and CUDA kernels; must match petops/reference.py ACT_*.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define PETOPS_HD __host__ __device__ __forceinline__
#else
#define PETOPS_HD inline
#endif

namespace petops {

constexpr int64_t kActNone = 0;
constexpr int64_t kActGelu = 1;  // exact erf GELU (BERT "gelu")
constexpr int64_t kActRelu = 2;
constexpr int64_t kActSilu = 3;
constexpr int64_t kActGeluTanh = 4;  // tanh approximation (HF "gelu_new")
constexpr int64_t kNumActs = 5;

// Evaluated in float, like the reference (which upcasts before F.gelu & co).
PETOPS_HD float apply_act(float x, int act) {
  switch (act) {
    case kActGelu:
      return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case kActRelu:
      return x < 0.f ? 0.f : x;  // keeps NaN, as F.relu does
    case kActSilu:
      return x / (1.f + expf(-x));
    case kActGeluTanh: {
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
    default:
      return x;
  }
}

}  // namespace petops
