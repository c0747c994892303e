// Host launcher of the multi-tensor EMA update: picks the functor for the params' dtype.
#include "ema.h"

#include "ema.cuh"

namespace cck {

namespace {

template <typename P>
cudaError_t launch(int n_tensors, float* const* ema, const void* const* params,
                   const int64_t* sizes, double decay, cudaStream_t stream) {
  const EmaFunctor<P> functor{static_cast<float>(1.0 - decay)};
  auto address_of = [&](int list, int tensor) -> void* {
    return list == 0 ? static_cast<void*>(ema[tensor]) : const_cast<void*>(params[tensor]);
  };
  return multi_tensor_apply<2>(sizes, n_tensors, address_of, functor, stream);
}

}  // namespace

cudaError_t ema_update(int n_tensors, float* const* ema, const void* const* params,
                       const int64_t* sizes, DType params_dtype, double decay,
                       cudaStream_t stream) {
  switch (params_dtype) {
    case DType::kFloat32:
      return launch<float>(n_tensors, ema, params, sizes, decay, stream);
    case DType::kFloat16:
      return launch<__half>(n_tensors, ema, params, sizes, decay, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(n_tensors, ema, params, sizes, decay, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cck
