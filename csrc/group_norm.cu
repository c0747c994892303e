// Host launchers of the channels_last GroupNorm (+ SiLU) kernels: pick the element type, the
// vector width (16-byte packs when C and the pointers allow, else scalar) and the SiLU flag,
// then launch the passes described in group_norm.cuh on the caller's stream. The forward is
// one pass where gn::single_pass_plan finds a tile that fits, else split.
#include "group_norm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <type_traits>
#include <vector>

#include "group_norm.cuh"

namespace cck {

namespace {

using gn::cdiv;
using gn::kThreads;

// The split passes' grid aims at this many blocks an SM, at most: two whole rounds of resident
// blocks for the forward's streaming kernels (3 an SM) and three for the backward's (2). K
// rounds down, so the grid never spills a few blocks into one more round: rounding up gave 800
// blocks for 792 slots at batch 32, C = 320 on 132 SMs, a 4th round of 8 blocks in the
// backward (an audit's reading; not yet timed).
constexpr int kBlocksPerSM = 6;
constexpr int kMinRowsPerThread = 4;  // fewer and the partial sums cost more than they save

int itemsize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The vector width the launchers use when the pointers are 16-byte aligned (else 1).
int pack_width(int C, DType dtype) {
  const int pack = 16 / itemsize(dtype);
  return C % pack == 0 ? pack : 1;
}

struct Launch {
  dim3 grid, block;
  int chunk;        // rows per chunk
  size_t row_smem;  // shared memory of sum_over_rows
};

Launch launch_shape(int N, int S, int C, int K, int vec) {
  const gn::SplitLaunch l = gn::split_launch(S, C, K, vec);
  return {dim3(l.grid_x, K, N), dim3(l.block_x, l.block_y), l.chunk, static_cast<size_t>(l.row_smem)};
}

bool valid(int N, int S, int C, int G, int K) {
  return N >= 1 && N <= 65535 && S >= 1 && G >= 1 && C % G == 0 && K >= 1 && K <= 65535 &&
         cdiv(S, cdiv(S, K)) == K;  // every chunk non-empty, as group_norm_nhwc_chunks gives
}

template <typename T>
bool packs_fit(int C, std::initializer_list<const void*> pointers) {
  if (C % (16 / sizeof(T))) return false;
  for (const void* p : pointers) {
    if (p && reinterpret_cast<std::uintptr_t>(p) % 16) return false;
  }
  return true;
}

template <int V>
using Vec = std::integral_constant<int, V>;
template <bool B>
using Silu = std::integral_constant<bool, B>;

// Calls f(T{}, Vec<VEC>{}, Silu<SILU>{}) for the runtime element type, vector width and flag.
template <typename T, typename F>
cudaError_t with_type(int C, std::initializer_list<const void*> pointers, bool silu, F& f) {
  constexpr int kPack = 16 / sizeof(T);
  if (packs_fit<T>(C, pointers)) return silu ? f(T{}, Vec<kPack>{}, Silu<true>{}) : f(T{}, Vec<kPack>{}, Silu<false>{});
  return silu ? f(T{}, Vec<1>{}, Silu<true>{}) : f(T{}, Vec<1>{}, Silu<false>{});
}

template <typename F>
cudaError_t dispatch(DType dtype, int C, std::initializer_list<const void*> pointers, bool silu, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return with_type<float>(C, pointers, silu, f);
    case DType::kFloat16:
      return with_type<__half>(C, pointers, silu, f);
    case DType::kBFloat16:
      return with_type<__nv_bfloat16>(C, pointers, silu, f);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int group_norm_nhwc_chunks(int N, int S, int C, DType dtype, int sm_count) {
  const gn::SplitLaunch l = gn::split_launch(S, C, 1, pack_width(C, dtype));
  const int blocks_per_chunk = std::max(1, N * l.grid_x);
  const int most = std::max(1, std::min(65535, S / (kMinRowsPerThread * l.block_y)));
  const int K = std::min(most, std::max(1, kBlocksPerSM * sm_count / blocks_per_chunk));
  return cdiv(S, cdiv(S, K));
}

cudaError_t group_norm_nhwc_forward(const void* x, const float* weight, const float* bias, void* y,
                                    float* mean, float* rstd, float* part_a, float* part_b,
                                    int N, int S, int C, int G, int K, float eps, bool silu,
                                    DType dtype, cudaStream_t stream) {
  if (!valid(N, S, C, G, K)) return cudaErrorInvalidValue;
  return dispatch(dtype, C, {x, y}, silu, [&](auto type, auto vec, auto act) {
    using T = decltype(type);
    constexpr int VEC = decltype(vec)::value;
    const Launch l = launch_shape(N, S, C, K, VEC);
    gn::channel_stats_kernel<T, VEC><<<l.grid, l.block, l.row_smem, stream>>>(
        static_cast<const T*>(x), part_a, part_b, S, C, l.chunk);
    const gn::GroupLaunch gl = gn::group_launch(K, C, G);
    gn::group_stats_kernel<<<dim3(gl.grid_x, N), kThreads, gn::kGroupSmemBytes, stream>>>(
        part_a, part_b, mean, rstd, S, C, G, K, l.chunk, eps, gl.lanes);
    gn::normalize_kernel<T, VEC, decltype(act)::value><<<l.grid, l.block, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), weight, bias, mean, rstd, S, C, G, l.chunk);
    return cudaGetLastError();
  });
}

gn::SinglePassPlan group_norm_nhwc_single_pass_plan(int N, int S, int C, int G, DType dtype, int sm_count,
                                                    int smem_bytes, int max_cluster, bool backward) {
  const int tensors = backward ? 2 : 1;
  const gn::SinglePassPlan plan = gn::single_pass_plan(N, S, C, G, itemsize(dtype), pack_width(C, dtype), sm_count,
                                                       smem_bytes, max_cluster, tensors);
  return gn::single_pass_pays(N, C, plan, sm_count, tensors) ? plan : gn::SinglePassPlan{0, 0};
}

namespace {

// A launch of single_pass_kernel in clusters of `cluster` blocks (no cluster attribute for one
// block: older GPUs have none); `attr` holds the attribute the config points to.
cudaLaunchConfig_t cluster_launch(dim3 grid, dim3 block, long long smem, cudaStream_t stream, int cluster,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

// How many clusters of `config` (blockDim, dynamic shared memory, `cluster` blocks) of
// `kernel` the current device holds at once; 0 if the query fails. Asked once per device,
// kernel, block, shared memory size and cluster: the single passes ask on every launch.
int resident_clusters(const void* kernel, const cudaLaunchConfig_t& config, int cluster) {
  struct Known {
    int device;
    const void* kernel;
    unsigned threads;
    size_t smem;
    int cluster, clusters;
  };
  const unsigned threads = config.blockDim.x * config.blockDim.y * config.blockDim.z;
  static std::mutex lock;
  static std::vector<Known> known;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const std::lock_guard<std::mutex> guard(lock);
  for (const Known& k : known) {
    if (k.device == device && k.kernel == kernel && k.threads == threads && k.smem == config.dynamicSmemBytes &&
        k.cluster == cluster) {
      return k.clusters;
    }
  }
  int clusters = 0, per_sm = 0, sms = 0;
  if (cluster > 1) {  // clusters are placed GPC by GPC: the driver counts them
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) clusters = 0;
  } else if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(threads),
                                                           config.dynamicSmemBytes) == cudaSuccess &&
             cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess) {
    clusters = per_sm * sms;
  }
  cudaGetLastError();  // a failed query only means no persistent grid
  known.push_back({device, kernel, threads, config.dynamicSmemBytes, cluster, clusters});
  return clusters;
}

}  // namespace

int group_norm_nhwc_max_cluster(int smem_bytes) {
  // Per device, asked once: its answer does not change within a process.
  static std::atomic<int> known[64];  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return 1;
  }
  if (const int most = known[device].load()) return most;
  int most = 1;
  const auto kernel = gn::single_pass_kernel<float, 4, false>;  // every instantiation fits 2 blocks an SM
  cudaFuncAttributes attr;
  // ptxVersion < 90: the driver JIT-compiled PTX of an older architecture, whose code path has no clusters
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) == cudaSuccess &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
    // the largest cluster of such blocks the GPU can place (fewer SMs a GPC, e.g. under MIG, place less)
    for (int cluster = gn::kMaxCluster; cluster > 1 && most == 1; --cluster) {
      cudaLaunchAttribute cluster_attr;
      const cudaLaunchConfig_t config = cluster_launch(dim3(cluster), dim3(kThreads), smem_bytes, 0, cluster,
                                                       &cluster_attr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) most = cluster;
    }
  }
  cudaGetLastError();  // a failed query only means no clusters
  known[device].store(most);
  return most;
}

namespace {

// dweight, dbias (either may be null) from the (rows, C) partials of either backward.
void launch_backward_affine(const float* part_dz, const float* part_dz_xhat, float* dweight, float* dbias, int rows,
                            int C, cudaStream_t stream) {
  const dim3 block(gn::kAffineChannels, kThreads / gn::kAffineChannels);
  gn::backward_affine_kernel<<<cdiv(C, gn::kAffineChannels), block, gn::kAffineSmemBytes, stream>>>(
      part_dz, part_dz_xhat, dweight, dbias, rows, C);
}

bool valid_plan(int N, int S, int C, int G, gn::SinglePassPlan plan) {
  const int channels = plan.channels, cluster = plan.cluster;
  return valid(N, S, C, G, 1) && channels >= 1 && C % channels == 0 && channels % (C / G) == 0 && channels <= kThreads &&
         cluster >= 1 && cluster <= gn::kMaxCluster && cdiv(S, cdiv(S, cluster)) == cluster;
}

// Launches a single-pass kernel of VEC-element packs staging `tensors` inputs of T as a
// persistent grid: as many clusters as the GPU holds at once, each looping over its share of
// the tiles (one cluster a tile if the occupancy query failed: slower, not wrong).
template <typename T, int VEC, typename... Params, typename... Args>
cudaError_t launch_single_pass(void (*kernel)(Params...), int N, int S, int C, int G, gn::SinglePassPlan plan,
                               int tensors, cudaStream_t stream, Args... args) {
  const int channels = plan.channels, cluster = plan.cluster;
  const long long smem = gn::single_pass_smem_bytes(cdiv(S, cluster), channels, C / G, VEC, sizeof(T), tensors);
  // above 48 KB a kernel must opt in to dynamic shared memory
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && cluster > gn::kMaxPortableCluster) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr;
  cudaLaunchConfig_t config = cluster_launch(dim3(cluster), dim3(channels / VEC, kThreads / (channels / VEC)), smem,
                                             stream, cluster, &attr);
  const int tiles = N * (C / channels);
  const int resident = resident_clusters(reinterpret_cast<const void*>(kernel), config, cluster);
  config.gridDim = dim3((resident > 0 ? std::min(tiles, resident) : tiles) * cluster);
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace

cudaError_t group_norm_nhwc_forward_single_pass(const void* x, const float* weight, const float* bias, void* y,
                                                float* mean, float* rstd, int N, int S, int C, int G,
                                                gn::SinglePassPlan plan, float eps, bool silu, DType dtype,
                                                cudaStream_t stream) {
  if (!valid_plan(N, S, C, G, plan)) return cudaErrorInvalidValue;
  return dispatch(dtype, C, {x, y}, silu, [&](auto type, auto vec, auto act) {
    using T = decltype(type);
    constexpr int VEC = decltype(vec)::value;
    return launch_single_pass<T, VEC>(gn::single_pass_kernel<T, VEC, decltype(act)::value>, N, S, C, G, plan, 1,
                                      stream, static_cast<const T*>(x), static_cast<T*>(y), weight, bias, mean, rstd,
                                      N, S, C, G, eps);
  });
}

cudaError_t group_norm_nhwc_backward_single_pass(const void* dy, const void* x, const float* weight,
                                                 const float* bias, const float* mean, const float* rstd, void* dx,
                                                 const void* dx_addend, float* dweight, float* dbias, float* part_a,
                                                 float* part_b, int N, int S, int C, int G, gn::SinglePassPlan plan,
                                                 bool silu, DType dtype, cudaStream_t stream) {
  if (!valid_plan(N, S, C, G, plan) || !dx) return cudaErrorInvalidValue;
  return dispatch(dtype, C, {dy, x, dx, dx_addend}, silu, [&](auto type, auto vec, auto act) {
    using T = decltype(type);
    constexpr int VEC = decltype(vec)::value;
    cudaError_t err = launch_single_pass<T, VEC>(
        gn::backward_single_pass_kernel<T, VEC, decltype(act)::value>, N, S, C, G, plan, 2, stream,
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), static_cast<const T*>(dx_addend),
        weight, bias, mean, rstd, part_a, part_b, N, S, C, G);
    if (err == cudaSuccess && (dweight || dbias)) {
      launch_backward_affine(part_a, part_b, dweight, dbias, N * plan.cluster, C, stream);
      err = cudaGetLastError();
    }
    return err;
  });
}

cudaError_t group_norm_nhwc_backward(const void* dy, const void* x, const float* weight, const float* bias,
                                     const float* mean, const float* rstd, void* dx, const void* dx_addend,
                                     float* dweight, float* dbias, float* part_a, float* part_b, float* coef_a,
                                     float* coef_b, int N, int S, int C, int G, int K, bool silu,
                                     DType dtype, cudaStream_t stream) {
  if (!valid(N, S, C, G, K)) return cudaErrorInvalidValue;
  return dispatch(dtype, C, {dy, x, dx, dx_addend}, silu, [&](auto type, auto vec, auto act) {
    using T = decltype(type);
    constexpr int VEC = decltype(vec)::value;
    constexpr bool SILU = decltype(act)::value;
    const Launch l = launch_shape(N, S, C, K, VEC);
    gn::backward_partials_kernel<T, VEC, SILU><<<l.grid, l.block, l.row_smem, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), weight, bias, mean, rstd, part_a, part_b, S, C, G,
        l.chunk);
    if (dweight || dbias) launch_backward_affine(part_a, part_b, dweight, dbias, N * K, C, stream);
    if (dx) {
      const gn::GroupLaunch gl = gn::group_launch(K, C, G);
      gn::backward_group_kernel<<<dim3(gl.grid_x, N), kThreads, gn::kGroupSmemBytes, stream>>>(
          part_a, part_b, weight, coef_a, coef_b, S, C, G, K, gl.lanes);
      gn::backward_dx_kernel<T, VEC, SILU><<<l.grid, l.block, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), weight, bias, mean, rstd,
          coef_a, coef_b, static_cast<const T*>(dx_addend), S, C, G, l.chunk);
    }
    return cudaGetLastError();
  });
}

}  // namespace cck
