// GroupNorm (+ fused SiLU) kernels for channels_last tensors (NHWC, NDHWC, ...), seen as
// (N, S, C) with S the flattened spatial size and channels contiguous. Statistics and every
// sum are fp32; x, y, dy, dx are float, __half or __nv_bfloat16; weight and bias are fp32.
//
// Each thread owns VEC consecutive channels (one 16-byte Pack when VEC = 16 / sizeof(T), else
// VEC = 1, the scalar fallback) and walks rows (spatial positions). Block (TX, TY): TX
// threads across channel packs, TY across rows.
//
// forward, single pass (single_pass_kernel), where single_pass_plan finds a tile of which two
//           fit shared memory, with tiles that fill the GPU in at most a few rounds
//           (single_pass_pays; with more, the split passes are faster): a cluster of K blocks
//           (K = 1 except on sm90) stages a whole number of groups (channels) x all S positions
//           of one sample in shared memory (cp.async on sm80+), each block S / K of the positions,
//           reading x once; then fp32 statistics from the staged tiles in one pass (sums of
//           x - shift and its square, shift = a value of the group, as channel_stats), the
//           blocks of a cluster adding their partial sums through distributed shared memory,
//           and y from the tiles, while the cluster's next tile is staged in the other buffer.
//           A persistent grid: as many clusters (K, 1, 1) as the GPU holds, looping over tiles.
// Otherwise every pass splits each sample into K spatial chunks, grid (channel-pack blocks,
// K chunks, N), so that small batches still fill the GPU:
// forward   channel_stats: per (n, chunk, channel) mean and M2 from fp32 sums of (x - shift),
//           shift = the chunk's first value of that channel, so the sums stay O(std) and
//           M2 = S2 - S1^2 / count does not cancel catastrophically (streaming, one read);
//           group_stats: per (n, group) mean and rstd, Chan's parallel merge of the partials;
//           normalize: y = silu?(x * scale_c + shift_c) (x read a second time; the folded
//           shift rounds like the mean itself, and subtracting the mean first spilled).
// backward  backward_partials: per (n, chunk, channel) sums of dz and dz * xhat (z recomputed);
//           backward_group: per (n, group) means of w * dz and w * dz * xhat;
//           backward_affine: dweight, dbias summed over (n, chunk) in a fixed order;
//           backward_dx: dx = rstd * (w * dz - mean(w * dz) - xhat * mean(w * dz * xhat)),
//           plus x's gradient from its other uses where given (prenorm: the skip connection's),
//           added in fp32 before dx is rounded.
// No atomics anywhere: results are bitwise reproducible.
//
// Two parts: the planning of the single-pass forward (plain C++ for host and device, so a CPU
// C++ test checks it) and the kernels (nvcc and NVRTC).
#pragma once

#include "vector.cuh"  // CCK_HOST_DEVICE

namespace cck {
namespace gn {

constexpr int kThreads = 256;   // threads per block in every kernel
constexpr int kMaxCluster = 16;        // blocks per cluster: H100's limit (opted in above 8)
constexpr int kMaxPortableCluster = 8;  // what every sm90 GPU takes without opting in
constexpr int kRowBytes = 128;  // single pass: widen a block's channel run up to a cache line,
// and on while its tile is under kTileBytes: a round of blocks costs 7-10 us whatever their
// tile below ~16 KB (H200, fifth run: 32x1280x8x8, 512 blocks of 80 channels x 64 positions,
// 20 us; 256x1280x8x8, 4096 such blocks, 115 us where the split forward took 69)
constexpr int kTileBytes = 32 * 1024;

CCK_HOST_DEVICE inline int cdiv(int a, int b) { return (a + b - 1) / b; }
CCK_HOST_DEVICE inline int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

// Shared memory of single_pass_kernel (tensors = 1: x) and backward_single_pass_kernel (2: x and
// dy) for a block of `rows` positions x `width` channels (a block of width / vec threads
// across): two tiles of each tensor (each padded to 16 bytes; one is staged while the other is
// used), then the threads' fp32 partial sums (width floats per row of threads), the backward's
// channel sums (2 * width floats), then per group the block's and the cluster's sums (4
// floats). The host sizes the launch with it.
CCK_HOST_DEVICE inline long long single_pass_tile_bytes(int rows, int width, int itemsize) {
  return (static_cast<long long>(rows) * width * itemsize + 15) / 16 * 16;
}
CCK_HOST_DEVICE inline long long single_pass_smem_bytes(int rows, int width, int cpg, int vec, int itemsize,
                                                        int tensors = 1) {
  const int thread_rows = kThreads / (width / vec);
  const int channel_sums = tensors == 2 ? 2 * width : 0;  // the backward's
  return 2 * tensors * single_pass_tile_bytes(rows, width, itemsize) +
         (thread_rows * width + channel_sums + 4 * (width / cpg)) * 4;
}

// The split passes' launch for (N, S, C) in K chunks of packs of vec: blocks of block_x x
// block_y threads, block_x across the C / vec channel packs (split evenly over blocks at most
// 128 threads across), block_y over rows; grid (grid_x, K, N); chunk rows a chunk; row_smem
// bytes of dynamic shared memory for sum_over_rows.
struct SplitLaunch {
  int block_x, block_y, grid_x, chunk;
  long long row_smem;
};
CCK_HOST_DEVICE inline SplitLaunch split_launch(int S, int C, int K, int vec) {
  const int packs = C / vec, tx = cdiv(packs, cdiv(packs, 128)), ty = kThreads / tx > 1 ? kThreads / tx : 1;
  return {tx, ty, cdiv(packs, tx), cdiv(S, K), 2LL * tx * ty * vec * 4};
}

// The per-group kernels (group_stats, backward_group) sum each (n, group)'s K * cpg partials
// with `lanes` threads: a warp where they are few (256x320x32x32: K = 2, 20 partials; a block a
// group spent 14 us of the H200's backward there on 8192 blocks of 30 busy threads, ncu, fifth
// run), the whole block where a warp would walk many (8x640x32x32: K = 64, 1280 partials, one
// latency-bound load after another: the split forward took 50 us there against 33, seventh
// run). Grid (grid_x, N) of kThreads threads, kGroupSmemBytes of dynamic shared memory.
struct GroupLaunch {
  int lanes, grid_x;
};
CCK_HOST_DEVICE inline GroupLaunch group_launch(int K, int C, int G) {
  const int lanes = K * (C / G) > 4 * 32 ? kThreads : 32;
  return {lanes, cdiv(G, kThreads / lanes)};
}
constexpr int kGroupSmemBytes = kThreads / 32 * 4;

#ifndef __CUDACC_RTC__  // host planning: not for NVRTC, which compiles device code only
struct SinglePassPlan {
  int channels;  // per block: whole groups, whole vec packs, dividing C; 0 = use the split forward
  int cluster;   // blocks per cluster, each staging cdiv(S, cluster) positions
};

// The single-pass forward (tensors = 1) or backward (2) of an (N, S, C) tensor with G groups,
// packs of vec elements of itemsize bytes: the smallest cluster (up to max_cluster) whose tile
// buffers fit smem_bytes (what one block may use: half an SM's, so that two blocks share it)
// with N * C / channels * cluster blocks giving every one of sm_count SMs one; the widest
// channel block (up to kRowBytes runs, or kTileBytes tiles where rows are few) while they do.
// Smaller clusters first: fewer cross-block sums, larger runs of rows.
inline SinglePassPlan single_pass_plan(int N, int S, int C, int G, int itemsize, int vec, int sm_count,
                                       int smem_bytes, int max_cluster, int tensors = 1) {
  if (N < 1 || S < 1 || G < 1 || C % G || C % vec) return {0, 0};
  const int cpg = C / G;
  const int unit = cpg / gcd(cpg, vec) * vec;  // lcm: whole groups and whole packs
  for (int cluster = 1; cluster <= max_cluster && cluster <= S; ++cluster) {
    const int rows = cdiv(S, cluster);
    if (cdiv(S, rows) != cluster) continue;  // a block would get no positions
    int best = 0;
    // width <= kThreads: a block also has a thread per channel if the pointers force vec = 1
    for (int width = unit; width <= C && width <= kThreads; width += unit) {
      if (C % width) continue;  // blocks tile C exactly
      if (single_pass_smem_bytes(rows, width, cpg, vec, itemsize, tensors) > smem_bytes) break;  // grows with width
      const bool wide = best * itemsize >= kRowBytes && static_cast<long long>(rows) * best * itemsize >= kTileBytes;
      if (best && (wide || N * (C / width) * cluster < sm_count)) break;
      best = width;
    }
    if (best && N * (C / best) * cluster >= sm_count) return {best, cluster};
  }
  return {0, 0};
}

// Whether `plan` (from single_pass_plan, for `tensors` tensors) beats the split passes: only
// where its blocks take at most kMaxRounds / tensors rounds of two an SM. With more rounds
// each block's short tile costs more than the split passes' second read (seventh run, H200,
// forward: 15.5 rounds at 256x320x32x32 took 200 us against the split's 151, 7.8 at
// 256x1280x8x8 95 against 59, 4.8 at 32x960x32x32 82 against 80, 2.4 at 8x1920x32x32 51
// against 57; backward: 1.9 rounds at 8x2560x16x16 38 against 43, 4.8 at 8x1920x32x32 125
// against 80).
constexpr int kMaxRounds = 4;
inline bool single_pass_pays(int N, int C, SinglePassPlan plan, int sm_count, int tensors = 1) {
  return plan.channels &&
         static_cast<long long>(N) * (C / plan.channels) * plan.cluster <= 2LL * sm_count * kMaxRounds / tensors;
}
#endif  // !__CUDACC_RTC__

}  // namespace gn
}  // namespace cck

#ifdef __CUDACC__
namespace cck {
namespace gn {

// 16-byte loads a thread keeps in flight (batched()): what the streaming loops over rows (and
// single_pass_kernel's scalar staging) issue before they use the first.
// The streaming kernels' launch bounds are the most blocks an SM at which they do so without
// spilling (sm90, CUDA 13): three for the forward's (x, kLoadBatch rows), two for the
// backward's (x and dy, kLoadBatch / 2 rows). Without the bounds ptxas spilled in some
// instantiations, below any register limit.
constexpr int kLoadBatch = 8;

// The block's dynamic shared memory; a CPU emulation (tests/cpp/simt.h) supplies its own.
__device__ __forceinline__ unsigned char* dynamic_shared() {
#ifdef CCK_SIMT
  return reinterpret_cast<unsigned char*>(simt::this_block->smem.data());
#else
  extern __shared__ float4 dynamic_smem[];  // float4: 16-byte aligned for the packs
  return reinterpret_cast<unsigned char*>(dynamic_smem);
#endif
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& pack, float (&out)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

// bf16 pairs a 32-bit word at a time: the low element shifted up, the high one masked in place,
// one integer instruction an element (element by element, ptxas spent a PRMT and often a move
// more on every high element: sm90 SASS of single_pass_kernel).
template <int VEC>
__device__ __forceinline__ void unpack(const Pack<__nv_bfloat16, VEC>& pack, float (&out)[VEC]) {
  if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      unsigned int word;  // memcpy, not a cast of the pointer: that broke strict aliasing (g++ -O3 read stale words)
      memcpy(&word, &pack.v[i], sizeof(word));
      out[i] = __uint_as_float(word << 16);
      out[i + 1] = __uint_as_float(word & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  unpack(load_pack<T, VEC>(p), out);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  store_pack(p, pack);
}

// The rows [s_begin, s_end) of chunk blockIdx.y of sample blockIdx.z, and this thread's
// first channel c0 = VEC * (its channel pack); threads past the last pack are not active.
struct Walk {
  int n, k, c0, s_begin, s_end;
  bool active;
  int64_t sample;  // offset of sample n's first element
};

template <int VEC>
__device__ __forceinline__ Walk walk(int S, int C, int chunk) {
  Walk w;
  w.n = blockIdx.z;
  w.k = blockIdx.y;
  w.c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  w.s_begin = w.k * chunk;
  w.s_end = min(S, w.s_begin + chunk);
  w.active = w.c0 < C;
  w.sample = static_cast<int64_t>(w.n) * S * C;
  return w;
}

// Per-channel fp32 group statistics and affine parameters of the VEC channels from c0 of sample n.
template <int VEC>
struct ChannelParams {
  float mean[VEC], rstd[VEC], w[VEC], b[VEC];
};

template <int VEC>
__device__ __forceinline__ ChannelParams<VEC> channel_params(int n, int c0, const float* weight, const float* bias,
                                                             const float* mean, const float* rstd, int C, int G) {
  ChannelParams<VEC> p;
  const int cpg = C / G;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const int c = c0 + i;
    const int ng = n * G + c / cpg;
    p.mean[i] = mean[ng];
    p.rstd[i] = rstd[ng];
    p.w[i] = weight ? weight[c] : 1.0f;
    p.b[i] = bias ? bias[c] : 0.0f;
  }
  return p;
}

// 1 / (1 + 2^(-z log2 e)) by the SFU's approximate exp2 and reciprocal (2 ulp and 1 ulp), the
// instructions __expf and __fdividef come down to, without __fdividef's range check (which
// scales divisors above 2^126: a compare and two multiplies an element, sm90 SASS, when the
// forward's normalize loop is issue-bound: 31 instructions an element, ncu on an H200) and
// without IEEE division's Newton steps and slow path. For z < -88, 2^(-z log2 e) is inf and the
// result 0, the limit.
__device__ __forceinline__ float sigmoid(float z) {
#ifdef CCK_SIMT
  return 1.0f / (1.0f + exp2f(z * -1.4426950408889634f));
#else
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(z * -1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return r;
#endif
}

// x and dy at one position of this thread's channels, loaded together by batched().
template <typename T, int VEC>
struct XDy {
  Pack<T, VEC> x, dy;
};

// xhat and dL/dz for z = xhat * w + b from x and dy; with SILU, y = z * sigmoid(z) and z is
// recomputed here rather than saved by the forward.
template <typename T, int VEC, bool SILU>
__device__ __forceinline__ void xhat_dz(const XDy<T, VEC>& in, const ChannelParams<VEC>& p, float (&xhat)[VEC],
                                        float (&dz)[VEC]) {
  unpack(in.x, xhat);
  unpack(in.dy, dz);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    xhat[i] = (xhat[i] - p.mean[i]) * p.rstd[i];
    if (SILU) {
      const float z = fmaf(xhat[i], p.w[i], p.b[i]);
      const float s = sigmoid(z);
      dz[i] *= s * fmaf(z, 1.0f - s, 1.0f);
    }
  }
}

// x and dy at element offset `at`: batched()'s load in the backward kernels.
template <typename T, int VEC>
__device__ __forceinline__ XDy<T, VEC> load_x_dy(const T* x, const T* dy, int64_t at) {
  return {load_pack<T, VEC>(x + at), load_pack<T, VEC>(dy + at)};
}

// Sums a and b over threadIdx.y into the threads with threadIdx.y == 0, in a fixed order.
// smem: 2 * blockDim.x * blockDim.y * VEC floats. Every thread of the block must call it.
template <int VEC>
__device__ __forceinline__ void sum_over_rows(float (&a)[VEC], float (&b)[VEC], float* smem) {
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
  float* sb = smem + blockDim.x * blockDim.y * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    smem[slot + i] = a[i];
    sb[slot + i] = b[i];
  }
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int r = 1; r < blockDim.y; ++r) {
    const int other = (r * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      a[i] += smem[other + i];
      b[i] += sb[other + i];
    }
  }
}

// The sum of v over a warp, returned to every lane (fixed order). Every lane must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over the `lanes` threads of a group (group_launch: a warp or the block),
// returned to each of them, in a fixed order. Every one of them must call it; smem holds
// kThreads / 32 floats.
__device__ __forceinline__ float lanes_sum(float v, int lanes, float* smem) {
  v = warp_sum(v);
  if (lanes == 32) return v;
  __syncthreads();  // smem may still be read by a previous call
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < lanes / 32; ++w) total += smem[w];
  return total;
}

// Partials are (N, K, C) fp32 arrays; a group's K * cpg entries are visited as i -> (k, j).
__device__ __forceinline__ int64_t part_index(int n, int K, int C, int g, int cpg, int i) {
  return (static_cast<int64_t>(n) * K + i / cpg) * C + g * cpg + i % cpg;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 3) channel_stats_kernel(
    const T* __restrict__ x,          // (N, S, C)
    float* __restrict__ part_mean,    // (N, K, C) out: chunk mean per channel
    float* __restrict__ part_m2,      // (N, K, C) out: chunk sum of squared deviations
    int S, int C, int chunk) {
  float* smem = reinterpret_cast<float*>(dynamic_shared());
  const Walk wk = walk<VEC>(S, C, chunk);
  float shift[VEC], s1[VEC] = {}, s2[VEC] = {};
  if (wk.active) {
    const T* xc = x + wk.sample + wk.c0;
    load<T, VEC>(xc + static_cast<int64_t>(wk.s_begin) * C, shift);
    batched<kLoadBatch>(
        wk.s_begin + static_cast<int>(threadIdx.y), wk.s_end, static_cast<int>(blockDim.y),
        [&](int s) { return load_pack<T, VEC>(xc + static_cast<int64_t>(s) * C); },
        [&](int, const Pack<T, VEC>& pack) {
          float v[VEC];
          unpack(pack, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float d = v[i] - shift[i];
            s1[i] += d;
            s2[i] = fmaf(d, d, s2[i]);
          }
        });
  }
  sum_over_rows<VEC>(s1, s2, smem);
  if (threadIdx.y != 0 || !wk.active) return;
  const float count = static_cast<float>(wk.s_end - wk.s_begin);
  const int64_t out = (static_cast<int64_t>(wk.n) * gridDim.y + wk.k) * C + wk.c0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float m = s1[i] / count;
    part_mean[out + i] = shift[i] + m;
    part_m2[out + i] = fmaxf(s2[i] - s1[i] * m, 0.0f);
  }
}

__global__ void __launch_bounds__(kThreads) group_stats_kernel(
    const float* __restrict__ part_mean, const float* __restrict__ part_m2,  // (N, K, C)
    float* __restrict__ mean, float* __restrict__ rstd,                      // (N, G) out
    int S, int C, int G, int K, int chunk, float eps, int lanes) {
  float* smem = reinterpret_cast<float*>(dynamic_shared());
  const int g = blockIdx.x * (kThreads / lanes) + threadIdx.x / lanes, n = blockIdx.y, cpg = C / G, parts = K * cpg;
  const int lane = threadIdx.x % lanes;
  if (g >= G) return;  // whole groups of lanes
  const float count_all = static_cast<float>(cpg) * S;
  float acc = 0.0f;
  for (int i = lane; i < parts; i += lanes) {
    const float count = static_cast<float>(min(chunk, S - (i / cpg) * chunk));
    acc = fmaf(count, part_mean[part_index(n, K, C, g, cpg, i)], acc);
  }
  const float mu = lanes_sum(acc, lanes, smem) / count_all;
  acc = 0.0f;
  for (int i = lane; i < parts; i += lanes) {
    const float count = static_cast<float>(min(chunk, S - (i / cpg) * chunk));
    const int64_t at = part_index(n, K, C, g, cpg, i);
    const float d = part_mean[at] - mu;
    acc += part_m2[at] + count * d * d;
  }
  const float var = lanes_sum(acc, lanes, smem) / count_all;
  if (lane == 0) {
    mean[n * G + g] = mu;
    rstd[n * G + g] = rsqrtf(var + eps);
  }
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads, 3) normalize_kernel(
    const T* __restrict__ x, T* __restrict__ y,                          // (N, S, C)
    const float* __restrict__ weight, const float* __restrict__ bias,    // (C,) or null
    const float* __restrict__ mean, const float* __restrict__ rstd,      // (N, G)
    int S, int C, int G, int chunk) {
  const Walk wk = walk<VEC>(S, C, chunk);
  if (!wk.active) return;
  const ChannelParams<VEC> p = channel_params<VEC>(wk.n, wk.c0, weight, bias, mean, rstd, C, G);
  float scale[VEC], shift[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    scale[i] = p.rstd[i] * p.w[i];
    shift[i] = p.b[i] - p.mean[i] * scale[i];
  }
  const int64_t base = wk.sample + wk.c0;
  batched<kLoadBatch>(
      wk.s_begin + static_cast<int>(threadIdx.y), wk.s_end, static_cast<int>(blockDim.y),
      [&](int s) { return load_pack<T, VEC>(x + base + static_cast<int64_t>(s) * C); },
      [&](int s, const Pack<T, VEC>& pack) {
        float v[VEC];
        unpack(pack, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float z = fmaf(v[i], scale[i], shift[i]);
          v[i] = SILU ? z * sigmoid(z) : z;
        }
        store<T, VEC>(y + base + static_cast<int64_t>(s) * C, v);
      });
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads, 2) backward_partials_kernel(
    const T* __restrict__ dy, const T* __restrict__ x,                   // (N, S, C)
    const float* __restrict__ weight, const float* __restrict__ bias,    // (C,) or null
    const float* __restrict__ mean, const float* __restrict__ rstd,      // (N, G)
    float* __restrict__ part_dz, float* __restrict__ part_dz_xhat,       // (N, K, C) out
    int S, int C, int G, int chunk) {
  float* smem = reinterpret_cast<float*>(dynamic_shared());
  const Walk wk = walk<VEC>(S, C, chunk);
  float sum_dz[VEC] = {}, sum_dz_xhat[VEC] = {};
  if (wk.active) {
    const ChannelParams<VEC> p = channel_params<VEC>(wk.n, wk.c0, weight, bias, mean, rstd, C, G);
    const int64_t base = wk.sample + wk.c0;
    batched<kLoadBatch / 2>(
        wk.s_begin + static_cast<int>(threadIdx.y), wk.s_end, static_cast<int>(blockDim.y),
        [&](int s) { return load_x_dy<T, VEC>(x, dy, base + static_cast<int64_t>(s) * C); },
        [&](int, const XDy<T, VEC>& in) {
          float xhat[VEC], dz[VEC];
          xhat_dz<T, VEC, SILU>(in, p, xhat, dz);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            sum_dz[i] += dz[i];
            sum_dz_xhat[i] = fmaf(dz[i], xhat[i], sum_dz_xhat[i]);
          }
        });
  }
  sum_over_rows<VEC>(sum_dz, sum_dz_xhat, smem);
  if (threadIdx.y != 0 || !wk.active) return;
  const int64_t out = (static_cast<int64_t>(wk.n) * gridDim.y + wk.k) * C + wk.c0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    part_dz[out + i] = sum_dz[i];
    part_dz_xhat[out + i] = sum_dz_xhat[i];
  }
}

__global__ void __launch_bounds__(kThreads) backward_group_kernel(
    const float* __restrict__ part_dz, const float* __restrict__ part_dz_xhat,  // (N, K, C)
    const float* __restrict__ weight,                                          // (C,) or null
    float* __restrict__ coef_dz, float* __restrict__ coef_xhat,                // (N, G) out
    int S, int C, int G, int K, int lanes) {
  float* smem = reinterpret_cast<float*>(dynamic_shared());
  const int g = blockIdx.x * (kThreads / lanes) + threadIdx.x / lanes, n = blockIdx.y, cpg = C / G, parts = K * cpg;
  const int lane = threadIdx.x % lanes;
  if (g >= G) return;  // whole groups of lanes
  float acc_dz = 0.0f, acc_xhat = 0.0f;
  for (int i = lane; i < parts; i += lanes) {
    const float w = weight ? weight[g * cpg + i % cpg] : 1.0f;
    const int64_t at = part_index(n, K, C, g, cpg, i);
    acc_dz = fmaf(w, part_dz[at], acc_dz);
    acc_xhat = fmaf(w, part_dz_xhat[at], acc_xhat);
  }
  const float count_all = static_cast<float>(cpg) * S;
  const float dz = lanes_sum(acc_dz, lanes, smem) / count_all;
  const float xhat = lanes_sum(acc_xhat, lanes, smem) / count_all;
  if (lane == 0) {
    coef_dz[n * G + g] = dz;
    coef_xhat[n * G + g] = xhat;
  }
}

// A block of kAffineChannels channels x (kThreads / kAffineChannels) row lanes, each lane
// summing every lanes-th row with kLoadBatch rows in flight, then the lanes in a fixed order.
// The walk is latency-bound: one thread per channel walking all N * K rows (2 blocks for 320
// channels) took 59 us under ncu on an H200 at 32x320x32x32, 32 channels x 8 lanes (10 blocks)
// 16 us at 256x320x32x32 (768 rows, 96 a lane); 8 x 32 gives 40 blocks, 24 rows a lane.
constexpr int kAffineChannels = 8;
constexpr int kAffineSmemBytes = 2 * kThreads * sizeof(float);  // its launch's dynamic shared memory

__global__ void __launch_bounds__(kThreads) backward_affine_kernel(
    const float* __restrict__ part_dz, const float* __restrict__ part_dz_xhat,  // (rows, C)
    float* __restrict__ dweight, float* __restrict__ dbias,                    // (C,) out, or null
    int rows, int C) {
  float* smem = reinterpret_cast<float*>(dynamic_shared());  // kAffineSmemBytes
  const int c = blockIdx.x * kAffineChannels + threadIdx.x;
  float dw[1] = {0.0f}, db[1] = {0.0f};
  if (c < C) {
    batched<kLoadBatch>(
        static_cast<int>(threadIdx.y), rows, static_cast<int>(blockDim.y),
        [&](int r) {
          const int64_t at = static_cast<int64_t>(r) * C + c;
          return make_float2(part_dz_xhat[at], part_dz[at]);
        },
        [&](int, const float2& v) {
          dw[0] += v.x;
          db[0] += v.y;
        });
  }
  sum_over_rows<1>(dw, db, smem);
  if (threadIdx.y != 0 || c >= C) return;
  if (dweight) dweight[c] = dw[0];
  if (dbias) dbias[c] = db[0];
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads, 2) backward_dx_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,     // (N, S, C)
    const float* __restrict__ weight, const float* __restrict__ bias,          // (C,) or null
    const float* __restrict__ mean, const float* __restrict__ rstd,            // (N, G)
    const float* __restrict__ coef_dz, const float* __restrict__ coef_xhat,    // (N, G)
    const T* __restrict__ addend,  // (N, S, C) or null: added to dx (prenorm: x's gradient from the skip)
    int S, int C, int G, int chunk) {
  const Walk wk = walk<VEC>(S, C, chunk);
  if (!wk.active) return;
  const ChannelParams<VEC> p = channel_params<VEC>(wk.n, wk.c0, weight, bias, mean, rstd, C, G);
  float c_dz[VEC], c_xhat[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const int ng = wk.n * G + (wk.c0 + i) / (C / G);
    c_dz[i] = coef_dz[ng];
    c_xhat[i] = coef_xhat[ng];
  }
  const int64_t base = wk.sample + wk.c0;
  batched<kLoadBatch / 2>(
      wk.s_begin + static_cast<int>(threadIdx.y), wk.s_end, static_cast<int>(blockDim.y),
      [&](int s) { return load_x_dy<T, VEC>(x, dy, base + static_cast<int64_t>(s) * C); },
      [&](int s, const XDy<T, VEC>& in) {
        float xhat[VEC], dz[VEC], a[VEC] = {};
        // loaded here, not with x and dy: in flight with them, sm80's fp16 SiLU instance spilled
        if (addend) load<T, VEC>(addend + base + static_cast<int64_t>(s) * C, a);
        xhat_dz<T, VEC, SILU>(in, p, xhat, dz);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          dz[i] = p.rstd[i] * (p.w[i] * dz[i] - c_dz[i] - xhat[i] * c_xhat[i]);
          if (addend) dz[i] += a[i];
        }
        store<T, VEC>(dx + base + static_cast<int64_t>(s) * C, dz);
      });
}

// Sums every thread's acc (partials of its VEC channels) over the rows and over each group's
// channels into out[j], j < width / cpg, in a fixed order: a warp a group, its lanes over the
// rows, then warp_sum. (Halving the rows in shared memory took 7 barriers and ~3 instructions
// an element of the forward at 256x320x32x32: 51 rows of 5 threads, sm90 SASS.) Every thread
// must call it; scratch: blockDim.y * width floats. out is visible to all threads on return.
template <int VEC>
__device__ __forceinline__ void sum_over_groups(const float (&acc)[VEC], float* scratch, float* out, int width,
                                                int cpg) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) scratch[threadIdx.y * width + threadIdx.x * VEC + i] = acc[i];
  __syncthreads();
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, lane = tid % 32;
  const int warps = blockDim.x * blockDim.y / 32;  // whole warps only: warp_sum needs every lane
  if (tid / 32 < warps) {
    for (int j = tid / 32; j < width / cpg; j += warps) {
      float sum = 0.0f;
      for (int r = lane; r < blockDim.y; r += 32) {
        const float* row = scratch + r * width + j * cpg;
        for (int c = 0; c < cpg; ++c) sum += row[c];
      }
      sum = warp_sum(sum);
      if (lane == 0) out[j] = sum;
    }
  }
  __syncthreads();
}

// Thread block clusters (sm90): the blocks of a cluster read each other's shared memory. Code
// built for an older architecture has none, and its host never launches a cluster of more
// than one block (group_norm_nhwc_max_cluster checks the kernel's PTX version).
__device__ __forceinline__ int cluster_blocks() {
#if __CUDA_ARCH__ >= 900
  return static_cast<int>(__clusterSizeInBlocks());
#else
  return 1;
#endif
}
__device__ __forceinline__ int cluster_rank() {
#if __CUDA_ARCH__ >= 900
  return static_cast<int>(__clusterRelativeBlockRank());
#else
  return 0;
#endif
}
// Barrier of every thread of the cluster; arrive releases this block's shared-memory writes,
// wait acquires the others'. Split so that independent work can run in between.
__device__ __forceinline__ void cluster_arrive() {
#if __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if __CUDA_ARCH__ >= 900
  __cluster_barrier_wait();
#endif
}
// p, a shared-memory address of this block, in block `rank` of the cluster.
template <typename V>
__device__ __forceinline__ const V* cluster_shared(const V* p, int rank) {
#if __CUDA_ARCH__ >= 900
  return static_cast<const V*>(__cluster_map_shared_rank(const_cast<V*>(p), rank));
#else
  return p;
#endif
}

// total[j] = sum over the K blocks of the cluster of their part[j], j < groups, added in rank
// order (block `rank` reads its own), so every block gets the same bits. Every thread of the
// cluster must call it after writing part; total is visible to all threads of the block on
// return. With K > 1 the caller must keep part unchanged, and the block alive, until the
// cluster's next barrier.
__device__ __forceinline__ void sum_over_cluster(const float* part, float* total, int groups, int K, int rank) {
  if (K > 1) {
    cluster_arrive();
    cluster_wait();
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
  for (int j = tid; j < groups; j += threads) {
    float sum = 0.0f;
    for (int r = 0; r < K; ++r) sum += (r == rank ? part : cluster_shared(part, r))[j];
    total[j] = sum;
  }
  __syncthreads();
}

// The single-pass kernels' tiles. A persistent grid of clusters of K blocks, each cluster
// taking tiles one after the other (Tiles::for_each) of the N * C / width tiles: tile t is
// channels [c0, c0 + width) of sample n, c0 = (t % (C / width)) * width, n = t / (C / width),
// width = blockDim.x * VEC a multiple of cpg; block rank r of the cluster stages positions
// [r * rows, min(S, (r + 1) * rows)) of each of its `tensors` inputs, rows = cdiv(S, K). Thread
// (tx, ty) owns pack column tx at rows ty, ty + blockDim.y, ... and only ever reads back the
// tile cells it wrote, so the tiles need no barrier. Two buffers a tensor: the next tile's copies
// fly while this one is used. One tile a block at a time left DRAM idle while blocks computed:
// in the fifth run's counters (ncu, H200, the forward at 256x320x32x32, one tile a block) DRAM
// was busy 42% and issue 53%, as if loading and computing took turns. 16-byte packs reach the
// tiles by copy_pack_async, all of a thread's rows of a tile in flight together; the scalar
// fallback goes through registers (no overlap).
// Dynamic shared memory: single_pass_smem_bytes(rows, width, cpg, VEC, sizeof(T), tensors): the
// tiles (tensor k's buffer b at index 2 * k + b), then the kernel's fp32 scratch.
template <typename T, int VEC>
struct Tiles {
  int K, rank, s_begin, s_end, first;  // cluster, rows of this block, this thread's first row
  int cpg, width, groups, col, blocks_c, tiles, S, C;
  int buffer_step, tile_step;  // elements between buffers, between a thread's rows in a buffer
  int64_t x_step;              // elements between a thread's rows in a tensor
  T* buffer;                   // buffer 0 at this thread's column
  float* scratch;              // past the buffers

  __device__ Tiles(int N, int S_, int C_, int G, int tensors, unsigned char* smem) : S(S_), C(C_) {
    K = cluster_blocks();
    rank = cluster_rank();
    const int rows = cdiv(S, K);
    s_begin = rank * rows;
    s_end = min(S, s_begin + rows);
    first = s_begin + threadIdx.y;
    cpg = C / G;
    width = blockDim.x * VEC;
    groups = width / cpg;
    col = threadIdx.x * VEC;
    blocks_c = C / width;
    tiles = N * blocks_c;
    const long long tile_bytes = single_pass_tile_bytes(rows, width, sizeof(T));  // a multiple of 16
    buffer_step = static_cast<int>(tile_bytes / sizeof(T));
    tile_step = blockDim.y * width;
    x_step = static_cast<int64_t>(blockDim.y) * C;
    buffer = reinterpret_cast<T*>(smem) + col;
    scratch = reinterpret_cast<float*>(smem + 2 * tensors * tile_bytes);
  }
  __device__ int sample(int t) const { return t / blocks_c; }
  __device__ int channel0(int t) const { return (t % blocks_c) * width; }
  // element offset of this thread's first row of tile t in a (N, S, C) tensor
  __device__ int64_t origin(int t) const {
    return static_cast<int64_t>(sample(t)) * S * C + static_cast<int64_t>(first) * C + channel0(t) + col;
  }
  __device__ T* tile(int tensor, int b) const { return buffer + (2 * tensor + b) * buffer_step; }
  // this thread's rows of tile t of `tensor` (its pointer) into buffer b; the caller commits
  __device__ void stage(const T* tensor_ptr, int tensor, int t, int b) const {
    const T* from = tensor_ptr + origin(t);
    T* to = tile(tensor, b) + (first - s_begin) * width;
    if constexpr (sizeof(Pack<T, VEC>) == 16) {  // what cp.async moves
      // pointers stepped, not recomputed: the 64-bit index math took 12 of the loop's 17
      // instructions (sm90 SASS)
      for (int s = first; s < s_end; s += blockDim.y, from += x_step, to += tile_step) copy_pack_async<T, VEC>(to, from);
    } else {  // kLoadBatch rows in flight, through registers
      batched<kLoadBatch>(
          0, cdiv(s_end - first, static_cast<int>(blockDim.y)), 1,
          [&](int r) { return load_pack<T, VEC>(from + r * x_step); },
          [&](int r, const Pack<T, VEC>& pack) { store_pack(to + r * tile_step, pack); });
    }
  }
  // Runs use(t, b) for this cluster's tiles (blockIdx.x / K, + gridDim.x / K, ...), tile t staged
  // in buffer b by stage_all(t, b) (all the kernel's tensors), the next tile's copies in flight
  // meanwhile. Dealt out in advance, not taken from a counter: the counter's zeroing and its
  // hand-off through the cluster added 5-12 us to each small launch (seventh run, H200), and
  // every block of a cluster takes the same tiles, so the barrier that ends each use() is the
  // last one any block waits for.
  template <typename StageAll, typename Use>
  __device__ void for_each(StageAll&& stage_all, Use&& use) const {
    const int clusters = gridDim.x / K;
    int t = blockIdx.x / K;
    if (t < tiles) {
      stage_all(t, 0);
      commit_copies();
    }
    for (int b = 0; t < tiles; t += clusters, b ^= 1) {
      if (t + clusters < tiles) {
        stage_all(t + clusters, b ^ 1);
        commit_copies();
        wait_copies<1>();  // this tile's copies, not the next one's
      } else {
        wait_copies<0>();
      }
      use(t, b);
    }
  }
};

// Launch bounds for 2 blocks an SM, as the plan's shared memory budget (half an SM's) allows: at
// 3 (80 registers) ptxas spilled the forward's loop state (sm90).
// The statistics take one pass over the tile, sums of x - shift and of its square with shift
// = the group's first value (position 0 of its first channel, the same in every block of the
// cluster), so that the sums stay O(std) and var = E[d^2] - E[d]^2 does not cancel, as in
// channel_stats. The fifth run's counters found this kernel issue-bound too (31 instructions
// an element): a second pass for squared deviations from the mean cost ~4.7 of them, and a
// second round of block and cluster sums.
template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads, 2) single_pass_kernel(
    const T* __restrict__ x, T* __restrict__ y,                          // (N, S, C)
    const float* __restrict__ weight, const float* __restrict__ bias,    // (C,) or null
    float* __restrict__ mean, float* __restrict__ rstd,                  // (N, G) out
    int N, int S, int C, int G, float eps) {
  const Tiles<T, VEC> tl(N, S, C, G, 1, dynamic_shared());
  const int K = tl.K, rank = tl.rank, first = tl.first, s_begin = tl.s_begin, s_end = tl.s_end;
  const int cpg = tl.cpg, width = tl.width, groups = tl.groups, col = tl.col;
  // per group: this block's sums of d and d^2, then the cluster's
  float* scratch = tl.scratch;
  float* part = scratch + blockDim.y * width;
  float* total = part + 2 * groups;
  tl.for_each([&](int t, int b) { tl.stage(x, 0, t, b); }, [&](int t, int b) {
    const T* tile = tl.tile(0, b);
    const int n = tl.sample(t), c0 = tl.channel0(t);
    const int64_t sample = static_cast<int64_t>(n) * S * C;
    float shift[VEC], s1[VEC] = {}, s2[VEC] = {};
#pragma unroll
    for (int i = 0; i < VEC; ++i) shift[i] = to_float(x[sample + (c0 + col + i) / cpg * cpg]);
#pragma unroll 4
    for (int s = first; s < s_end; s += blockDim.y) {
      float v[VEC];
      load<T, VEC>(tile + (s - s_begin) * width, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[i] - shift[i];
        s1[i] += d;
        s2[i] = fmaf(d, d, s2[i]);
      }
    }
    sum_over_groups<VEC>(s1, scratch, part, width, cpg);
    sum_over_groups<VEC>(s2, scratch, part + groups, width, cpg);
    sum_over_cluster(part, total, 2 * groups, K, rank);
    if (K > 1) cluster_arrive();  // done reading the others' parts
    const float count = static_cast<float>(cpg) * S;
    // Group g's variance from the totals: E[d^2] - E[d]^2, whose relative rounding error grows
    // with E[d^2] / var = 1 + E[d]^2 / var (a shift 6 std from the mean: 1.4e-5 in rstd, a
    // float32 model of these sums against fp64). Where that exceeds kMaxCancel for a group of
    // the tile, a second pass over it sums the squared deviations from the mean instead (the
    // same branch in every block of a cluster: they hold the same totals).
    constexpr float kMaxCancel = 8.0f;
    bool refined = false;
    const auto variance = [&](int g) {
      const float d = total[g] / count, e2 = total[groups + g] / count;
      return refined ? e2 : fmaxf(e2 - d * d, 0.0f);
    };
    bool cancels = false;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = total[(col + i) / cpg] / count;
      cancels |= d * d > (kMaxCancel - 1.0f) * variance((col + i) / cpg);
    }
    if (__syncthreads_or(cancels)) {
      if (K > 1) cluster_wait();  // every block done reading this one's parts, which change now
      float mu[VEC], m2[VEC] = {};
#pragma unroll
      for (int i = 0; i < VEC; ++i) mu[i] = shift[i] + total[(col + i) / cpg] / count;
#pragma unroll 4
      for (int s = first; s < s_end; s += blockDim.y) {
        float v[VEC];
        load<T, VEC>(tile + (s - s_begin) * width, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) m2[i] = fmaf(v[i] - mu[i], v[i] - mu[i], m2[i]);
      }
      sum_over_groups<VEC>(m2, scratch, part + groups, width, cpg);
      sum_over_cluster(part + groups, total + groups, groups, K, rank);
      if (K > 1) cluster_arrive();
      refined = true;
    }
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    if (rank == 0 && tid < groups) {
      mean[n * G + c0 / cpg + tid] = to_float(x[sample + c0 + tid * cpg]) + total[tid] / count;
      rstd[n * G + c0 / cpg + tid] = rsqrtf(variance(tid) + eps);
    }
    // y = silu?(x * scale + offset): the mean folded into the offset, as normalize_kernel does
    float scale[VEC], offset[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int c = c0 + col + i, g = (col + i) / cpg;
      scale[i] = rsqrtf(variance(g) + eps) * (weight ? weight[c] : 1.0f);
      offset[i] = (bias ? bias[c] : 0.0f) - (shift[i] + total[g] / count) * scale[i];
    }
    T* out = y + tl.origin(t);
#pragma unroll 4
    for (int s = first; s < s_end; s += blockDim.y, out += tl.x_step) {
      float v[VEC];
      load<T, VEC>(tile + (s - s_begin) * width, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float z = fmaf(v[i], scale[i], offset[i]);
        v[i] = SILU ? z * sigmoid(z) : z;
      }
      store<T, VEC>(out, v);
    }
    if (K > 1) cluster_wait();  // every block done reading this one's parts before the next tile's
  });
}

// The backward in one read of x and dy: tiles of both (Tiles, tensors 0 and 1), then per
// channel the block's sums of dz and dz * xhat over its rows (part_dz, part_dz_xhat at row
// n * K + rank: backward_affine sums them into dbias and dweight), per group their weighted
// sums over the cluster (backward_group's coefficients), and dx from the tiles, where the
// split backward reads x and dy twice (backward_partials, backward_dx). Shared memory past the
// tiles: blockDim.y * width floats of row partials, 2 * width of channel sums, 4 per group.
template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads, 2) backward_single_pass_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,  // (N, S, C)
    const T* __restrict__ addend,                                           // (N, S, C) or null: added to dx
    const float* __restrict__ weight, const float* __restrict__ bias,       // (C,) or null
    const float* __restrict__ mean, const float* __restrict__ rstd,         // (N, G)
    float* __restrict__ part_dz, float* __restrict__ part_dz_xhat,          // (N, K, C) out
    int N, int S, int C, int G) {
  const Tiles<T, VEC> tl(N, S, C, G, 2, dynamic_shared());
  const int K = tl.K, rank = tl.rank, first = tl.first, s_begin = tl.s_begin, s_end = tl.s_end;
  const int cpg = tl.cpg, width = tl.width, groups = tl.groups, col = tl.col;
  float* scratch = tl.scratch;
  float* channel_sums = scratch + blockDim.y * width;  // dz, then dz * xhat: width each
  float* part = channel_sums + 2 * width;               // per group: w-weighted sums of both
  float* total = part + 2 * groups;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const auto stage_all = [&](int t, int b) {
    tl.stage(x, 0, t, b);
    tl.stage(dy, 1, t, b);
  };
  tl.for_each(stage_all, [&](int t, int b) {
    const T* x_tile = tl.tile(0, b) + (first - s_begin) * width;
    const T* dy_tile = tl.tile(1, b) + (first - s_begin) * width;
    const int n = tl.sample(t), c0 = tl.channel0(t);
    const ChannelParams<VEC> p = channel_params<VEC>(n, c0 + col, weight, bias, mean, rstd, C, G);
    const auto tile_row = [&](int r) {  // this thread's r-th row of both tiles
      return XDy<T, VEC>{load_pack<T, VEC>(x_tile + r * tl.tile_step), load_pack<T, VEC>(dy_tile + r * tl.tile_step)};
    };
    const int my_rows = cdiv(s_end - first, static_cast<int>(blockDim.y));
    float sum_dz[VEC] = {}, sum_dz_xhat[VEC] = {};
#pragma unroll 1
    for (int r = 0; r < my_rows; ++r) {
      float xhat[VEC], dz[VEC];
      xhat_dz<T, VEC, SILU>(tile_row(r), p, xhat, dz);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sum_dz[i] += dz[i];
        sum_dz_xhat[i] = fmaf(dz[i], xhat[i], sum_dz_xhat[i]);
      }
    }
    // per channel over the rows (groups of one channel), in a fixed order: dbias's and
    // dweight's partials, this block's row of them
    sum_over_groups<VEC>(sum_dz, scratch, channel_sums, width, 1);
    sum_over_groups<VEC>(sum_dz_xhat, scratch, channel_sums + width, width, 1);
    const int64_t part_row = (static_cast<int64_t>(n) * K + rank) * C + c0;
    for (int j = tid; j < width; j += blockDim.x * blockDim.y) {
      part_dz[part_row + j] = channel_sums[j];
      part_dz_xhat[part_row + j] = channel_sums[width + j];
    }
    // per group, weighted by w: a warp a group, then the cluster's
    const int lane = tid % 32, warps = blockDim.x * blockDim.y / 32;
    if (tid / 32 < warps) {
      for (int j = tid / 32; j < groups; j += warps) {
        float a = 0.0f, bsum = 0.0f;
        for (int c = lane; c < cpg; c += 32) {
          const float w = weight ? weight[c0 + j * cpg + c] : 1.0f;
          a = fmaf(w, channel_sums[j * cpg + c], a);
          bsum = fmaf(w, channel_sums[width + j * cpg + c], bsum);
        }
        a = warp_sum(a);
        bsum = warp_sum(bsum);
        if (lane == 0) {
          part[j] = a;
          part[groups + j] = bsum;
        }
      }
    }
    __syncthreads();
    sum_over_cluster(part, total, 2 * groups, K, rank);
    if (K > 1) cluster_arrive();  // done reading the others' parts
    const float count = static_cast<float>(cpg) * S;
    float c_dz[VEC], c_xhat[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      c_dz[i] = total[(col + i) / cpg] / count;
      c_xhat[i] = total[groups + (col + i) / cpg] / count;
    }
    const int64_t at = tl.origin(t);
    T* out = dx + at;
    const T* add = addend ? addend + at : nullptr;
#pragma unroll 1  // both loops: unrolled twice, ptxas spilled (sm80, sm90; fp16 with SiLU)
    for (int r = 0; r < my_rows; ++r) {
      float xhat[VEC], dz[VEC], a[VEC] = {};
      if (add) load<T, VEC>(add + r * tl.x_step, a);
      xhat_dz<T, VEC, SILU>(tile_row(r), p, xhat, dz);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dz[i] = p.rstd[i] * (p.w[i] * dz[i] - c_dz[i] - xhat[i] * c_xhat[i]);
        if (add) dz[i] += a[i];
      }
      store<T, VEC>(out + r * tl.x_step, dz);
    }
    if (K > 1) cluster_wait();  // every block done reading this one's parts before the next tile's
  });
}

}  // namespace gn
}  // namespace cck

#endif  // __CUDACC__
