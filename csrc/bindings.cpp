// Python bindings of fastlars._C (pybind11 through torch's extension headers).
#include <torch/extension.h>

#include "kernels.h"
#include "layouts.h"

// One layout of csrc/layouts.h as {column name: index}, for tests/test_layouts.py to compare
// with fastlars/ops/layouts.py.
#define FASTLARS_COLUMNS_DICT(LIST, prefix)               \
  [] {                                                    \
    pybind11::dict columns;                               \
    LIST(FASTLARS_ENTRY_##prefix)                         \
    return columns;                                       \
  }()
#define FASTLARS_ENTRY_C(name) columns[#name] = static_cast<int>(fastlars::C_##name);
#define FASTLARS_ENTRY_L(name) columns[#name] = static_cast<int>(fastlars::L_##name);
#define FASTLARS_ENTRY_B(name) columns[#name] = static_cast<int>(fastlars::B_##name);
#define FASTLARS_ENTRY_S(name) columns[#name] = static_cast<int>(fastlars::S_##name);
#define FASTLARS_ENTRY_K(name) columns[#name] = static_cast<int>(fastlars::K_##name);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlars fused optimizer kernels (CPU, and CUDA when built with it)";
  m.attr("chunk_elements") = fastlars::kChunk;
  m.attr("tensor_columns") = FASTLARS_COLUMNS_DICT(FASTLARS_TENSOR_COLUMNS, C);
  m.attr("chunk_columns") = FASTLARS_COLUMNS_DICT(FASTLARS_CHUNK_COLUMNS, K);
  m.attr("lars_columns") = FASTLARS_COLUMNS_DICT(FASTLARS_LARS_COLUMNS, L);
  m.attr("lamb_columns") = FASTLARS_COLUMNS_DICT(FASTLARS_LAMB_COLUMNS, B);
  m.attr("sum_columns") = FASTLARS_COLUMNS_DICT(FASTLARS_SUM_COLUMNS, S);
  m.def("add_one_cpu", &fastlars::add_one_cpu, "adds 1 to each tensor (LAMB's step counters), one call");
  m.def("first_layout_mismatch", &fastlars::first_layout_mismatch,
        "index of the first parameter whose tensors the CPU kernels cannot walk linearly, or -1");
  m.def("sumsq_cpu", &fastlars::sumsq_cpu, "per-tensor sums of squares of weights and gradients");
  m.def("lars_update_cpu", &fastlars::lars_update_cpu, "fused LARS update");
  m.def("lamb_norms_cpu", &fastlars::lamb_norms_cpu, "per-tensor sums of squares of w, g and the LAMB direction u");
  m.def("lamb_update_cpu", &fastlars::lamb_update_cpu, "fused LAMB update");
  m.def("grad_sumsq_cpu", &fastlars::grad_sumsq_cpu, "per-tensor sums of squares of the gradients (the gate's read)");
  m.def("lars_step_cpu", &fastlars::lars_step_cpu, "LARS step in cache-sized batches (one pass where it fits)");
  m.def("lamb_step_cpu", &fastlars::lamb_step_cpu, "LAMB step in cache-sized batches (one pass where it fits)");
#ifdef FASTLARS_WITH_CUDA
  m.def("sumsq_cuda", &fastlars::sumsq_cuda, "per-tensor sums of squares (CUDA, one launch)");
  m.def("lars_update_cuda", &fastlars::lars_update_cuda, "fused LARS update (CUDA, one launch)");
  m.def("lamb_norms_cuda", &fastlars::lamb_norms_cuda, "LAMB partial norms of w, g, u (CUDA, one launch)");
  m.def("lamb_update_cuda", &fastlars::lamb_update_cuda, "fused LAMB update (CUDA, one launch)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
