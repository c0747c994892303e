// Element types the torch-free launchers accept; bindings.cpp maps torch dtypes onto them.
#pragma once

namespace cck {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cck
