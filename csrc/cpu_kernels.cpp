// Fused CPU kernels for LARS and LAMB: OpenMP over fixed-size chunks (work items) of all
// tensors, the per-element maths from fastlars_math.h.
//
// Two ways through memory (fp32 bytes per element; bench/NOTES.md has the model and the
// measurements):
// - the step (lars_step_cpu, lamb_step_cpu): whole tensors in cache-sized batches; per batch
//   the norms of its tensors, then their update while the batch is still in cache, each thread
//   on the same items in both phases. A tensor larger than a batch is a batch of its own, read
//   twice. With the gradients' sums from a pre-read (grad_sumsq_cpu: the gate's 4 B), LARS
//   moves 4 + 20 = 24 B and LAMB 4 + 28 = 32 B; without (GradScaler decided already) 20 and 28.
// - two passes (sumsq_cpu then lars_update_cpu; lamb_norms_cpu then lamb_update_cpu), where
//   norms must be combined across ranks between them (sharded parameters): LARS 28 B, LAMB 44 B.
// Items are fixed (not per thread) and their partial sums combined in item order, so results
// do not depend on the thread count, nor on the batch size: both ways give the same bits.
#include "dispatch.h"
#include "fastlars_math.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace fastlars {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise the sums

// The element loops are compiled for AVX2 beside the x86-64 baseline (SSE2) and the loader
// picks one by the CPU (GCC's target_clones), as torch's own fused CPU steps pick their at::vec
// kernels: SSE2's four lanes leave LAMB's divisions and square root compute-bound. Not FMA:
// contracting a * b + c would round differently from the reference's separate operations.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLARS_ELEMENT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define FASTLARS_ELEMENT_LOOP
#endif

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

// The items [begin, end) of whole tensors [first_tensor, end_tensor) that one step phase pair covers.
struct Batch {
  int64_t begin, end, first_tensor, end_tensor;
};

// Consecutive whole tensors whose bytes (bytes_per_element each) fit `budget`; a tensor larger
// than the budget is a batch of its own. Tensors without items (empty) join the current batch.
std::vector<Batch> cache_batches(const std::vector<WorkItem>& items, int64_t n_tensors, int64_t bytes_per_element,
                                 int64_t budget) {
  std::vector<Batch> batches;
  int64_t k = 0, tensor = 0;
  while (tensor < n_tensors) {
    Batch b{k, k, tensor, tensor};
    int64_t bytes = 0;
    while (b.end_tensor < n_tensors) {
      int64_t end = b.end;
      while (end < static_cast<int64_t>(items.size()) && items[end].tensor == b.end_tensor) ++end;
      int64_t tensor_bytes = 0;
      for (int64_t j = b.end; j < end; ++j) tensor_bytes += (items[j].end - items[j].begin) * bytes_per_element;
      if (b.end_tensor > b.first_tensor && bytes + tensor_bytes > budget) break;
      bytes += tensor_bytes;
      b.end = end;
      ++b.end_tensor;
    }
    batches.push_back(b);
    k = b.end;
    tensor = b.end_tensor;
  }
  return batches;
}

// Bytes of a batch: the caller's, else FASTLARS_CPU_BATCH_BYTES, else twice the L2 caches of
// the threads (each thread's items in its L2, and as much again in the L3, which on AMD holds
// what the L2s evict). The L3's size is not used: it is shared with other cores (in a VM, with
// other tenants), and sysconf may misreport it: 320 MB on the 2-core VM of bench/NOTES.md (32
// MB in sysfs), where half of it made the whole ResNet-50 step one batch that no cache holds.
// Measured there: batches of 1-8 MB alike, 12-24 MB slower, 160 MB slowest.
int64_t batch_budget(int64_t requested) {
  if (requested > 0) return requested;
  if (const char* env = std::getenv("FASTLARS_CPU_BATCH_BYTES")) {
    const long long value = std::atoll(env);
    if (value > 0) return value;
  }
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return std::max<int64_t>(2 * (l2 > 0 ? l2 : (1 << 20)) * at::get_num_threads(), 1 << 20);
}

// Runs a step batch by batch in one parallel region: sums(k) for the batch's items, then
// finish(batch) on one thread (false: stop here, nothing more is written), then update(k) for
// the same items, each on the thread that summed it (a static schedule over the same range).
template <typename Sums, typename Finish, typename Update>
void run_batches(const std::vector<Batch>& batches, const Sums& sums, const Finish& finish, const Update& update) {
  bool go = true;
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    for (const Batch& b : batches) {
#pragma omp for schedule(static)
      for (int64_t k = b.begin; k < b.end; ++k) sums(k);
#pragma omp single
      go = finish(b);
      if (!go) break;  // every thread reads it after the single's barrier
#pragma omp for schedule(static) nowait
      for (int64_t k = b.begin; k < b.end; ++k) update(k);
    }
  }
}

// Adds the partials of the batch's items to their tensors' rows of `out`, in item order.
void add_partials(const Batch& b, const std::vector<WorkItem>& items, const std::vector<double>& partials,
                  double* out, int columns) {
  for (int64_t k = b.begin; k < b.end; ++k)
    for (int c = 0; c < columns; ++c) out[items[k].tensor * columns + c] += partials[k * columns + c];
}

// Per-tensor totals of per-item partials, summed in item order (add_partials over every item).
at::Tensor totals(const std::vector<WorkItem>& items, const std::vector<double>& partials, int64_t n_tensors,
                  int columns) {
  at::Tensor out = at::zeros({n_tensors, columns}, at::kDouble);
  add_partials(Batch{0, static_cast<int64_t>(items.size()), 0, n_tensors}, items, partials, out.data_ptr<double>(),
               columns);
  return out;
}

bool finite_row(const double* row, int columns) {
  for (int c = 0; c < columns; ++c)
    if (!std::isfinite(row[c])) return false;
  return true;
}

template <typename T>
FASTLARS_ELEMENT_LOOP double sum_squares(const T* p, int64_t n) {
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
FASTLARS_ELEMENT_LOOP double sum_products(const A* a, const B* b, int64_t n) {
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

// The element loops of the updates. Each takes its arrays as __restrict parameters and its
// hyper-parameters by value, so that the compiler knows no store aliases another array or a
// hyper-parameter: with the loops behind target_clones (a call, not inlined), a closure or a
// reference would leave the loop unvectorised. kMaster: w is the fp32 master of the
// low-precision parameter p, which gets the rounded value too; else p is w and is not passed.
template <bool kMaster, typename acc_t, typename weight_t, typename param_t>
inline void store_weight(weight_t* __restrict w, param_t* __restrict p, int64_t e, acc_t value) {
  w[e] = static_cast<weight_t>(value);
  if constexpr (kMaster) p[e] = static_cast<param_t>(value);
}

template <unsigned F, bool kMaster, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lars_update_loop(weight_t* __restrict w, param_t* __restrict p,
                                            const param_t* __restrict g, acc_t* __restrict buf, int64_t begin,
                                            int64_t end, const LarsFactors<acc_t> factors, const LarsHyper<acc_t> h,
                                            const acc_t scale) {
  for (int64_t e = begin; e < end; ++e) {
    acc_t b = 0;
    if constexpr (variant::has(F, variant::kMomentum)) b = buf[e];
    const acc_t updated = lars_element<F, acc_t>(acc_t(w[e]), acc_t(g[e]) * scale, b, false, factors, h);
    if constexpr (variant::has(F, variant::kMomentum)) buf[e] = b;
    store_weight<kMaster>(w, p, e, updated);
  }
}

// LAMB's update of the two passes: new moments, u and the weights.
template <unsigned F, bool kMaster, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lamb_update_loop(weight_t* __restrict w, param_t* __restrict p,
                                            const param_t* __restrict g, acc_t* __restrict m, acc_t* __restrict v,
                                            int64_t begin, int64_t end, const acc_t factor, const acc_t ratio,
                                            const LambHyper<acc_t> h) {
  for (int64_t e = begin; e < end; ++e) {
    const acc_t we = acc_t(w[e]);
    acc_t me = m[e], ve = v[e];
    const acc_t u = lamb_direction<F, acc_t>(we, acc_t(g[e]) * factor, me, ve, h);
    m[e] = me;
    v[e] = ve;
    store_weight<kMaster>(w, p, e, lamb_weight<F, acc_t>(we, u, ratio, h));
  }
}

// The one pass's LAMB update from u kept by its sums (u indexed from `begin`), or recomputed
// from the moments its sums wrote (a tensor larger than a batch).
template <unsigned F, bool kMaster, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lamb_weight_loop(weight_t* __restrict w, param_t* __restrict p,
                                            const acc_t* __restrict u, int64_t begin, int64_t end,
                                            const acc_t ratio, const LambHyper<acc_t> h) {
  for (int64_t e = begin; e < end; ++e) store_weight<kMaster>(w, p, e, lamb_weight<F, acc_t>(acc_t(w[e]), u[e - begin], ratio, h));
}

template <unsigned F, bool kMaster, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lamb_moments_weight_loop(weight_t* __restrict w, param_t* __restrict p,
                                                    const acc_t* __restrict m, const acc_t* __restrict v,
                                                    int64_t begin, int64_t end, const acc_t ratio,
                                                    const LambHyper<acc_t> h) {
  for (int64_t e = begin; e < end; ++e) {
    const acc_t we = acc_t(w[e]);
    store_weight<kMaster>(w, p, e, lamb_weight<F, acc_t>(we, lamb_direction_of_moments<F, acc_t>(we, m[e], v[e], h), ratio, h));
  }
}

// Calls fn(std::bool_constant<master>) for whether weight w is the master copy of parameter p.
template <typename Fn>
void with_master(const void* w, const void* p, const Fn& fn) {
  if (w != p)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// ---------------------------------------------------------------------------------------
// LARS

// What a LARS tensor's norms sum besides w^2 (SumColumn): g^2 unless it came from the
// pre-read; x^2 where its group's ratio divides by ||x|| (lars_denominator), which reads the
// buffer where the ratio is taken after momentum and the buffer holds a previous step's.
template <typename acc_t>
struct LarsSums {
  bool g2, x2;
  LarsDenominator<acc_t> x;
};

template <typename acc_t>
LarsSums<acc_t> lars_sums_of(const LarsHyper<acc_t>& h, bool first, bool has_buf, double inv_scale, bool g2) {
  LarsSums<acc_t> what{g2, lars_sums_denominator(h), lars_denominator<acc_t>(h, acc_t(inv_scale), first)};
  what.x.reads_buf = what.x.reads_buf && has_buf;
  return what;
}

// The sums of a LARS item whose ratio reads the buffer, in one loop over the chunk: w^2 (and
// g^2) in kLanes float lanes and their tails in double, the order of sum_squares, so the bits
// are its; x^2 (lars_denominator_element) in acc_t lanes.
template <bool kG2, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lars_sums_loop(const weight_t* __restrict w, const param_t* __restrict g,
                                          const acc_t* __restrict buf, int64_t n, const LarsDenominator<acc_t> x,
                                          double* sums) {
  float w2[kLanes] = {0}, g2[kLanes] = {0};
  acc_t x2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float we = static_cast<float>(w[i + l]), ge = static_cast<float>(g[i + l]);
      w2[l] += we * we;
      if constexpr (kG2) g2[l] += ge * ge;
      const acc_t xe = lars_denominator_element<true, acc_t>(x, acc_t(w[i + l]), acc_t(g[i + l]), buf[i + l]);
      x2[l] += xe * xe;
    }
  double t[3] = {0, 0, 0};  // w2, g2, x2
  for (; i < n; ++i) {
    const double we = static_cast<float>(w[i]), ge = static_cast<float>(g[i]);
    t[0] += we * we;
    if constexpr (kG2) t[1] += ge * ge;
    const double xe = lars_denominator_element<true, acc_t>(x, acc_t(w[i]), acc_t(g[i]), buf[i]);
    t[2] += xe * xe;
  }
  for (int l = 0; l < kLanes; ++l) {
    t[0] += w2[l];
    t[1] += g2[l];
    t[2] += x2[l];
  }
  sums[S_W2] = t[0];
  if constexpr (kG2) sums[S_G2] = t[1];
  sums[S_U2] = t[2];
}

// sum x^2 alone (lars_denominator_element), in acc_t lanes, beside sum_squares' w^2 and g^2.
template <bool kBuf, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP double sum_denominator_squares(const weight_t* __restrict w, const param_t* __restrict g,
                                                     const acc_t* __restrict buf, int64_t n,
                                                     const LarsDenominator<acc_t> x) {
  acc_t lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t xe = lars_denominator_element<kBuf, acc_t>(x, acc_t(w[i + l]), acc_t(g[i + l]),
                                                             kBuf ? buf[i + l] : acc_t(0));
      lanes[l] += xe * xe;
    }
  double total = 0;
  for (; i < n; ++i) {
    const double xe = lars_denominator_element<kBuf, acc_t>(x, acc_t(w[i]), acc_t(g[i]), kBuf ? buf[i] : acc_t(0));
    total += xe * xe;
  }
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename weight_t, typename param_t, typename acc_t>
void lars_item_sums(const weight_t* w, const param_t* g, const acc_t* buf, int64_t n, const LarsSums<acc_t>& what,
                    double* sums) {
  const auto& x = what.x;
  // with the buffer (the "momentum_update" ratio after its first step): one loop, which reads
  // w, g and buf once; else separate loops, which GCC vectorises better than that loop without
  // the buffer (A/B on ResNet-50's shapes, bench/NOTES.md). fp64: sum_squares' double order.
  if (std::is_same_v<weight_t, double> || !x.reads_buf) {
    sums[S_W2] = sum_squares(w, n);
    if (what.g2) sums[S_G2] = sum_squares(g, n);
    if (what.x2)
      sums[S_U2] = x.reads_buf ? sum_denominator_squares<true>(w, g, buf, n, x)
                               : sum_denominator_squares<false>(w, g, buf, n, x);
  } else if (what.g2) {
    lars_sums_loop<true>(w, g, buf, n, x, sums);
  } else {
    lars_sums_loop<false>(w, g, buf, n, x, sums);
  }
}

// A tensor's factors of the update (lars_factors) from its sums.
template <typename acc_t>
LarsFactors<acc_t> lars_tensor_factors(const double* sums, double inv_scale, const LarsHyper<acc_t>& h) {
  const acc_t w_norm = acc_t(std::sqrt(sums[S_W2]));
  const acc_t x_norm = lars_denominator_norm<acc_t>(sums, acc_t(std::sqrt(sums[S_G2]) * inv_scale), h);
  return lars_factors<acc_t>(w_norm, x_norm, h);
}

// The update of elements [begin, end) of one tensor, its loop compiled for its variant set.
template <typename acc_t, typename weight_t, typename param_t>
void lars_item_update(weight_t* w, param_t* p, const param_t* g, acc_t* buf, int64_t begin, int64_t end, bool first,
                      const LarsFactors<acc_t>& factors, const LarsHyper<acc_t>& h, acc_t scale) {
  const unsigned set = buf ? lars_set(h, first) : variant::kExact;
  with_variant_set<variant::kLarsSets, variant::kExact>(set, [&](auto s) {
    with_master(w, p, [&](auto master) {
      lars_update_loop<decltype(s)::value, decltype(master)::value>(w, p, g, buf, begin, end, factors, h, scale);
    });
  });
}

// ---------------------------------------------------------------------------------------
// LAMB

// Sums of w^2, g^2 and u^2 over [begin, end) in kLanes float lanes (the tail in partial lane
// groups): the order every LAMB norms pass uses. u = lamb_direction of the new moments. kStore
// (the step, after the gate): the new moments are written back, and u into u_out (indexed from
// `begin`) where given. Both choices are template arguments: no branch in the element loop.
template <unsigned F, bool kStore, bool kKeepU, typename acc_t, typename weight_t, typename param_t>
FASTLARS_ELEMENT_LOOP void lamb_item_sums(const weight_t* __restrict w, const param_t* __restrict g, acc_t* __restrict m,
                                          acc_t* __restrict v, int64_t begin, int64_t end, const acc_t factor,
                                          const LambHyper<acc_t> h, acc_t* __restrict u_out, double* sums) {
  acc_t w2[kLanes] = {0}, g2[kLanes] = {0}, u2[kLanes] = {0};
  for (int64_t e0 = begin; e0 < end; e0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - e0));
    for (int l = 0; l < lanes; ++l) {
      const int64_t e = e0 + l;
      const acc_t we = acc_t(w[e]), ge = acc_t(g[e]);
      acc_t me = m[e], ve = v[e];
      const acc_t u = lamb_direction<F, acc_t>(we, ge * factor, me, ve, h);
      if constexpr (kStore) {
        m[e] = me;
        v[e] = ve;
      }
      if constexpr (kKeepU) u_out[e - begin] = u;
      w2[l] += we * we;
      g2[l] += ge * ge;
      u2[l] += u * u;
    }
  }
  sums[S_W2] = sums[S_G2] = sums[S_U2] = 0;
  for (int l = 0; l < kLanes; ++l) {
    sums[S_W2] += w2[l];
    sums[S_G2] += g2[l];
    sums[S_U2] += u2[l];
  }
}

// Calls fn with the compile-time variant set of a LAMB group (variant::kExact).
template <typename acc_t, typename Fn>
void with_lamb_set(const LambHyper<acc_t>& h, const Fn& fn) {
  with_variant_set<variant::kLambSets, variant::kExact>(lamb_set(h), fn);
}

template <typename acc_t>
acc_t lamb_tensor_ratio(const double* sums, const LambHyper<acc_t>& h) {
  return lamb_trust_ratio<acc_t>(acc_t(std::sqrt(sums[S_W2])), acc_t(std::sqrt(sums[S_U2])), h);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// entry points

void add_one_cpu(const TensorList& tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1 && !t.is_inference()) {
      *t.data_ptr<float>() += 1.0f;
      t.unsafeGetTensorImpl()->bump_version();
    } else {
      t.add_(1);
    }
  }
}

int64_t first_layout_mismatch(const TensorList& params, const std::vector<OptionalTensorList>& others) {
  for (const auto& list : others)
    TORCH_CHECK(list.size() == params.size(), "fastlars: first_layout_mismatch needs one entry per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() > 1 && !p.is_non_overlapping_and_dense()) return static_cast<int64_t>(i);
    for (const auto& list : others) {
      const auto& t = list[i];
      if (t && t->numel() > 0 && t->strides() != p.strides()) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

at::Tensor grad_sumsq_cpu(const TensorList& grads) {
  const auto items = chunk_items(grads);
  std::vector<double> partials(items.size() * S_NCOL);
  if (!items.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fastlars_grad_sumsq_cpu", [&] {
      for_items(items, [&](int64_t k) {
        const auto& it = items[k];
        partials[S_NCOL * k + S_G2] = sum_squares(grads[it.tensor].data_ptr<scalar_t>() + it.begin, it.end - it.begin);
      });
    });
  }
  return totals(items, partials, static_cast<int64_t>(grads.size()), S_NCOL);
}

at::Tensor sumsq_cpu(const TensorList& weights, const TensorList& grads, const OptionalTensorList& bufs,
                     const std::vector<bool>& first, const std::vector<int64_t>& group_of,
                     const std::optional<at::Tensor>& lars_groups, double inv_scale) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(!lars_groups || (static_cast<int64_t>(bufs.size()) == n && static_cast<int64_t>(first.size()) == n &&
                               static_cast<int64_t>(group_of.size()) == n),
              "fastlars: sumsq_cpu with a LARS group table needs a buffer (or None), a first flag and a group per tensor");
  const auto items = chunk_items(grads);
  std::vector<double> partials(items.size() * S_NCOL);  // columns not summed stay 0
  const double* table = lars_groups ? lars_groups->data_ptr<double>() : nullptr;
  if (!items.empty()) {
    FASTLARS_DISPATCH(grads, weights, "fastlars_sumsq_cpu", [&] {
      for_items(items, [&](int64_t k) {
        const auto& it = items[k];
        const int64_t i = it.tensor;
        LarsSums<acc_t> what{true, false, {}};
        if (table) what = lars_sums_of(lars_hyper<acc_t>(table + group_of[i] * L_NCOL), first[i],
                                       bufs[i].has_value(), inv_scale, true);
        lars_item_sums(weights[i].data_ptr<weight_t>() + it.begin, grads[i].data_ptr<param_t>() + it.begin,
                       what.x.reads_buf ? bufs[i]->data_ptr<acc_t>() + it.begin : static_cast<acc_t*>(nullptr),
                       it.end - it.begin, what, partials.data() + S_NCOL * k);
      });
    });
  }
  return totals(items, partials, n, S_NCOL);
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
      const auto factors = lars_tensor_factors<acc_t>(norms + S_NCOL * i, inv_scale, h);
      lars_item_update<acc_t>(weights[i].data_ptr<weight_t>(), params[i].data_ptr<param_t>(),
                              grads[i].data_ptr<param_t>(), bufs[i] ? bufs[i]->data_ptr<acc_t>() : nullptr, it.begin,
                              it.end, first[i], factors, h, acc_t(inv_scale));
    });
  });
}

std::tuple<at::Tensor, int64_t> lars_step_cpu(const TensorList& weights, const TensorList& params,
                                              const TensorList& grads, const OptionalTensorList& bufs,
                                              const std::vector<bool>& first, const std::vector<int64_t>& group_of,
                                              const at::Tensor& groups, const std::optional<at::Tensor>& grad_sums,
                                              double inv_scale, int64_t batch_bytes) {
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto items = chunk_items(grads);
  at::Tensor out = at::zeros({n, S_NCOL}, at::kDouble);
  double* sums = out.data_ptr<double>();
  if (grad_sums) {  // the pre-read's g^2 (its other columns are 0)
    TORCH_CHECK(grad_sums->sizes() == out.sizes(), "fastlars: lars_step_cpu's grad_sums must be (tensors, sums)");
    out.copy_(*grad_sums);
  }
  int64_t nonfinite = -1;
  if (items.empty()) return {out, nonfinite};
  const double* table = groups.data_ptr<double>();
  std::vector<double> partials(items.size() * S_NCOL);
  FASTLARS_DISPATCH(params, weights, "fastlars_lars_step_cpu", [&] {
    const int64_t element_bytes = 2 * sizeof(weight_t) + sizeof(param_t) + sizeof(acc_t) +
                                  (std::is_same_v<weight_t, param_t> ? 0 : sizeof(param_t));
    const auto batches = cache_batches(items, n, element_bytes, batch_budget(batch_bytes));
    std::vector<LarsHyper<acc_t>> hyper(n);
    std::vector<LarsFactors<acc_t>> factors(n);
    for (int64_t i = 0; i < n; ++i) hyper[i] = lars_hyper<acc_t>(table + group_of[i] * L_NCOL);
    auto buf_of = [&](int64_t i) { return bufs[i] ? bufs[i]->data_ptr<acc_t>() : static_cast<acc_t*>(nullptr); };
    run_batches(
        batches,
        [&](int64_t k) {
          const auto& it = items[k];
          const int64_t i = it.tensor;
          const auto what = lars_sums_of(hyper[i], first[i], bufs[i].has_value(), inv_scale, !grad_sums);
          acc_t* b = what.x.reads_buf ? buf_of(i) + it.begin : nullptr;
          double* row = partials.data() + S_NCOL * k;
          lars_item_sums(weights[i].data_ptr<weight_t>() + it.begin, grads[i].data_ptr<param_t>() + it.begin, b,
                         it.end - it.begin, what, row);
        },
        [&](const Batch& b) {
          add_partials(b, items, partials, sums, S_NCOL);
          for (int64_t i = b.first_tensor; i < b.end_tensor; ++i) {
            if (!finite_row(sums + S_NCOL * i, S_NCOL)) {
              nonfinite = i;
              return false;
            }
            factors[i] = lars_tensor_factors<acc_t>(sums + S_NCOL * i, inv_scale, hyper[i]);
          }
          return true;
        },
        [&](int64_t k) {
          const auto& it = items[k];
          const int64_t i = it.tensor;
          lars_item_update<acc_t>(weights[i].data_ptr<weight_t>(), params[i].data_ptr<param_t>(),
                                  grads[i].data_ptr<param_t>(), buf_of(i), it.begin, it.end, first[i], factors[i],
                                  hyper[i], acc_t(inv_scale));
        });
  });
  return {out, nonfinite};
}

at::Tensor lamb_norms_cpu(const TensorList& weights, const TensorList& grads, const TensorList& exp_avgs,
                          const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                          const std::vector<int64_t>& group_of, const at::Tensor& groups, double inv_scale,
                          double global_norm) {
  const auto items = chunk_items(grads);
  std::vector<double> partials(items.size() * S_NCOL);
  const double* table = groups.data_ptr<double>();
  if (!items.empty()) {
    FASTLARS_DISPATCH(grads, weights, "fastlars_lamb_norms_cpu", [&] {
      for_items(items, [&](int64_t k) {
        const auto& it = items[k];
        const int64_t i = it.tensor;
        const double* row = table + group_of[i] * B_NCOL;
        const auto h = lamb_hyper<acc_t>(row, steps[i]);
        const acc_t factor = acc_t(grad_factor(row, inv_scale, global_norm));
        // u is recomputed in the update: this pass writes nothing but partials
        with_lamb_set(h, [&](auto set) {
          lamb_item_sums<decltype(set)::value, false, false>(
              weights[i].data_ptr<weight_t>(), grads[i].data_ptr<param_t>(), exp_avgs[i].data_ptr<acc_t>(),
              exp_avg_sqs[i].data_ptr<acc_t>(), it.begin, it.end, factor, h, static_cast<acc_t*>(nullptr),
              partials.data() + S_NCOL * k);
        });
      });
    });
  }
  return totals(items, partials, static_cast<int64_t>(grads.size()), S_NCOL);
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
      const acc_t ratio = lamb_tensor_ratio<acc_t>(sums + S_NCOL * i, h);
      weight_t* w = weights[i].data_ptr<weight_t>();
      const param_t* g = grads[i].data_ptr<param_t>();
      acc_t* m = exp_avgs[i].data_ptr<acc_t>();
      acc_t* v = exp_avg_sqs[i].data_ptr<acc_t>();
      with_lamb_set(h, [&](auto set) {
        with_master(w, params[i].data_ptr<param_t>(), [&](auto master) {
          lamb_update_loop<decltype(set)::value, decltype(master)::value>(w, params[i].data_ptr<param_t>(), g, m, v,
                                                                          it.begin, it.end, factor, ratio, h);
        });
      });
    });
  });
}

std::tuple<at::Tensor, int64_t> lamb_step_cpu(const TensorList& weights, const TensorList& params,
                                              const TensorList& grads, const TensorList& exp_avgs,
                                              const TensorList& exp_avg_sqs, const std::vector<double>& steps,
                                              const std::vector<int64_t>& group_of, const at::Tensor& groups,
                                              const std::optional<at::Tensor>& grad_sums, double inv_scale,
                                              double global_norm, int64_t batch_bytes) {
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto items = chunk_items(grads);
  at::Tensor out = at::zeros({n, S_NCOL}, at::kDouble);
  double* sums = out.data_ptr<double>();
  int64_t nonfinite = -1;
  if (items.empty()) return {out, nonfinite};
  const double* table = groups.data_ptr<double>();
  const double* pre_read = grad_sums ? grad_sums->data_ptr<double>() : nullptr;  // (n, S_NCOL): its G2
  std::vector<double> partials(items.size() * S_NCOL);
  FASTLARS_DISPATCH(params, weights, "fastlars_lamb_step_cpu", [&] {
    // the batch's working set: w, g, m, v, u (and the parameter beside its master)
    const int64_t element_bytes = sizeof(weight_t) + sizeof(param_t) + 3 * sizeof(acc_t) +
                                  (std::is_same_v<weight_t, param_t> ? 0 : sizeof(param_t));
    const int64_t budget = batch_budget(batch_bytes);
    const auto batches = cache_batches(items, n, element_bytes, budget);
    // u of the batch's items, kept for the update while in cache; a batch larger than the
    // budget (one large tensor) recomputes u from the new moments instead. Two regions, taken
    // by alternate batches: a thread done with batch b's update (nowait) sums batch b + 1's
    // while others still read b's u, but none reaches b + 2 before all have left b's update
    // (the barrier after each batch's sums).
    auto batch_elements = [&](const Batch& b) {
      int64_t count = 0;
      for (int64_t k = b.begin; k < b.end; ++k) count += items[k].end - items[k].begin;
      return count;
    };
    int64_t u_elements = 0;  // the largest batch that keeps u
    for (const Batch& b : batches)
      if (batch_elements(b) * element_bytes <= budget) u_elements = std::max(u_elements, batch_elements(b));
    std::vector<int64_t> u_offset(items.size(), -1);
    for (size_t j = 0; j < batches.size(); ++j) {
      const Batch& b = batches[j];
      if (batch_elements(b) * element_bytes > budget) continue;
      int64_t offset = static_cast<int64_t>(j % 2) * u_elements;
      for (int64_t k = b.begin; k < b.end; ++k) {
        u_offset[k] = offset;
        offset += items[k].end - items[k].begin;
      }
    }
    // kept across steps (a new allocation of this size is fresh pages, faulted in at every
    // step), one per calling thread; the parallel region's threads use it through u_kept
    static thread_local std::vector<acc_t> u_buffer;
    if (static_cast<int64_t>(u_buffer.size()) < 2 * u_elements) u_buffer.resize(2 * u_elements);
    acc_t* const u_kept = u_buffer.data();
    std::vector<LambHyper<acc_t>> hyper(n);
    std::vector<acc_t> factor(n), ratio(n);
    for (int64_t i = 0; i < n; ++i) {
      const double* row = table + group_of[i] * B_NCOL;
      hyper[i] = lamb_hyper<acc_t>(row, steps[i]);
      factor[i] = acc_t(grad_factor(row, inv_scale, global_norm));
    }
    run_batches(
        batches,
        [&](int64_t k) {
          const auto& it = items[k];
          const int64_t i = it.tensor;
          with_lamb_set(hyper[i], [&](auto set) {
            constexpr unsigned F = decltype(set)::value;
            const weight_t* w = weights[i].data_ptr<weight_t>();
            const param_t* g = grads[i].data_ptr<param_t>();
            acc_t* m = exp_avgs[i].data_ptr<acc_t>();
            acc_t* v = exp_avg_sqs[i].data_ptr<acc_t>();
            double* row = partials.data() + S_NCOL * k;
            if (u_offset[k] >= 0)
              lamb_item_sums<F, true, true>(w, g, m, v, it.begin, it.end, factor[i], hyper[i],
                                            u_kept + u_offset[k], row);
            else
              lamb_item_sums<F, true, false>(w, g, m, v, it.begin, it.end, factor[i], hyper[i],
                                             static_cast<acc_t*>(nullptr), row);
          });
        },
        [&](const Batch& b) {
          add_partials(b, items, partials, sums, S_NCOL);
          for (int64_t i = b.first_tensor; i < b.end_tensor; ++i) {
            double* row = sums + S_NCOL * i;
            if (pre_read) row[S_G2] = pre_read[S_NCOL * i + S_G2];  // the gate's, and clipping's
            if (!finite_row(row, S_NCOL)) {
              nonfinite = i;
              return false;
            }
            ratio[i] = lamb_tensor_ratio<acc_t>(row, hyper[i]);
          }
          return true;
        },
        [&](int64_t k) {
          const auto& it = items[k];
          const int64_t i = it.tensor;
          weight_t* w = weights[i].data_ptr<weight_t>();
          param_t* p = params[i].data_ptr<param_t>();
          const auto& h = hyper[i];
          const acc_t r = ratio[i];
          with_lamb_set(h, [&](auto set) {
            with_master(w, p, [&](auto master) {
              constexpr unsigned F = decltype(set)::value;
              constexpr bool kMaster = decltype(master)::value;
              if (u_offset[k] >= 0)
                lamb_weight_loop<F, kMaster>(w, p, u_kept + u_offset[k], it.begin, it.end, r, h);
              else
                lamb_moments_weight_loop<F, kMaster>(w, p, exp_avgs[i].data_ptr<acc_t>(),
                                                     exp_avg_sqs[i].data_ptr<acc_t>(), it.begin, it.end, r, h);
            });
          });
        });
  });
  return {out, nonfinite};
}

}  // namespace fastlars
