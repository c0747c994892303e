// Torch-free host entries of the channels_last GroupNorm (+ SiLU) kernels (csrc/group_norm.cu).
// Tensors are device pointers to (N, S, C) arrays with channels contiguous (NHWC, NDHWC, ...
// flattened spatially); weight and bias are fp32 (C,) or null. All statistics are fp32.
#pragma once

#include <cuda_runtime_api.h>

#include "dtype.h"
#include "group_norm.cuh"  // gn::SinglePassPlan (its kernels only under nvcc)

namespace cck {

// How many spatial chunks K to split each sample into so that the grid covers the GPU; the
// caller allocates the (N, K, C) fp32 workspaces with it and passes the same K back.
int group_norm_nhwc_chunks(int N, int S, int C, DType dtype, int sm_count);

// y = silu?(group_norm(x)); writes mean and rstd (N, G) for the backward.
// part_a, part_b: (N, K, C) fp32 workspaces. Returns the first CUDA error.
cudaError_t group_norm_nhwc_forward(const void* x, const float* weight, const float* bias, void* y,
                                    float* mean, float* rstd, float* part_a, float* part_b,
                                    int N, int S, int C, int G, int K, float eps, bool silu,
                                    DType dtype, cudaStream_t stream);

// The single-pass forward (or backward) of this shape on a GPU with sm_count SMs, smem_bytes of
// shared memory a block may use (half an SM's, so that two blocks share it) and clusters of at
// most max_cluster blocks (group_norm_nhwc_max_cluster()): gn::single_pass_plan in
// group_norm.cuh, where gn::single_pass_pays. plan.channels == 0: the split forward (backward)
// runs.
gn::SinglePassPlan group_norm_nhwc_single_pass_plan(int N, int S, int C, int G, DType dtype, int sm_count,
                                                    int smem_bytes, int max_cluster, bool backward);

// The largest cluster of blocks with smem_bytes of shared memory each that the single-pass
// kernel can take on the current device (up to gn::kMaxCluster where its sm90 code runs and the
// GPU places such clusters, else 1).
int group_norm_nhwc_max_cluster(int smem_bytes);

// As group_norm_nhwc_forward in one pass over x, with a plan from the function above.
cudaError_t group_norm_nhwc_forward_single_pass(const void* x, const float* weight, const float* bias, void* y,
                                                float* mean, float* rstd, int N, int S, int C, int G,
                                                gn::SinglePassPlan plan, float eps, bool silu, DType dtype,
                                                cudaStream_t stream);

// dx (skipped when null; plus dx_addend, x's layout, where not null), dweight and dbias (each
// skipped when null; fp32) from dy, which has x's layout, and the forward's mean and rstd.
// part_a, part_b: (N, K, C) fp32 workspaces; coef_a, coef_b: (N, G) fp32 workspaces. Returns
// the first CUDA error.
cudaError_t group_norm_nhwc_backward(const void* dy, const void* x, const float* weight, const float* bias,
                                     const float* mean, const float* rstd, void* dx, const void* dx_addend,
                                     float* dweight, float* dbias, float* part_a, float* part_b, float* coef_a,
                                     float* coef_b, int N, int S, int C, int G, int K, bool silu,
                                     DType dtype, cudaStream_t stream);

// As group_norm_nhwc_backward with dx (not null), reading x and dy once, with a backward plan from
// group_norm_nhwc_single_pass_plan. part_a, part_b: (N, plan.cluster, C) fp32 workspaces.
cudaError_t group_norm_nhwc_backward_single_pass(const void* dy, const void* x, const float* weight,
                                                 const float* bias, const float* mean, const float* rstd, void* dx,
                                                 const void* dx_addend, float* dweight, float* dbias, float* part_a,
                                                 float* part_b, int N, int S, int C, int G, gn::SinglePassPlan plan,
                                                 bool silu, DType dtype, cudaStream_t stream);

}  // namespace cck
