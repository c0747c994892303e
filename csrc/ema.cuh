// EMA functor for multi_tensor_apply: ema <- decay * ema + (1 - decay) * param over one chunk,
// computed as torch.lerp(ema, param, 1 - decay) like the torch and Triton backends.
// The shadow is fp32; params are float, __half or __nv_bfloat16; the math is fp32.
#pragma once

#include "multi_tensor_apply.cuh"

#ifdef __CUDACC__
#include "vector.cuh"

namespace cck {

// torch.lerp's formula: exact at w = 0 and w = 1, and a constant b is its fixed point.
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

template <typename P>
struct EmaFunctor {
  // Eight elements per step: two 16-byte accesses of the fp32 shadow, one 16-byte access of
  // bf16/fp16 params (two for fp32).
  static constexpr int kVec = 8;
  static_assert(kChunkSize % kVec == 0, "chunks must start on a pack boundary");
  // 1 - decay, computed on the host in double. Not decay * e + (1 - decay) * p: float(decay)
  // and float(1 - decay) do not sum to 1, so that form scales the shadow by their sum every
  // step (at 0.9999 it settles at 0.99983 times the weights it averages).
  float weight;

  __device__ __forceinline__ float update(float e, float p) const { return torch_lerp(e, p, weight); }

  __device__ void operator()(void* const* addresses, int64_t start, int64_t n) const {
    float* __restrict__ ema = static_cast<float*>(addresses[0]) + start;
    const P* __restrict__ param = static_cast<const P*>(addresses[1]) + start;
    int64_t done = 0;
    // start is a multiple of the chunk size, so the chunk is aligned when the tensors are.
    const unsigned long long bits = reinterpret_cast<unsigned long long>(ema) |
                                    reinterpret_cast<unsigned long long>(param);
    if (bits % 16 == 0) {
      const int64_t packs = n / kVec;
      for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        Pack<float, kVec> e = load_pack<float, kVec>(ema + i * kVec);
        const Pack<P, kVec> p = load_pack<P, kVec>(param + i * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) e.v[j] = update(e.v[j], to_float(p.v[j]));
        store_pack(ema + i * kVec, e);
      }
      done = packs * kVec;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
      ema[i] = update(ema[i], to_float(param[i]));
    }
  }
};

}  // namespace cck
#endif  // __CUDACC__
