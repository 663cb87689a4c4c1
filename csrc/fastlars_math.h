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
template <typename acc_t>
struct LarsHyper {
  acc_t lr, weight_decay, trust_coefficient, eps, momentum, one_minus_dampening;
  bool trust_clip, adapt, nesterov;
};

template <typename acc_t>
struct LambHyper {
  acc_t lr, beta1, beta2, one_minus_beta2, beta3, bc1, bc2, eps, weight_decay;
  bool trust_clip, adapt;
};

// r = eta ||w|| / (||g|| + wd ||w|| + eps), 1 for a zero norm or a group without
// trust ratio; LARC clip: min(r / lr, 1), whose limit at lr = 0 is 1.
template <typename acc_t>
FASTLARS_HD acc_t lars_trust_ratio(acc_t w_norm, acc_t g_norm, const LarsHyper<acc_t>& h) {
  if (!h.adapt) return acc_t(1);
  acc_t r = (w_norm > 0 && g_norm > 0) ? h.trust_coefficient * w_norm / (g_norm + h.weight_decay * w_norm + h.eps)
                                       : acc_t(1);
  if (h.trust_clip) r = h.lr > 0 ? (r / h.lr < acc_t(1) ? r / h.lr : acc_t(1)) : acc_t(1);
  return r;
}

// One element: d = r (g + wd w); buf = d (first step) or mu buf + (1 - dampening) d;
// d = d + mu buf (nesterov) or buf; returns the new w. buf is untouched when mu = 0.
template <typename acc_t>
FASTLARS_HD acc_t lars_element(acc_t w, acc_t g, acc_t& buf, bool first, acc_t ratio, const LarsHyper<acc_t>& h) {
  acc_t d = ratio * (g + h.weight_decay * w);
  if (h.momentum != 0) {
    buf = first ? d : h.momentum * buf + h.one_minus_dampening * d;
    d = h.nesterov ? d + h.momentum * buf : buf;
  }
  return w - h.lr * d;
}

// New moments and the direction u = m_hat / (sqrt(v_hat) + eps) + wd w.
template <typename acc_t>
FASTLARS_HD acc_t lamb_direction(acc_t w, acc_t g, acc_t& m, acc_t& v, const LambHyper<acc_t>& h) {
  m = h.beta1 * m + h.beta3 * g;
  v = h.beta2 * v + h.one_minus_beta2 * (g * g);
  return (m / h.bc1) / (std::sqrt(v / h.bc2) + h.eps) + h.weight_decay * w;
}

// r = ||w|| / ||u||, 1 for a zero norm or a group without trust ratio; clip: min(r, 1).
template <typename acc_t>
FASTLARS_HD acc_t lamb_trust_ratio(acc_t w_norm, acc_t u_norm, const LambHyper<acc_t>& h) {
  acc_t r = (h.adapt && w_norm > 0 && u_norm > 0) ? w_norm / u_norm : acc_t(1);
  return (h.trust_clip && r > acc_t(1)) ? acc_t(1) : r;
}

template <typename acc_t>
FASTLARS_HD LarsHyper<acc_t> lars_hyper(const double* row) {
  return {acc_t(row[L_LR]),       acc_t(row[L_WEIGHT_DECAY]),        acc_t(row[L_TRUST_COEFFICIENT]),
          acc_t(row[L_EPS]),      acc_t(row[L_MOMENTUM]),            acc_t(row[L_ONE_MINUS_DAMPENING]),
          row[L_TRUST_CLIP] != 0, row[L_ADAPT] != 0,                 row[L_NESTEROV] != 0};
}

// LAMB hyper-parameters for a tensor whose state step is `step` (this update makes
// step + 1); bias corrections 1 - beta^t in double.
template <typename acc_t>
FASTLARS_HD LambHyper<acc_t> lamb_hyper(const double* row, double step) {
  const double t = step + 1.0;
  const bool bc = row[B_BIAS_CORRECTION] != 0;
  return {acc_t(row[B_LR]), acc_t(row[B_BETA1]), acc_t(row[B_BETA2]), acc_t(row[B_ONE_MINUS_BETA2]),
          acc_t(row[B_BETA3]), acc_t(bc ? 1.0 - std::exp(t * row[B_LOG_BETA1]) : 1.0),
          acc_t(bc ? 1.0 - std::exp(t * row[B_LOG_BETA2]) : 1.0), acc_t(row[B_EPS]), acc_t(row[B_WEIGHT_DECAY]),
          row[B_TRUST_CLIP] != 0, row[B_ADAPT] != 0};
}

// Gradient factor: unscale (GradScaler) and global-norm clipping, 1/max(1, ||g|| / max_norm).
FASTLARS_HD double grad_factor(const double* row, double inv_scale, double global_norm) {
  const double max_norm = row[B_MAX_GRAD_NORM];
  double f = inv_scale;
  if (max_norm > 0 && global_norm >= 0) {
    const double ratio = global_norm * inv_scale / max_norm;
    f /= ratio > 1.0 ? ratio : 1.0;
  }
  return f;
}

}  // namespace fastlars
