// The single-pass GroupNorm kernels (csrc/group_norm.cuh) run on the CPU through simt.h's
// emulation, against an fp64 reference: the forward (y, mean, rstd) and the backward (dx with
// and without the skip gradient, dweight and dbias from the kernel's partials), in fp32, bf16
// and fp16, with 16-byte packs and scalar, one block a tile and clusters of 2 and 3, several
// clusters taking tiles from the one counter, and a large offset with a group value 8 std from
// the mean at position 0 (the forward's second statistics pass). Outputs start as NaN.
#include "simt.h"  // first: it sets up the CUDA names the kernels use

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "group_norm.cuh"

using cck::gn::kThreads;

template <typename T>
static T from_double(double v) {
  if constexpr (std::is_same_v<T, float>) return static_cast<float>(v);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else return __float2bfloat16_rn(static_cast<float>(v));
}
template <typename T>
static double to_double(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
template <typename T>
static double ulp() {  // relative rounding of T
  return std::is_same_v<T, float> ? 6e-8 : std::is_same_v<T, __half> ? 4.9e-4 : 3.9e-3;
}

struct Case {
  std::string name;
  int N, S, C, G, channels, cluster, clusters;  // plan: channels a block, cluster; clusters launched
  bool silu, affine, addend;
  double offset = 0.0, outlier = 0.0;  // added to x; added to x at position 0
};

// fp64 GroupNorm (+ SiLU) forward and backward of (N, S, C) arrays.
struct Reference {
  std::vector<double> y, mean, rstd, dx, dweight, dbias;
};

static Reference reference(const Case& c, const std::vector<double>& x, const std::vector<double>& w,
                           const std::vector<double>& b, const std::vector<double>& dy, double eps) {
  const int N = c.N, S = c.S, C = c.C, G = c.G, cpg = C / G;
  Reference r;
  r.y.assign(x.size(), 0);
  r.dx.assign(x.size(), 0);
  r.mean.assign(N * G, 0);
  r.rstd.assign(N * G, 0);
  r.dweight.assign(C, 0);
  r.dbias.assign(C, 0);
  const auto at = [&](int n, int s, int ch) { return (static_cast<size_t>(n) * S + s) * C + ch; };
  for (int n = 0; n < N; ++n) {
    for (int g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int s = 0; s < S; ++s)
        for (int k = 0; k < cpg; ++k) sum += x[at(n, s, g * cpg + k)];
      const double count = static_cast<double>(S) * cpg, mu = sum / count;
      for (int s = 0; s < S; ++s)
        for (int k = 0; k < cpg; ++k) sq += (x[at(n, s, g * cpg + k)] - mu) * (x[at(n, s, g * cpg + k)] - mu);
      const double rs = 1.0 / std::sqrt(sq / count + eps);
      r.mean[n * G + g] = mu;
      r.rstd[n * G + g] = rs;
      double a = 0, bb = 0;  // means of w * dz and w * dz * xhat
      for (int s = 0; s < S; ++s) {
        for (int k = 0; k < cpg; ++k) {
          const int ch = g * cpg + k;
          const size_t i = at(n, s, ch);
          const double xhat = (x[i] - mu) * rs, z = xhat * w[ch] + b[ch];
          const double sig = 1.0 / (1.0 + std::exp(-z));
          r.y[i] = c.silu ? z * sig : z;
          const double dz = c.silu ? dy[i] * sig * (1.0 + z * (1.0 - sig)) : dy[i];
          r.dweight[ch] += dz * xhat;
          r.dbias[ch] += dz;
          a += w[ch] * dz;
          bb += w[ch] * dz * xhat;
        }
      }
      a /= count;
      bb /= count;
      for (int s = 0; s < S; ++s) {
        for (int k = 0; k < cpg; ++k) {
          const int ch = g * cpg + k;
          const size_t i = at(n, s, ch);
          const double xhat = (x[i] - mu) * rs, z = xhat * w[ch] + b[ch];
          const double sig = 1.0 / (1.0 + std::exp(-z));
          const double dz = c.silu ? dy[i] * sig * (1.0 + z * (1.0 - sig)) : dy[i];
          r.dx[i] = rs * (w[ch] * dz - a - xhat * bb);
        }
      }
    }
  }
  return r;
}

// max |got - want| / (1 + max |want|) over the arrays, with NaN as failure
static double error(const std::vector<double>& got, const std::vector<double>& want) {
  double worst = 0, scale = 1;
  for (double v : want) scale = std::max(scale, 1 + std::abs(v));
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::abs(got[i] - want[i]);
    if (!(e == e)) return INFINITY;
    worst = std::max(worst, e);
  }
  return worst / scale;
}

template <typename T, int VEC>
static void run(const Case& c) {
  const int N = c.N, S = c.S, C = c.C, G = c.G;
  const double eps = 1e-5;
  std::mt19937 rng(1234 + N * 7 + C);
  std::normal_distribution<double> normal;
  const size_t size = static_cast<size_t>(N) * S * C;
  std::vector<T> x(size), dy(size), addend(size);
  std::vector<double> xd(size), dyd(size), ad(size), w(C, 1.0), b(C, 0.0);
  for (size_t i = 0; i < size; ++i) {
    const bool first = (i / C) % S == 0;
    x[i] = from_double<T>(2 * normal(rng) + 0.5 + c.offset + (first ? c.outlier : 0.0));
    dy[i] = from_double<T>(normal(rng));
    addend[i] = from_double<T>(normal(rng));
    xd[i] = to_double(x[i]);
    dyd[i] = to_double(dy[i]);
    ad[i] = to_double(addend[i]);
  }
  std::vector<float> wf(C), bf(C);
  for (int ch = 0; ch < C; ++ch) {
    if (c.affine) {
      w[ch] = static_cast<float>(1 + 0.5 * normal(rng));
      b[ch] = static_cast<float>(0.5 * normal(rng));
    }
    wf[ch] = static_cast<float>(w[ch]);
    bf[ch] = static_cast<float>(b[ch]);
  }
  const Reference ref = reference(c, xd, w, b, dyd, eps);

  const cck::gn::SinglePassPlan plan{c.channels, c.cluster};
  const simt::Dim3 block{static_cast<unsigned>(plan.channels / VEC), static_cast<unsigned>(kThreads / (plan.channels / VEC)), 1};
  const int rows = cck::gn::cdiv(S, plan.cluster);
  const float* weight = c.affine ? wf.data() : nullptr;
  const float* bias = c.affine ? bf.data() : nullptr;

  // forward
  std::vector<T> y(size, from_double<T>(NAN));
  std::vector<float> mean(N * G, NAN), rstd(N * G, NAN);
  int counter = 0;
  simt::launch(c.clusters, plan.cluster, block,
               cck::gn::single_pass_smem_bytes(rows, plan.channels, C / G, VEC, sizeof(T), 1), [&] {
                 const auto kernel = c.silu ? cck::gn::single_pass_kernel<T, VEC, true>
                                            : cck::gn::single_pass_kernel<T, VEC, false>;
                 kernel(x.data(), y.data(), weight, bias, mean.data(), rstd.data(), &counter, N, S, C, G,
                        static_cast<float>(eps));
               });
  std::vector<double> yd(size), md(mean.begin(), mean.end()), rd(rstd.begin(), rstd.end());
  for (size_t i = 0; i < size; ++i) yd[i] = to_double(y[i]);
  // the mean is folded into the normalize offset: fp32 rounding of |mean| * rstd
  const double tol = 8 * ulp<T>() + 1e-6 + 4e-7 * c.offset;
  const double e_y = error(yd, ref.y), e_mean = error(md, ref.mean), e_rstd = error(rd, ref.rstd);
  if (!(e_y <= tol && e_mean <= 1e-6 && e_rstd <= 2e-5)) {
    std::printf("%s forward: y %.2e (tol %.1e), mean %.2e, rstd %.2e\n", c.name.c_str(), e_y, tol, e_mean, e_rstd);
    ++failures;
  }

  // backward, from the reference's mean and rstd rounded to fp32 (what the forward hands it)
  std::vector<float> mean_in(N * G), rstd_in(N * G);
  for (int i = 0; i < N * G; ++i) {
    mean_in[i] = static_cast<float>(ref.mean[i]);
    rstd_in[i] = static_cast<float>(ref.rstd[i]);
  }
  std::vector<T> dx(size, from_double<T>(NAN));
  std::vector<float> part_dz(static_cast<size_t>(N) * plan.cluster * C, NAN), part_dzx(part_dz.size(), NAN);
  counter = 0;
  simt::launch(c.clusters, plan.cluster, block,
               cck::gn::single_pass_smem_bytes(rows, plan.channels, C / G, VEC, sizeof(T), 2), [&] {
                 const auto kernel = c.silu ? cck::gn::backward_single_pass_kernel<T, VEC, true>
                                            : cck::gn::backward_single_pass_kernel<T, VEC, false>;
                 kernel(dy.data(), x.data(), dx.data(), c.addend ? addend.data() : nullptr, weight, bias,
                        mean_in.data(), rstd_in.data(), part_dz.data(), part_dzx.data(), &counter, N, S, C, G);
               });
  std::vector<double> dxd(size), want_dx = ref.dx, dw(C, 0), db(C, 0);
  for (size_t i = 0; i < size; ++i) {
    dxd[i] = to_double(dx[i]);
    if (c.addend) want_dx[i] += ad[i];
  }
  for (size_t r = 0; r < static_cast<size_t>(N) * plan.cluster; ++r) {
    for (int ch = 0; ch < C; ++ch) {
      dw[ch] += part_dzx[r * C + ch];
      db[ch] += part_dz[r * C + ch];
    }
  }
  const double e_dx = error(dxd, want_dx), e_dw = error(dw, ref.dweight), e_db = error(db, ref.dbias);
  const double tol_dx = 16 * ulp<T>() + 1e-5, tol_sum = 2e-5;
  if (!(e_dx <= tol_dx && e_dw <= tol_sum && e_db <= tol_sum)) {
    std::printf("%s backward: dx %.2e (tol %.1e), dweight %.2e, dbias %.2e (tol %.1e)\n", c.name.c_str(), e_dx, tol_dx,
                e_dw, e_db, tol_sum);
    ++failures;
  }
}

int main() {
  // name, N, S, C, G, channels a block, cluster, clusters launched, silu, affine, addend
  run<float, 4>({"fp32 packs, a block a tile, 2 clusters", 3, 37, 24, 4, 12, 1, 2, true, true, true});
  run<float, 4>({"fp32 packs, clusters of 3", 3, 37, 24, 4, 24, 3, 2, false, true, false});
  run<float, 4>({"fp32, large offset, outlier at position 0", 2, 30, 24, 4, 24, 2, 2, true, false, false, 1e3, 16.0});
  run<__nv_bfloat16, 8>({"bf16 packs, clusters of 2", 2, 50, 48, 4, 24, 2, 3, true, true, true});
  run<__nv_bfloat16, 8>({"bf16 packs, one cluster takes every tile", 2, 50, 48, 4, 48, 1, 1, true, true, false});
  run<__nv_bfloat16, 1>({"bf16 scalar, 3 channels a group", 2, 17, 36, 12, 18, 2, 2, true, true, true});
  run<__half, 8>({"fp16 packs, more clusters than tiles", 2, 19, 48, 8, 48, 1, 3, false, true, true});
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
