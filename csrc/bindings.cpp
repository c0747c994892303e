// The only file that knows torch: checks tensors at the boundary (with messages naming the
// bad value), then calls the torch-free launchers on torch's current CUDA stream.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdio>
#include <array>
#include <string>
#include <vector>

#include "adamw_ema.h"
#include "ema.h"
#include "group_norm.h"

// Set by the build (setup.py / CMakeLists.txt) from the architectures it compiled for, as
// bare tokens (-DCCKERNELS_ARCHS=sm_80,sm_90) because quotes do not survive every build tool.
#ifndef CCKERNELS_ARCHS
#error "CCKERNELS_ARCHS must be defined by the build, e.g. -DCCKERNELS_ARCHS=sm_90"
#endif
#define CCK_STRINGIFY_(...) #__VA_ARGS__
#define CCK_STRINGIFY(...) CCK_STRINGIFY_(__VA_ARGS__)

namespace {

cck::DType to_dtype(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cck::DType::kFloat32;
    case at::kHalf:
      return cck::DType::kFloat16;
    case at::kBFloat16:
      return cck::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, name, " has dtype ", t.scalar_type(),
                        "; expected float32, float16 or bfloat16");
  }
}

// Numbers in messages are formatted here, never streamed: on the GPU image (torch 2.11, this
// extension built by /opt/gcc's g++) streaming a number into a TORCH_CHECK message kills the
// process (the first runs crashed on streamed sizes, then on a streamed size_t and a double),
// while streamed strings, dtypes and devices raise as they should.
template <typename Int>
std::string num(Int v) {
  return std::to_string(v);
}
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// "[2, 4]": sizes or strides for a message.
std::string dims_str(c10::IntArrayRef dims) {
  std::string out = "[";
  for (size_t d = 0; d < dims.size(); ++d) {
    if (d) out += ", ";
    out += num(dims[d]);
  }
  return out + "]";
}

// Both tensors hold their elements in the same order with no gaps: both contiguous, or both
// channels_last (conv weights of a channels_last model).
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  const auto format = a.dim() == 4   ? at::MemoryFormat::ChannelsLast
                      : a.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::Contiguous;
  return a.is_contiguous(format) && b.is_contiguous(format);
}

// Checks a per-parameter buffer against params[i]: same device, shape and dense layout, and `dtype`.
void check_like_param(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype,
                      const std::string& name, const std::string& param_name) {
  TORCH_CHECK_VALUE(t.device() == param.device(), name, " is on ", t.device(), " but ", param_name,
                    " is on ", param.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), "; expected ", dtype);
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), name, " shape ", dims_str(t.sizes()), " != ", param_name,
                    " shape ", dims_str(param.sizes()));
  TORCH_CHECK_VALUE(same_dense_layout(t, param), name, " (strides ", dims_str(t.strides()), ") and ", param_name,
                    " (strides ", dims_str(param.strides()), ") must both be contiguous or both channels_last");
}

// The tensors of one params dtype, as the torch-free launcher takes them.
struct EmaList {
  std::vector<float*> ema;
  std::vector<const void*> params;
  std::vector<int64_t> sizes;
};

// Params may mix dtypes (fp32 norms beside bf16 weights): each dtype gets its own
// multi-tensor pass, so a whole list still takes a few launches per dtype.
void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                 double decay) {
  TORCH_CHECK_VALUE(ema.size() == params.size(), "ema has ", num(ema.size()),
                    " tensors but params has ", num(params.size()));
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "decay must be in [0, 1], got ", num(decay));
  if (ema.empty()) return;
  TORCH_CHECK_VALUE(ema[0].is_cuda(), "ema[0] is on ", ema[0].device(), "; expected a CUDA tensor");
  const c10::Device device = ema[0].device();
  std::array<EmaList, 3> by_dtype;  // indexed by cck::DType
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& p = params[i];
    const std::string ei = "ema[" + std::to_string(i) + "]";
    const std::string pi = "params[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(p.device() == device, pi, " is on ", p.device(), " but ema[0] is on ", device);
    check_like_param(e, p, at::kFloat, ei, pi);  // the shadow: fp32, p's shape and layout
    const cck::DType dtype = to_dtype(p, pi);
    EmaList& list = by_dtype[static_cast<int>(dtype)];
    list.ema.push_back(e.data_ptr<float>());
    list.params.push_back(p.data_ptr());
    list.sizes.push_back(e.numel());
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (int d = 0; d < static_cast<int>(by_dtype.size()); ++d) {
    const EmaList& list = by_dtype[d];
    if (list.ema.empty()) continue;
    const cudaError_t err = cck::ema_update(static_cast<int>(list.ema.size()), list.ema.data(), list.params.data(),
                                            list.sizes.data(), static_cast<cck::DType>(d), decay, stream);
    TORCH_CHECK(err == cudaSuccess, "ema_update_ kernel launch failed: ", cudaGetErrorString(err));
  }
}

// Channels-last layout: (N, C, *spatial) with channels contiguous, i.e. (N, *spatial, C) dense.
bool channels_last_dense(const at::Tensor& t) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return t.permute(order).is_contiguous();
}

void check_group_norm_param(const c10::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value()) return;
  TORCH_CHECK_VALUE(p->device() == x.device(), name, " is on ", p->device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(p->scalar_type() == at::kFloat, name, " has dtype ", p->scalar_type(), "; the kernel reads float32");
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1) && p->is_contiguous(), name, " must be a contiguous (",
                    num(x.size(1)), ",) tensor, got shape ", dims_str(p->sizes()), " strides ", dims_str(p->strides()));
}

const float* optional_data(const c10::optional<at::Tensor>& p) {
  return p.has_value() ? p->data_ptr<float>() : nullptr;
}

// Checks x for the channels_last GroupNorm kernels; returns (N, S, C, K).
std::array<int, 4> group_norm_shape(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x is on ", x.device(), "; expected a CUDA tensor");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must be (N, C, *spatial), got shape ", dims_str(x.sizes()));
  TORCH_CHECK_VALUE(channels_last_dense(x), "x (shape ", dims_str(x.sizes()), ", strides ", dims_str(x.strides()),
                    ") must be channels_last: channels contiguous, no gaps");
  const int64_t N = x.size(0), C = x.size(1), S = N * C != 0 ? x.numel() / (N * C) : 0;
  TORCH_CHECK_VALUE(N >= 1 && N <= 65535, "batch ", num(N), " outside [1, 65535]");
  TORCH_CHECK_VALUE(C >= 1 && S >= 1 && C * S < (int64_t{1} << 31), "x has ", num(C), " channels of ", num(S),
                    " positions; need both >= 1 and fewer than 2^31 elements per sample");
  TORCH_CHECK_VALUE(num_groups >= 1 && C % num_groups == 0, "num_channels ", num(C),
                    " is not divisible by num_groups ", num(num_groups));
  const int sms = at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
  const int K = cck::group_norm_nhwc_chunks(static_cast<int>(N), static_cast<int>(S), static_cast<int>(C),
                                            to_dtype(x, "x"), sms);
  return {static_cast<int>(N), static_cast<int>(S), static_cast<int>(C), K};
}

// The single-pass forward (or backward) of x (shape from group_norm_shape); plan.channels == 0:
// split. A block may use half an SM's shared memory, less the per-block reserve, so that two
// blocks share an SM (sm80: 81 KB, sm90: 113 KB).
cck::gn::SinglePassPlan single_pass_plan(const at::Tensor& x, const std::array<int, 4>& shape, int64_t num_groups,
                                         bool backward) {
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.device().index());
  const int budget = std::min(static_cast<int>(props->sharedMemPerBlockOptin),
                              static_cast<int>(props->sharedMemPerMultiprocessor / 2 - props->reservedSharedMemPerBlock));
  const int max_cluster = props->major >= 9 ? cck::group_norm_nhwc_max_cluster(budget) : 1;
  return cck::group_norm_nhwc_single_pass_plan(shape[0], shape[1], shape[2], static_cast<int>(num_groups),
                                               to_dtype(x, "x"), props->multiProcessorCount, budget, max_cluster,
                                               backward);
}

// (channels per block, blocks per cluster) of the single-pass forward (backward), (0, 0) for split.
std::array<int, 2> group_norm_single_pass_plan(const at::Tensor& x, int64_t num_groups, bool backward) {
  const auto shape = group_norm_shape(x, num_groups);  // checks x first
  const c10::cuda::CUDAGuard guard(x.device());        // the cluster limit is asked of the current device
  const cck::gn::SinglePassPlan plan = single_pass_plan(x, shape, num_groups, backward);
  return {plan.channels, plan.cluster};
}

// Returns {y, mean, rstd}; mean and rstd are (N, G) fp32 for the backward.
// single_pass = false runs the split forward whatever the plan (benchmarks compare the two).
std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, int64_t num_groups,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                           bool single_pass) {
  const auto shape = group_norm_shape(x, num_groups);
  const auto [N, S, C, K] = shape;
  check_group_norm_param(weight, "weight", x);
  check_group_norm_param(bias, "bias", x);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0 (as torch allows 0), got ", num(eps));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);  // keeps x's channels_last strides
  at::Tensor mean = at::empty({N, num_groups}, f32), rstd = at::empty({N, num_groups}, f32);
  const int G = static_cast<int>(num_groups);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaError_t err;
  const cck::gn::SinglePassPlan plan =
      single_pass ? single_pass_plan(x, shape, num_groups, false) : cck::gn::SinglePassPlan{0, 0};
  if (plan.channels) {
    err = cck::group_norm_nhwc_forward_single_pass(x.data_ptr(), optional_data(weight), optional_data(bias),
                                                   y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), N, S,
                                                   C, G, plan, static_cast<float>(eps), silu, to_dtype(x, "x"),
                                                   stream);
  } else {
    at::Tensor part_a = at::empty({N, K, C}, f32), part_b = at::empty({N, K, C}, f32);
    err = cck::group_norm_nhwc_forward(x.data_ptr(), optional_data(weight), optional_data(bias), y.data_ptr(),
                                       mean.data_ptr<float>(), rstd.data_ptr<float>(), part_a.data_ptr<float>(),
                                       part_b.data_ptr<float>(), N, S, C, G, K, static_cast<float>(eps), silu,
                                       to_dtype(x, "x"), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "group_norm forward kernel launch failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

// Returns {dx, dweight, dbias} (fp32 parameter gradients); each is None unless asked for.
std::vector<c10::optional<at::Tensor>> group_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, bool silu,
    bool need_dx, bool need_weight, bool need_bias, const c10::optional<at::Tensor>& dx_addend, bool single_pass) {
  const int64_t G = mean.size(1);
  const auto [N, S, C, K] = group_norm_shape(x, G);
  check_group_norm_param(weight, "weight", x);
  check_group_norm_param(bias, "bias", x);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type() &&
                        dy.device() == x.device(),
                    "dy (", dims_str(dy.sizes()), ", strides ", dims_str(dy.strides()), ", ", dy.scalar_type(),
                    ") must match x (", dims_str(x.sizes()), ", strides ", dims_str(x.strides()), ", ",
                    x.scalar_type(), ")");
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == x.device() &&
                          t->dim() == 2 && t->size(0) == N && t->size(1) == G,
                      "mean and rstd must be contiguous float32 (", num(N), ", ", num(G), ") tensors on x's device");
  }
  if (dx_addend) {
    const at::Tensor& a = *dx_addend;
    TORCH_CHECK_VALUE(need_dx, "dx_addend given without need_dx");
    TORCH_CHECK_VALUE(a.sizes() == x.sizes() && a.strides() == x.strides() && a.scalar_type() == x.scalar_type() &&
                          a.device() == x.device(),
                      "dx_addend (", dims_str(a.sizes()), ", strides ", dims_str(a.strides()), ", ", a.scalar_type(),
                      ") must match x (", dims_str(x.sizes()), ", strides ", dims_str(x.strides()), ", ",
                      x.scalar_type(), ")");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  c10::optional<at::Tensor> dx, dweight, dbias;
  if (need_dx) dx = at::empty_like(x);
  if (need_weight) dweight = at::empty({C}, f32);
  if (need_bias) dbias = at::empty({C}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cck::DType dtype = to_dtype(x, "x");
  // one read of x and dy where dx is asked for and a plan fits; the parameter gradients alone
  // read them once anyway (backward_partials)
  const cck::gn::SinglePassPlan plan =
      single_pass && need_dx ? single_pass_plan(x, {N, S, C, K}, G, true) : cck::gn::SinglePassPlan{0, 0};
  const int rows = plan.channels ? plan.cluster : K;  // of the (N, rows, C) partials
  at::Tensor part_a = at::empty({N, rows, C}, f32), part_b = at::empty({N, rows, C}, f32);
  cudaError_t err;
  if (plan.channels) {
    err = cck::group_norm_nhwc_backward_single_pass(
        dy.data_ptr(), x.data_ptr(), optional_data(weight), optional_data(bias), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), dx->data_ptr(), dx_addend ? dx_addend->data_ptr() : nullptr,
        dweight ? dweight->data_ptr<float>() : nullptr, dbias ? dbias->data_ptr<float>() : nullptr,
        part_a.data_ptr<float>(), part_b.data_ptr<float>(), N, S, C, static_cast<int>(G), plan, silu, dtype, stream);
  } else {
    at::Tensor coef_a = at::empty({N, G}, f32), coef_b = at::empty({N, G}, f32);
    err = cck::group_norm_nhwc_backward(
        dy.data_ptr(), x.data_ptr(), optional_data(weight), optional_data(bias), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), dx ? dx->data_ptr() : nullptr, dx_addend ? dx_addend->data_ptr() : nullptr,
        dweight ? dweight->data_ptr<float>() : nullptr, dbias ? dbias->data_ptr<float>() : nullptr,
        part_a.data_ptr<float>(), part_b.data_ptr<float>(), coef_a.data_ptr<float>(), coef_b.data_ptr<float>(), N, S,
        C, static_cast<int>(G), K, silu, dtype, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "group_norm backward kernel launch failed: ", cudaGetErrorString(err));
  return {dx, dweight, dbias};
}

void adamw_ema_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& emas,
                const std::vector<double>& scalars) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
                    "params, grads, exp_avgs, exp_avg_sqs have ", num(n), ", ", num(grads.size()), ", ",
                    num(exp_avgs.size()), ", ", num(exp_avg_sqs.size()), " tensors; expected equal counts");
  TORCH_CHECK_VALUE(masters.empty() || masters.size() == n, "masters has ", num(masters.size()),
                    " tensors; expected 0 or ", num(n));
  TORCH_CHECK_VALUE(emas.empty() || emas.size() == n, "emas has ", num(emas.size()), " tensors; expected 0 or ", num(n));
  TORCH_CHECK_VALUE(scalars.size() == 8, "scalars has ", num(scalars.size()),
                    " values; expected 8 (decay_factor, beta1_w, beta2, beta2_w, step_size, bc2_sqrt, eps, ema_w)");
  if (n == 0) return;
  TORCH_CHECK_VALUE(params[0].is_cuda(), "params[0] is on ", params[0].device(), "; expected a CUDA tensor");
  const cck::DType dtype = to_dtype(params[0], "params[0]");
  TORCH_CHECK_VALUE(masters.empty() == (dtype == cck::DType::kFloat32),
                    "fp32 params are stepped in place (no masters); fp16/bf16 params need fp32 masters, got ",
                    num(masters.size()), " masters for ", params[0].scalar_type(), " params");
  std::vector<void*> param_ptrs(n);
  std::vector<const void*> grad_ptrs(n);
  std::vector<float*> m_ptrs(n), v_ptrs(n), master_ptrs(masters.size()), ema_ptrs(emas.size());
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string at_i = "[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(), pi,
                      " (", p.scalar_type(), " on ", p.device(), ") differs from params[0] (",
                      params[0].scalar_type(), " on ", params[0].device(), ") in dtype or device");
    check_like_param(grads[i], p, p.scalar_type(), "grads" + at_i, pi);
    check_like_param(exp_avgs[i], p, at::kFloat, "exp_avgs" + at_i, pi);
    check_like_param(exp_avg_sqs[i], p, at::kFloat, "exp_avg_sqs" + at_i, pi);
    if (!masters.empty()) check_like_param(masters[i], p, at::kFloat, "masters" + at_i, pi);
    if (!emas.empty()) check_like_param(emas[i], p, at::kFloat, "emas" + at_i, pi);
    param_ptrs[i] = p.data_ptr();
    grad_ptrs[i] = grads[i].data_ptr();
    m_ptrs[i] = exp_avgs[i].data_ptr<float>();
    v_ptrs[i] = exp_avg_sqs[i].data_ptr<float>();
    if (!masters.empty()) master_ptrs[i] = masters[i].data_ptr<float>();
    if (!emas.empty()) ema_ptrs[i] = emas[i].data_ptr<float>();
    sizes[i] = p.numel();
  }
  const cck::AdamWEmaScalars s{
      static_cast<float>(scalars[0]), static_cast<float>(scalars[1]), static_cast<float>(scalars[2]),
      static_cast<float>(scalars[3]), static_cast<float>(scalars[4]), static_cast<float>(scalars[5]),
      static_cast<float>(scalars[6]), static_cast<float>(scalars[7])};
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = cck::adamw_ema_step(
      static_cast<int>(n), param_ptrs.data(), grad_ptrs.data(), m_ptrs.data(), v_ptrs.data(),
      masters.empty() ? nullptr : master_ptrs.data(), emas.empty() ? nullptr : ema_ptrs.data(), sizes.data(),
      dtype, s, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "adamw_ema_ kernel launch failed: ", cudaGetErrorString(err));
}

std::vector<std::string> archs() {
  std::vector<std::string> out;
  const std::string all = CCK_STRINGIFY(CCKERNELS_ARCHS);
  for (size_t start = 0, end; start < all.size(); start = end + 1) {
    end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) out.push_back(all.substr(start, end - start));
  }
  return out;
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cckernels' compiled CUDA kernels (csrc/)";
  m.def("ema_update_", &ema_update_, pybind11::arg("ema"), pybind11::arg("params"),
        pybind11::arg("decay"),
        "ema[i] <- decay * ema[i] + (1 - decay) * params[i] in place, on the current CUDA stream; ema: fp32, "
        "params: fp32/fp16/bf16, mixed dtypes allowed (a multi-tensor pass per dtype)");
  m.def("group_norm_forward", &group_norm_forward, pybind11::arg("x"), pybind11::arg("num_groups"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("silu"),
        pybind11::arg("single_pass") = true,
        "channels_last GroupNorm (+ SiLU) -> [y, mean, rstd]; weight, bias: fp32 (C,) or None; "
        "single_pass=False: the split forward even where a single pass fits");
  m.def("group_norm_single_pass_plan", &group_norm_single_pass_plan, pybind11::arg("x"), pybind11::arg("num_groups"),
        pybind11::arg("backward") = false,
        "[channels a block holds, blocks per cluster] of group_norm_forward's (backward's) single pass for x, or "
        "[0, 0] where it runs the split forward (backward)");
  m.def("group_norm_backward", &group_norm_backward, pybind11::arg("dy"), pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("mean"), pybind11::arg("rstd"),
        pybind11::arg("silu"), pybind11::arg("need_dx"), pybind11::arg("need_weight"), pybind11::arg("need_bias"),
        pybind11::arg("dx_addend") = pybind11::none(), pybind11::arg("single_pass") = true,
        "-> [dx (+ dx_addend, which has x's strides and dtype), dweight, dbias] (fp32 parameter gradients), None "
        "where not asked for; single_pass=False: the split backward even where a single pass fits");
  m.def("adamw_ema_", &adamw_ema_, pybind11::arg("params"), pybind11::arg("grads"),
        pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"), pybind11::arg("masters"),
        pybind11::arg("emas"), pybind11::arg("scalars"),
        "one fused AdamW step (+ EMA when emas is not empty) in place, on the current CUDA stream; "
        "masters: fp32 weights of fp16/bf16 params ([] for fp32 params)");
  m.def("archs", &archs, "GPU architectures compiled in, e.g. ['sm_90']");
  m.def("cuda_version", &cuda_version, "CUDA runtime version the extension was built with");
}
