// Host launcher of the fused AdamW + EMA step: picks the functor for dtype, master, EMA.
#include "adamw_ema.h"

namespace cck {

namespace {

template <typename P, bool kMaster, bool kEma>
cudaError_t launch(int n_tensors, void* const* params, const void* const* grads,
                   float* const* exp_avgs, float* const* exp_avg_sqs, float* const* masters,
                   float* const* emas, const int64_t* sizes, const AdamWEmaScalars& scalars,
                   cudaStream_t stream) {
  auto address_of = [&](int list, int tensor) -> void* {
    switch (list) {
      case 0: return params[tensor];
      case 1: return const_cast<void*>(grads[tensor]);
      case 2: return exp_avgs[tensor];
      case 3: return exp_avg_sqs[tensor];
      case 4: return kMaster ? masters[tensor] : nullptr;
      default: return kEma ? emas[tensor] : nullptr;
    }
  };
  return multi_tensor_apply<kAdamWEmaDepth>(sizes, n_tensors, address_of,
                                            AdamWEmaFunctor<P, kMaster, kEma>{scalars}, stream);
}

template <typename P, bool kMaster>
cudaError_t launch_ema(bool ema, int n_tensors, void* const* params, const void* const* grads,
                       float* const* exp_avgs, float* const* exp_avg_sqs, float* const* masters,
                       float* const* emas, const int64_t* sizes, const AdamWEmaScalars& scalars,
                       cudaStream_t stream) {
  return ema ? launch<P, kMaster, true>(n_tensors, params, grads, exp_avgs, exp_avg_sqs, masters,
                                        emas, sizes, scalars, stream)
             : launch<P, kMaster, false>(n_tensors, params, grads, exp_avgs, exp_avg_sqs, masters,
                                         emas, sizes, scalars, stream);
}

}  // namespace

cudaError_t adamw_ema_step(int n_tensors, void* const* params, const void* const* grads,
                           float* const* exp_avgs, float* const* exp_avg_sqs,
                           float* const* masters, float* const* emas, const int64_t* sizes,
                           DType params_dtype, const AdamWEmaScalars& scalars,
                           cudaStream_t stream) {
  const bool ema = emas != nullptr;
  switch (params_dtype) {
    case DType::kFloat32:  // stepped in place: no master copy
      if (masters != nullptr) return cudaErrorInvalidValue;
      return launch_ema<float, false>(ema, n_tensors, params, grads, exp_avgs, exp_avg_sqs,
                                      masters, emas, sizes, scalars, stream);
    case DType::kFloat16:  // fp16/bf16 params need fp32 masters
      if (masters == nullptr) return cudaErrorInvalidValue;
      return launch_ema<__half, true>(ema, n_tensors, params, grads, exp_avgs, exp_avg_sqs,
                                      masters, emas, sizes, scalars, stream);
    case DType::kBFloat16:
      if (masters == nullptr) return cudaErrorInvalidValue;
      return launch_ema<__nv_bfloat16, true>(ema, n_tensors, params, grads, exp_avgs,
                                             exp_avg_sqs, masters, emas, sizes, scalars, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cck
