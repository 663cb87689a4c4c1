// Fused multi-tensor LARS and LAMB on CUDA: one launch for the norms, one for the
// update, whatever the number of tensors. The launch tables are the Triton kernels'
// (built once per layout and cached by fastlars/ops/launch.py, the group table updated
// from pinned memory when a hyper-parameter changes; columns in layouts.h): an int64
// table row per tensor (pointers, numel, group, chunk range, first-step flag) and one
// block per kChunk-element chunk. Nothing is copied from the host here, so a step can
// be captured in a CUDA graph (capturable=True). Per-tensor norms
// are reduced without atomics: every chunk writes its own partial slots and a finalize
// launch (one block per tensor) sums its tensor's slots in a fixed order, so results are
// bitwise reproducible; the update reads one total per tensor (blocks run concurrently:
// the norms pass itself cannot know when a tensor's last chunk is done without atomics).
// The per-element maths is fastlars_math.h, which the CPU kernels (tested) share.
//
// Bytes (fp32): LARS 8 + 20 = 28 B/element, LAMB 16 + 28 = 44 B/element (floors 20, 28: docs/contract.md, "The floors").
// Only <ATen/ATen.h> and c10/cuda headers: a minimal toolkit has no cuBLAS headers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dispatch.h"
#include "fastlars_math.h"
#include "kernels.h"
#include "layouts.h"

namespace fastlars {
namespace {

constexpr int kThreads = 512;
// The variant sets the element loops are compiled for (fastlars_math.h, namespace variant):
// every option, each tested per group (uniform over a block, so no divergence).
constexpr unsigned kLarsAnySet = variant::kMomentum | variant::kNesterov | variant::kFirst;
constexpr unsigned kLambAnySet = variant::kGradDecay | variant::kEpsInsideSqrt | variant::kWeightScale;

// Deterministic block-wide sum (fixed tree over kThreads threads).
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ double scratch[kThreads];
  scratch[threadIdx.x] = static_cast<double>(value);
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = static_cast<acc_t>(scratch[0]);
  __syncthreads();
  return total;
}

// Sum of one column of a tensor's chunk partials, in a fixed order.
template <typename acc_t>
__device__ acc_t tensor_sum(const acc_t* partials, int64_t chunk0, int64_t n_chunks, int columns, int column) {
  acc_t local = 0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) local += partials[(chunk0 + c) * columns + column];
  return block_sum(local);
}

struct Chunk {
  const int64_t* row;
  int64_t index, begin, end;  // index: the tensor's table row
};

// reverse (the update kernels): block i takes chunk n-1-i, so the update starts with the
// chunks the norms pass read last, still in L2 (see bench/NOTES.md).
__device__ Chunk chunk_of(const int64_t* table, const int64_t* chunks, bool reverse) {
  const int64_t c = reverse ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t index = chunks[K_NCOL * c + K_ROW];
  const int64_t* row = table + index * C_NCOL;
  const int64_t begin = chunks[K_NCOL * c + K_START];
  const int64_t end = begin + kChunk < row[C_NUMEL] ? begin + kChunk : row[C_NUMEL];
  return {row, index, begin, end};
}

template <typename T>
__device__ T* column_ptr(const int64_t* row, int column) {
  return reinterpret_cast<T*>(row[column]);
}

// One thread's sums of w^2, g^2 and (kX) x^2 over its elements of a chunk, the loop compiled
// per case (kBuf: x reads the buffer) so that it tests nothing per element.
template <bool kX, bool kBuf, typename param_t, typename weight_t, typename acc_t>
__device__ __forceinline__ void thread_sums(const weight_t* w, const param_t* g, const acc_t* buf, const Chunk& ch,
                                            const LarsDenominator<acc_t>& x, acc_t& sw, acc_t& sg, acc_t& sx) {
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    const acc_t we = static_cast<acc_t>(w[e]), ge = static_cast<acc_t>(g[e]);
    sw += we * we;
    sg += ge * ge;
    if constexpr (kX) {
      const acc_t xe = lars_denominator_element<kBuf, acc_t>(x, we, ge, kBuf ? buf[e] : acc_t(0));
      sx += xe * xe;
    }
  }
}

// Every column of a chunk's partials is written (0 for the sums not asked for): the
// finalize sums them all. With the LARS group table (lars_groups, else nullptr), sum x^2 of a
// tensor whose group's ratio divides by ||x|| (fastlars_math.h, lars_denominator), which reads
// the buffer, the table's S0, where the group has "momentum_update" with momentum and the
// buffer exists (FIRST 0; a tensor without one has S0 = W, of another dtype, never read).
template <typename param_t, typename weight_t, typename acc_t>
__global__ void sumsq_kernel(const int64_t* table, const int64_t* chunks, acc_t* partials,
                             const double* lars_groups, const float* inv_scale_ptr) {
  const Chunk ch = chunk_of(table, chunks, false);
  const weight_t* w = column_ptr<const weight_t>(ch.row, C_W);
  const param_t* g = column_ptr<const param_t>(ch.row, C_G);
  const acc_t* buf = column_ptr<const acc_t>(ch.row, C_S0);
  // the same for the whole block (one tensor): chosen once, outside the element loop
  bool with_x = false;
  LarsDenominator<acc_t> x{};
  if (lars_groups != nullptr) {
    const auto h = lars_hyper<acc_t>(lars_groups + ch.row[C_GROUP] * L_NCOL);
    with_x = lars_sums_denominator(h);
    const acc_t s = inv_scale_ptr != nullptr ? static_cast<acc_t>(*inv_scale_ptr) : acc_t(1);
    x = lars_denominator<acc_t>(h, s, ch.row[C_FIRST] != 0);
  }
  acc_t sw = 0, sg = 0, sx = 0;
  if (!with_x)
    thread_sums<false, false>(w, g, buf, ch, x, sw, sg, sx);
  else if (x.reads_buf)
    thread_sums<true, true>(w, g, buf, ch, x, sw, sg, sx);
  else
    thread_sums<true, false>(w, g, buf, ch, x, sw, sg, sx);
  sw = block_sum(sw);
  sg = block_sum(sg);
  if (with_x) sx = block_sum(sx);
  if (threadIdx.x == 0) {
    acc_t* out = partials + S_NCOL * blockIdx.x;
    out[S_W2] = sw;
    out[S_G2] = sg;
    out[S_U2] = sx;
  }
}

// The finalize of a norms pass: block t writes tensor t's sums of its chunks' partials.
template <typename acc_t>
__global__ void tensor_totals_kernel(const int64_t* table, const acc_t* partials, acc_t* totals, int columns) {
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * C_NCOL;
  for (int c = 0; c < columns; ++c) {
    const acc_t total = tensor_sum(partials, row[C_CHUNK0], row[C_NCHUNKS], columns, c);
    if (threadIdx.x == 0) totals[static_cast<int64_t>(blockIdx.x) * columns + c] = total;
  }
}

template <typename param_t, typename weight_t, typename acc_t>
__global__ void lars_update_kernel(const int64_t* table, const int64_t* chunks, const acc_t* totals,
                                   const double* groups, const float* inv_scale_ptr, const bool* ok) {
  if (ok != nullptr && !*ok) return;  // skipped on the device (skip_nonfinite / GradScaler)
  const Chunk ch = chunk_of(table, chunks, true);
  const auto h = lars_hyper<acc_t>(groups + ch.row[C_GROUP] * L_NCOL);
  const acc_t inv_scale = inv_scale_ptr != nullptr ? static_cast<acc_t>(*inv_scale_ptr) : acc_t(1);
  const acc_t* sums = totals + S_NCOL * ch.index;
  const bool first = ch.row[C_FIRST] != 0;
  const acc_t w_norm = sqrt(sums[S_W2]);
  const acc_t x_norm = lars_denominator_norm<acc_t>(sums, sqrt(sums[S_G2]) * inv_scale, h);
  const auto factors = lars_factors<acc_t>(w_norm, x_norm, h);
  weight_t* w = column_ptr<weight_t>(ch.row, C_W);
  param_t* p = column_ptr<param_t>(ch.row, C_P);
  const param_t* g = column_ptr<const param_t>(ch.row, C_G);
  acc_t* buf = column_ptr<acc_t>(ch.row, C_S0);
  const bool master = static_cast<void*>(w) != static_cast<void*>(p);
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    acc_t b = h.momentum != 0 ? buf[e] : acc_t(0);
    const acc_t updated = lars_element<kLarsAnySet, acc_t>(static_cast<acc_t>(w[e]), static_cast<acc_t>(g[e]) * inv_scale, b,
                                              first, factors, h);
    if (h.momentum != 0) buf[e] = b;
    w[e] = static_cast<weight_t>(updated);
    if (master) p[e] = static_cast<param_t>(updated);
  }
}

// LAMB pass 1: partial sums of w^2, g^2 and u^2 per chunk; writes nothing else, so a
// non-finite gradient is caught before any state changes.
template <typename param_t, typename weight_t, typename acc_t>
__global__ void lamb_norms_kernel(const int64_t* table, const int64_t* chunks, acc_t* partials, const double* groups,
                                  const float* inv_scale_ptr, const double* global_norm_ptr) {
  const Chunk ch = chunk_of(table, chunks, false);
  const double* row = groups + ch.row[C_GROUP] * B_NCOL;
  const auto h = lamb_hyper<acc_t>(row, static_cast<double>(*column_ptr<const float>(ch.row, C_STEP)));
  const acc_t factor = static_cast<acc_t>(grad_factor(row, inv_scale_ptr ? double(*inv_scale_ptr) : 1.0,
                                                      global_norm_ptr ? *global_norm_ptr : -1.0));
  const weight_t* w = column_ptr<const weight_t>(ch.row, C_W);
  const param_t* g = column_ptr<const param_t>(ch.row, C_G);
  const acc_t* m = column_ptr<const acc_t>(ch.row, C_S0);
  const acc_t* v = column_ptr<const acc_t>(ch.row, C_S1);
  acc_t sw = 0, sg = 0, su = 0;
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    const acc_t we = static_cast<acc_t>(w[e]), ge = static_cast<acc_t>(g[e]);
    acc_t me = m[e], ve = v[e];
    const acc_t u = lamb_direction<kLambAnySet, acc_t>(we, ge * factor, me, ve, h);
    sw += we * we;
    sg += ge * ge;
    su += u * u;
  }
  sw = block_sum(sw);
  sg = block_sum(sg);
  su = block_sum(su);
  if (threadIdx.x == 0) {
    partials[S_NCOL * blockIdx.x + S_W2] = sw;
    partials[S_NCOL * blockIdx.x + S_G2] = sg;
    partials[S_NCOL * blockIdx.x + S_U2] = su;
  }
}

// LAMB pass 2: r = ||w|| / ||u|| from the partials, then m, v, w (and p) written.
template <typename param_t, typename weight_t, typename acc_t>
__global__ void lamb_update_kernel(const int64_t* table, const int64_t* chunks, const acc_t* totals,
                                   const double* groups, const float* inv_scale_ptr, const double* global_norm_ptr,
                                   const bool* ok) {
  if (ok != nullptr && !*ok) return;
  const Chunk ch = chunk_of(table, chunks, true);
  const double* row = groups + ch.row[C_GROUP] * B_NCOL;
  const auto h = lamb_hyper<acc_t>(row, static_cast<double>(*column_ptr<const float>(ch.row, C_STEP)));
  const acc_t factor = static_cast<acc_t>(grad_factor(row, inv_scale_ptr ? double(*inv_scale_ptr) : 1.0,
                                                      global_norm_ptr ? *global_norm_ptr : -1.0));
  const acc_t w_norm = sqrt(totals[S_NCOL * ch.index + S_W2]);
  const acc_t u_norm = sqrt(totals[S_NCOL * ch.index + S_U2]);
  const acc_t ratio = lamb_trust_ratio<acc_t>(w_norm, u_norm, h);
  weight_t* w = column_ptr<weight_t>(ch.row, C_W);
  param_t* p = column_ptr<param_t>(ch.row, C_P);
  const param_t* g = column_ptr<const param_t>(ch.row, C_G);
  acc_t* m = column_ptr<acc_t>(ch.row, C_S0);
  acc_t* v = column_ptr<acc_t>(ch.row, C_S1);
  const bool master = static_cast<void*>(w) != static_cast<void*>(p);
  for (int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kThreads) {
    const acc_t we = static_cast<acc_t>(w[e]);
    const acc_t u = lamb_direction<kLambAnySet, acc_t>(we, static_cast<acc_t>(g[e]) * factor, m[e], v[e], h);
    const acc_t updated = lamb_weight<kLambAnySet, acc_t>(we, u, ratio, h);
    w[e] = static_cast<weight_t>(updated);
    if (master) p[e] = static_cast<param_t>(updated);
  }
}

// One launch's tables, built and cached in Python (fastlars/ops/launch.py, the tables the
// Triton kernels read): the TensorColumn rows of its tensors and its ChunkColumn rows.
struct Launch {
  const at::Tensor& table;
  const at::Tensor& chunks;
  int64_t n_chunks, n_tensors;
};

Launch launch_of(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& param) {
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == C_NCOL &&
                  table.device() == param.device() && table.is_contiguous(),
              "fastlars: the launch table must be a contiguous (n_tensors, ", static_cast<int>(C_NCOL),
              ") int64 tensor on the parameters' device (csrc/layouts.h, TensorColumn)");
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 2 && chunks.size(1) == K_NCOL &&
                  chunks.device() == param.device() && chunks.is_contiguous(),
              "fastlars: the chunk list must be a contiguous (n_chunks, ", static_cast<int>(K_NCOL),
              ") int64 tensor on the parameters' device (csrc/layouts.h, ChunkColumn)");
  return {table, chunks, chunks.size(0), table.size(0)};
}

const double* group_rows(const at::Tensor& groups, const at::Tensor& param, int columns) {
  TORCH_CHECK(groups.scalar_type() == at::kDouble && groups.dim() == 2 && groups.size(1) == columns &&
                  groups.device() == param.device() && groups.is_contiguous(),
              "fastlars: the group table must be a contiguous (n_groups, ", columns,
              ") float64 tensor on the parameters' device (csrc/layouts.h)");
  return groups.data_ptr<double>();
}

// (n_tensors, columns) per-tensor totals of a norms pass's (n_chunks, columns) partials.
at::Tensor tensor_totals(const Launch& launch, const at::Tensor& partials, int columns) {
  if (launch.n_chunks == 0) return at::zeros({launch.n_tensors, columns}, partials.options());  // empty tensors only
  at::Tensor totals = at::empty({launch.n_tensors, columns}, partials.options());  // every row is written
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "fastlars_tensor_totals_cuda", [&] {
    tensor_totals_kernel<scalar_t><<<launch.n_tensors, kThreads, 0, stream>>>(
        launch.table.data_ptr<int64_t>(), partials.data_ptr<scalar_t>(), totals.data_ptr<scalar_t>(), columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return totals;
}

at::ScalarType acc_type(const at::Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor sumsq_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& weight,
                      const at::Tensor& param, const std::optional<at::Tensor>& lars_groups,
                      const std::optional<at::Tensor>& inv_scale) {
  const auto device = param.device();  // inv_scale is moved here
  const at::cuda::CUDAGuard guard(device);
  const Launch launch = launch_of(table, chunks, param);
  const double* rows = lars_groups.has_value() ? group_rows(*lars_groups, param, L_NCOL) : nullptr;
  at::Tensor partials = at::empty({launch.n_chunks, S_NCOL}, param.options().dtype(acc_type(param)));
  if (launch.n_chunks == 0) return tensor_totals(launch, partials, S_NCOL);
  const at::Tensor scale = rows && inv_scale.has_value() ? inv_scale->to(device, at::kFloat) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTLARS_DISPATCH_TYPES(param.scalar_type(), weight.scalar_type(), "fastlars_sumsq_cuda", [&] {
    sumsq_kernel<param_t, weight_t, acc_t><<<launch.n_chunks, kThreads, 0, stream>>>(
        launch.table.data_ptr<int64_t>(), launch.chunks.data_ptr<int64_t>(), partials.data_ptr<acc_t>(), rows,
        scale.defined() ? scale.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tensor_totals(launch, partials, S_NCOL);
}

void lars_update_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                      const at::Tensor& sumsq, const at::Tensor& weight, const at::Tensor& param,
                      const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& ok) {
  const auto device = param.device();  // scalars (ok, inv_scale) are moved here
  const at::cuda::CUDAGuard guard(device);
  const Launch launch = launch_of(table, chunks, param);
  const double* rows = group_rows(groups, param, L_NCOL);
  if (launch.n_chunks == 0) return;
  const at::Tensor scale = inv_scale.has_value() ? inv_scale->to(device, at::kFloat) : at::Tensor();
  const at::Tensor flag = ok.has_value() ? ok->to(device, at::kBool) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTLARS_DISPATCH_TYPES(param.scalar_type(), weight.scalar_type(), "fastlars_lars_update_cuda", [&] {
    lars_update_kernel<param_t, weight_t, acc_t><<<launch.n_chunks, kThreads, 0, stream>>>(
        launch.table.data_ptr<int64_t>(), launch.chunks.data_ptr<int64_t>(), sumsq.data_ptr<acc_t>(), rows,
        scale.defined() ? scale.data_ptr<float>() : nullptr, flag.defined() ? flag.data_ptr<bool>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor lamb_norms_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                           const at::Tensor& weight, const at::Tensor& param,
                           const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& global_norm) {
  const auto device = param.device();  // scalars (inv_scale, global norm) are moved here
  const at::cuda::CUDAGuard guard(device);
  const Launch launch = launch_of(table, chunks, param);
  const double* rows = group_rows(groups, param, B_NCOL);
  at::Tensor partials = at::empty({launch.n_chunks, S_NCOL}, param.options().dtype(acc_type(param)));
  if (launch.n_chunks == 0) return tensor_totals(launch, partials, S_NCOL);
  const at::Tensor scale = inv_scale.has_value() ? inv_scale->to(device, at::kFloat) : at::Tensor();
  const at::Tensor norm = global_norm.has_value() ? global_norm->to(device, at::kDouble) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTLARS_DISPATCH_TYPES(param.scalar_type(), weight.scalar_type(), "fastlars_lamb_norms_cuda", [&] {
    lamb_norms_kernel<param_t, weight_t, acc_t><<<launch.n_chunks, kThreads, 0, stream>>>(
        launch.table.data_ptr<int64_t>(), launch.chunks.data_ptr<int64_t>(), partials.data_ptr<acc_t>(), rows,
        scale.defined() ? scale.data_ptr<float>() : nullptr, norm.defined() ? norm.data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tensor_totals(launch, partials, S_NCOL);
}

void lamb_update_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                      const at::Tensor& norms, const at::Tensor& weight, const at::Tensor& param,
                      const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& global_norm,
                      const std::optional<at::Tensor>& ok) {
  const auto device = param.device();  // scalars (ok, inv_scale, global norm) are moved here
  const at::cuda::CUDAGuard guard(device);
  const Launch launch = launch_of(table, chunks, param);
  const double* rows = group_rows(groups, param, B_NCOL);
  if (launch.n_chunks == 0) return;
  const at::Tensor scale = inv_scale.has_value() ? inv_scale->to(device, at::kFloat) : at::Tensor();
  const at::Tensor norm = global_norm.has_value() ? global_norm->to(device, at::kDouble) : at::Tensor();
  const at::Tensor flag = ok.has_value() ? ok->to(device, at::kBool) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTLARS_DISPATCH_TYPES(param.scalar_type(), weight.scalar_type(), "fastlars_lamb_update_cuda", [&] {
    lamb_update_kernel<param_t, weight_t, acc_t><<<launch.n_chunks, kThreads, 0, stream>>>(
        launch.table.data_ptr<int64_t>(), launch.chunks.data_ptr<int64_t>(), norms.data_ptr<acc_t>(), rows,
        scale.defined() ? scale.data_ptr<float>() : nullptr, norm.defined() ? norm.data_ptr<double>() : nullptr,
        flag.defined() ? flag.data_ptr<bool>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastlars
