// Dtype dispatch shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

#include <type_traits>

// Runs the lambda with param_t (the parameters' and gradients' dtype), acc_t (fp32,
// or fp64 for fp64 parameters: the state and arithmetic dtype) and weight_t (the
// weights the kernel updates: the parameters themselves, or fp32 master copies).
#define FASTLARS_DISPATCH(params, weights, NAME, ...)                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (params)[0].scalar_type(), NAME, [&] {       \
    using param_t = scalar_t;                                                                              \
    using acc_t = std::conditional_t<std::is_same_v<param_t, double>, double, float>;                     \
    if ((weights)[0].scalar_type() == (params)[0].scalar_type()) {                                         \
      using weight_t = param_t;                                                                            \
      __VA_ARGS__();                                                                                       \
    } else {                                                                                               \
      using weight_t = acc_t;                                                                              \
      __VA_ARGS__();                                                                                       \
    }                                                                                                      \
  })

