// What every kernel of csrc moves memory with (nvcc and NVRTC): fp32 conversions of the
// element types, Packs of elements read or written as one access, and batched(), the loop
// that keeps several of those accesses in flight per thread.
//
// batched() is plain C++ for host and device, so a CPU C++ test checks the order it visits.
#pragma once

#ifdef __CUDACC__
#define CCK_HOST_DEVICE __host__ __device__
#else
#define CCK_HOST_DEVICE
#endif
// Only in device code (nvcc's device pass, NVRTC): the host compiler would warn about it.
#ifdef __CUDA_ARCH__
#define CCK_UNROLL _Pragma("unroll")
#else
#define CCK_UNROLL
#endif

namespace cck {

// Calls use(i, item) with item = load(i) for i = first, first + step, ... below end, B indices
// at a time: the B loads first (predicated, so all of them are in flight together), then
// the B uses. A plain strided loop, even unrolled, has one iteration's loads in flight per
// thread: the compiler keeps each load behind the previous iteration's exit test and stores.
// With few warps an SM, that is a fraction of the bytes in flight DRAM needs to stay busy.
template <int B, typename I, typename Load, typename Use>
CCK_HOST_DEVICE inline void batched(I first, I end, I step, Load&& load, Use&& use) {
  for (I i0 = first; i0 < end; i0 += B * step) {
    decltype(load(i0)) items[B];
    CCK_UNROLL
    for (int u = 0; u < B; ++u) {
      if (i0 + u * step < end) items[u] = load(i0 + u * step);
    }
    CCK_UNROLL
    for (int u = 0; u < B; ++u) {
      if (i0 + u * step < end) use(i0 + u * step, items[u]);
    }
  }
}

}  // namespace cck

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cck {

#ifdef __CUDACC_RTC__
using int64_t = long long;  // NVRTC has no <cstdint>
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
// bf16 is the top half of an fp32: a shift, written out because __bfloat162float's inline
// asm kept ptxas from interleaving the conversions with their uses (a GroupNorm kernel
// batching 8 loads took 114 registers with it, 79 without).
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<unsigned int>(__bfloat16_as_ushort(v)) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved together: one 16-byte access (two for 8 floats), or narrower in the scalar
// fallbacks. Aligned to at most 16 bytes: that is all the callers check, and a 32-byte type
// would let the compiler use sm100's 32-byte loads.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// A 16-byte Pack copied from global to shared memory without passing through registers
// (cp.async, sm80+; .cg: cached in L2 only), so a thread can have all its copies in flight at
// once; visible to this thread once commit_copies() closed their group and wait_copies() saw
// it land. Older GPUs copy through registers, one at a time. Both addresses must be 16-byte
// aligned.
template <typename T, int N>
__device__ __forceinline__ void copy_pack_async(T* shared, const T* global) {
  static_assert(sizeof(Pack<T, N>) == 16, "cp.async moves 16-byte packs");
#if __CUDA_ARCH__ >= 800 && !defined(CCK_SIMT)  // CCK_SIMT: tests/cpp/simt.h's CPU emulation
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(global) : "memory");
#else
  store_pack(shared, load_pack<T, N>(global));
#endif
}

// Closes a group of this thread's copy_pack_async copies (those since the last group).
__device__ __forceinline__ void commit_copies() {
#if __CUDA_ARCH__ >= 800 && !defined(CCK_SIMT)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's latest committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
#if __CUDA_ARCH__ >= 800 && !defined(CCK_SIMT)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

}  // namespace cck
#endif  // __CUDACC__
