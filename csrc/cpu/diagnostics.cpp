// What the CPU kernels run on, for users, tests and benchmark reports: the instruction set they
// dispatch to (cpu/simd.h) and the number of threads at::parallel_for gives them. The second is a
// build check, too: without OpenMP in this extension's compile flags at::parallel_for runs on one
// thread without a word (see setup.py).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cpu/simd.h"

namespace qdarts {
namespace cpu {
namespace {

std::string cpu_simd_level() {
  switch (simd_level()) {
    case SimdLevel::kAvx512:
      return "avx512";
    case SimdLevel::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

// Runs a parallel loop of one item per possible thread and counts the threads that took part.
int64_t cpu_parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id < 64) seen.fetch_or(uint64_t{1} << id);
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qdarts_C, m) {
  m.def("cpu_simd_level() -> str", &cpu_simd_level);
  m.def("cpu_parallel_threads() -> int", &cpu_parallel_threads);
}

}  // namespace cpu
}  // namespace qdarts
