// Multi-tensor apply: run one small device functor over the chunks of many tensors in few
// launches. The host walks the tensor lists, packs their addresses and a block -> (tensor,
// chunk) table into a struct passed by value as the kernel argument, and launches whenever
// the table fills. An op is then just a functor plus a host entry that dispatches on dtype.
//
// Three parts, each compiled where it can be:
//   - TensorTable and the table limits: plain C++, for host and device;
//   - plan_launches(): host-only C++ (no CUDA needed, so a CPU C++ test checks it);
//   - multi_tensor_kernel (device, also under NVRTC) and multi_tensor_apply (nvcc host code).
#pragma once

#ifndef __CUDACC_RTC__
#include <cstdint>
#include <vector>
#endif

namespace cck {

#ifdef __CUDACC_RTC__
// NVRTC has no <cstdint>; these are the same types on every CUDA platform.
using int64_t = long long;
#endif

// The table travels as a kernel argument, so it must stay under the classic 4 KB parameter
// limit (newer drivers allow 32 KB, but the NVRTC/CuPy path should not depend on that).
constexpr int kTableBytes = 3968;
constexpr int kMaxBlocks = 384;       // chunks per launch
constexpr int kBlockThreads = 512;    // threads per chunk
constexpr int64_t kChunkSize = 65536; // elements per chunk (a multiple of any vector width)

// Depth = number of tensor lists (e.g. 2 for EMA: shadow and params).
template <int Depth>
struct TensorTable {
  // As many tensor slots as fit beside the block table: each slot holds Depth addresses and
  // a size; each block a one-byte slot index and a four-byte chunk index.
  static constexpr int kFit = (kTableBytes - kMaxBlocks * 5) / (8 * Depth + 8);
  static constexpr int kMaxTensors = kFit < 255 ? kFit : 255;
  void* addresses[kMaxTensors][Depth];  // [slot][list]: first element of each tensor
  int64_t sizes[kMaxTensors];           // [slot]: elements in that tensor
  int block_chunk[kMaxBlocks];          // [block]: chunk index within its tensor
  unsigned char block_slot[kMaxBlocks]; // [block]: slot of its tensor
};

#ifndef __CUDACC_RTC__
// One launch: which tensors occupy the slots, and which (slot, chunk) each block runs.
// A tensor whose chunks do not fit in one launch continues in slot 0 of the next.
struct Launch {
  std::vector<int> tensors;      // [slot] -> tensor index in the caller's lists
  std::vector<int> block_slot;   // [block] -> slot
  std::vector<int> block_chunk;  // [block] -> chunk index within the tensor
};

// Splits tensors of the given sizes into launches of at most max_tensors tensors and
// max_blocks chunks of chunk_size elements. Empty tensors are skipped.
inline std::vector<Launch> plan_launches(const int64_t* sizes, int n_tensors, int64_t chunk_size,
                                         int max_tensors, int max_blocks) {
  std::vector<Launch> launches;
  Launch current;
  for (int t = 0; t < n_tensors; ++t) {
    if (sizes[t] <= 0) continue;
    const int64_t chunks = (sizes[t] + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      if (current.tensors.empty() || current.tensors.back() != t) current.tensors.push_back(t);
      current.block_slot.push_back(static_cast<int>(current.tensors.size()) - 1);
      current.block_chunk.push_back(static_cast<int>(c));
      const bool blocks_full = static_cast<int>(current.block_slot.size()) == max_blocks;
      // A full tensor table only ends the launch once its last tensor is done, so that
      // tensor's remaining chunks still fill the block table.
      const bool tensors_full =
          static_cast<int>(current.tensors.size()) == max_tensors && c == chunks - 1;
      if (blocks_full || tensors_full) {
        launches.push_back(std::move(current));
        current = Launch();
      }
    }
  }
  if (!current.block_slot.empty()) launches.push_back(std::move(current));
  return launches;
}
#endif  // !__CUDACC_RTC__

#ifdef __CUDACC__
// One block per chunk: find its tensor and element range, and hand them to the functor as
//   functor(addresses of that tensor in each list, first element of the chunk, elements).
template <int Depth, typename Functor>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(int64_t chunk_size, TensorTable<Depth> table, Functor functor) {
  const int slot = table.block_slot[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * chunk_size;
  const int64_t left = table.sizes[slot] - start;
  functor(table.addresses[slot], start, left < chunk_size ? left : chunk_size);
}
#endif  // __CUDACC__

#if defined(__CUDACC__) && !defined(__CUDACC_RTC__)
// Runs functor over n_tensors tensors of the given sizes; address_of(list, tensor) gives
// the first element of that tensor in that list. Returns the first launch error.
template <int Depth, typename Functor, typename AddressOf>
cudaError_t multi_tensor_apply(const int64_t* sizes, int n_tensors, AddressOf address_of,
                               Functor functor, cudaStream_t stream) {
  using Table = TensorTable<Depth>;
  static_assert(sizeof(Table) + sizeof(Functor) + sizeof(int64_t) <= 4096,
                "kernel arguments exceed 4 KB");
  for (const Launch& launch :
       plan_launches(sizes, n_tensors, kChunkSize, Table::kMaxTensors, kMaxBlocks)) {
    Table table;
    for (int s = 0; s < static_cast<int>(launch.tensors.size()); ++s) {
      table.sizes[s] = sizes[launch.tensors[s]];
      for (int d = 0; d < Depth; ++d) table.addresses[s][d] = address_of(d, launch.tensors[s]);
    }
    const int blocks = static_cast<int>(launch.block_slot.size());
    for (int b = 0; b < blocks; ++b) {
      table.block_slot[b] = static_cast<unsigned char>(launch.block_slot[b]);
      table.block_chunk[b] = launch.block_chunk[b];
    }
#ifdef CCK_SIMT  // tests/cpp/simt.h's CPU emulation: the launchers run in a C++ test
    (void)stream;
    simt::launch({static_cast<unsigned>(blocks)}, 1, {kBlockThreads}, 0,
                 [&] { multi_tensor_kernel<Depth>(kChunkSize, table, functor); });
#else
    multi_tensor_kernel<Depth><<<blocks, kBlockThreads, 0, stream>>>(kChunkSize, table, functor);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
#endif
  }
  return cudaSuccess;
}
#endif

}  // namespace cck
