// Torch-free host entry of the multi-tensor EMA update (csrc/ema.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace cck {

// ema[i] <- decay * ema[i] + (1 - decay) * params[i] for i < n_tensors, in place, on stream.
// ema[i]: fp32 device pointers; params[i]: device pointers of params_dtype; sizes[i]:
// elements of tensor i (both lists laid out alike). Returns the first CUDA error.
cudaError_t ema_update(int n_tensors, float* const* ema, const void* const* params,
                       const int64_t* sizes, DType params_dtype, double decay,
                       cudaStream_t stream);

}  // namespace cck
