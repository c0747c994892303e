// A CPU stand-in for the CUDA execution model, enough to run csrc's GroupNorm kernels and the
// multi-tensor launchers (multi_tensor_apply.cuh) in a C++ test without a GPU: every CUDA thread an OS thread, all blocks of a launch
// at once, __syncthreads and the cluster barrier as std::barrier, warp shuffles through a
// per-warp buffer, distributed shared memory as the other blocks' buffers. Kernels see
// __CUDA_ARCH__ 900 (clusters) with CCK_SIMT defined, which swaps their inline PTX (cp.async,
// ex2/rcp.approx) for plain C++. Include it before any csrc header; link with -pthread.
//
// What it checks: indexing, reductions, the order of barriers, the tile hand-off between
// clusters. What it cannot: timing, memory-model subtleties beyond what the barriers order,
// register or shared-memory limits (the inspect tool and the GPU tests do those).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

namespace simt {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Block;

struct Cluster {
  std::unique_ptr<std::barrier<>> barrier;  // every thread of every block of the cluster
  std::vector<Block*> blocks;               // by rank
};

struct Block {
  std::vector<float4> smem;  // the dynamic shared memory, 16-byte aligned
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<std::array<float, 32>> warp_buffer;
  std::atomic<int> vote{0};
  std::atomic<int> running{0};  // threads not yet returned: another block's reads need it > 0
  Cluster* cluster = nullptr;
  unsigned rank = 0;
};

inline thread_local Dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Block* this_block = nullptr;
inline thread_local std::optional<std::barrier<>::arrival_token> cluster_token;  // between arrive and wait

inline int thread_rank() { return static_cast<int>(thread_idx.y * block_dim.x + thread_idx.x); }

// Runs kernel() on a grid of `grid` blocks of `block` threads with smem_bytes of dynamic shared
// memory each, in clusters of `cluster` consecutive blocks along x (grid.x a multiple of it),
// every thread at once; returns when all are done.
inline void launch(Dim3 grid, int cluster, Dim3 block, size_t smem_bytes, const std::function<void()>& kernel) {
  const int threads = static_cast<int>(block.x * block.y), warps = (threads + 31) / 32;
  const int count = static_cast<int>(grid.x * grid.y * grid.z);
  std::vector<std::unique_ptr<Cluster>> clusters;
  std::vector<std::unique_ptr<Block>> blocks;
  for (int i = 0; i < count; ++i) {
    if (i % cluster == 0) {
      clusters.push_back(std::make_unique<Cluster>());
      clusters.back()->barrier = std::make_unique<std::barrier<>>(cluster * threads);
    }
    auto b = std::make_unique<Block>();
    b->smem.resize((smem_bytes + 15) / 16);
    std::memset(b->smem.data(), 0xff, b->smem.size() * 16);  // poison: NaN floats, -1 ints
    b->sync = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < warps; ++w) b->warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
    b->warp_buffer.resize(warps);
    b->cluster = clusters.back().get();
    b->rank = static_cast<unsigned>(i % cluster);
    b->running = threads;
    clusters.back()->blocks.push_back(b.get());
    blocks.push_back(std::move(b));
  }
  std::vector<std::thread> workers;
  for (int i = 0; i < count; ++i) {
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, i, t] {
        this_block = blocks[i].get();
        block_idx = {i % grid.x, i / grid.x % grid.y, i / (grid.x * grid.y)};
        grid_dim = grid;
        block_dim = block;
        thread_idx = {static_cast<unsigned>(t) % block.x, static_cast<unsigned>(t) / block.x, 0};
        kernel();
        --this_block->running;
      });
    }
  }
  for (std::thread& w : workers) w.join();
}

}  // namespace simt

#define threadIdx (::simt::thread_idx)
#define blockIdx (::simt::block_idx)
#define blockDim (::simt::block_dim)
#define gridDim (::simt::grid_dim)

inline void __syncthreads() { simt::this_block->sync->arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  simt::Block* b = simt::this_block;
  b->sync->arrive_and_wait();  // every earlier call has read the vote
  if (predicate) b->vote.store(1);
  b->sync->arrive_and_wait();
  const int any = b->vote.load();
  b->sync->arrive_and_wait();
  if (simt::thread_rank() == 0) b->vote.store(0);  // before thread 0 arrives at the next call
  return any;
}

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  simt::Block* b = simt::this_block;
  const int lane = simt::thread_rank() % 32, warp = simt::thread_rank() / 32;
  b->warp_buffer[warp][lane] = value;
  b->warp_sync[warp]->arrive_and_wait();
  const float other = b->warp_buffer[warp][lane ^ lane_mask];
  b->warp_sync[warp]->arrive_and_wait();
  return other;
}

inline unsigned __clusterSizeInBlocks() { return static_cast<unsigned>(simt::this_block->cluster->blocks.size()); }
inline unsigned __clusterRelativeBlockRank() { return simt::this_block->rank; }
inline void __cluster_barrier_arrive() { simt::cluster_token = simt::this_block->cluster->barrier->arrive(); }
inline void __cluster_barrier_wait() {
  simt::this_block->cluster->barrier->wait(std::move(*simt::cluster_token));
  simt::cluster_token.reset();
}

// p, in this block's dynamic shared memory, at the same offset in block `rank` of the cluster,
// which must not have exited (on a GPU, reading an exited block's shared memory is an error)
inline void* __cluster_map_shared_rank(void* p, unsigned rank) {
  simt::Block* other = simt::this_block->cluster->blocks[rank];
  if (other != simt::this_block && other->running.load() == 0) {
    std::fprintf(stderr, "simt: block %u reads the shared memory of block %u of its cluster, which exited\n",
                 simt::this_block->rank, rank);
    std::abort();
  }
  const char* mine = reinterpret_cast<const char*>(simt::this_block->smem.data());
  return reinterpret_cast<char*>(other->smem.data()) + (static_cast<char*>(p) - mine);
}

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// IEEE division and square root, as the CPU's are
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline int min(int a, int b) { return std::min(a, b); }

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define CCK_SIMT 1
