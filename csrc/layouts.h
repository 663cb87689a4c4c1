// The layouts of the tables the fused kernels read. The one definition is
// fastlars/ops/layouts.py (which the Triton kernels read by name); these X-macro lists
// name the same columns in the same order, bindings.cpp exports them
// (fastlars._C.tensor_columns, ...), and tests/test_layouts.py checks the two agree.
#pragma once

// Per-tensor launch table (int64, one row per tensor): TensorColumn.
#define FASTLARS_TENSOR_COLUMNS(X) \
  X(W) X(P) X(G) X(S0) X(S1) X(STEP) X(NUMEL) X(GROUP) X(CHUNK0) X(NCHUNKS) X(FIRST)
// Per-group hyper-parameter tables (double, one row per param group): LarsColumn, LambColumn.
#define FASTLARS_LARS_COLUMNS(X) \
  X(LR) X(WEIGHT_DECAY) X(TRUST_COEFFICIENT) X(EPS) X(TRUST_CLIP) X(ADAPT) X(MOMENTUM) X(ONE_MINUS_DAMPENING) X(NESTEROV) \
  X(DENOMINATOR_DECAY) X(NORM_OF_SUM) X(AFTER_MOMENTUM) X(PLAIN_SGD) X(RATIO_MIN) X(RATIO_MAX) X(LR_IN_MOMENTUM)
#define FASTLARS_LAMB_COLUMNS(X)                                                                          \
  X(LR) X(BETA1) X(BETA2) X(ONE_MINUS_BETA2) X(BETA3) X(LOG_BETA1) X(LOG_BETA2) X(BIAS_CORRECTION) X(EPS) \
  X(WEIGHT_DECAY) X(MAX_GRAD_NORM) X(TRUST_CLIP) X(ADAPT) X(GRAD_DECAY) X(DIRECT_DECAY) X(EPS_INSIDE_SQRT)   \
  X(BIAS_CORRECTION_IN_LR) X(TRUST_LOW) X(TRUST_HIGH) X(GRAD_NORM_EPS)
// The chunk list of a launch (int64, one row per chunk): ChunkColumn.
#define FASTLARS_CHUNK_COLUMNS(X) X(ROW) X(START)
// Per-tensor sums of a norms pass: SumColumn.
#define FASTLARS_SUM_COLUMNS(X) X(W2) X(G2) X(U2)

namespace fastlars {

#define FASTLARS_ENUMERATOR(prefix, name) prefix##name,
#define FASTLARS_C(name) FASTLARS_ENUMERATOR(C_, name)
#define FASTLARS_L(name) FASTLARS_ENUMERATOR(L_, name)
#define FASTLARS_B(name) FASTLARS_ENUMERATOR(B_, name)
#define FASTLARS_S(name) FASTLARS_ENUMERATOR(S_, name)
#define FASTLARS_K(name) FASTLARS_ENUMERATOR(K_, name)
enum TensorColumn { FASTLARS_TENSOR_COLUMNS(FASTLARS_C) C_NCOL };
enum LarsColumn { FASTLARS_LARS_COLUMNS(FASTLARS_L) L_NCOL };
enum LambColumn { FASTLARS_LAMB_COLUMNS(FASTLARS_B) B_NCOL };
enum SumColumn { FASTLARS_SUM_COLUMNS(FASTLARS_S) S_NCOL };
enum ChunkColumn { FASTLARS_CHUNK_COLUMNS(FASTLARS_K) K_NCOL };
#undef FASTLARS_C
#undef FASTLARS_L
#undef FASTLARS_B
#undef FASTLARS_S
#undef FASTLARS_K
#undef FASTLARS_ENUMERATOR

}  // namespace fastlars
