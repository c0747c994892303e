// The element types of the kernels in fp64, for the C++ tests that check them against an fp64
// reference: conversions, and how finely each type rounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
#include <vector>

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
static std::vector<double> doubles(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_double(v[i]);
  return out;
}
// The largest relative error of one rounding to T (half an ulp): 2^-24, 2^-11, 2^-8.
template <typename T>
static double unit_roundoff() {
  return std::is_same_v<T, float> ? 6e-8 : std::is_same_v<T, __half> ? 4.9e-4 : 3.9e-3;
}
