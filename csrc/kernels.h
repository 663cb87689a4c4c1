// Entry points of the fused optimizer kernels, bound to Python in bindings.cpp.
//
// Every call takes the tensors of one (device, dtype) bucket as lists plus a double
// "group table" (one row per param group; columns in fastlars_math.h) and the group
// index of each tensor. Weights are fp32 master copies or the parameters themselves;
// state is fp32 (fp64 for fp64 parameters). Norms come back as per-tensor sums of
// squares in double, summed in a fixed order (bitwise reproducible).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlars {

using TensorList = std::vector<at::Tensor>;
using OptionalTensorList = std::vector<std::optional<at::Tensor>>;

// Elements per work item (CPU) and per block (CUDA) (Python: fastlars._C.chunk_elements).
// Norms come back as one row of sums per tensor on both.
constexpr int64_t kChunk = 16384;

// Adds 1 to each tensor (LAMB's step counters after a CPU step), in one call: torch's foreach
// add dispatches one add per tensor on the CPU. A one-element fp32 CPU tensor is written in
// place (its version bumped, as an in-place op does); any other goes through add_.
void add_one_cpu(const TensorList& tensors);
// The first parameter whose tensors the CPU kernels cannot walk linearly: the parameter not
// dense, or a tensor of `others` (lists beside `params`: weights, state; None skipped) with
// other strides than the parameter's and some elements; -1 if none. Python names it.
int64_t first_layout_mismatch(const TensorList& params, const std::vector<OptionalTensorList>& others);
// (n, SumColumn) per tensor: sum w^2, sum g^2; given the LARS group table (and per tensor its
// buffer or None, whether this step creates the buffer, its group), sum x^2 of the vector its
// ratio divides by where its group needs it (fastlars_math.h, lars_denominator; inv_scale: the
// gradients' s), else U2 0. Without the table, the lists may be empty.
at::Tensor sumsq_cpu(const TensorList& weights, const TensorList& grads, const OptionalTensorList& bufs,
                     const std::vector<bool>& first, const std::vector<int64_t>& group_of,
                     const std::optional<at::Tensor>& lars_groups, double inv_scale);
// (n, SumColumn): sum g^2 per tensor (the other columns 0): the gate's read of the gradients
// before a one-pass step, which also gives LAMB's clipping its global norm.
at::Tensor grad_sumsq_cpu(const TensorList& grads);
void lars_update_cpu(const TensorList& weights, const TensorList& params, const TensorList& grads,
                     const OptionalTensorList& bufs, const std::vector<bool>& first,
                     const std::vector<int64_t>& group_of, const at::Tensor& groups, const at::Tensor& sumsq,
                     double inv_scale);
// (n, SumColumn): sum w^2, sum g^2, sum u^2 per tensor; nothing else is written.
at::Tensor lamb_norms_cpu(const TensorList& weights, const TensorList& grads, const TensorList& exp_avgs,
                          const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                          const std::vector<int64_t>& group_of, const at::Tensor& groups, double inv_scale,
                          double global_norm);
void lamb_update_cpu(const TensorList& weights, const TensorList& params, const TensorList& grads,
                     const TensorList& exp_avgs, const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                     const std::vector<int64_t>& group_of, const at::Tensor& groups, const at::Tensor& norms,
                     double inv_scale, double global_norm);

// One step in a single pass over memory where the maths allows (cpu_kernels.cpp): tensors in
// cache-sized batches (batch_bytes; 0: the cache's size), each batch's sums then its update.
// grad_sums: grad_sumsq_cpu's output, whose g^2 the step then does not sum again (None: summed
// with the batch). Returns the per-tensor sums (as sumsq_cpu / lamb_norms_cpu give them) and -1,
// or the index of the first tensor whose sums are not finite, where the step stopped: its
// batch and the later ones are not updated (LAMB: that batch's moments are).
std::tuple<at::Tensor, int64_t> lars_step_cpu(const TensorList& weights, const TensorList& params,
                                              const TensorList& grads, const OptionalTensorList& bufs,
                                              const std::vector<bool>& first, const std::vector<int64_t>& group_of,
                                              const at::Tensor& groups, const std::optional<at::Tensor>& grad_sums,
                                              double inv_scale, int64_t batch_bytes);
std::tuple<at::Tensor, int64_t> lamb_step_cpu(const TensorList& weights, const TensorList& params,
                                              const TensorList& grads, const TensorList& exp_avgs,
                                              const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                                              const std::vector<int64_t>& group_of, const at::Tensor& groups,
                                              const std::optional<at::Tensor>& grad_sums, double inv_scale,
                                              double global_norm, int64_t batch_bytes);

#ifdef FASTLARS_WITH_CUDA
// The same maths on CUDA tensors, a fixed number of launches, no host synchronisation and
// no copy from the host (a step can be captured in a CUDA graph). Each call takes one
// launch's tables as fastlars/ops/launch.py builds and caches them for the Triton kernels
// too: `table` (n_tensors, TensorColumn) and `chunks` (n_chunks, ChunkColumn) int64, and
// `groups` (n_groups, LarsColumn or LambColumn) float64, all on the device (layouts.h);
// `weight` and `param` are one weight and one parameter of the launch (their dtypes and
// device). Scalars that live on the device (inverse grad scale, global norm, skip flag)
// come as optional 0-d tensors. Per-tensor sums: per-chunk partials, then a finalize
// launch summing each tensor's in a fixed order (the update reads one row per tensor).
// (n, SumColumn) per tensor, as sumsq_cpu; given the LARS group table, the sums of x^2 of
// the tensors whose group needs them (the buffers: the table's S0; FIRST marks one not made yet).
at::Tensor sumsq_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& weight,
                      const at::Tensor& param, const std::optional<at::Tensor>& lars_groups,
                      const std::optional<at::Tensor>& inv_scale);
void lars_update_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                      const at::Tensor& sumsq, const at::Tensor& weight, const at::Tensor& param,
                      const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& ok);
// (n, SumColumn): sum w^2, g^2, u^2 per tensor; the kernels read each tensor's 0-d float32 `step`
// through the table (this update makes step + 1).
at::Tensor lamb_norms_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                           const at::Tensor& weight, const at::Tensor& param,
                           const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& global_norm);
void lamb_update_cuda(const at::Tensor& table, const at::Tensor& chunks, const at::Tensor& groups,
                      const at::Tensor& norms, const at::Tensor& weight, const at::Tensor& param,
                      const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& global_norm,
                      const std::optional<at::Tensor>& ok);
#endif

}  // namespace fastlars
