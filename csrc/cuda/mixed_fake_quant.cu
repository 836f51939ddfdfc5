// Mixed-precision fake quantization on CUDA: y = sum_k p_k * Q(x; s_k, b_k), forward and backward.
//
// The quantizer is csrc/quant_math.h, the same code as the CPU kernels, and this file is compiled
// with --fmad=false: the forward performs the reference's fp32 operations in the reference's order
// (Q_k = (q - z) * s_k, y = p_0 * Q_0, y = y + p_1 * Q_1, ...) with no contraction, so it matches
// qdarts_kernels.reference bit for bit. The backward recomputes Q_k from x; nothing else is saved.
#include <initializer_list>

#include "cuda/mixed_fake_quant.cuh"

namespace qdarts {
namespace gpu {
namespace {

template <typename T, int K, int VEC, bool PER_CHANNEL>
__global__ void __launch_bounds__(kThreads)
    mixed_fake_quant_forward_kernel(const T* __restrict__ x, T* __restrict__ y, QuantizerArgs args,
                                    ChannelView view) {
  mixed_fake_quant_forward_thread<T, K, VEC, PER_CHANNEL>(x, y, args, view, this_thread());
}

// Partials row of a block: [dprobs (K) if requested][dscales sums (K) if requested].
template <int K, bool NEED_DPROBS, bool NEED_DSCALES>
constexpr int partial_columns() {
  return (NEED_DPROBS ? K : 0) + (NEED_DSCALES ? K : 0);
}

template <typename T, int K, int VEC, bool PER_CHANNEL, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
__global__ void __launch_bounds__(kThreads)
    mixed_fake_quant_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                                     float* __restrict__ partials, QuantizerArgs args, ChannelView view) {
  float dprob[K];
  float dscale[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    dprob[k] = 0.0f;
    dscale[k] = 0.0f;
  }
  const ThreadCoords t = this_thread();
  mixed_fake_quant_backward_thread<T, K, VEC, PER_CHANNEL, NEED_DX, NEED_DPROBS, NEED_DSCALES>(
      grad, x, dx, args, view, t, dprob, dscale);

  if constexpr (NEED_DPROBS || NEED_DSCALES) {
    constexpr int kColumns = partial_columns<K, NEED_DPROBS, NEED_DSCALES>();
    float sums[kColumns];
    constexpr int kScaleColumn = NEED_DPROBS ? K : 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if constexpr (NEED_DPROBS) sums[k] = dprob[k];
      if constexpr (NEED_DSCALES) sums[kScaleColumn + k] = dscale[k];
    }
    block_sum<kColumns>(sums, partials + block_row(t) * kColumns);
  }
}

// 16-byte accesses need every pointer aligned and, per channel, groups that never cross a row.
template <typename T>
bool can_vectorize(const ChannelView& view, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (!is_vector_aligned(p)) return false;
  }
  return !view.per_channel || view.inner % vector_width<T>() == 0;
}

dim3 backward_grid(const ChannelView& view, bool reduces) {
  return element_grid(view, reduces ? kReduceBlocks : kElementwiseBlocks);
}

}  // namespace

void launch_mixed_fake_quant_forward(const void* x, void* y, DType dtype, const MixedQuantizer& quantizer,
                                     const ChannelView& view, cudaStream_t stream) {
  const QuantizerArgs args = make_quantizer_args(quantizer, view);
  const dim3 grid = element_grid(view, kElementwiseBlocks);
  const auto vectorize = [&](auto type) { return can_vectorize<typename decltype(type)::type>(view, {x, y}); };
  dispatch_quantizer_kernel(dtype, quantizer.num_bits, vectorize, view.per_channel, [&](auto type, auto k, auto vec,
                                                                                        auto per_channel) {
    using T = typename decltype(type)::type;
    mixed_fake_quant_forward_kernel<T, decltype(k)::value, decltype(vec)::value, decltype(per_channel)::value>
        <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), args, view);
  });
}

int64_t mixed_fake_quant_backward_partials_size(const MixedQuantizer& quantizer, const ChannelView& view,
                                                bool need_dprobs, bool need_dscales) {
  const int64_t columns = (need_dprobs ? quantizer.num_bits : 0) + (need_dscales ? quantizer.num_bits : 0);
  if (columns == 0) return 0;
  return grid_blocks(backward_grid(view, true)) * columns;
}

void launch_mixed_fake_quant_backward(const void* grad, const void* x, void* dx, float* dprobs, float* dscales,
                                      float* partials, DType dtype, const MixedQuantizer& quantizer,
                                      const ChannelView& view, cudaStream_t stream) {
  const bool need_dx = dx != nullptr;
  const bool need_dprobs = dprobs != nullptr;
  const bool need_dscales = dscales != nullptr;
  if (!(need_dx || need_dprobs || need_dscales)) return;
  const QuantizerArgs args = make_quantizer_args(quantizer, view);
  const dim3 grid = backward_grid(view, need_dprobs || need_dscales);
  const auto vectorize = [&](auto type) {
    return can_vectorize<typename decltype(type)::type>(view, {grad, x, dx});
  };
  dispatch_quantizer_kernel(dtype, quantizer.num_bits, vectorize, view.per_channel, [&](auto type, auto k, auto vec,
                                                                                        auto per_channel) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(k)::value;
    constexpr int VEC = decltype(vec)::value;
    constexpr bool PER_CHANNEL = decltype(per_channel)::value;
    dispatch_quantizer_gradients(need_dx, need_dprobs, need_dscales, [&](auto dx_flag, auto dp_flag, auto ds_flag) {
      mixed_fake_quant_backward_kernel<T, K, VEC, PER_CHANNEL, decltype(dx_flag)::value, decltype(dp_flag)::value,
                                       decltype(ds_flag)::value>
          <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                          static_cast<T*>(dx), partials, args, view);
    });
  });

  // Partials row of a block: [dprobs (K) if requested][dscales sums (K) if requested]; per channel,
  // block (c, split) holds row c * splits + split, so channel c's rows are one segment of dscales.
  const int num_bits = quantizer.num_bits;
  const int64_t columns = (need_dprobs ? num_bits : 0) + (need_dscales ? num_bits : 0);
  PartialColumns dprob_columns{};
  if (need_dprobs) dprob_columns = {0, num_bits, 1, grid_blocks(grid), nullptr, dprobs};
  PartialColumns dscale_columns{};
  if (need_dscales) {
    dscale_columns = {need_dprobs ? num_bits : 0, num_bits, view.per_channel ? grid.x : 1,
                      view.per_channel ? grid.y : grid_blocks(grid), quantizer.probs, dscales};
  }
  launch_sum_partials(partials, columns, dprob_columns, dscale_columns, stream);
}

}  // namespace gpu
}  // namespace qdarts
