// Grouped mixed-precision fake quantization on CUDA: N tensors with one bit set and grid in one
// launch forward, one launch plus one fixed-order sum launch backward.
//
// Each tensor gets exactly the blocks its single-tensor launch would get (element_grid), laid
// end to end in one 1-D grid; a block finds its tensor by a binary search over the device array
// of descriptors and runs the single-tensor per-thread code (mixed_fake_quant.cuh) with the
// coordinates it would have there. The forward is therefore the single op's arithmetic, bit for
// bit; the backward's block partials are the single op's, and the second pass adds each output's
// partials in a fixed order (no atomics): deterministic. Compiled with --fmad=false, as every
// kernel here.
#include <initializer_list>

#include "cuda/mixed_fake_quant_grouped.cuh"

namespace qdarts {
namespace gpu {
namespace {

template <typename T, int K, int VEC, bool PER_CHANNEL>
__global__ void __launch_bounds__(kThreads)
    grouped_forward_kernel(const GroupedTensor* __restrict__ tensors, int n, GroupedQuantizerArgs args) {
  const int i = find_tensor(tensors, n, blockIdx.x, &GroupedTensor::block_start);
  const GroupedTensor t = tensors[i];
  mixed_fake_quant_forward_thread<T, K, VEC, PER_CHANNEL>(
      static_cast<const T*>(t.x), static_cast<T*>(t.out), tensor_quantizer_args<K>(args, t, i), t.view,
      grouped_coords(t, blockIdx.x - t.block_start, threadIdx.x));
}

// Partials row of a block, as in the single kernel: [dprobs (K) if requested][dscales sums (K)].
template <int K, bool NEED_DPROBS, bool NEED_DSCALES>
constexpr int partial_columns() {
  return (NEED_DPROBS ? K : 0) + (NEED_DSCALES ? K : 0);
}

template <typename T, int K, int VEC, bool PER_CHANNEL, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
__global__ void __launch_bounds__(kThreads)
    grouped_backward_kernel(const GroupedTensor* __restrict__ tensors, int n, GroupedQuantizerArgs args,
                            float* __restrict__ partials) {
  const int i = find_tensor(tensors, n, blockIdx.x, &GroupedTensor::block_start);
  const GroupedTensor t = tensors[i];
  const ThreadCoords coords = grouped_coords(t, blockIdx.x - t.block_start, threadIdx.x);
  float dprob[K];
  float dscale[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    dprob[k] = 0.0f;
    dscale[k] = 0.0f;
  }
  mixed_fake_quant_backward_thread<T, K, VEC, PER_CHANNEL, NEED_DX, NEED_DPROBS, NEED_DSCALES>(
      static_cast<const T*>(t.grad), static_cast<const T*>(t.x), static_cast<T*>(t.out),
      tensor_quantizer_args<K>(args, t, i), t.view, coords, dprob, dscale);
  if constexpr (NEED_DPROBS || NEED_DSCALES) {
    constexpr int kColumns = partial_columns<K, NEED_DPROBS, NEED_DSCALES>();
    constexpr int kScaleColumn = NEED_DPROBS ? K : 0;
    float sums[kColumns];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if constexpr (NEED_DPROBS) sums[k] = dprob[k];
      if constexpr (NEED_DSCALES) sums[kScaleColumn + k] = dscale[k];
    }
    block_sum<kColumns>(sums, partials + (t.partial_row + block_row(coords)) * kColumns);
  }
}

// One block per output segment: blocks [0, dp_segments) give dprobs[i, :] from all of tensor i's
// partial rows; the next ones give the dscales of one channel (or of one per-tensor scale) from
// that channel's `splits` rows, times p_k. Rows are added in a fixed order (see block_sum).
template <int K>
__global__ void __launch_bounds__(kThreads)
    grouped_sum_kernel(const GroupedTensor* __restrict__ tensors, int n, int64_t dp_segments,
                       const float* __restrict__ partials, int columns, int scale_column,
                       const float* __restrict__ probs, float* __restrict__ dprobs, float* __restrict__ dscales) {
  const int64_t seg = blockIdx.x;
  const bool is_dprobs = seg < dp_segments;
  int i;
  int64_t channel = 0;
  if (is_dprobs) {
    i = static_cast<int>(seg);
  } else {
    i = find_tensor(tensors, n, seg - dp_segments, &GroupedTensor::segment_start);
    channel = seg - dp_segments - tensors[i].segment_start;
  }
  const GroupedTensor& t = tensors[i];
  const int64_t count = is_dprobs ? t.blocks : t.splits;
  const int64_t first = t.partial_row + (is_dprobs ? 0 : channel * t.splits);
  const int column = is_dprobs ? 0 : scale_column;
  float sums[K];
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k] = 0.0f;
  for (int64_t j = threadIdx.x; j < count; j += kThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) sums[k] += partials[(first + j) * columns + column + k];
  }
  __shared__ float totals[K];
  block_sum<K>(sums, totals);
  __syncthreads();
  if (threadIdx.x < K) {
    const int k = threadIdx.x;
    if (is_dprobs) {
      dprobs[static_cast<int64_t>(i) * K + k] = totals[k];
    } else {
      // p_k * sum, as the single op; a tensor with no elements sums to 0 whatever p_k is
      const float p = probs[static_cast<int64_t>(i) * K + k];
      dscales[t.scale_offset + k * t.view.channels + channel] = count == 0 ? 0.0f : p * totals[k];
    }
  }
}

}  // namespace

int64_t plan_mixed_fake_quant_grouped(GroupedTensor* tensors, int n, bool reduces, int64_t* segments) {
  return plan_grouped_tensors(tensors, n, reduces, segments);
}

void launch_mixed_fake_quant_grouped_forward(const GroupedTensor* tensors, int n, int64_t blocks, DType dtype,
                                             const MixedQuantizer& quantizer, bool per_channel, bool vectorize,
                                             cudaStream_t stream) {
  if (blocks == 0) return;
  const GroupedQuantizerArgs args = make_grouped_quantizer_args(quantizer);
  const auto vectorized = [&](auto) { return vectorize; };
  dispatch_quantizer_kernel(dtype, quantizer.num_bits, vectorized, per_channel, [&](auto type, auto k, auto vec,
                                                                                   auto pc) {
    using T = typename decltype(type)::type;
    grouped_forward_kernel<T, decltype(k)::value, decltype(vec)::value, decltype(pc)::value>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(tensors, n, args);
  });
}

int64_t mixed_fake_quant_grouped_partials_size(int num_bits, int64_t blocks, bool need_dprobs, bool need_dscales) {
  return blocks * ((need_dprobs ? num_bits : 0) + (need_dscales ? num_bits : 0));
}

void launch_mixed_fake_quant_grouped_backward(const GroupedTensor* tensors, int n, int64_t blocks, int64_t segments,
                                              bool need_dx, float* dprobs, float* dscales, float* partials,
                                              DType dtype, const MixedQuantizer& quantizer, bool per_channel,
                                              bool vectorize, cudaStream_t stream) {
  const bool need_dprobs = dprobs != nullptr;
  const bool need_dscales = dscales != nullptr;
  if (!(need_dx || need_dprobs || need_dscales)) return;
  const GroupedQuantizerArgs args = make_grouped_quantizer_args(quantizer);
  const auto vectorized = [&](auto) { return vectorize; };
  dispatch_quantizer_kernel(dtype, quantizer.num_bits, vectorized, per_channel, [&](auto type, auto k, auto vec,
                                                                                   auto per_channel) {
    using T = typename decltype(type)::type;
    constexpr int K = decltype(k)::value;
    constexpr int VEC = decltype(vec)::value;
    constexpr bool PER_CHANNEL = decltype(per_channel)::value;
    dispatch_quantizer_gradients(need_dx, need_dprobs, need_dscales, [&](auto dx_flag, auto dp_flag, auto ds_flag) {
      if (blocks > 0) {
        grouped_backward_kernel<T, K, VEC, PER_CHANNEL, decltype(dx_flag)::value, decltype(dp_flag)::value,
                                decltype(ds_flag)::value>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(tensors, n, args, partials);
      }
    });
  });
  if (!(need_dprobs || need_dscales)) return;
  // one launch for both sums: the dprobs segments first, then the dscales segments
  const int num_bits = quantizer.num_bits;
  const int columns = (need_dprobs ? num_bits : 0) + (need_dscales ? num_bits : 0);
  const int64_t dp_segments = need_dprobs ? n : 0;
  const int64_t total_segments = dp_segments + (need_dscales ? segments : 0);
  if (total_segments == 0) return;
  dispatch_int<1, 2, 3, 4>(num_bits, [&](auto k) {
    constexpr int K = decltype(k)::value;
    grouped_sum_kernel<K><<<static_cast<unsigned>(total_segments), kThreads, 0, stream>>>(
        tensors, n, dp_segments, partials, columns, need_dprobs ? num_bits : 0, quantizer.probs, dprobs, dscales);
  });
}

}  // namespace gpu
}  // namespace qdarts
