// Torch-free host entry of the fused AdamW + EMA step (csrc/adamw_ema.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "adamw_ema.cuh"
#include "dtype.h"

namespace cck {

// One AdamW step (+ EMA) over n_tensors tensors, in place, on stream. params, grads:
// device pointers of params_dtype; exp_avgs, exp_avg_sqs: fp32; masters: fp32 master
// weights, or nullptr when the params are fp32 and updated directly; emas: fp32 EMA
// tensors, or nullptr for no EMA update. sizes[i]: elements of tensor i (every list laid
// out alike). Returns the first CUDA error.
cudaError_t adamw_ema_step(int n_tensors, void* const* params, const void* const* grads,
                           float* const* exp_avgs, float* const* exp_avg_sqs,
                           float* const* masters, float* const* emas, const int64_t* sizes,
                           DType params_dtype, const AdamWEmaScalars& scalars,
                           cudaStream_t stream);

}  // namespace cck
