// The channels_last GroupNorm kernels (csrc/group_norm.cuh) run on the CPU through simt.h's
// emulation, every kernel in the order the launchers run them, against an fp64 reference: the
// single passes (forward, then the backward and backward_affine) and the split passes
// (channel_stats, group_stats, normalize; backward_partials, backward_affine, backward_group,
// backward_dx), giving y, mean, rstd, dx (with and without the skip gradient), dweight and dbias;
// in fp32, bf16 and fp16, with 16-byte packs and scalar (each type), with and without affine,
// one block a tile and clusters of 2 and 3, several clusters looping over their tiles, split
// into 1-4 and 12 chunks (a group's partials summed by a warp, and by a block), a batch of 1 and
// a single position, and a large offset with a group value 8 std from the mean at position 0
// (the single pass's second statistics pass). Outputs and workspaces start as NaN, shared
// memory as NaN bytes.
#include "simt.h"  // first: it sets up the CUDA names the kernels use

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "group_norm.cuh"
#include "numerics.h"

using cck::gn::kThreads;

struct Case {
  std::string name;
  int N, S, C, G, channels, cluster, clusters;  // single pass: channels a block, cluster; clusters launched
  int chunks;                                    // split passes: chunks a sample
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
      std::vector<double> xhats, dzs;  // the group's, in (s, k) order
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
          a += w[ch] * dz / count;
          bb += w[ch] * dz * xhat / count;
          xhats.push_back(xhat);
          dzs.push_back(dz);
        }
      }
      for (int s = 0, j = 0; s < S; ++s) {
        for (int k = 0; k < cpg; ++k, ++j) {
          const int ch = g * cpg + k;
          r.dx[at(n, s, ch)] = rs * (w[ch] * dzs[j] - a - xhats[j] * bb);
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

// What a pipeline gives back, in fp64.
struct Result {
  std::vector<double> y, mean, rstd, dx, dweight, dbias;
};

// The problem's inputs, as the kernels take them.
template <typename T>
struct Inputs {
  std::vector<T> x, dy, addend;
  std::vector<float> w, b;
  const float* weight(const Case& c) const { return c.affine ? w.data() : nullptr; }
  const float* bias(const Case& c) const { return c.affine ? b.data() : nullptr; }
};

constexpr float kEps = 1e-5f;

// dweight, dbias from the (rows, C) partials, by backward_affine_kernel as the launchers run it.
static void affine(const Case& c, const std::vector<float>& part_dz, const std::vector<float>& part_dzx, int rows,
                   Result& r) {
  std::vector<float> dw(c.C, NAN), db(c.C, NAN);
  simt::launch({static_cast<unsigned>(cck::gn::cdiv(c.C, cck::gn::kAffineChannels)), 1, 1}, 1,
               {cck::gn::kAffineChannels, kThreads / cck::gn::kAffineChannels, 1}, cck::gn::kAffineSmemBytes,
               [&] { cck::gn::backward_affine_kernel(part_dz.data(), part_dzx.data(), dw.data(), db.data(), rows, c.C); });
  r.dweight = doubles(dw);
  r.dbias = doubles(db);
}

// The single passes (forward, then backward from the forward's mean and rstd), as the launchers
// run them: a persistent grid of c.clusters clusters.
template <typename T, int VEC, bool SILU>
static Result single_pass(const Case& c, const Inputs<T>& in) {
  const int N = c.N, S = c.S, C = c.C, G = c.G, K = c.cluster, rows = cck::gn::cdiv(S, K);
  const simt::Dim3 grid{static_cast<unsigned>(c.clusters * K), 1, 1};
  const simt::Dim3 block{static_cast<unsigned>(c.channels / VEC), static_cast<unsigned>(kThreads / (c.channels / VEC)), 1};
  const size_t size = in.x.size();
  std::vector<T> y(size, from_double<T>(NAN)), dx(size, from_double<T>(NAN));
  std::vector<float> mean(N * G, NAN), rstd(N * G, NAN);
  std::vector<float> part_dz(static_cast<size_t>(N) * K * C, NAN), part_dzx(part_dz.size(), NAN);
  simt::launch(grid, K, block, cck::gn::single_pass_smem_bytes(rows, c.channels, C / G, VEC, sizeof(T), 1), [&] {
    cck::gn::single_pass_kernel<T, VEC, SILU>(in.x.data(), y.data(), in.weight(c), in.bias(c), mean.data(),
                                              rstd.data(), N, S, C, G, kEps);
  });
  simt::launch(grid, K, block, cck::gn::single_pass_smem_bytes(rows, c.channels, C / G, VEC, sizeof(T), 2), [&] {
    cck::gn::backward_single_pass_kernel<T, VEC, SILU>(
        in.dy.data(), in.x.data(), dx.data(), c.addend ? in.addend.data() : nullptr, in.weight(c), in.bias(c),
        mean.data(), rstd.data(), part_dz.data(), part_dzx.data(), N, S, C, G);
  });
  Result r{doubles(y), doubles(mean), doubles(rstd), doubles(dx), {}, {}};
  affine(c, part_dz, part_dzx, N * K, r);
  return r;
}

// The split passes with c.chunks chunks a sample, as group_norm_nhwc_forward and _backward run them.
template <typename T, int VEC, bool SILU>
static Result split(const Case& c, const Inputs<T>& in) {
  const int N = c.N, S = c.S, C = c.C, G = c.G, K = c.chunks;
  const cck::gn::SplitLaunch l = cck::gn::split_launch(S, C, K, VEC);
  const simt::Dim3 grid{static_cast<unsigned>(l.grid_x), static_cast<unsigned>(K), static_cast<unsigned>(N)};
  const simt::Dim3 block{static_cast<unsigned>(l.block_x), static_cast<unsigned>(l.block_y), 1};
  const cck::gn::GroupLaunch gl = cck::gn::group_launch(K, C, G);
  const simt::Dim3 group_grid{static_cast<unsigned>(gl.grid_x), static_cast<unsigned>(N), 1};
  const size_t size = in.x.size();
  std::vector<T> y(size, from_double<T>(NAN)), dx(size, from_double<T>(NAN));
  std::vector<float> mean(N * G, NAN), rstd(N * G, NAN), coef_a(N * G, NAN), coef_b(N * G, NAN);
  std::vector<float> part_a(static_cast<size_t>(N) * K * C, NAN), part_b(part_a.size(), NAN);
  simt::launch(grid, 1, block, l.row_smem,
               [&] { cck::gn::channel_stats_kernel<T, VEC>(in.x.data(), part_a.data(), part_b.data(), S, C, l.chunk); });
  simt::launch(group_grid, 1, {kThreads, 1, 1}, cck::gn::kGroupSmemBytes, [&] {
    cck::gn::group_stats_kernel(part_a.data(), part_b.data(), mean.data(), rstd.data(), S, C, G, K, l.chunk, kEps,
                                gl.lanes);
  });
  simt::launch(grid, 1, block, 0, [&] {
    cck::gn::normalize_kernel<T, VEC, SILU>(in.x.data(), y.data(), in.weight(c), in.bias(c), mean.data(), rstd.data(),
                                            S, C, G, l.chunk);
  });
  std::fill(part_a.begin(), part_a.end(), NAN);
  std::fill(part_b.begin(), part_b.end(), NAN);
  simt::launch(grid, 1, block, l.row_smem, [&] {
    cck::gn::backward_partials_kernel<T, VEC, SILU>(in.dy.data(), in.x.data(), in.weight(c), in.bias(c), mean.data(),
                                                    rstd.data(), part_a.data(), part_b.data(), S, C, G, l.chunk);
  });
  Result r{doubles(y), doubles(mean), doubles(rstd), {}, {}, {}};
  affine(c, part_a, part_b, N * K, r);
  simt::launch(group_grid, 1, {kThreads, 1, 1}, cck::gn::kGroupSmemBytes, [&] {
    cck::gn::backward_group_kernel(part_a.data(), part_b.data(), in.weight(c), coef_a.data(), coef_b.data(), S, C, G, K,
                                   gl.lanes);
  });
  simt::launch(grid, 1, block, 0, [&] {
    cck::gn::backward_dx_kernel<T, VEC, SILU>(in.dy.data(), in.x.data(), dx.data(), in.weight(c), in.bias(c),
                                              mean.data(), rstd.data(), coef_a.data(), coef_b.data(),
                                              c.addend ? in.addend.data() : nullptr, S, C, G, l.chunk);
  });
  r.dx = doubles(dx);
  return r;
}

template <typename T>
static void compare(const Case& c, const char* pipeline, const Result& got, const Reference& ref,
                    const std::vector<double>& addend) {
  std::vector<double> want_dx = ref.dx;
  if (c.addend) {
    for (size_t i = 0; i < want_dx.size(); ++i) want_dx[i] += addend[i];
  }
  // the mean is folded into the normalize offset: fp32 rounding of |mean| * rstd
  const double u = unit_roundoff<T>();
  const double tol_y = 8 * u + 1e-6 + 4e-8 * c.offset, tol_dx = 16 * u + 1e-5, tol_sum = 2e-5;
  const double e_y = error(got.y, ref.y), e_mean = error(got.mean, ref.mean), e_rstd = error(got.rstd, ref.rstd);
  const double e_dx = error(got.dx, want_dx), e_dw = error(got.dweight, ref.dweight), e_db = error(got.dbias, ref.dbias);
  if (!(e_y <= tol_y && e_mean <= 1e-6 && e_rstd <= 2e-5 && e_dx <= tol_dx && e_dw <= tol_sum && e_db <= tol_sum)) {
    std::printf("%s, %s: y %.2e (tol %.1e), mean %.2e, rstd %.2e, dx %.2e (tol %.1e), dweight %.2e, dbias %.2e\n",
                c.name.c_str(), pipeline, e_y, tol_y, e_mean, e_rstd, e_dx, tol_dx, e_dw, e_db);
    ++failures;
  }
}

template <typename T, int VEC>
static void run(const Case& c) {
  const int N = c.N, S = c.S, C = c.C;
  std::mt19937 rng(1234 + N * 7 + C);
  std::normal_distribution<double> normal;
  const size_t size = static_cast<size_t>(N) * S * C;
  Inputs<T> in{std::vector<T>(size), std::vector<T>(size), std::vector<T>(size), std::vector<float>(C, 1.0f),
               std::vector<float>(C, 0.0f)};
  for (size_t i = 0; i < size; ++i) {
    const bool first = (i / C) % S == 0;
    in.x[i] = from_double<T>(2 * normal(rng) + 0.5 + c.offset + (first ? c.outlier : 0.0));
    in.dy[i] = from_double<T>(normal(rng));
    in.addend[i] = from_double<T>(normal(rng));
  }
  if (c.affine) {
    for (int ch = 0; ch < C; ++ch) {
      in.w[ch] = static_cast<float>(1 + 0.5 * normal(rng));
      in.b[ch] = static_cast<float>(0.5 * normal(rng));
    }
  }
  const std::vector<double> w(in.w.begin(), in.w.end()), b(in.b.begin(), in.b.end());
  const Reference ref = reference(c, doubles(in.x), w, b, doubles(in.dy), kEps);
  const std::vector<double> addend = doubles(in.addend);
  if (c.silu) {
    compare<T>(c, "single pass", single_pass<T, VEC, true>(c, in), ref, addend);
    compare<T>(c, "split", split<T, VEC, true>(c, in), ref, addend);
  } else {
    compare<T>(c, "single pass", single_pass<T, VEC, false>(c, in), ref, addend);
    compare<T>(c, "split", split<T, VEC, false>(c, in), ref, addend);
  }
}

int main() {
  // name, N, S, C, G, channels a block, cluster, clusters launched, chunks, silu, affine, addend
  run<float, 4>({"fp32 packs, a block a tile, 2 clusters", 3, 37, 24, 4, 12, 1, 2, 3, true, true, true});
  run<float, 4>({"fp32 packs, clusters of 3", 3, 37, 24, 4, 24, 3, 2, 1, false, true, false});
  run<float, 4>({"fp32, large offset, outlier at position 0", 2, 30, 24, 4, 24, 2, 2, 2, true, false, false, 1e3, 16.0});
  run<__nv_bfloat16, 8>({"bf16 packs, clusters of 2", 2, 50, 48, 4, 24, 2, 3, 4, true, true, true});
  run<__nv_bfloat16, 8>({"bf16 packs, one cluster takes every tile", 2, 50, 48, 4, 48, 1, 1, 2, true, true, false});
  run<__nv_bfloat16, 1>({"bf16 scalar, 3 channels a group", 2, 17, 36, 12, 18, 2, 2, 3, true, true, true});
  run<__half, 8>({"fp16 packs, more clusters than tiles", 2, 19, 48, 8, 48, 1, 3, 2, false, true, true});
  // 12 chunks of 12-channel groups: 144 partials a group, summed by a block, not a warp (group_launch)
  run<__nv_bfloat16, 8>({"bf16 packs, a block a group's partials", 2, 60, 48, 4, 48, 1, 2, 12, true, true, true});
  // corners: a batch of 1, one position, the scalar paths of fp32 and fp16, fp16 without affine
  run<__half, 8>({"fp16 packs, non-affine, batch 1", 1, 40, 32, 4, 32, 2, 1, 2, true, false, true});
  run<float, 4>({"fp32 packs, one position", 3, 1, 24, 4, 24, 1, 2, 1, true, true, true});
  run<float, 1>({"fp32 scalar, C = 30 not a multiple of 4", 2, 23, 30, 5, 30, 2, 2, 3, true, true, true});
  run<__half, 1>({"fp16 scalar, non-affine, 2 groups a block", 2, 21, 20, 4, 10, 1, 3, 2, true, false, false});
  run<__half, 1>({"fp16 scalar, batch 1, one position", 1, 1, 12, 3, 12, 1, 1, 1, false, true, true});
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
