// Whole launches of the CUDA kernels on the CPU (tests/cuda/launch_emulation.h): the launch_*
// entry points of csrc/cuda/*.cu run with their real grids, partial buffers and second passes
// (block_sum's shuffle tree and shared memory, sum_partials_kernel and columns_of_output, the
// grouped sum kernel), which the per-thread host tests (tests/cuda/*_test.cu) cannot reach.
// Each result is compared with a direct computation of DESIGN section 4: y and dx bit for bit (the
// same fp32 operations in the same order), dprobs / dscales / dweights within 1e-5 of the sum of
// the terms' magnitudes of a sum in double. Partial buffers have the size the *_partials_size
// functions give, are filled with NaN (a partial read before it is written shows as NaN) and are
// followed by a guard, as are the gradient outputs (a write past the end fails).
// Built and run by .ci/compile_cuda.sh; sizes are kept small, as the emulation runs a block's
// threads one by one (a few ms a block): a few cases still have several blocks, several splits
// per channel and more than one group per step of a thread's loop.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

using namespace qdarts;
using namespace qdarts::gpu;

int check_device_rounding();  // tests/cuda/quant_math_device_branch.cpp

namespace {

int failures = 0;
int cases = 0;

template <typename... Args>
void fail(const char* format, Args... args) {
  if (++failures <= 30) {
    std::printf(format, args...);
    std::printf("\n");
  }
}

template <typename T>
const char* dtype_name() {
  if (std::is_same<T, float>::value) return "float32";
  return std::is_same<T, __half>::value ? "float16" : "bfloat16";
}

template <typename T>
DType dtype_of() {
  if (std::is_same<T, float>::value) return DType::kFloat32;
  return std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16;
}

// fp32 v rounded to T to nearest even by the CUDA headers' own conversions, not common.cuh's
// from_float (which the kernels use: a reference sharing it could not see a wrong rounding there).
template <typename T>
float rounded(float v) {
  if constexpr (std::is_same<T, float>::value) return v;
  else if constexpr (std::is_same<T, __half>::value) return __half2float(__float2half_rn(v));
  else return __bfloat162float(__float2bfloat16_rn(v));
}

// Equal as the kernels must be equal to the reference: same bits, NaN for NaN (-0.0 is not 0.0).
bool same(float got, float want) {
  return (std::isnan(got) && std::isnan(want)) || (got == want && std::signbit(got) == std::signbit(want));
}

bool close(double got, double want, double magnitude) {
  return (std::isnan(got) && std::isnan(want)) || std::fabs(got - want) <= 1e-5 * magnitude + 1e-30;
}

// n elements of T starting `shift` elements past a 16-byte boundary (shift 1: every vector access
// misaligned, so the launchers must take their scalar path), followed by a guard.
template <typename T>
class Buffer {
 public:
  static constexpr int kGuard = 16;
  Buffer(int64_t n, int shift, T fill) : storage_((n + shift + kGuard) * sizeof(T) + 16), n_(n) {
    const uintptr_t base = (reinterpret_cast<uintptr_t>(storage_.data()) + 15) & ~uintptr_t(15);
    data_ = reinterpret_cast<T*>(base) + shift;
    for (int64_t i = 0; i < n + kGuard; ++i) data_[i] = fill;
    std::memcpy(guard_, data_ + n, sizeof(guard_));
  }
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  bool guard_intact() const { return std::memcmp(guard_, data_ + n_, sizeof(guard_)) == 0; }

 private:
  std::vector<unsigned char> storage_;
  int64_t n_;
  T* data_;
  T guard_[kGuard];
};

// The quantizer of DESIGN section 4 for one element, written from the contract.
struct Quantized {
  float q_minus_z;
  bool in;
  float scaled;  // x * (1/s), for the LSQ scale gradient
};

Quantized quantize_ref(float x, float s, int grid, int bits) {
  const float half = static_cast<float>(1 << (bits - 1));
  float qmin = -half, qmax = half - 1, z = 0;
  if (grid == kGridUnsigned || grid == kGridRelu) qmin = 0, qmax = 2 * half - 1;
  if (grid == kGridMidrise) qmin = -half + 1, qmax = half, z = 0.5f;
  const float xr = grid == kGridRelu && x < 0 ? 0.0f : x;  // torch.relu: -0.0 and NaN stay
  const float inv_s = 1.0f / s;
  const float r = std::nearbyint(xr * inv_s + z);
  const float q = r < qmin ? qmin : (r > qmax ? qmax : r);
  // z = 0: q + 0.0, as PyTorch's integer levels give +0.0 for level 0
  return {z == 0 ? q + 0.0f : q - z, r >= qmin && r <= qmax && (grid != kGridRelu || x > 0), xr * inv_s};
}

// Sums of one gradient output in double, with the magnitude the tolerance is relative to.
struct RefSum {
  double value = 0, magnitude = 0;
  void add(double term) {
    value += term;
    if (std::isfinite(term)) magnitude += std::fabs(term);
  }
};

struct Flags {
  bool dx, dprobs, dscales;
};

std::string flags_name(const Flags& f) {
  return std::string(f.dx ? "dx" : "") + (f.dprobs ? " dprobs" : "") + (f.dscales ? " dscales" : "");
}

// One tensor's data and its reference results.
template <typename T>
struct QuantCase {
  ChannelView view;
  int64_t channels;  // of the scales: C per channel, 1 per tensor
  Buffer<T> x, grad, y, dx;
  std::vector<float> scales;

  QuantCase(const ChannelView& v, int K, int shift, bool specials, std::mt19937& rng)
      : view(v),
        channels(v.per_channel ? v.channels : 1),
        x(v.numel(), shift, from_float<T>(0.0f)),
        grad(v.numel(), shift, from_float<T>(0.0f)),
        y(v.numel(), shift, from_float<T>(-7.0f)),
        dx(v.numel(), shift, from_float<T>(-7.0f)),
        scales(K * channels) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.01f, 0.41f);
    for (float& s : scales) s = uniform(rng);
    const int64_t n = v.numel();
    for (int64_t e = 0; e < n; ++e) {
      x[e] = from_float<T>(3.0f * normal(rng));
      grad[e] = from_float<T>(normal(rng));
    }
    // ties of the first scale (rounded to even), the infinities, both zeros, a small negative
    // (0 on the relu grid, with its gradient), NaN
    if (specials && n >= 12) {
      const float specials_x[] = {2.5f * scales[0], -1.5f * scales[0], INFINITY, -INFINITY, -0.0f, 0.0f, -0.001f};
      for (int i = 0; i < 7; ++i) x[1 + i] = from_float<T>(specials_x[i]);
      x[n - 1] = from_float<T>(NAN);
    }
  }

  int64_t channel_of(int64_t e) const { return view.per_channel ? (e / view.inner) % view.channels : 0; }
};

// Compares y, dx, dprobs [K] and dscales [K * C] of one tensor with the reference.
template <typename T>
void check_tensor(QuantCase<T>& c, const float* probs, const std::vector<int>& bits, int grid, const Flags& flags,
                  const float* dprobs, const float* dscales, bool check_y, const std::string& tag) {
  const int K = static_cast<int>(bits.size());
  std::vector<RefSum> dp(K), ds(K * c.channels);
  int y_fails = 0, dx_fails = 0;
  for (int64_t e = 0; e < c.view.numel(); ++e) {
    const int64_t ch = c.channel_of(e);
    const float x = to_float(c.x[e]), g = to_float(c.grad[e]);
    float y = 0, pass = 0;
    for (int k = 0; k < K; ++k) {
      const float s = c.scales[k * c.channels + ch];
      const Quantized r = quantize_ref(x, s, grid, bits[k]);
      const float term = probs[k] * (r.q_minus_z * s);
      y = k == 0 ? term : y + term;
      pass = pass + (r.in ? probs[k] : 0.0f);
      dp[k].add(double(g) * (double(r.q_minus_z) * s));
      ds[k * c.channels + ch].add(double(g) * probs[k] * (double(r.q_minus_z) - (r.in ? double(r.scaled) : 0.0)));
    }
    const float want_y = rounded<T>(y);
    if (check_y && !same(to_float(c.y[e]), want_y) && ++y_fails <= 2)
      fail("FAIL y %s at %lld: got %.9g want %.9g (x = %.9g)", tag.c_str(), (long long)e, to_float(c.y[e]), want_y, x);
    const float want_dx = rounded<T>(g * pass);
    if (flags.dx && !same(to_float(c.dx[e]), want_dx) && ++dx_fails <= 2)
      fail("FAIL dx %s at %lld: got %.9g want %.9g", tag.c_str(), (long long)e, to_float(c.dx[e]), want_dx);
  }
  if (!c.y.guard_intact() || !c.dx.guard_intact()) fail("FAIL %s: y or dx written past its end", tag.c_str());
  for (int k = 0; flags.dprobs && k < K; ++k)
    if (!close(dprobs[k], dp[k].value, dp[k].magnitude))
      fail("FAIL dprobs %s k=%d: got %.9g want %.9g", tag.c_str(), k, dprobs[k], dp[k].value);
  for (int64_t i = 0; flags.dscales && i < K * c.channels; ++i)
    if (!close(dscales[i], ds[i].value, ds[i].magnitude))
      fail("FAIL dscales %s [%lld]: got %.9g want %.9g", tag.c_str(), (long long)i, dscales[i], ds[i].value);
}

std::string view_name(const ChannelView& v) {
  return "(" + std::to_string(v.outer) + ", " + std::to_string(v.channels) + ", " + std::to_string(v.inner) +
         (v.per_channel ? ") per channel" : ") per tensor");
}

// A poisoned partials buffer of the size the launcher asked for (NaN, then a NaN guard).
Buffer<float> partials_buffer(int64_t size) { return Buffer<float>(size, 0, NAN); }

template <typename T>
void mixed_fake_quant_case(const ChannelView& view, int grid, const std::vector<int>& bits, const Flags& flags,
                           int shift, std::mt19937& rng) {
  ++cases;
  const int K = static_cast<int>(bits.size());
  QuantCase<T> c(view, K, shift, true, rng);
  std::uniform_real_distribution<float> uniform(0.05f, 1.05f);
  std::vector<float> probs(K);
  for (float& p : probs) p = uniform(rng);
  MixedQuantizer quantizer{K, {}, grid, probs.data(), c.scales.data()};
  for (int k = 0; k < K; ++k) quantizer.bits[k] = bits[k];

  launch_mixed_fake_quant_forward(c.x.data(), c.y.data(), dtype_of<T>(), quantizer, view, nullptr);
  Buffer<float> dprobs(K, 0, -7.0f), dscales(K * c.channels, 0, -7.0f);
  Buffer<float> partials =
      partials_buffer(mixed_fake_quant_backward_partials_size(quantizer, view, flags.dprobs, flags.dscales));
  launch_mixed_fake_quant_backward(c.grad.data(), c.x.data(), flags.dx ? c.dx.data() : nullptr,
                                   flags.dprobs ? dprobs.data() : nullptr, flags.dscales ? dscales.data() : nullptr,
                                   partials.data(), dtype_of<T>(), quantizer, view, nullptr);

  const std::string tag = std::string(dtype_name<T>()) + " " + view_name(view) + " K=" + std::to_string(K) +
                          " grid=" + std::to_string(grid) + " shift=" + std::to_string(shift) + " " +
                          flags_name(flags);
  check_tensor(c, probs.data(), bits, grid, flags, dprobs.data(), dscales.data(), true, tag);
  if (!partials.guard_intact() || !dprobs.guard_intact() || !dscales.guard_intact())
    fail("FAIL %s: partials, dprobs or dscales written past its end", tag.c_str());
}

// The bit-widths of K = 1 + index % 4.
const std::vector<int>& bit_set(int index) {
  static const std::vector<std::vector<int>> sets = {{5}, {2, 8}, {1, 3, 8}, {2, 4, 8, 16}};
  return sets[index % 4];
}

// Turn t of a sweep uses grid t % 4 and K from t + t / 4: any 16 consecutive turns cover every
// (grid, K) pair.
const std::vector<int>& bit_set_of_turn(int turn) { return bit_set(turn + turn / 4); }

template <typename T>
void mixed_fake_quant_sweep(std::mt19937& rng) {
  const std::vector<ChannelView> views = {
      {1, 1, 1, false}, {1, 1, 7, false}, {1, 1, 33, false}, {1, 1, 1000, false},
      // 3 blocks; at 4 elements a vector, 2 groups a step for the first threads
      {1, 1, 2 * 2048 + 13, false},
      {1, 3, 5, true}, {2, 4, 8, true}, {7, 3, 1, true}, {5, 17, 24, true},
      // rows of 12: whole float4s, not whole 8-half vectors
      {3, 2, 12, true},
      // 2 splits per channel
      {1, 2, 2048 + 24, true},
  };
  int turn = 0;
  for (const ChannelView& view : views) {
    // each of the 7 gradient sets, with K, the grid and the alignment varying
    for (int f = 1; f < 8; ++f, ++turn) {
      const Flags flags{(f & 1) != 0, (f & 2) != 0, (f & 4) != 0};
      mixed_fake_quant_case<T>(view, turn % kNumGrids, bit_set_of_turn(turn), flags, (turn / 2) % 2, rng);
    }
    // each K with every gradient (the widest partial rows)
    for (int k = 0; k < 4; ++k, ++turn) {
      mixed_fake_quant_case<T>(view, turn % kNumGrids, bit_set(k), Flags{true, true, true}, turn % 2, rng);
    }
  }
}

// Grouped forward and backward of one group of tensors (register.cpp's glue: plan, partials
// size, vectorize when every pointer is aligned and, per channel, every row a whole vector).
template <typename T>
void grouped_case(const std::vector<ChannelView>& views, int grid, const std::vector<int>& bits, const Flags& flags,
                  int shift, std::mt19937& rng) {
  ++cases;
  const int n = static_cast<int>(views.size()), K = static_cast<int>(bits.size());
  std::vector<QuantCase<T>> tensors;
  for (const ChannelView& view : views) tensors.emplace_back(view, K, shift, false, rng);
  std::uniform_real_distribution<float> uniform(0.05f, 1.05f);
  std::vector<float> probs(n * K);
  for (float& p : probs) p = uniform(rng);
  MixedQuantizer quantizer{K, {}, grid, probs.data(), nullptr};
  for (int k = 0; k < K; ++k) quantizer.bits[k] = bits[k];
  std::vector<GroupedTensor> descriptors(n);
  int64_t scales_numel = 0;
  bool vectorize = true;
  for (int i = 0; i < n; ++i) {
    QuantCase<T>& t = tensors[i];
    descriptors[i] = GroupedTensor{};  // the geometry is planned below
    descriptors[i].x = t.x.data();
    descriptors[i].out = t.y.data();
    descriptors[i].grad = t.grad.data();
    descriptors[i].scales = t.scales.data();
    descriptors[i].view = t.view;
    descriptors[i].scale_offset = scales_numel;
    scales_numel += static_cast<int64_t>(t.scales.size());
    vectorize = vectorize && is_vector_aligned(t.x.data()) && is_vector_aligned(t.y.data()) &&
                is_vector_aligned(t.dx.data()) && is_vector_aligned(t.grad.data()) &&
                (!t.view.per_channel || t.view.inner % vector_width<T>() == 0);
  }
  const bool per_channel = views[0].per_channel;
  int64_t segments = 0;
  int64_t blocks = plan_mixed_fake_quant_grouped(descriptors.data(), n, false, &segments);
  launch_mixed_fake_quant_grouped_forward(descriptors.data(), n, blocks, dtype_of<T>(), quantizer, per_channel,
                                          vectorize, nullptr);

  for (int i = 0; i < n; ++i) descriptors[i].out = flags.dx ? tensors[i].dx.data() : nullptr;
  blocks = plan_mixed_fake_quant_grouped(descriptors.data(), n, flags.dprobs || flags.dscales, &segments);
  Buffer<float> dprobs(n * K, 0, -7.0f), dscales(scales_numel, 0, -7.0f);
  Buffer<float> partials = partials_buffer(mixed_fake_quant_grouped_partials_size(K, blocks, flags.dprobs,
                                                                                  flags.dscales));
  launch_mixed_fake_quant_grouped_backward(descriptors.data(), n, blocks, segments, flags.dx,
                                           flags.dprobs ? dprobs.data() : nullptr,
                                           flags.dscales ? dscales.data() : nullptr, partials.data(), dtype_of<T>(),
                                           quantizer, per_channel, vectorize, nullptr);

  for (int i = 0; i < n; ++i) {
    const std::string tag = std::string("grouped ") + dtype_name<T>() + " tensor " + std::to_string(i) + "/" +
                            std::to_string(n) + " " + view_name(views[i]) + " K=" + std::to_string(K) + " grid=" +
                            std::to_string(grid) + " shift=" + std::to_string(shift) + " " + flags_name(flags);
    check_tensor(tensors[i], probs.data() + i * K, bits, grid, flags, dprobs.data() + i * K,
                 dscales.data() + descriptors[i].scale_offset, true, tag);
  }
  if (!partials.guard_intact() || !dprobs.guard_intact() || !dscales.guard_intact())
    fail("FAIL grouped n=%d: partials, dprobs or dscales written past its end", n);
}

void grouped_sweep(std::mt19937& rng) {
  // tensors with no elements (no blocks, and per channel C = 0 or inner = 0), 1-block and
  // multi-block tensors, per channel with several splits
  const std::vector<std::vector<ChannelView>> groups = {
      {{1, 1, 100, false}, {1, 1, 0, false}, {1, 1, 2048 + 300, false}, {1, 1, 3, false}},
      {{1, 1, 1, false}, {1, 1, 9 * 2048 + 5, false}},
      {{2, 3, 8, true}, {1, 0, 4, true}, {4, 5, 12, true}, {1, 1, 0, true}},
      {{3, 7, 1, true}, {1, 2, 2048 + 16, true}},
  };
  int turn = 0;
  for (const auto& group : groups)
    for (int f = 1; f < 8; ++f, ++turn) {
      const Flags flags{(f & 1) != 0, (f & 2) != 0, (f & 4) != 0};
      if (turn % 3 == 2) {
        grouped_case<__nv_bfloat16>(group, turn % kNumGrids, bit_set_of_turn(turn), flags, (turn / 2) % 2, rng);
      } else {
        grouped_case<float>(group, turn % kNumGrids, bit_set_of_turn(turn), flags, (turn / 2) % 2, rng);
      }
    }
}

// mixed_op_sum forward and backward: y and d inputs bit for bit, dweights within the tolerance.
template <typename T>
void op_sum_case(int count, int64_t numel, bool need_dinputs, bool need_dweights, int shift, std::mt19937& rng) {
  ++cases;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Buffer<T>> outputs, doutputs;
  OpSumInputs inputs{};
  inputs.count = count;
  void* dinputs[kMaxOpSumInputs] = {};
  std::vector<float> weights(count);
  for (int k = 0; k < count; ++k) {
    outputs.emplace_back(numel, shift, from_float<T>(0.0f));
    doutputs.emplace_back(numel, shift, from_float<T>(-7.0f));
    for (int64_t e = 0; e < numel; ++e) outputs[k][e] = from_float<T>(normal(rng));
    weights[k] = normal(rng);
  }
  for (int k = 0; k < count; ++k) {
    inputs.tensors[k] = outputs[k].data();
    dinputs[k] = doutputs[k].data();
  }
  Buffer<T> grad(numel, shift, from_float<T>(0.0f)), y(numel, shift, from_float<T>(-7.0f));
  for (int64_t e = 0; e < numel; ++e) grad[e] = from_float<T>(normal(rng));
  Buffer<float> dweights(count, 0, -7.0f);
  Buffer<float> partials = partials_buffer(mixed_op_sum_backward_partials_size(count, numel, need_dweights));
  launch_mixed_op_sum_forward(inputs, weights.data(), y.data(), numel, dtype_of<T>(), nullptr);
  launch_mixed_op_sum_backward(grad.data(), inputs, weights.data(), need_dinputs ? dinputs : nullptr,
                               need_dweights ? dweights.data() : nullptr, partials.data(), numel, dtype_of<T>(),
                               nullptr);

  const std::string tag = std::string(dtype_name<T>()) + " K=" + std::to_string(count) + " numel=" +
                          std::to_string(numel) + " shift=" + std::to_string(shift) +
                          (need_dinputs ? " dinputs" : "") + (need_dweights ? " dweights" : "");
  for (int64_t e = 0; e < numel; ++e) {
    float want = 0;
    for (int k = 0; k < count; ++k) {
      const float term = weights[k] * to_float(outputs[k][e]);
      want = k == 0 ? term : want + term;
    }
    if (!same(to_float(y[e]), rounded<T>(want))) {
      fail("FAIL op sum y %s at %lld", tag.c_str(), (long long)e);
      break;
    }
  }
  for (int k = 0; k < count; ++k) {
    RefSum dw;
    bool din_ok = true;
    for (int64_t e = 0; e < numel; ++e) {
      const float g = to_float(grad[e]);
      dw.add(double(g) * to_float(outputs[k][e]));
      din_ok = din_ok && same(to_float(doutputs[k][e]), rounded<T>(weights[k] * g));
    }
    if (need_dinputs && !din_ok) fail("FAIL op sum d inputs[%d] %s", k, tag.c_str());
    if (need_dweights && !close(dweights[k], dw.value, dw.magnitude))
      fail("FAIL op sum dweights[%d] %s: got %.9g want %.9g", k, tag.c_str(), dweights[k], dw.value);
    if (!doutputs[k].guard_intact()) fail("FAIL op sum d inputs[%d] %s written past its end", k, tag.c_str());
  }
  if (!y.guard_intact() || !partials.guard_intact() || !dweights.guard_intact())
    fail("FAIL op sum %s: y, partials or dweights written past its end", tag.c_str());
}

void op_sum_sweep(std::mt19937& rng) {
  // every compile-time bound of K (4, 8, 16, 32, 64), each partly and fully used
  for (int count : {1, 3, 4, 5, 8, 9, 16, 17, 33, 64})
    for (int64_t numel : {1, 9, 100}) {
      const int shift = static_cast<int>((count + numel) % 2);
      for (int f = 1; f < 4; ++f) op_sum_case<float>(count, numel, f & 1, f & 2, shift, rng);
      op_sum_case<__half>(count, numel, true, true, 1 - shift, rng);
    }
  // several blocks and a tail of the 8-wide half vectors
  op_sum_case<float>(5, 2 * 2048 + 5, true, true, 0, rng);
  op_sum_case<__nv_bfloat16>(9, 2048 + 7, true, true, 0, rng);
  // more partial rows than a warp count and than a block's threads (sum_partials_kernel's stride),
  // and more blocks than the reducing grid's cap (partials size and the launched grid must agree)
  op_sum_case<float>(2, 9 * 2048 + 1, true, true, 1, rng);
  op_sum_case<float>(1, 257 * 2048 + 1, false, true, 0, rng);
  op_sum_case<float>(1, kReduceBlocks * kThreads * kElementsPerThread + 5, false, true, 0, rng);
}

// Launch geometry of shapes too large to run here: grids within CUDA's limits, and the element
// loops' offsets past 2^31 (for_each_flat run for the threads of the last block, with a body that
// only records the offsets).
void geometry_checks() {
  for (const ChannelView& view : {ChannelView{1, 1, int64_t{1} << 28, true}, ChannelView{3, 1, int64_t{1} << 27, true},
                                  ChannelView{1, 2, int64_t{1} << 30, true}}) {
    ++cases;
    for (int64_t cap : {kElementwiseBlocks, kReduceBlocks}) {
      const dim3 g = element_grid(view, cap);
      if (g.x > 2147483647u || g.y > 65535u || g.y == 0)
        fail("FAIL element_grid %s cap %lld: grid (%u, %u) over CUDA's limits", view_name(view).c_str(),
             (long long)cap, g.x, g.y);
    }
  }
  const int64_t n = (int64_t{1} << 32) + 5;
  const dim3 g = element_grid(ChannelView{1, 1, n, false}, kElementwiseBlocks);
  ++cases;
  for (int64_t thread : {int64_t{0}, int64_t{kThreads - 1}}) {
    const ThreadCoords t{g.x - 1, 0, g.x, 1, thread};
    const int64_t first = t.block_x * kThreads + t.thread, stride = t.grid_x * kThreads;
    int64_t want = first, visited = 0;
    bool ok = true;
    struct Runaway {};  // a wrapped offset: the loop would not end
    auto body = [&](auto, const auto& groups) {
      for (int64_t offset : groups.at) {
        ok = ok && offset == want;
        want += stride;
        if (++visited > 4096) throw Runaway{};
      }
    };
    try {
      for_each_flat<1, 2>(n, t, body);
    } catch (Runaway) {
      ok = false;
    }
    if (!ok || want < n || want - stride >= n)
      fail("FAIL for_each_flat n = 2^32 + 5, thread %lld of the last block: %lld offsets, wrong past 2^31",
           (long long)thread, (long long)visited);
  }
}

}  // namespace

int main() {
  geometry_checks();
  failures += check_device_rounding();
  std::mt19937 rng(1234);
  mixed_fake_quant_sweep<float>(rng);
  mixed_fake_quant_sweep<__half>(rng);
  mixed_fake_quant_sweep<__nv_bfloat16>(rng);
  grouped_sweep(rng);
  op_sum_sweep(rng);
  std::printf("launch emulation: %d cases, %lld launches, %lld blocks, %d failures\n", cases, emu::launches,
              emu::blocks_run, failures);
  return failures == 0 ? 0 : 1;
}
