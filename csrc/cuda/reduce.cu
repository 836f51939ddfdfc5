// Second pass of every deterministic reduction: add the per-block partial sums in a fixed order.
#include "cuda/common.cuh"

namespace qdarts {
namespace gpu {
namespace {

// One block per output value; see PartialColumns in common.cuh for the indexing.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ partials, int64_t row_length, PartialColumns first,
                        PartialColumns second) {
  int64_t o = blockIdx.x;
  const PartialColumns c = columns_of_output(first, second, o);
  const int64_t col = o / c.segments;
  const int64_t seg = o % c.segments;
  const float* column = partials + c.first_column + col;
  float sum[1] = {0.0f};
  for (int64_t j = threadIdx.x; j < c.segment_length; j += kThreads) {
    sum[0] += column[segment_row(seg, c.segment_length, j) * row_length];
  }
  __shared__ float total;
  block_sum<1>(sum, &total);
  // block_sum wrote `total` from thread 0, which alone reads it.
  if (threadIdx.x == 0) c.out[o] = c.scale != nullptr ? c.scale[col] * total : total;
}

}  // namespace

void launch_sum_partials(const float* partials, int64_t row_length, const PartialColumns& first,
                         const PartialColumns& second, cudaStream_t stream) {
  const int64_t outputs = partial_outputs(first) + partial_outputs(second);
  if (outputs == 0) return;
  sum_partials_kernel<<<static_cast<unsigned>(outputs), kThreads, 0, stream>>>(partials, row_length, first, second);
}

}  // namespace gpu
}  // namespace qdarts
