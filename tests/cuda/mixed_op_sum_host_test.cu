// Host-side run of the mixed_op_sum kernels' per-thread code (csrc/cuda/mixed_op_sum.cuh): every
// thread of the grid the launcher would use runs on the CPU, and the result is compared with a
// direct computation: y and d inputs bit for bit (same fp32 operations in the same order), the
// per-thread dweights sums within a tight tolerance of a sum in double. Exercises the guarded
// loops over K up to each compile-time bound, the load batches, vector groups, tails and dtype
// conversions. The block reduction and the finishing kernel run only on a GPU (tests/test_*.py).
// Run by .ci/compile_cuda.sh.
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/mixed_op_sum.cuh"

using namespace qdarts::gpu;

namespace {

int failures = 0;
int checks = 0;

template <typename T>
const char* dtype_name() {
  if (sizeof(T) == 4) return "float32";
  return std::is_same<T, __half>::value ? "float16" : "bfloat16";
}

template <typename T>
void report(const char* what, int count, int max_k, int vec, int64_t numel, int64_t index, double got, double want) {
  if (++failures <= 20) {
    std::printf("FAIL %s: %s K=%d MAX_K=%d vec=%d numel=%lld at %lld: got %.9g want %.9g\n", what, dtype_name<T>(),
                count, max_k, vec, static_cast<long long>(numel), static_cast<long long>(index), got, want);
  }
}

template <typename T, int MAX_K, int VEC, bool NEED_DINPUTS, bool NEED_DWEIGHTS>
void check_case(int count, int64_t numel, std::mt19937& rng) {
  ++checks;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<T>> inputs(count, std::vector<T>(numel)), dinputs(count, std::vector<T>(numel));
  std::vector<T> grad(numel), y(numel);
  std::vector<float> weights(count);
  InputPointers<T> input_ptrs{};
  OutputPointers<T> dinput_ptrs{};
  for (int k = 0; k < count; ++k) {
    for (T& v : inputs[k]) v = from_float<T>(normal(rng));
    weights[k] = std::fabs(normal(rng));
    input_ptrs.p[k] = inputs[k].data();
    dinput_ptrs.p[k] = dinputs[k].data();
  }
  for (T& v : grad) v = from_float<T>(normal(rng));

  const int64_t forward_blocks = flat_blocks(numel, kElementwiseBlocks);
  for (int64_t b = 0; b < forward_blocks; ++b)
    for (int64_t thread = 0; thread < kThreads; ++thread)
      mixed_op_sum_forward_thread<T, MAX_K, VEC>(input_ptrs, count, weights.data(), y.data(), numel,
                                                 ThreadCoords{b, 0, forward_blocks, 1, thread});

  const int64_t backward_blocks = flat_blocks(numel, NEED_DWEIGHTS ? kReduceBlocks : kElementwiseBlocks);
  std::vector<double> dw_sum(count, 0.0);
  for (int64_t b = 0; b < backward_blocks; ++b) {
    for (int64_t thread = 0; thread < kThreads; ++thread) {
      float dw[MAX_K] = {};
      mixed_op_sum_backward_thread<T, MAX_K, VEC, NEED_DINPUTS, NEED_DWEIGHTS>(
          grad.data(), input_ptrs, dinput_ptrs, count, weights.data(), numel,
          ThreadCoords{b, 0, backward_blocks, 1, thread}, dw);
      for (int k = 0; k < MAX_K; ++k) {
        if (k >= count && dw[k] != 0.0f) report<T>("dw beyond K", count, MAX_K, VEC, numel, k, dw[k], 0.0);
        if (k < count) dw_sum[k] += dw[k];
      }
    }
  }

  std::vector<double> dw_want(count, 0.0), magnitude(count, 1e-6);
  for (int64_t e = 0; e < numel; ++e) {
    float acc = 0.0f;
    const float g = to_float(grad[e]);
    for (int k = 0; k < count; ++k) {
      const float o = to_float(inputs[k][e]);
      const float term = weights[k] * o;
      acc = k == 0 ? term : acc + term;
      if (NEED_DINPUTS) {
        const float want = to_float(from_float<T>(weights[k] * g));
        const float got = to_float(dinputs[k][e]);
        if (got != want) report<T>("d input", count, MAX_K, VEC, numel, e, got, want);
      }
      dw_want[k] += static_cast<double>(g) * o;
      magnitude[k] += std::fabs(static_cast<double>(g) * o);
    }
    const float want_y = to_float(from_float<T>(acc));
    if (to_float(y[e]) != want_y) report<T>("y", count, MAX_K, VEC, numel, e, to_float(y[e]), want_y);
  }
  for (int k = 0; NEED_DWEIGHTS && k < count; ++k) {
    if (std::fabs(dw_sum[k] - dw_want[k]) > 1e-5 * magnitude[k]) {
      report<T>("dweights", count, MAX_K, VEC, numel, k, dw_sum[k], dw_want[k]);
    }
  }
}

template <typename T, int MAX_K, int VEC>
void check_all_flags(int count, int64_t numel, std::mt19937& rng) {
  check_case<T, MAX_K, VEC, true, true>(count, numel, rng);
  check_case<T, MAX_K, VEC, true, false>(count, numel, rng);
  check_case<T, MAX_K, VEC, false, true>(count, numel, rng);
}

template <typename T, int MAX_K>
void check_bound(std::initializer_list<int> counts, std::mt19937& rng) {
  for (int count : counts) {
    for (int64_t numel : {1, 9, 1000, 4103}) {
      check_all_flags<T, MAX_K, 1>(count, numel, rng);
      check_all_flags<T, MAX_K, vector_width<T>()>(count, numel, rng);
    }
  }
}

template <typename T>
void check_dtype(std::mt19937& rng) {
  // Each K with the bound the launcher picks for it (smallest of 4, 8, 16, 32, 64 that holds K).
  check_bound<T, 4>({1, 3, 4}, rng);
  check_bound<T, 8>({5, 8}, rng);
  check_bound<T, 16>({9, 16}, rng);
  check_bound<T, 32>({17, 32}, rng);
  check_bound<T, 64>({33, 35, 64}, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(99);
  check_dtype<float>(rng);
  check_dtype<__half>(rng);
  check_dtype<__nv_bfloat16>(rng);
  if (failures == 0) std::printf("mixed_op_sum_host_test: %d cases, per-thread kernel code matches\n", checks);
  return failures == 0 ? 0 : 1;
}
