// Dtype dispatch shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

#include <type_traits>
#include <utility>

// FASTLARS_DISPATCH_TYPES runs the lambda with param_t (the parameters' and gradients' dtype), acc_t (fp32,
// or fp64 for fp64 parameters: the state and arithmetic dtype) and weight_t (the
// weights the kernel updates: the parameters themselves, or fp32 master copies).
#define FASTLARS_DISPATCH_TYPES(param_type, weight_type, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (param_type), NAME, [&] {                     \
    using param_t = scalar_t;                                                                              \
    using acc_t = std::conditional_t<std::is_same_v<param_t, double>, double, float>;                     \
    if ((weight_type) == (param_type)) {                                                                   \
      using weight_t = param_t;                                                                            \
      __VA_ARGS__();                                                                                       \
    } else {                                                                                               \
      using weight_t = acc_t;                                                                              \
      __VA_ARGS__();                                                                                       \
    }                                                                                                      \
  })

// The same from tensor lists (tensor 0 of each).
#define FASTLARS_DISPATCH(params, weights, NAME, ...) \
  FASTLARS_DISPATCH_TYPES((params)[0].scalar_type(), (weights)[0].scalar_type(), NAME, __VA_ARGS__)

namespace fastlars {

// Calls fn(std::integral_constant<unsigned, set>{}) for a run-time `set` below `Sets` (with
// the bits of `Extra` kept), so that a loop compiled for each set runs the one it needs
// (fastlars_math.h, namespace variant).
template <unsigned Sets, unsigned Extra = 0, unsigned Set = 0, typename Fn>
inline void with_variant_set(unsigned set, Fn&& fn) {
  if constexpr (Set < Sets) {
    if ((set & ~Extra) == Set) {
      fn(std::integral_constant<unsigned, Set | Extra>{});
      return;
    }
    with_variant_set<Sets, Extra, Set + 1>(set, std::forward<Fn>(fn));
  }
}

}  // namespace fastlars
