// Fused CPU kernels for LARS and LAMB: OpenMP over fixed-size chunks of all tensors,
// the per-element maths from fastlars_math.h.
//
// Passes over memory (fp32): LARS = sumsq (read w, g) + update (read w, g, buf; write
// w, buf) = 28 B/element; LAMB = norms (read w, g, m, v) + update (read w, g, m, v;
// write w, m, v) = 44 B/element. Chunks are fixed (not per thread), and partial sums
// are combined in chunk order, so results do not depend on the thread count.
#include "dispatch.h"
#include "fastlars_math.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace fastlars {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise the sums

struct WorkItem {
  int64_t tensor, begin, end;
};

std::vector<WorkItem> chunk_items(const TensorList& tensors) {
  std::vector<WorkItem> items;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({i, b, std::min(n, b + kChunk)});
  }
  return items;
}

// Calls fn(item index) for every work item, in parallel.
template <typename Fn>
void for_items(const std::vector<WorkItem>& items, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) fn(k);
  });
}

// Per-tensor totals of per-item partials, summed in item order.
at::Tensor totals(const std::vector<WorkItem>& items, const std::vector<double>& partials, int64_t n_tensors,
                  int columns) {
  at::Tensor out = at::zeros({n_tensors, columns}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (size_t k = 0; k < items.size(); ++k)
    for (int c = 0; c < columns; ++c) o[items[k].tensor * columns + c] += partials[k * columns + c];
  return out;
}

template <typename T>
double sum_squares(const T* p, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float x = static_cast<float>(p[i + l]);
      lanes[l] += x * x;
    }
  double total = 0;
  for (; i < n; ++i) total += static_cast<double>(static_cast<float>(p[i])) * static_cast<float>(p[i]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <>
double sum_squares<double>(const double* p, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += p[i] * p[i];
  return total;
}

// sum a b (the LARS variants' sums WG, BG, BW), accumulated as sum_squares.
template <typename A, typename B>
double sum_products(const A* a, const B* b, int64_t n) {
  using lane_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;
  lane_t lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<lane_t>(a[i + l]) * static_cast<lane_t>(b[i + l]);
  double total = 0;
  for (; i < n; ++i) total += static_cast<double>(static_cast<lane_t>(a[i])) * static_cast<lane_t>(b[i]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename acc_t, typename weight_t, typename param_t>
void write_weight(weight_t* w, param_t* p, int64_t i, acc_t value) {
  w[i] = static_cast<weight_t>(value);
  if (static_cast<void*>(w) != static_cast<void*>(p)) p[i] = static_cast<param_t>(value);  // master weights
}

}  // namespace

at::Tensor sumsq_cpu(const TensorList& weights, const TensorList& grads, const OptionalTensorList& bufs,
                     const std::vector<bool>& products) {
  const bool variants = !products.empty();  // empty lists: w^2 and g^2 only (no per-step list to convert)
  TORCH_CHECK(!variants || (bufs.size() == grads.size() && products.size() == grads.size()),
              "fastlars: sumsq_cpu needs one buffer (or None) and one products flag per tensor, or two empty lists");
  const auto items = chunk_items(grads);
  std::vector<double> partials(items.size() * kLarsSums);  // columns not summed stay 0
  if (!items.empty()) {
    FASTLARS_DISPATCH(grads, weights, "fastlars_sumsq_cpu", [&] {
      for_items(items, [&](int64_t k) {
        const auto& it = items[k];
        const int64_t n = it.end - it.begin;
        const weight_t* w = weights[it.tensor].data_ptr<weight_t>() + it.begin;
        const param_t* g = grads[it.tensor].data_ptr<param_t>() + it.begin;
        double* sums = partials.data() + kLarsSums * k;
        sums[S_W2] = sum_squares(w, n);
        sums[S_G2] = sum_squares(g, n);
        if (!variants) return;
        if (products[it.tensor]) sums[S_WG] = sum_products(w, g, n);
        if (bufs[it.tensor].has_value()) {
          const acc_t* buf = bufs[it.tensor]->data_ptr<acc_t>() + it.begin;
          sums[S_B2] = sum_squares(buf, n);
          sums[S_BG] = sum_products(buf, g, n);
          sums[S_BW] = sum_products(buf, w, n);
        }
      });
    });
  }
  return totals(items, partials, static_cast<int64_t>(grads.size()), kLarsSums);
}

void lars_update_cpu(const TensorList& weights, const TensorList& params, const TensorList& grads,
                     const OptionalTensorList& bufs, const std::vector<bool>& first,
                     const std::vector<int64_t>& group_of, const at::Tensor& groups, const at::Tensor& sumsq,
                     double inv_scale) {
  const auto items = chunk_items(grads);
  if (items.empty()) return;
  const double* table = groups.data_ptr<double>();
  const double* norms = sumsq.data_ptr<double>();
  FASTLARS_DISPATCH(params, weights, "fastlars_lars_update_cpu", [&] {
    for_items(items, [&](int64_t k) {
      const auto& it = items[k];
      const int64_t i = it.tensor;
      const auto h = lars_hyper<acc_t>(table + group_of[i] * L_NCOL);
      const double* sums = norms + kLarsSums * i;
      const acc_t w_norm = acc_t(std::sqrt(sums[S_W2]));
      const bool is_first = first[i];
      const acc_t x_norm = lars_denominator_norm<acc_t>(sums, acc_t(std::sqrt(sums[S_G2]) * inv_scale),
                                                        acc_t(inv_scale), is_first, h);
      const auto factors = lars_factors<acc_t>(w_norm, x_norm, h);
      weight_t* w = weights[i].data_ptr<weight_t>();
      param_t* p = params[i].data_ptr<param_t>();
      const param_t* g = grads[i].data_ptr<param_t>();
      const acc_t scale = acc_t(inv_scale);
      const bool master = static_cast<void*>(w) != static_cast<void*>(p);
      // loop-invariant choices outside the element loops, so that they vectorise
      if (bufs[i].has_value()) {
        acc_t* buf = bufs[i]->data_ptr<acc_t>();
        for (int64_t e = it.begin; e < it.end; ++e) {
          const acc_t updated = lars_element<acc_t>(acc_t(w[e]), acc_t(g[e]) * scale, buf[e], is_first, factors, h);
          w[e] = static_cast<weight_t>(updated);
          if (master) p[e] = static_cast<param_t>(updated);
        }
      } else {
        for (int64_t e = it.begin; e < it.end; ++e) {
          acc_t unused = 0;
          const acc_t updated = lars_element<acc_t>(acc_t(w[e]), acc_t(g[e]) * scale, unused, false, factors, h);
          w[e] = static_cast<weight_t>(updated);
          if (master) p[e] = static_cast<param_t>(updated);
        }
      }
    });
  });
}

at::Tensor lamb_norms_cpu(const TensorList& weights, const TensorList& grads, const TensorList& exp_avgs,
                          const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                          const std::vector<int64_t>& group_of, const at::Tensor& groups, double inv_scale,
                          double global_norm) {
  const auto items = chunk_items(grads);
  std::vector<double> partials(items.size() * kLambSums);
  const double* table = groups.data_ptr<double>();
  if (!items.empty()) {
    FASTLARS_DISPATCH(grads, weights, "fastlars_lamb_norms_cpu", [&] {
      for_items(items, [&](int64_t k) {
        const auto& it = items[k];
        const int64_t i = it.tensor;
        const double* row = table + group_of[i] * B_NCOL;
        const auto h = lamb_hyper<acc_t>(row, steps[i]);
        const acc_t factor = acc_t(grad_factor(row, inv_scale, global_norm));
        const weight_t* w = weights[i].data_ptr<weight_t>();
        const param_t* g = grads[i].data_ptr<param_t>();
        const acc_t* m = exp_avgs[i].data_ptr<acc_t>();
        const acc_t* v = exp_avg_sqs[i].data_ptr<acc_t>();
        // u is recomputed here and in the update: this pass writes nothing but partials
        acc_t w2[kLanes] = {0}, g2[kLanes] = {0}, u2[kLanes] = {0};
        for (int64_t e0 = it.begin; e0 < it.end; e0 += kLanes) {
          const int lanes = static_cast<int>(std::min<int64_t>(kLanes, it.end - e0));
          for (int l = 0; l < lanes; ++l) {
            const int64_t e = e0 + l;
            const acc_t we = acc_t(w[e]), ge = acc_t(g[e]);
            acc_t me = m[e], ve = v[e];
            const acc_t u = lamb_direction<acc_t>(we, ge * factor, me, ve, h);
            w2[l] += we * we;
            g2[l] += ge * ge;
            u2[l] += u * u;
          }
        }
        double sums[kLambSums] = {0, 0, 0};
        for (int l = 0; l < kLanes; ++l) {
          sums[S_W2] += w2[l];
          sums[S_G2] += g2[l];
          sums[S_U2] += u2[l];
        }
        for (int c = 0; c < kLambSums; ++c) partials[kLambSums * k + c] = sums[c];
      });
    });
  }
  return totals(items, partials, static_cast<int64_t>(grads.size()), kLambSums);
}

void lamb_update_cpu(const TensorList& weights, const TensorList& params, const TensorList& grads,
                     const TensorList& exp_avgs, const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                     const std::vector<int64_t>& group_of, const at::Tensor& groups, const at::Tensor& norms,
                     double inv_scale, double global_norm) {
  const auto items = chunk_items(grads);
  if (items.empty()) return;
  const double* table = groups.data_ptr<double>();
  const double* sums = norms.data_ptr<double>();
  FASTLARS_DISPATCH(params, weights, "fastlars_lamb_update_cpu", [&] {
    for_items(items, [&](int64_t k) {
      const auto& it = items[k];
      const int64_t i = it.tensor;
      const double* row = table + group_of[i] * B_NCOL;
      const auto h = lamb_hyper<acc_t>(row, steps[i]);
      const acc_t factor = acc_t(grad_factor(row, inv_scale, global_norm));
      const acc_t ratio = lamb_trust_ratio<acc_t>(acc_t(std::sqrt(sums[kLambSums * i + S_W2])),
                                                  acc_t(std::sqrt(sums[kLambSums * i + S_U2])), h);
      weight_t* w = weights[i].data_ptr<weight_t>();
      param_t* p = params[i].data_ptr<param_t>();
      const param_t* g = grads[i].data_ptr<param_t>();
      acc_t* m = exp_avgs[i].data_ptr<acc_t>();
      acc_t* v = exp_avg_sqs[i].data_ptr<acc_t>();
      for (int64_t e = it.begin; e < it.end; ++e) {
        const acc_t we = acc_t(w[e]);
        const acc_t u = lamb_direction<acc_t>(we, acc_t(g[e]) * factor, m[e], v[e], h);
        write_weight<acc_t>(w, p, e, lamb_weight<acc_t>(we, u, ratio, h));
      }
    });
  });
}

}  // namespace fastlars
