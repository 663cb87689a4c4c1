// The per-element maths of LARS and LAMB and their trust-ratio rules, shared by the
// CPU (cpu_kernels.cpp) and CUDA (cuda_kernels.cu) kernels, so that the CPU tests
// exercise the arithmetic the GPU runs. The contract is docs/contract.md ("LARS", "LAMB"); the Python
// reference backend (fastlars/optim/lars.py, lamb.py) is the oracle.
#pragma once

#include <cmath>

#include "layouts.h"  // LarsColumn, LambColumn: the group tables

#if defined(__CUDACC__)
#define FASTLARS_HD __host__ __device__ __forceinline__
#else
#define FASTLARS_HD inline
#endif

namespace fastlars {

// Hyper-parameters of one param group, as the kernels use them. Differences such as
// 1 - dampening are formed in double on the host: 1 - float(0.999) is 1e-5 off.
// The variants' values (docs/contract.md, "LARS variants") are the effective ones formed on
// the host (fastlars/optim/_hyper.py, LarsHyper): denominator_decay is wd for
// "sum_of_norms" and 0 otherwise; the mode flags are set only where the group adapts.
template <typename acc_t>
struct LarsHyper {
  acc_t lr, weight_decay, trust_coefficient, eps, momentum, one_minus_dampening;
  bool trust_clip, adapt, nesterov;
  acc_t denominator_decay, ratio_min, ratio_max;
  bool norm_of_sum, after_momentum, plain_sgd, lr_in_momentum;
};

// LAMB: weight_decay is the decay added to u, grad_decay to the gradient, and w is
// multiplied by weight_scale = 1 - lr direct_decay (the group's decay_mode, docs/contract.md
// "LAMB"); norm_scale = |weight_scale| scales ||w|| in the trust ratio; step_scale (1, or
// sqrt(bc2) / bc1 with bias_correction_in_lr, bc1 = bc2 = 1 then) scales the step.
template <typename acc_t>
struct LambHyper {
  acc_t lr, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay, grad_decay, weight_scale, norm_scale,
      step_scale, trust_low, trust_high;
  bool trust_clip, adapt, eps_inside_sqrt;
};

// The options that change the instructions of an element loop. Each loop is compiled once per
// option set it runs (the template argument F), so that it carries no loop-invariant branch: a
// branch or select on a group's option inside the loop keeps the compiler from vectorising it
// (the CPU LAMB update ran 3.4x slower with three of them). With kExact, F is the tensor's own
// set (the CPU kernels, per work item) and the loop tests nothing; without it (the CUDA kernels:
// F is the union over a launch's groups) a group outside an option tests its value, a branch
// that is uniform over a block.
namespace variant {
constexpr unsigned kExact = 1u << 31;
// LAMB: the gradient decayed first (decay_mode "l2"), sqrt(v_hat + eps), w scaled (decay_mode "direct")
constexpr unsigned kGradDecay = 1u << 0, kEpsInsideSqrt = 1u << 1, kWeightScale = 1u << 2;
constexpr unsigned kLambSets = 1u << 3;  // every combination: 0 .. kLambSets - 1
// LARS: a momentum buffer, nesterov, the step that creates the buffer
constexpr unsigned kMomentum = 1u << 0, kNesterov = 1u << 1, kFirst = 1u << 2;
constexpr unsigned kLarsSets = 1u << 3;
constexpr bool has(unsigned set, unsigned option) { return (set & option) != 0; }
}  // namespace variant

// The vector x whose norm a LARS ratio divides by where that is not ||g|| s (s: the inverse
// grad scale): d = s g + wd w ("norm_of_sum"), or u = a buf + b d, the update after momentum
// ("momentum_update"; a = 0 where this step creates the buffer, and without momentum u = d).
// The norms pass sums x^2 element by element (SumColumn U2), additive across shards: the same
// norm formed afterwards from sums of g^2, w g, w^2 ... cancels catastrophically where
// g ~ -wd w (79 % off at a residual of 1e-4 ||wd w|| in fp32).
template <typename acc_t>
struct LarsDenominator {
  acc_t buf, d, s, wd;  // x = buf * buf_e + d * (s g_e + wd w_e)
  bool reads_buf;       // a != 0: the buffer exists and the ratio is taken after momentum
};

// Whether a group's ratio divides by ||x|| (its norms pass sums x^2) rather than by ||g|| s.
template <typename acc_t>
FASTLARS_HD bool lars_sums_denominator(const LarsHyper<acc_t>& h) {
  return h.norm_of_sum || h.after_momentum;
}

// x's coefficients for a tensor of the group; first: this step creates its buffer.
template <typename acc_t>
FASTLARS_HD LarsDenominator<acc_t> lars_denominator(const LarsHyper<acc_t>& h, acc_t s, bool first) {
  if (!(h.after_momentum && h.momentum != 0)) return {acc_t(0), acc_t(1), s, h.weight_decay, false};
  // buf' = d (first step) or mu buf + (1 - dampening) d; u = buf' or d + mu buf' (nesterov)
  const acc_t a = first ? acc_t(0) : h.nesterov ? h.momentum * h.momentum : h.momentum;
  const acc_t b = h.nesterov ? acc_t(1) + h.momentum * (first ? acc_t(1) : h.one_minus_dampening)
                             : first ? acc_t(1) : h.one_minus_dampening;
  return {a, b, s, h.weight_decay, !first};
}

// One element of x; kBuf: the buffer is read (reads_buf), else buf is not used.
template <bool kBuf, typename acc_t>
FASTLARS_HD acc_t lars_denominator_element(const LarsDenominator<acc_t>& x, acc_t w, acc_t g, acc_t buf) {
  const acc_t d = x.s * g + x.wd * w;
  if constexpr (kBuf) return x.buf * buf + x.d * d;
  return x.d * d;
}

// The norm the ratio's denominator holds: g_norm = ||g|| s, or ||x|| from the sums.
template <typename acc_t, typename sum_t>
FASTLARS_HD acc_t lars_denominator_norm(const sum_t* sums, acc_t g_norm, const LarsHyper<acc_t>& h) {
  return lars_sums_denominator(h) ? std::sqrt(acc_t(sums[S_U2])) : g_norm;  // a NaN stays NaN (the gate caught it)
}

// r = eta ||w|| / (x + wd' ||w|| + eps) (x: lars_denominator_norm, wd': denominator_decay),
// 1 for a zero norm or a group without trust ratio; LARC clip: min(r / lr, 1), whose limit
// at lr = 0 is 1; trust_bounds clamp a computed ratio; plain_sgd: 1 where a norm is 0.
template <typename acc_t>
FASTLARS_HD acc_t lars_trust_ratio(acc_t w_norm, acc_t x_norm, const LarsHyper<acc_t>& h) {
  if (!h.adapt) return acc_t(1);
  const bool computed = w_norm > 0 && x_norm > 0;
  acc_t r = computed ? h.trust_coefficient * w_norm / (x_norm + h.denominator_decay * w_norm + h.eps) : acc_t(1);
  if (h.trust_clip) r = h.lr > 0 ? (r / h.lr < acc_t(1) ? r / h.lr : acc_t(1)) : acc_t(1);
  if (computed) r = r < h.ratio_min ? h.ratio_min : (r > h.ratio_max ? h.ratio_max : r);
  if (h.plain_sgd && !computed) r = acc_t(1);
  return r;
}

// A tensor's factors of the update: d = pre (g + decay w), then momentum (lars_element),
// then w = w - step u. Default: pre = r, decay = wd, step = lr. "momentum_update": pre = 1,
// step = lr r; lr_in_momentum: pre = lr r, step = 1; plain_sgd at a zero norm: decay 0.
template <typename acc_t>
struct LarsFactors {
  acc_t pre, decay, step;
};

template <typename acc_t>
FASTLARS_HD LarsFactors<acc_t> lars_factors(acc_t w_norm, acc_t x_norm, const LarsHyper<acc_t>& h) {
  const acc_t r = lars_trust_ratio<acc_t>(w_norm, x_norm, h);
  const bool zero_norm = !(w_norm > 0 && x_norm > 0);
  const acc_t decay = h.plain_sgd && zero_norm ? acc_t(0) : h.weight_decay;
  const acc_t pre = h.after_momentum ? acc_t(1) : r;
  if (h.lr_in_momentum) return {h.lr * pre, decay, acc_t(1)};
  return {pre, decay, h.after_momentum ? h.lr * r : h.lr};
}

// One element: d = pre (g + decay w); buf = d (first step) or mu buf + (1 - dampening) d;
// u = d + mu buf (nesterov) or buf (d when mu = 0); returns w - step u. buf is untouched when mu = 0.
// F: the variant set (kMomentum, kNesterov, kFirst); without kExact, the options in it are tested.
template <unsigned F, typename acc_t>
FASTLARS_HD acc_t lars_element(acc_t w, acc_t g, acc_t& buf, bool first, const LarsFactors<acc_t>& f,
                               const LarsHyper<acc_t>& h) {
  using namespace variant;
  constexpr bool exact = has(F, kExact);
  acc_t d = f.pre * (g + f.decay * w);
  if constexpr (has(F, kMomentum)) {
    if (exact || h.momentum != 0) {
      buf = has(F, kFirst) && (exact || first) ? d : h.momentum * buf + h.one_minus_dampening * d;
      d = has(F, kNesterov) && (exact || h.nesterov) ? d + h.momentum * buf : buf;
    }
  }
  return w - f.step * d;
}

// The element loop's set (variant::kExact) of a tensor: its group's momentum and nesterov, and
// whether this step creates its buffer.
template <typename acc_t>
inline unsigned lars_set(const LarsHyper<acc_t>& h, bool first) {
  using namespace variant;
  if (h.momentum == 0) return kExact;
  return kExact | kMomentum | (h.nesterov ? kNesterov : 0u) | (first ? kFirst : 0u);
}

// u from the new moments: m_hat / (sqrt(v_hat) + eps) + wd w, or sqrt(v_hat + eps) with
// eps_inside_sqrt (F: the variant set).
template <unsigned F, typename acc_t>
FASTLARS_HD acc_t lamb_direction_of_moments(acc_t w, acc_t m, acc_t v, const LambHyper<acc_t>& h) {
  using namespace variant;
  const acc_t v_hat = v / h.bc2;
  acc_t denom;
  if constexpr (has(F, kEpsInsideSqrt) && has(F, kExact))
    denom = std::sqrt(v_hat + h.eps);
  else if constexpr (has(F, kEpsInsideSqrt))
    denom = h.eps_inside_sqrt ? std::sqrt(v_hat + h.eps) : std::sqrt(v_hat) + h.eps;
  else
    denom = std::sqrt(v_hat) + h.eps;
  return (m / h.bc1) / denom + h.weight_decay * w;
}

// New moments and the direction u = m_hat / (sqrt(v_hat) + eps) + wd w, the gradient
// first decayed (decay_mode "l2"), sqrt(v_hat + eps) with eps_inside_sqrt. F: the variant set.
template <unsigned F, typename acc_t>
FASTLARS_HD acc_t lamb_direction(acc_t w, acc_t g, acc_t& m, acc_t& v, const LambHyper<acc_t>& h) {
  using namespace variant;
  // a test, not + 0 * w, outside the set: a non-finite w would poison g
  if constexpr (has(F, kGradDecay))
    if (has(F, kExact) || h.grad_decay != 0) g = g + h.grad_decay * w;
  m = h.beta1 * m + h.beta3 * g;
  v = h.beta2 * v + h.one_minus_beta2 * (g * g);
  return lamb_direction_of_moments<F>(w, m, v, h);
}

// What u is multiplied by (with lr) in the step: the trust ratio r = ||w|| / ||u|| (||w||
// of the decayed weights in decay_mode "direct"), 1 for a zero norm or a group without trust
// ratio; clip: min(r, 1); a computed r clamped to the trust bounds; times step_scale.
template <typename acc_t>
FASTLARS_HD acc_t lamb_trust_ratio(acc_t w_norm, acc_t u_norm, const LambHyper<acc_t>& h) {
  w_norm = w_norm * h.norm_scale;
  acc_t r = acc_t(1);
  if (h.adapt && w_norm > 0 && u_norm > 0) {
    r = w_norm / u_norm;
    if (h.trust_clip && r > acc_t(1)) r = acc_t(1);
    r = r < h.trust_low ? h.trust_low : (r > h.trust_high ? h.trust_high : r);
  }
  return r * h.step_scale;
}

// The new weight: w (1 - lr direct_decay) - lr (r u), ratio from lamb_trust_ratio. Outside
// kWeightScale the default step is the expression it always was: nvcc contracts a * b - c into
// an fma, which would round w - lr (r u) differently.
template <unsigned F, typename acc_t>
FASTLARS_HD acc_t lamb_weight(acc_t w, acc_t u, acc_t ratio, const LambHyper<acc_t>& h) {
  using namespace variant;
  if constexpr (has(F, kWeightScale))
    if (has(F, kExact) || h.weight_scale != acc_t(1)) w = w * h.weight_scale;
  return w - h.lr * (ratio * u);
}

// The element loop's set (variant::kExact) of a tensor of the group h.
template <typename acc_t>
inline unsigned lamb_set(const LambHyper<acc_t>& h) {
  using namespace variant;
  return kExact | (h.grad_decay != 0 ? kGradDecay : 0u) | (h.eps_inside_sqrt ? kEpsInsideSqrt : 0u) |
         (h.weight_scale != acc_t(1) ? kWeightScale : 0u);
}

template <typename acc_t>
FASTLARS_HD LarsHyper<acc_t> lars_hyper(const double* row) {
  return {acc_t(row[L_LR]),       acc_t(row[L_WEIGHT_DECAY]),        acc_t(row[L_TRUST_COEFFICIENT]),
          acc_t(row[L_EPS]),      acc_t(row[L_MOMENTUM]),            acc_t(row[L_ONE_MINUS_DAMPENING]),
          row[L_TRUST_CLIP] != 0, row[L_ADAPT] != 0,                 row[L_NESTEROV] != 0,
          acc_t(row[L_DENOMINATOR_DECAY]), acc_t(row[L_RATIO_MIN]),  acc_t(row[L_RATIO_MAX]),
          row[L_NORM_OF_SUM] != 0, row[L_AFTER_MOMENTUM] != 0,       row[L_PLAIN_SGD] != 0,
          row[L_LR_IN_MOMENTUM] != 0};
}

// LAMB hyper-parameters for a tensor whose state step is `step` (this update makes
// step + 1); bias corrections 1 - beta^t, the step scale and the weight scale in double.
template <typename acc_t>
FASTLARS_HD LambHyper<acc_t> lamb_hyper(const double* row, double step) {
  const double t = step + 1.0;
  const bool bc = row[B_BIAS_CORRECTION] != 0;
  double bc1 = bc ? 1.0 - std::exp(t * row[B_LOG_BETA1]) : 1.0;
  double bc2 = bc ? 1.0 - std::exp(t * row[B_LOG_BETA2]) : 1.0;
  double step_scale = 1.0;
  if (row[B_BIAS_CORRECTION_IN_LR] != 0) {  // DeepSpeed fused_lamb_cuda: step_size = lr sqrt(bc2) / bc1
    step_scale = std::sqrt(bc2) / bc1;
    bc1 = bc2 = 1.0;
  }
  const double weight_scale = 1.0 - row[B_LR] * row[B_DIRECT_DECAY];
  return {acc_t(row[B_LR]),
          acc_t(row[B_BETA1]),
          acc_t(row[B_BETA2]),
          acc_t(row[B_ONE_MINUS_BETA2]),
          acc_t(row[B_BETA3]),
          acc_t(bc1),
          acc_t(bc2),
          acc_t(row[B_EPS]),
          acc_t(row[B_WEIGHT_DECAY]),
          acc_t(row[B_GRAD_DECAY]),
          acc_t(weight_scale),
          acc_t(weight_scale < 0 ? -weight_scale : weight_scale),
          acc_t(step_scale),
          acc_t(row[B_TRUST_LOW]),
          acc_t(row[B_TRUST_HIGH]),
          row[B_TRUST_CLIP] != 0,
          row[B_ADAPT] != 0,
          row[B_EPS_INSIDE_SQRT] != 0};
}

// Gradient factor: unscale (GradScaler) and global-norm clipping,
// 1/max(1, (||g|| + grad_norm_eps) / max_norm).
FASTLARS_HD double grad_factor(const double* row, double inv_scale, double global_norm) {
  const double max_norm = row[B_MAX_GRAD_NORM];
  double f = inv_scale;
  if (max_norm > 0 && global_norm >= 0) {
    const double ratio = (global_norm * inv_scale + row[B_GRAD_NORM_EPS]) / max_norm;
    f /= ratio > 1.0 ? ratio : 1.0;
  }
  return f;
}

}  // namespace fastlars
