// The DARTS mixed-op sum on CUDA: y = sum_k w_k * o_k over K candidate outputs, forward and backward.
// The K pointers travel in a by-value struct; the per-thread code is in mixed_op_sum.cuh.
#include "cuda/mixed_op_sum.cuh"

namespace qdarts {
namespace gpu {
namespace {

template <typename T, int MAX_K, int VEC>
__global__ void __launch_bounds__(kThreads)
    mixed_op_sum_forward_kernel(InputPointers<T> inputs, int count, const float* __restrict__ weights,
                                T* __restrict__ y, int64_t numel) {
  mixed_op_sum_forward_thread<T, MAX_K, VEC>(inputs, count, weights, y, numel, this_thread());
}

template <typename T, int MAX_K, int VEC, bool NEED_DINPUTS, bool NEED_DWEIGHTS>
__global__ void __launch_bounds__(kThreads)
    mixed_op_sum_backward_kernel(const T* __restrict__ grad, InputPointers<T> inputs, OutputPointers<T> dinputs,
                                 int count, const float* __restrict__ weights, float* __restrict__ partials,
                                 int64_t numel) {
  float dw[MAX_K];
#pragma unroll
  for (int k = 0; k < MAX_K; ++k) dw[k] = 0.0f;
  const ThreadCoords t = this_thread();
  mixed_op_sum_backward_thread<T, MAX_K, VEC, NEED_DINPUTS, NEED_DWEIGHTS>(grad, inputs, dinputs, count, weights,
                                                                          numel, t, dw);
  if constexpr (NEED_DWEIGHTS) block_sum<MAX_K>(dw, partials + block_row(t) * MAX_K);
}

// The compile-time bound used for `count` candidates.
int max_k_for(int count) {
  for (int bound = kLoadBatch; bound < kMaxOpSumInputs; bound *= 2) {
    if (count <= bound) return bound;
  }
  return kMaxOpSumInputs;
}

template <typename F>
void dispatch_max_k(int count, F&& f) {
  static_assert(kMaxOpSumInputs == 64, "update the bounds below with kMaxOpSumInputs");
  dispatch_int<4, 8, 16, 32, 64>(max_k_for(count), f);
}

// True when every one of the `count` pointers (none when `pointers` is null) is 16-byte aligned.
bool all_aligned(const void* const* pointers, int count) {
  for (int k = 0; pointers != nullptr && k < count; ++k) {
    if (!is_vector_aligned(pointers[k])) return false;
  }
  return true;
}

template <typename T>
InputPointers<T> typed_inputs(const OpSumInputs& inputs) {
  InputPointers<T> typed{};
  for (int k = 0; k < inputs.count; ++k) typed.p[k] = static_cast<const T*>(inputs.tensors[k]);
  return typed;
}

}  // namespace

void launch_mixed_op_sum_forward(const OpSumInputs& inputs, const float* weights, void* y, int64_t numel,
                                 DType dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(flat_blocks(numel, kElementwiseBlocks)));
  const bool aligned = is_vector_aligned(y) && all_aligned(inputs.tensors, inputs.count);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_max_k(inputs.count, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      dispatch_bool(aligned, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value ? vector_width<T>() : 1;
        mixed_op_sum_forward_kernel<T, MAX_K, VEC><<<grid, kThreads, 0, stream>>>(
            typed_inputs<T>(inputs), inputs.count, weights, static_cast<T*>(y), numel);
      });
    });
  });
}

int64_t mixed_op_sum_backward_partials_size(int count, int64_t numel, bool need_dweights) {
  if (!need_dweights) return 0;
  return flat_blocks(numel, kReduceBlocks) * max_k_for(count);
}

void launch_mixed_op_sum_backward(const void* grad, const OpSumInputs& inputs, const float* weights,
                                  void* const* dinputs, float* dweights, float* partials, int64_t numel,
                                  DType dtype, cudaStream_t stream) {
  const bool need_dinputs = dinputs != nullptr;
  const bool need_dweights = dweights != nullptr;
  if (!(need_dinputs || need_dweights)) return;
  const int64_t blocks = flat_blocks(numel, need_dweights ? kReduceBlocks : kElementwiseBlocks);
  const bool aligned = is_vector_aligned(grad) && all_aligned(inputs.tensors, inputs.count) &&
                       all_aligned(dinputs, inputs.count);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    OutputPointers<T> typed_dinputs{};
    for (int k = 0; need_dinputs && k < inputs.count; ++k) typed_dinputs.p[k] = static_cast<T*>(dinputs[k]);
    dispatch_max_k(inputs.count, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      dispatch_bool(aligned, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value ? vector_width<T>() : 1;
        dispatch_bool(need_dinputs, [&](auto dinputs_flag) {
          dispatch_bool(need_dweights, [&](auto dweights_flag) {
            constexpr bool DIN = decltype(dinputs_flag)::value;
            constexpr bool DW = decltype(dweights_flag)::value;
            if constexpr (DIN || DW) {
              mixed_op_sum_backward_kernel<T, MAX_K, VEC, DIN, DW>
                  <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                      static_cast<const T*>(grad), typed_inputs<T>(inputs), typed_dinputs, inputs.count, weights,
                      partials, numel);
            }
          });
        });
      });
    });
  });
  if (need_dweights) {
    launch_sum_partials(partials, max_k_for(inputs.count), {0, inputs.count, 1, blocks, nullptr, dweights},
                        PartialColumns{}, stream);
  }
}

}  // namespace gpu
}  // namespace qdarts
