// Fused AdamW step + EMA functor for multi_tensor_apply (cckernels.FusedAdamWEMA).
//
// Lists (Depth 6): 0 param (P), 1 grad (P), 2 exp_avg, 3 exp_avg_sq, 4 master, 5 ema (fp32).
// Per element, in fp32, each buffer read once and written once (w: the fp32 master weight
// when kMaster, else the fp32 param itself):
//   w   <- w * decay_factor                                 decoupled weight decay
//   m   <- lerp(m, g, beta1_w);  v <- v * beta2 + beta2_w * g * g
//   w   <- w - step_size * m / (sqrt(v) / bc2_sqrt + eps)
//   ema <- lerp(ema, w, ema_w)                               when kEma
//   param <- w rounded to P                                  when kMaster
// The same operations in the same order as torch.optim.AdamW, with IEEE sqrt and division.
#pragma once

#include "multi_tensor_apply.cuh"

namespace cck {

constexpr int kAdamWEmaDepth = 6;

// Plain floats, so the struct means the same to nvcc, NVRTC and a CuPy numpy dtype.
struct AdamWEmaScalars {
  float decay_factor;  // 1 - lr * weight_decay
  float beta1_w;       // 1 - beta1
  float beta2;
  float beta2_w;       // 1 - beta2
  float step_size;     // lr / (1 - beta1^step)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;
  float ema_w;         // 1 - ema_decay
};

}  // namespace cck

#ifdef __CUDACC__
#include "ema.cuh"  // torch_lerp
#include "vector.cuh"

namespace cck {

template <typename P, bool kMaster, bool kEma>
struct AdamWEmaFunctor {
  // Eight elements per step: 16-byte accesses (two per fp32 buffer, one for bf16/fp16 ones).
  static constexpr int kVec = 8;
  static_assert(kChunkSize % kVec == 0, "chunks must start on a pack boundary");
  static_assert(kMaster || sizeof(P) == 4, "non-fp32 params need fp32 master weights");
  AdamWEmaScalars s;

  // One element: w, m, v, e are updated in place; returns the new weight.
  __device__ __forceinline__ void update(float g, float& w, float& m, float& v, float& e) const {
    w *= s.decay_factor;
    m = torch_lerp(m, g, s.beta1_w);
    v = v * s.beta2 + s.beta2_w * g * g;
    const float denom = __fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt) + s.eps;
    w = w + (-s.step_size) * __fdiv_rn(m, denom);
    if (kEma) e = torch_lerp(e, w, s.ema_w);
  }

  __device__ void operator()(void* const* addresses, int64_t start, int64_t n) const {
    P* __restrict__ param = static_cast<P*>(addresses[0]) + start;
    const P* __restrict__ grad = static_cast<const P*>(addresses[1]) + start;
    float* __restrict__ exp_avg = static_cast<float*>(addresses[2]) + start;
    float* __restrict__ exp_avg_sq = static_cast<float*>(addresses[3]) + start;
    float* __restrict__ weight = static_cast<float*>(addresses[kMaster ? 4 : 0]) + start;
    float* __restrict__ ema = kEma ? static_cast<float*>(addresses[5]) + start : nullptr;
    unsigned long long bits = 0;
    for (int d = 0; d < kAdamWEmaDepth; ++d) bits |= reinterpret_cast<unsigned long long>(addresses[d]);
    int64_t done = 0;
    // start is a multiple of the chunk size, so the chunk is aligned when the tensors are.
    if (bits % 16 == 0) {
      using F8 = Pack<float, kVec>;
      using P8 = Pack<P, kVec>;
      const int64_t packs = n / kVec;
      for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        const int64_t at = i * kVec;
        const P8 g = load_pack<P, kVec>(grad + at);
        F8 w = load_pack<float, kVec>(weight + at);
        F8 m = load_pack<float, kVec>(exp_avg + at);
        F8 v = load_pack<float, kVec>(exp_avg_sq + at);
        F8 e;
        if (kEma) e = load_pack<float, kVec>(ema + at);
#pragma unroll
        for (int j = 0; j < kVec; ++j) update(to_float(g.v[j]), w.v[j], m.v[j], v.v[j], e.v[j]);
        store_pack(weight + at, w);
        store_pack(exp_avg + at, m);
        store_pack(exp_avg_sq + at, v);
        if (kEma) store_pack(ema + at, e);
        if (kMaster) {
          P8 p;
#pragma unroll
          for (int j = 0; j < kVec; ++j) p.v[j] = from_float<P>(w.v[j]);
          store_pack(param + at, p);
        }
      }
      done = packs * kVec;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
      float w = weight[i], m = exp_avg[i], v = exp_avg_sq[i], e = kEma ? ema[i] : 0.0f;
      update(to_float(grad[i]), w, m, v, e);
      weight[i] = w;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (kEma) ema[i] = e;
      if (kMaster) param[i] = from_float<P>(w);
    }
  }
};

}  // namespace cck
#endif  // __CUDACC__
