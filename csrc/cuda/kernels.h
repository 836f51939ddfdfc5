// Host launchers of the CUDA kernels. Plain C++ (no torch headers): the kernel files that define
// these compile with plain nvcc, and csrc/cuda/register.cpp, the only file that sees torch, checks
// the arguments, allocates every buffer and calls these on the current stream.
//
// Every launcher enqueues its kernels on `stream` and returns without synchronising; the caller
// checks for launch errors (C10_CUDA_KERNEL_LAUNCH_CHECK). All pointers are device pointers to
// contiguous memory; element counts and offsets are int64 throughout.
//
// Reductions (dprobs, dscales, dweights) are deterministic: the main kernel writes one fp32 partial
// sum per block (a block sums its threads in a fixed tree order), its grid depends only on the
// shape, and a second kernel adds the partials in a fixed order. No float atomics are used, so two
// runs with the same inputs give bit-identical gradients. The partials buffer is allocated by the
// caller with the size the matching *_partials_size function returns.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_math.h"

namespace qdarts {
namespace gpu {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Most candidate outputs one mixed_op_sum call accepts: DARTS search spaces have 8 per edge; the
// supernet sums all candidates of a node's edges in one call (7 per edge, up to 35 for 4 steps).
constexpr int kMaxOpSumInputs = 64;

// The mixed quantizer y = sum_k probs[k] * Q(x; scales[k], bits[k]) on one grid.
struct MixedQuantizer {
  int num_bits;            // K, 1..kMaxBits
  int bits[kMaxBits];      // each in [1, 16]
  int grid;                // kGridSigned / kGridUnsigned / kGridMidrise / kGridRelu
  const float* probs;      // [K]
  const float* scales;     // [K] (per tensor) or [K, C] (per channel)
};

// x seen as [outer, channels, inner] around the channel axis. Per-tensor quantization uses
// per_channel = false and {1, 1, numel}.
struct ChannelView {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  bool per_channel;

  QD_HOST_DEVICE int64_t numel() const { return outer * channels * inner; }
};

// y = mixed quantization of x (x, y of `dtype`).
void launch_mixed_fake_quant_forward(const void* x, void* y, DType dtype, const MixedQuantizer& quantizer,
                                     const ChannelView& view, cudaStream_t stream);

// Floats of the partials buffer that launch_mixed_fake_quant_backward needs (0 when neither
// dprobs nor dscales is requested).
int64_t mixed_fake_quant_backward_partials_size(const MixedQuantizer& quantizer, const ChannelView& view,
                                                bool need_dprobs, bool need_dscales);

// Gradients of the mixed quantizer for the incoming gradient `grad` (of `dtype`, like x):
//   dx = grad * sum_k p_k in_k                        (of `dtype`; skipped when dx is null)
//   dprobs[k] = sum grad * Q_k                        ([K] fp32; skipped when null)
//   dscales[k(, c)] = p_k * sum grad * ((q_k - z) - (in_k ? x * inv_s_k : 0))
//                                                     ([K] or [K, C] fp32; skipped when null)
// Q_k is recomputed from x; nothing from the forward pass is needed.
void launch_mixed_fake_quant_backward(const void* grad, const void* x, void* dx, float* dprobs, float* dscales,
                                      float* partials, DType dtype, const MixedQuantizer& quantizer,
                                      const ChannelView& view, cudaStream_t stream);

// One tensor of a grouped mixed fake quantization (mixed_fake_quant_grouped.cu): N tensors share
// one bit set and grid and run in one launch. The host fills the data fields, then
// plan_mixed_fake_quant_grouped the launch geometry; the kernels read an array of these from
// device memory and find their tensor by a binary search over block_start.
struct GroupedTensor {
  const void* x;
  void* out;             // y forward, dx backward (null when dx is not requested)
  const void* grad;      // backward only
  const float* scales;   // this tensor's [K, C] (or [K]) scales
  ChannelView view;
  int64_t scale_offset;  // first float of this tensor's dscales in the concatenated dscales
  // Launch geometry (plan_mixed_fake_quant_grouped): this tensor's blocks are
  // [block_start, block_start + blocks) of the 1-D grid, its partial rows start at partial_row,
  // per channel `splits` blocks per channel (per tensor splits = blocks), and its dscales
  // segments (one per channel, or one) start at segment_start.
  int64_t block_start;
  int64_t blocks;
  int64_t splits;
  int64_t partial_row;
  int64_t segment_start;
};

// Fills the geometry of `n` tensors for a forward (reduces = false) or a reducing backward
// (reduces = true) launch; each tensor gets the grid its single-tensor launch would get. Returns
// the total number of blocks; *segments receives the number of dscales segments.
int64_t plan_mixed_fake_quant_grouped(GroupedTensor* tensors, int n, bool reduces, int64_t* segments);

// quantizer.probs is [N, K] (row i for tensor i; quantizer.scales is unused: each tensor has its
// own scales pointer); `tensors` is a device array of n planned descriptors. vectorize: every pointer 16-byte aligned
// and, per channel, every inner a multiple of the vector width.
void launch_mixed_fake_quant_grouped_forward(const GroupedTensor* tensors, int n, int64_t blocks, DType dtype,
                                             const MixedQuantizer& quantizer, bool per_channel, bool vectorize,
                                             cudaStream_t stream);

// Gradients of the N tensors: dx_i into tensors[i].out (when need_dx), dprobs [N, K] and dscales
// (the concatenation of the per-tensor [K, C_i] / [K]) when not null. partials holds
// mixed_fake_quant_grouped_partials_size floats; one main launch, then one fixed-order sum launch.
int64_t mixed_fake_quant_grouped_partials_size(int num_bits, int64_t blocks, bool need_dprobs, bool need_dscales);
void launch_mixed_fake_quant_grouped_backward(const GroupedTensor* tensors, int n, int64_t blocks, int64_t segments,
                                              bool need_dx, float* dprobs, float* dscales, float* partials,
                                              DType dtype, const MixedQuantizer& quantizer, bool per_channel,
                                              bool vectorize, cudaStream_t stream);

// K candidate tensors of one shape and dtype, numel elements each.
struct OpSumInputs {
  int count;                               // K, 1..kMaxOpSumInputs
  const void* tensors[kMaxOpSumInputs];
};

// y = sum_k weights[k] * inputs[k], accumulated in fp32 in the order k = 0, 1, ..., K-1.
void launch_mixed_op_sum_forward(const OpSumInputs& inputs, const float* weights, void* y, int64_t numel,
                                 DType dtype, cudaStream_t stream);

int64_t mixed_op_sum_backward_partials_size(int count, int64_t numel, bool need_dweights);

// d inputs[k] = weights[k] * grad (into dinputs[k], of `dtype`; skipped when dinputs is null),
// dweights[k] = sum grad * inputs[k] ([K] fp32; skipped when dweights is null).
void launch_mixed_op_sum_backward(const void* grad, const OpSumInputs& inputs, const float* weights,
                                  void* const* dinputs, float* dweights, float* partials, int64_t numel,
                                  DType dtype, cudaStream_t stream);

}  // namespace gpu
}  // namespace qdarts
