// Host-side planning of the single-pass GroupNorm forward and backward (gn::single_pass_plan).
// Plain C++ (no CUDA, no torch), run by CTest.
#include <cstdio>
#include <initializer_list>
#include <iterator>
#include <random>
#include <vector>

#include "group_norm.cuh"
#include "check.h"

using cck::gn::single_pass_plan;
using cck::gn::single_pass_smem_bytes;
using cck::gn::SinglePassPlan;

// H100 SXM: 132 SMs, 113 KB of shared memory a block (half of 228 KB, less the 1 KB reserve).
constexpr int kSMs = 132, kSmem = 233472 / 2 - 1024;

// Whether (channels, cluster) is a launch the kernel (of `tensors` inputs) can take that fits
// and fills the GPU.
static bool feasible(int N, int S, int C, int G, int itemsize, int vec, int tensors, int channels, int cluster) {
  const int cpg = C / G, rows = (S + cluster - 1) / cluster;
  return channels >= 1 && channels <= cck::gn::kThreads && C % channels == 0 && channels % cpg == 0 &&
         channels % vec == 0 && (S + rows - 1) / rows == cluster &&
         single_pass_smem_bytes(rows, channels, cpg, vec, itemsize, tensors) <= kSmem &&
         N * (C / channels) * cluster >= kSMs;
}

// Every plan is feasible, with the smallest feasible cluster; no plan only where none is.
static void check_plan(int N, int S, int C, int G, int itemsize, int vec, int max_cluster, int tensors) {
  const SinglePassPlan plan = single_pass_plan(N, S, C, G, itemsize, vec, kSMs, kSmem, max_cluster, tensors);
  const int first = plan.channels ? plan.cluster : max_cluster + 1;  // clusters below this must have no launch
  if (plan.channels) {
    CHECK(plan.cluster >= 1 && plan.cluster <= max_cluster);
    CHECK(feasible(N, S, C, G, itemsize, vec, tensors, plan.channels, plan.cluster));
  }
  for (int cluster = 1; cluster < first; ++cluster) {
    for (int channels = 1; channels <= C; ++channels) {
      if (feasible(N, S, C, G, itemsize, vec, tensors, channels, cluster)) {
        std::printf("N=%d S=%d C=%d G=%d itemsize=%d tensors=%d: (%d, %d) is feasible but the plan is (%d, %d)\n", N,
                    S, C, G, itemsize, tensors, channels, cluster, plan.channels, plan.cluster);
        ++failures;
        return;
      }
    }
  }
}

int main() {
  // SD2 UNet shapes in bf16 (batch, channels, latent side) -> (channels a block, cluster).
  struct Case {
    int N, C, side, channels, cluster;
  };
  const Case sd2[] = {{32, 320, 32, 40, 2}, {32, 640, 16, 80, 1}, {32, 1280, 8, 160, 1}, {32, 2560, 8, 160, 1},
                      {32, 1920, 16, 120, 2}, {32, 960, 32, 120, 5}, {8, 320, 64, 40, 7}, {8, 640, 32, 40, 2},
                      {8, 1920, 32, 120, 5}, {8, 960, 64, 0, 0}, {8, 960, 48, 120, 11}, {1, 320, 64, 0, 0}};
  // The backward stages x and dy: twice the tiles.
  const Case sd2_backward[] = {{32, 320, 32, 40, 4}, {32, 640, 16, 40, 1}, {32, 1280, 8, 160, 1},
                               {32, 2560, 8, 160, 1}, {32, 1920, 16, 120, 3}, {32, 960, 32, 120, 10},
                               {8, 320, 64, 40, 13}, {8, 640, 32, 40, 4}, {8, 2560, 16, 80, 2},
                               {8, 1920, 32, 120, 10}, {8, 960, 64, 0, 0}, {1, 320, 64, 0, 0}};
  for (int tensors : {1, 2}) {
    for (const Case& c : tensors == 1 ? std::vector<Case>(std::begin(sd2), std::end(sd2))
                                      : std::vector<Case>(std::begin(sd2_backward), std::end(sd2_backward))) {
      const SinglePassPlan plan =
          single_pass_plan(c.N, c.side * c.side, c.C, 32, 2, 8, kSMs, kSmem, cck::gn::kMaxCluster, tensors);
      if (plan.channels != c.channels || plan.cluster != c.cluster) {
        std::printf("%dx%dx%d^2, %d tensors: plan (%d, %d), want (%d, %d)\n", c.N, c.C, c.side, tensors,
                    plan.channels, plan.cluster, c.channels, c.cluster);
        ++failures;
      }
    }
  }
  // Up to the portable 8 blocks a cluster, 48x48x960 splits; without clusters (sm80, or code
  // JIT-compiled from older PTX) the large groups split.
  CHECK(single_pass_plan(8, 2304, 960, 32, 2, 8, kSMs, kSmem, 8).channels == 0);
  CHECK(single_pass_plan(32, 1024, 320, 32, 2, 8, kSMs, kSmem, 1).channels == 0);
  CHECK(single_pass_plan(32, 256, 640, 32, 2, 8, kSMs, kSmem, 1).channels == 80);
  // The single pass pays up to 4 rounds of two blocks an SM (forward), 2 (backward): the batch
  // of 256 runs the split passes, batch 8 at 512 px the single pass except 8x1920x32x32's backward.
  const auto pays = [](int N, int C, int side, int tensors) {
    const SinglePassPlan plan = single_pass_plan(N, side * side, C, 32, 2, 8, kSMs, kSmem, cck::gn::kMaxCluster, tensors);
    return cck::gn::single_pass_pays(N, C, plan, kSMs, tensors);
  };
  CHECK(!pays(256, 320, 32, 1) && !pays(256, 1280, 8, 1) && !pays(32, 960, 32, 1) && !pays(256, 1280, 8, 2));
  CHECK(pays(8, 1920, 32, 1) && !pays(8, 1920, 32, 2) && pays(32, 1920, 16, 1) && !pays(32, 1920, 16, 2));
  CHECK(pays(8, 2560, 16, 1) && pays(8, 2560, 16, 2) && pays(8, 1280, 8, 2) && !pays(8, 960, 64, 1));
  // Invalid shapes never get a plan.
  CHECK(single_pass_plan(0, 16, 64, 32, 2, 8, kSMs, kSmem, 8).channels == 0);
  CHECK(single_pass_plan(4, 16, 64, 30, 2, 8, kSMs, kSmem, 8).channels == 0);

  std::mt19937 rng(0);
  for (int trial = 0; trial < 3000; ++trial) {
    const int G = 1 + rng() % 40, cpg = 1 + rng() % 64, C = G * cpg;
    const int itemsize = rng() % 2 ? 2 : 4, vec = C % (16 / itemsize) == 0 ? 16 / itemsize : 1;
    const int N = 1 + rng() % 64, S = 1 + rng() % 5000;
    check_plan(N, S, C, G, itemsize, vec, 1 + rng() % cck::gn::kMaxCluster, 1 + trial % 2);
  }
  if (failures) std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
