// Second pass of every deterministic reduction: add the per-block partial sums in a fixed order.
#include "cuda/common.cuh"

namespace qdarts {
namespace gpu {
namespace {

// One block per output value; see launch_sum_partials in common.cuh for the indexing.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ partials, int64_t row_length, int first_column,
                        int64_t segments, int64_t segment_length, const float* __restrict__ scale,
                        float* __restrict__ out) {
  const int64_t o = blockIdx.x;
  const int64_t col = o / segments;
  const int64_t seg = o % segments;
  const float* column = partials + first_column + col;
  float sum[1] = {0.0f};
  for (int64_t j = threadIdx.x; j < segment_length; j += kThreads) {
    sum[0] += column[segment_row(seg, segment_length, j) * row_length];
  }
  __shared__ float total;
  block_sum<1>(sum, &total);
  // block_sum wrote `total` from thread 0, which alone reads it.
  if (threadIdx.x == 0) out[o] = scale != nullptr ? scale[col] * total : total;
}

}  // namespace

void launch_sum_partials(const float* partials, int64_t row_length, int first_column, int num_columns,
                         int64_t segments, int64_t segment_length, const float* scale, float* out,
                         cudaStream_t stream) {
  const int64_t outputs = static_cast<int64_t>(num_columns) * segments;
  sum_partials_kernel<<<static_cast<unsigned>(outputs), kThreads, 0, stream>>>(
      partials, row_length, first_column, segments, segment_length, scale, out);
}

}  // namespace gpu
}  // namespace qdarts
