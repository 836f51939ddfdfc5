// C++ CPU kernels of mixed_op_sum_forward / mixed_op_sum_backward (schemas in csrc/ops.cpp).
//
//   y = sum_k w_k * o_k                  (fp32, in the order k = 0, 1, ..., K-1, as the reference)
//   d o_k = w_k * g,   d w_k = sum g * o_k
//
// The K outputs are read where they are (a list, no stacking copy), once each per pass. Forward:
// one vector of y at a time, summed over the K outputs in a register, the K streams advancing
// together. Backward: tiles of kSumTileElements worked through one output at a time (see there):
// g stays in L2 after the first output; each o_k is read once, each d o_k written once, and d w_k
// summed in the same pass, in registers: kLanes lane sums per k (simd.h), moved into fp64 after
// each run of kRunLength elements. The tiles are fixed-size pieces of the flat tensors, so the
// sums do not depend on the number of threads (cpu_common.h) nor, thanks to the fixed lanes, on
// the instruction set. Large outputs are written with non-temporal stores and come from the
// output cache (output_cache.h). The lane sums restart every kRunLength elements of a tile, whether
// the tile is processed in one piece or in runs (for_each_piece), so the bits do not depend on that.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/output_cache.h"

namespace qdarts {
namespace cpu {
namespace {

struct SumJob {
  int64_t numel;
  int64_t n_tiles;
  int64_t k;
  Dtype dtype;
  bool stream;                 // non-temporal stores for y / d o_k
  const void* const* outputs;  // K pointers
  const float* weights;        // [K]
  const void* grad;
  void* y;                     // forward
  void* const* doutputs;       // K pointers (backward, when needed)
  double* partials;            // [n_tiles, K] (backward, when needed)
};

// Elements per tile. The backward works through a tile one candidate output at a time (k outer):
// a long sequential read of o_k next to the write of d o_k, 256 KiB each here, while g of the tile
// stays in the L2 cache between the K passes. On the 2-core VM of bench/results this beat both
// reading all K outputs per run of kRunLength elements and per vector (measured side by side).
constexpr int64_t kSumTileElements = int64_t{1} << 16;

// Calls run(offset, length) for the pieces of tile t: the whole tile at once where the kernels
// read and write it in place (fp32, whole lane groups: load_run and RunOutput then touch no staging
// buffer), else runs of at most kRunLength elements. Whole tiles: the per-run set-up (pointers,
// output checks, a call) had made the backward about 20% slower (measured side by side, fp32 K=8,
// 1M per input).
template <typename F>
inline void for_each_piece(const SumJob& job, int64_t t, F&& run) {
  const int64_t begin = t * kSumTileElements;
  const int64_t end = std::min(job.numel, begin + kSumTileElements);
  if (job.dtype == Dtype::kFloat && (end - begin) % kLanes == 0) {
    run(begin, end - begin);
    return;
  }
  for (int64_t i = begin; i < end; i += kRunLength) run(i, std::min(kRunLength, end - i));
}

#define QD_ISA_KERNELS "cpu/mixed_op_sum_kernels.inc"
#include "cpu/foreach_isa.h"

struct PreparedOutputs {
  std::vector<at::Tensor> tensors;  // contiguous
  std::vector<const void*> data;
};

PreparedOutputs prepare_outputs(at::TensorList outputs) {
  PreparedOutputs p;
  p.tensors.reserve(outputs.size());
  p.data.reserve(outputs.size());
  for (const at::Tensor& o : outputs) {
    p.tensors.push_back(o.contiguous());
    p.data.push_back(p.tensors.back().data_ptr());
  }
  return p;
}

SumJob make_job(const PreparedOutputs& outs, const at::Tensor& weights) {
  SumJob job{};
  job.numel = outs.tensors[0].numel();
  job.n_tiles = ceil_div(job.numel, kSumTileElements);
  job.k = static_cast<int64_t>(outs.tensors.size());
  job.dtype = dtype_of(outs.tensors[0]);
  job.outputs = outs.data.data();
  job.weights = weights.data_ptr<float>();
  return job;
}

at::Tensor mixed_op_sum_forward_cpu(at::TensorList outputs, const at::Tensor& weights_in) {
  check_mixed_op_sum_args(outputs, weights_in);
  const at::Tensor weights = weights_in.contiguous();
  const PreparedOutputs outs = prepare_outputs(outputs);
  SumJob job = make_job(outs, weights);
  at::Tensor y = empty_output_like(outs.tensors[0]);
  job.y = y.data_ptr();
  job.stream = static_cast<int64_t>(y.nbytes()) >= kStreamingStoreBytes;
  at::parallel_for(0, job.n_tiles, parallel_grain(job.numel * job.k, job.n_tiles), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(forward_tiles, job, begin, end);
  });
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_sum_backward_cpu(const at::Tensor& grad_in,
                                                                         at::TensorList outputs,
                                                                         const at::Tensor& weights_in,
                                                                         bool need_doutputs, bool need_dweights) {
  const int64_t k = check_mixed_op_sum_args(outputs, weights_in);
  check_grad_like(grad_in, outputs[0], "outputs[0]");
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const PreparedOutputs outs = prepare_outputs(outputs);
  SumJob job = make_job(outs, weights);
  job.grad = grad.data_ptr();

  std::vector<at::Tensor> doutputs;
  std::vector<void*> doutput_data;
  doutputs.reserve(k);
  for (int64_t i = 0; i < k; ++i) {
    doutputs.push_back(need_doutputs ? empty_output_like(outs.tensors[0])
                                     : at::empty({0}, grad.options()));
    doutput_data.push_back(doutputs.back().data_ptr());
  }
  job.doutputs = doutput_data.data();
  job.stream = need_doutputs && k * static_cast<int64_t>(outs.tensors[0].nbytes()) >= kStreamingStoreBytes;
  at::Tensor dweights = need_dweights ? at::zeros({k}, weights.options()) : at::empty({0}, weights.options());
  std::vector<double> partials(need_dweights ? job.n_tiles * k : 0, 0.0);
  job.partials = partials.data();

  if (need_doutputs || need_dweights) {
    at::parallel_for(0, job.n_tiles, parallel_grain(job.numel * job.k, job.n_tiles), [&](int64_t begin, int64_t end) {
      QD_ISA_DISPATCH(backward_tiles, job, need_doutputs, need_dweights, begin, end);
    });
  }
  if (need_dweights) {
    // tile partials summed in tile order on one thread: the same bits for any thread count
    float* dw = dweights.data_ptr<float>();
    for (int64_t i = 0; i < k; ++i) {
      double total = 0.0;
      for (int64_t t = 0; t < job.n_tiles; ++t) total += partials[t * k + i];
      dw[i] = static_cast<float>(total);
    }
  }
  return {doutputs, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CPU, m) {
  m.impl("mixed_op_sum_forward", &mixed_op_sum_forward_cpu);
  m.impl("mixed_op_sum_backward", &mixed_op_sum_backward_cpu);
}

}  // namespace cpu
}  // namespace qdarts
