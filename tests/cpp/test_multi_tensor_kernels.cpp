// The multi-tensor launchers (csrc/ema.cu's ema_update, csrc/adamw_ema.cu's adamw_ema_step) run
// on the CPU through simt.h's emulation, host side included: the dtype dispatch, the launch
// tables multi_tensor_apply builds, the kernels' 16-byte pack and scalar paths. Every element
// of every output is checked against an fp64 reference: the EMA of fp32, fp16 and bf16 params;
// AdamW for fp32 params stepped in place and for fp16 and bf16 params with fp32 masters, with
// and without the EMA. The lists hold tensors of 1, 3, 77, 100 and 257 elements, one of two
// chunks and an empty one, some starting one element past 16-byte alignment. Around the
// outputs, the gaps between tensors must come back untouched, the inputs unchanged; params
// written only from the masters start as NaN.
#include "simt.h"  // first: it sets up the CUDA names the kernels use

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "numerics.h"
// The launchers' own source: under simt.h, multi_tensor_apply launches with simt::launch.
#include "adamw_ema.cu"
#include "ema.cu"

using cck::DType;

// The tensors of every list: single elements, pack tails (77 = 9 packs of 8 and 5), two chunks
// (the second a pack and a tail), an empty one. Tensors 7 and 9 start one element past 16-byte
// alignment in every list, tensor 8 in list 1 only (the params of the EMA, the grads of AdamW):
// a chunk takes the packs only when every list's address allows.
const std::vector<int64_t> kSizes = {1, 3, 77, 100, 257, cck::kChunkSize + 9, 0, 257, 100, cck::kChunkSize + 9};
const std::vector<unsigned> kShifted = {0, 0, 0, 0, 0, 0, 0, ~0u, 1u << 1, ~0u};  // bit l: shifted in list l
const size_t kTensors = kSizes.size();

// One tensor list: its tensors in one buffer, as a caching allocator places them, 8 or more
// elements apart so that a stray write lands in a gap.
template <typename T>
struct List {
  std::vector<T> buffer;
  std::vector<T*> tensors;  // first element of each; nullptr for an empty one, as torch's data_ptr()
  std::vector<T> before;    // the buffer before the launch

  explicit List(int list) {
    constexpr size_t kAlign = 16 / sizeof(T), kGap = 8;
    std::vector<size_t> offsets;
    size_t end = 0;
    for (size_t t = 0; t < kTensors; ++t) {
      offsets.push_back((end + kGap + kAlign - 1) / kAlign * kAlign + (kShifted[t] >> list & 1));
      end = offsets.back() + kSizes[t];
    }
    buffer.resize(end + kGap + kAlign);
    const size_t base = (16 - reinterpret_cast<uintptr_t>(buffer.data()) % 16) % 16 / sizeof(T);
    for (size_t t = 0; t < kTensors; ++t) tensors.push_back(kSizes[t] ? buffer.data() + base + offsets[t] : nullptr);
  }
  template <typename Draw>
  void fill(Draw draw) {  // gaps included
    for (T& v : buffer) v = from_double<T>(draw());
  }
  void poison() {
    for (size_t t = 0; t < kTensors; ++t) std::fill(tensors[t], tensors[t] + kSizes[t], from_double<T>(NAN));
  }
  double at(size_t t, int64_t i) const { return to_double(tensors[t][i]); }
};

// An output's expected values and tolerances, [tensor][element].
struct Expected {
  std::vector<std::vector<double>> want{kTensors}, tol{kTensors};
  void push(size_t t, double w, double e) {
    want[t].push_back(w);
    tol[t].push_back(e);
  }
};

// Every element within its tolerance (NaN fails); one line for an output with any that is not.
template <typename T>
static void compare(const std::string& what, const List<T>& got, const Expected& x) {
  int bad = 0;
  double worst = 0;
  size_t worst_t = 0;
  int64_t worst_i = 0;
  for (size_t t = 0; t < kTensors; ++t) {
    for (int64_t i = 0; i < kSizes[t]; ++i) {
      const double e = std::abs(got.at(t, i) - x.want[t][i]), r = e == e ? e / x.tol[t][i] : INFINITY;
      if (r <= 1) continue;
      ++bad;
      if (r > worst || bad == 1) {
        worst = r;
        worst_t = t;
        worst_i = i;
      }
    }
  }
  if (bad) {
    std::printf("%s: %d elements off, worst tensor %zu [%lld]: got %.9g, want %.9g, tol %.2g\n", what.c_str(), bad,
                worst_t, static_cast<long long>(worst_i), got.at(worst_t, worst_i), x.want[worst_t][worst_i],
                x.tol[worst_t][worst_i]);
    ++failures;
  }
}

// The buffer as before the launch: outside the tensors for an output, everywhere for an input.
template <typename T>
static void check_untouched(const std::string& what, const List<T>& l, bool input) {
  std::vector<bool> inside(l.buffer.size(), false);
  for (size_t t = 0; t < kTensors && !input; ++t) {
    for (int64_t i = 0; i < kSizes[t]; ++i) inside[l.tensors[t] + i - l.buffer.data()] = true;
  }
  int changed = 0;
  for (size_t k = 0; k < l.buffer.size(); ++k) changed += !inside[k] && std::memcmp(&l.buffer[k], &l.before[k], sizeof(T));
  if (changed) {
    std::printf("%s: %d elements changed %s\n", what.c_str(), changed, input ? "in an input" : "outside the tensors");
    ++failures;
  }
}

// ema <- lerp(ema, param, 1 - decay). One rounding of 1 - decay, then three in torch_lerp (a
// difference, a product, a sum), each of a value at most |e| + |p|: 4 fp32 roundings of that.
template <typename P>
static void test_ema(const std::string& name, DType dtype, double decay, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  List<float> ema(0);
  List<P> param(1);
  ema.fill([&] { return normal(rng); });
  param.fill([&] { return normal(rng); });
  const double u = unit_roundoff<float>();
  Expected want;
  for (size_t t = 0; t < kTensors; ++t) {
    for (int64_t i = 0; i < kSizes[t]; ++i) {
      const double e = ema.at(t, i), p = param.at(t, i);
      want.push(t, decay * e + (1 - decay) * p, 4 * u * (std::abs(e) + std::abs(p)));
    }
  }
  ema.before = ema.buffer;
  param.before = param.buffer;
  const std::vector<const void*> params(param.tensors.begin(), param.tensors.end());
  CHECK(cck::ema_update(kTensors, ema.tensors.data(), params.data(), kSizes.data(), dtype, decay, nullptr) == cudaSuccess);
  compare(name + ": ema", ema, want);
  check_untouched(name + ": ema", ema, false);
  check_untouched(name + ": params", param, true);
}

// One gap of P at r: to its neighbour away from zero, the wider of the two.
template <typename P>
static double ulp_at(P r) {
  static_assert(sizeof(P) == 2, "fp16 and bf16");
  unsigned short bits;
  std::memcpy(&bits, &r, 2);
  ++bits;
  P next;
  std::memcpy(static_cast<void*>(&next), &bits, 2);
  return std::abs(to_double(next) - to_double(r));
}

// One AdamW step, then the EMA when with_ema, as torch.optim.AdamW at step 3 with lr 1e-2,
// betas (0.9, 0.999), weight decay 0.1, and eps 1e-3 (large enough to matter where exp_avg_sq
// is small) for the weights w (the masters, or fp32 params), then param = w rounded to P.
template <typename P>
static void test_adamw(const std::string& name, DType dtype, bool with_ema, unsigned seed) {
  constexpr bool kMaster = !std::is_same_v<P, float>;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  List<P> param(0), grad(1);
  List<float> exp_avg(2), exp_avg_sq(3), master(4), ema(5);
  param.fill([&] { return normal(rng); });
  grad.fill([&] { return normal(rng); });
  exp_avg.fill([&] { return 0.1 * normal(rng); });
  exp_avg_sq.fill([&] {  // >= 0, often tiny
    const double a = normal(rng), b = normal(rng);
    return 0.01 * a * a * b * b;
  });
  master.fill([&] { return normal(rng); });
  ema.fill([&] { return normal(rng); });
  if (kMaster) param.poison();  // written only
  List<float>& weights = [&]() -> List<float>& {
    if constexpr (kMaster) return master;
    else return param;
  }();
  // The scalars as cckernels.optim computes them in double and bindings.cpp passes them.
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, weight_decay = 0.1, ema_decay = 0.9;
  const int step = 3;
  const cck::AdamWEmaScalars s{static_cast<float>(1 - lr * weight_decay), static_cast<float>(1 - beta1),
                               static_cast<float>(beta2), static_cast<float>(1 - beta2),
                               static_cast<float>(lr / (1 - std::pow(beta1, step))),
                               static_cast<float>(std::sqrt(1 - std::pow(beta2, step))), 1e-3f,
                               static_cast<float>(with_ema ? 1 - ema_decay : 0)};
  // Tolerances: the fp32 roundings along each output's operations, counted, each at most u of
  // a bound on the value it rounds (first order; a GPU's FMAs only drop roundings), rounded up:
  //   m' (a lerp): 3 of |m| + |g|;  v': 4 of positive terms, at most v';
  //   w': the update step_size m' / denom carries m''s 3, denom's 5 (v''s 4 halved by the
  //       sqrt, the sqrt, / bc2_sqrt, + eps), the division's and the product's: 10 of
  //       step_size (|m| + |g|) / denom; the weight decay and the final sum 1 each of |w| + that;
  //   ema': its lerp's 3 of |e| + |w'|, plus w''s own error.
  const double u = unit_roundoff<float>();
  Expected want_w, want_m, want_v, want_ema, want_param;
  for (size_t t = 0; t < kTensors; ++t) {
    for (int64_t i = 0; i < kSizes[t]; ++i) {
      const double g = grad.at(t, i), w = weights.at(t, i), m = exp_avg.at(t, i), v = exp_avg_sq.at(t, i);
      const double e = ema.at(t, i);
      const double m1 = m + s.beta1_w * (g - m), v1 = v * s.beta2 + s.beta2_w * g * g;
      const double denom = std::sqrt(v1) / s.bc2_sqrt + s.eps;
      const double w1 = w * s.decay_factor - s.step_size * m1 / denom;
      const double tol_w = 16 * u * (std::abs(w) + s.step_size * (std::abs(m) + std::abs(g)) / denom);
      want_w.push(t, w1, tol_w);
      want_m.push(t, m1, 4 * u * (std::abs(m) + std::abs(g)));
      want_v.push(t, v1, 6 * u * v1);
      want_ema.push(t, e + s.ema_w * (w1 - e), 4 * u * (std::abs(e) + std::abs(w1)) + tol_w);
      // param: the fp32 w' rounded once, within one gap of P of the rounded w1 (w' may sit
      // on the other side of a rounding boundary)
      if constexpr (kMaster) want_param.push(t, to_double(from_double<P>(w1)), ulp_at(from_double<P>(w1)));
    }
  }
  for (auto* l : {&exp_avg, &exp_avg_sq, &master, &ema}) l->before = l->buffer;
  param.before = param.buffer;
  grad.before = grad.buffer;
  std::vector<void*> params(param.tensors.begin(), param.tensors.end());
  const std::vector<const void*> grads(grad.tensors.begin(), grad.tensors.end());
  const cudaError_t err = cck::adamw_ema_step(
      kTensors, params.data(), grads.data(), exp_avg.tensors.data(), exp_avg_sq.tensors.data(),
      kMaster ? master.tensors.data() : nullptr, with_ema ? ema.tensors.data() : nullptr, kSizes.data(), dtype, s, nullptr);
  CHECK(err == cudaSuccess);
  compare(name + (kMaster ? ": masters" : ": params"), weights, want_w);
  compare(name + ": exp_avg", exp_avg, want_m);
  compare(name + ": exp_avg_sq", exp_avg_sq, want_v);
  if (kMaster) compare(name + ": params", param, want_param);
  if (with_ema) compare(name + ": ema", ema, want_ema);
  check_untouched(name + ": exp_avg", exp_avg, false);
  check_untouched(name + ": exp_avg_sq", exp_avg_sq, false);
  check_untouched(name + ": params", param, false);
  check_untouched(name + ": grads", grad, true);
  check_untouched(name + ": masters", master, !kMaster);  // fp32: not passed
  check_untouched(name + ": ema", ema, !with_ema);
}

// What the launchers refuse, and empty lists, which launch nothing.
static void test_refusals() {
  float x = 1.0f;
  float* f = &x;
  void* p = &x;
  const void* g = &x;
  const int64_t size = 1;
  const cck::AdamWEmaScalars s{1, 0.1f, 0.999f, 0.001f, 0.01f, 1, 1e-8f, 0};
  // fp32 params are stepped in place, without masters; fp16 and bf16 params need them
  CHECK(cck::adamw_ema_step(1, &p, &g, &f, &f, &f, nullptr, &size, DType::kFloat32, s, nullptr) == cudaErrorInvalidValue);
  CHECK(cck::adamw_ema_step(1, &p, &g, &f, &f, nullptr, nullptr, &size, DType::kFloat16, s, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(cck::adamw_ema_step(1, &p, &g, &f, &f, nullptr, nullptr, &size, DType::kBFloat16, s, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(cck::ema_update(1, &f, &g, &size, static_cast<DType>(3), 0.9, nullptr) == cudaErrorInvalidValue);
  CHECK(x == 1.0f);
  CHECK(cck::ema_update(0, nullptr, nullptr, nullptr, DType::kFloat16, 0.9, nullptr) == cudaSuccess);
  CHECK(cck::adamw_ema_step(0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, DType::kFloat32, s,
                            nullptr) == cudaSuccess);
}

int main() {
  // decays on both sides of torch_lerp's switch at a weight 1 - decay of 0.5
  test_ema<float>("ema fp32", DType::kFloat32, 0.999, 1);
  test_ema<__half>("ema fp16", DType::kFloat16, 0.25, 2);
  test_ema<__nv_bfloat16>("ema bf16", DType::kBFloat16, 0.9, 3);
  test_adamw<float>("adamw fp32", DType::kFloat32, false, 4);
  test_adamw<float>("adamw+ema fp32", DType::kFloat32, true, 5);
  test_adamw<__half>("adamw fp16", DType::kFloat16, false, 6);
  test_adamw<__half>("adamw+ema fp16", DType::kFloat16, true, 7);
  test_adamw<__nv_bfloat16>("adamw bf16", DType::kBFloat16, false, 8);
  test_adamw<__nv_bfloat16>("adamw+ema bf16", DType::kBFloat16, true, 9);
  test_refusals();
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
