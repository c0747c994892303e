// Host-side planning of multi_tensor_apply: how tensor lists split into launches.
// Plain C++ (no CUDA, no torch), run by CTest.
#include <cstdio>
#include <random>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "check.h"

using cck::Launch;
using cck::plan_launches;

// The invariants every plan must satisfy: table limits respected, every chunk of every
// non-empty tensor run exactly once and in order, a tensor only continued in slot 0.
static void check_plan(const std::vector<int64_t>& sizes, int64_t chunk, int max_tensors,
                       int max_blocks, const std::vector<Launch>& plan) {
  std::vector<int64_t> next_chunk(sizes.size(), 0);
  int prev_last_tensor = -1;
  for (const Launch& l : plan) {
    CHECK(!l.tensors.empty() && !l.block_slot.empty());
    CHECK(static_cast<int>(l.tensors.size()) <= max_tensors);
    CHECK(static_cast<int>(l.block_slot.size()) <= max_blocks);
    CHECK(l.block_slot.size() == l.block_chunk.size());
    for (size_t s = 1; s < l.tensors.size(); ++s) CHECK(l.tensors[s] > l.tensors[s - 1]);
    // Only a tensor left unfinished by the previous launch may start this one mid-way.
    if (next_chunk[l.tensors[0]] > 0) CHECK(l.tensors[0] == prev_last_tensor);
    for (size_t b = 0; b < l.block_slot.size(); ++b) {
      const int slot = l.block_slot[b];
      CHECK(slot >= 0 && slot < static_cast<int>(l.tensors.size()));
      if (slot < 0 || slot >= static_cast<int>(l.tensors.size())) continue;
      const int t = l.tensors[slot];
      CHECK(l.block_chunk[b] == next_chunk[t]);
      next_chunk[t] = l.block_chunk[b] + 1;
    }
    prev_last_tensor = l.tensors.back();
  }
  for (size_t t = 0; t < sizes.size(); ++t) CHECK(next_chunk[t] == (sizes[t] + chunk - 1) / chunk);
}

static std::vector<Launch> plan(const std::vector<int64_t>& sizes, int64_t chunk, int max_tensors,
                                int max_blocks) {
  std::vector<Launch> p =
      plan_launches(sizes.data(), static_cast<int>(sizes.size()), chunk, max_tensors, max_blocks);
  check_plan(sizes, chunk, max_tensors, max_blocks, p);
  return p;
}

static void empty_lists() {
  CHECK(plan({}, 8, 4, 16).empty());
  CHECK(plan({0, 0, 0}, 8, 4, 16).empty());
}

static void many_tiny_tensors() {
  const std::vector<int64_t> sizes(1000, 3);  // 1000 one-chunk tensors, 4 slots per launch
  const auto p = plan(sizes, 8, 4, 16);
  CHECK(p.size() == 250);
  for (const Launch& l : p) CHECK(l.tensors.size() == 4 && l.block_slot.size() == 4);
}

static void one_huge_tensor() {
  const std::vector<int64_t> sizes = {8 * 16 * 2 + 5};  // 2 full launches of 16 chunks + 1 chunk
  const auto p = plan(sizes, 8, 4, 16);
  CHECK(p.size() == 3);
  CHECK(p[0].block_slot.size() == 16 && p[1].block_slot.size() == 16 && p[2].block_slot.size() == 1);
  CHECK(p[1].block_chunk[0] == 16 && p[2].block_chunk[0] == 32);
}

static void exactly_full_tables() {
  // Exactly max_tensors one-chunk tensors, and exactly max_blocks chunks: one launch each,
  // with no empty launch after.
  CHECK(plan({1, 2, 3, 4}, 8, 4, 16).size() == 1);
  CHECK(plan({8 * 16}, 8, 4, 16).size() == 1);
  CHECK(plan({8 * 10, 8 * 6}, 8, 4, 16).size() == 1);
  // One chunk more than fits starts a second launch holding just that chunk.
  const auto p = plan({8 * 16 + 1}, 8, 4, 16);
  CHECK(p.size() == 2 && p[1].block_slot.size() == 1 && p[1].block_chunk[0] == 16);
}

static void full_tensor_table_finishes_last_tensor() {
  // The 4th tensor fills the tensor table but has more chunks: they still go into this
  // launch's free blocks rather than a new launch.
  const auto p = plan({1, 1, 1, 8 * 5, 1}, 8, 4, 16);
  CHECK(p.size() == 2);
  CHECK(p[0].block_slot.size() == 8 && p[1].tensors.size() == 1 && p[1].tensors[0] == 4);
}

static void tensor_split_across_launches() {
  const auto p = plan({8, 8 * 20, 8}, 8, 4, 16);
  CHECK(p.size() == 2);
  CHECK(p[0].tensors.size() == 2 && p[0].block_slot.size() == 16);
  CHECK(p[1].tensors.size() == 2 && p[1].tensors[0] == 1 && p[1].block_chunk[0] == 15);
}

static void random_lists() {
  std::mt19937 rng(0);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> sizes(rng() % 300);
    for (auto& s : sizes) s = rng() % 4 == 0 ? 0 : static_cast<int64_t>(rng() % (8 * 40));
    plan(sizes, 8, 1 + static_cast<int>(rng() % 10), 1 + static_cast<int>(rng() % 50));
  }
}

static void real_table_limits() {
  // The production limits keep the kernel argument under 4 KB and slots in one byte.
  CHECK(sizeof(cck::TensorTable<2>) + 64 <= 4096);
  CHECK(sizeof(cck::TensorTable<6>) + 64 <= 4096);
  CHECK(cck::TensorTable<1>::kMaxTensors <= 255);
  CHECK(cck::TensorTable<2>::kMaxTensors >= 48);
  CHECK(cck::kChunkSize % 8 == 0);
  // 700 tensors, 865M values (an SD2 UNet): launches are bounded by the block table.
  std::vector<int64_t> sizes(700, 865000000 / 700);
  const auto p = plan(sizes, cck::kChunkSize, cck::TensorTable<2>::kMaxTensors, cck::kMaxBlocks);
  std::printf("SD2-like list (700 tensors, 865M values): %zu launches\n", p.size());
  CHECK(p.size() < 50);
}

int main() {
  empty_lists();
  many_tiny_tensors();
  one_huge_tensor();
  exactly_full_tables();
  full_tensor_table_finishes_last_tensor();
  tensor_split_across_launches();
  random_lists();
  real_table_limits();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all multi-tensor planning checks passed\n");
  return 0;
}
