// C++ CPU kernels of mixed_op_sum_forward / mixed_op_sum_backward (schemas in csrc/ops.cpp).
//
//   y = sum_k w_k * o_k                  (fp32, in the order k = 0, 1, ..., K-1, as the reference)
//   d o_k = w_k * g,   d w_k = sum g * o_k
//
// The K outputs are read where they are (a list, no stacking copy), once each per pass: a run of
// kRunLength elements of y stays in L1 while the K outputs are added into it; backward reads g and
// each o_k once, writes each d o_k once, and sums d w_k in the same pass. The tiles are fixed-size
// pieces of the flat tensors; d w_k is reduced deterministically as described in cpu_common.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace qdarts {
namespace cpu {
namespace {

struct SumJob {
  int64_t numel;
  int64_t n_tiles;
  int64_t k;
  Dtype dtype;
  const void* const* outputs;  // K pointers
  const float* weights;        // [K]
  const void* grad;
  void* y;                     // forward
  void* const* doutputs;       // K pointers (backward, when needed)
  double* partials;            // [n_tiles, K] (backward, when needed)
};

// Calls run(offset, length) for the runs of tile t.
template <typename F>
inline void for_each_run(const SumJob& job, int64_t t, F&& run) {
  const int64_t end = std::min(job.numel, (t + 1) * kTileElements);
  for (int64_t i = t * kTileElements; i < end; i += kRunLength) run(i, std::min(kRunLength, end - i));
}

inline void scale_run(float* __restrict y, const float* __restrict o, float w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = w * o[j];
}

inline void add_scaled_run(float* __restrict y, const float* __restrict o, float w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = y[j] + w * o[j];
}

// d = w * g and/or acc += g * o, in one loop over the run.
template <bool kDoutputs, bool kDweights>
inline void backward_run(float* __restrict d, float* __restrict acc, const float* __restrict g,
                         const float* __restrict o, float w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (kDoutputs) d[j] = w * g[j];
    if constexpr (kDweights) acc[j] += g[j] * o[j];
  }
}

// Processes tiles [t_begin, t_end) of the forward pass (one clone per instruction set).
QD_CPU_KERNEL void forward_tiles(const SumJob& job, int64_t t_begin, int64_t t_end) {
  alignas(64) float o_stage[kRunLength];
  alignas(64) float y_stage[kRunLength];
  for (int64_t t = t_begin; t < t_end; ++t) {
    for_each_run(job, t, [&](int64_t offset, int64_t n) {
      float* yf = output_fp32(job.dtype, job.y, offset, y_stage);
      scale_run(yf, load_fp32(job.dtype, job.outputs[0], offset, n, o_stage), job.weights[0], n);
      for (int64_t k = 1; k < job.k; ++k) {
        add_scaled_run(yf, load_fp32(job.dtype, job.outputs[k], offset, n, o_stage), job.weights[k], n);
      }
      store_from_fp32(job.dtype, job.y, offset, n, yf);
    });
  }
}

template <bool kDoutputs, bool kDweights>
void backward_tiles_impl(const SumJob& job, int64_t t_begin, int64_t t_end) {
  alignas(64) float g_stage[kRunLength];
  alignas(64) float o_stage[kRunLength];
  alignas(64) float d_stage[kRunLength];
  RunAccumulator acc(kDweights ? job.k : 1, kRunLength);
  for (int64_t t = t_begin; t < t_end; ++t) {
    if constexpr (kDweights) acc.reset(std::min(kRunLength, job.numel - t * kTileElements));
    for_each_run(job, t, [&](int64_t offset, int64_t n) {
      const float* gf = load_fp32(job.dtype, job.grad, offset, n, g_stage);
      if constexpr (kDweights) acc.begin_run(0);  // every run covers positions [0, n)
      for (int64_t k = 0; k < job.k; ++k) {
        float* df = kDoutputs ? output_fp32(job.dtype, job.doutputs[k], offset, d_stage) : nullptr;
        const float* of = kDweights ? load_fp32(job.dtype, job.outputs[k], offset, n, o_stage) : nullptr;
        backward_run<kDoutputs, kDweights>(df, kDweights ? acc.sum(k) : nullptr, gf, of, job.weights[k], n);
        if constexpr (kDoutputs) store_from_fp32(job.dtype, job.doutputs[k], offset, n, df);
      }
    });
    if constexpr (kDweights) {
      acc.flush();
      const int64_t positions = std::min(kRunLength, job.numel - t * kTileElements);
      double* slot = job.partials + t * job.k;
      for (int64_t k = 0; k < job.k; ++k) {
        double total = 0.0;
        for (int64_t j = 0; j < positions; ++j) total += acc.total(k, j);
        slot[k] = total;
      }
    }
  }
}

// Processes tiles [t_begin, t_end) of the backward pass (one clone per instruction set).
QD_CPU_KERNEL void backward_tiles(const SumJob& job, bool need_doutputs, bool need_dweights, int64_t t_begin,
                                  int64_t t_end) {
  if (need_doutputs && need_dweights) {
    backward_tiles_impl<true, true>(job, t_begin, t_end);
  } else if (need_doutputs) {
    backward_tiles_impl<true, false>(job, t_begin, t_end);
  } else if (need_dweights) {
    backward_tiles_impl<false, true>(job, t_begin, t_end);
  }
}

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
  job.n_tiles = ceil_div(job.numel, kTileElements);
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
  at::Tensor y = at::empty_like(outs.tensors[0], at::MemoryFormat::Contiguous);
  job.y = y.data_ptr();
  at::parallel_for(0, job.n_tiles, 1, [&](int64_t begin, int64_t end) { forward_tiles(job, begin, end); });
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
    doutputs.push_back(need_doutputs ? at::empty_like(outs.tensors[0], at::MemoryFormat::Contiguous)
                                     : at::empty({0}, grad.options()));
    doutput_data.push_back(doutputs.back().data_ptr());
  }
  job.doutputs = doutput_data.data();
  at::Tensor dweights = need_dweights ? at::zeros({k}, weights.options()) : at::empty({0}, weights.options());
  std::vector<double> partials(need_dweights ? job.n_tiles * k : 0, 0.0);
  job.partials = partials.data();

  if (need_doutputs || need_dweights) {
    at::parallel_for(0, job.n_tiles, 1, [&](int64_t begin, int64_t end) {
      backward_tiles(job, need_doutputs, need_dweights, begin, end);
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
