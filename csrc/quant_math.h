// The quantizer of DESIGN section 4, as plain inline functions shared by the C++ CPU kernels and
// the CUDA kernels. No torch headers: the CUDA kernel files include this and compile with plain nvcc.
//
//   v = x * inv_s + z,  r = rint(v) (half to even),  q = clamp(r, qmin, qmax),
//   Q = (q - z) * s,    in = (qmin <= r <= qmax)
//
// The relu grid is the unsigned grid applied to relu(x), with the ReLU's gradient folded into `in`
// (0 where x <= 0): GridRange::x_floor is 0 there and -inf on the other grids, where the two extra
// operations it costs change nothing (x < -inf is never true, and x > -inf fails only for -inf and
// NaN, which are out of range anyway).
//
// Both builds disable floating-point contraction (-ffp-contract=off, nvcc --fmad=false): an FMA in
// x * inv_s + z would round a tie differently from PyTorch's fake-quant kernels. Where an FMA is
// wanted (the gradients' sums, whose order differs from the reference's anyway) it is asked for by
// name (fused_multiply_add).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QD_HOST_DEVICE inline
#endif

namespace qdarts {

constexpr int kMaxBits = 4;  // K, the number of bit-widths one mixed quantizer mixes
constexpr int kGridSigned = 0;
constexpr int kGridUnsigned = 1;
constexpr int kGridMidrise = 2;
constexpr int kGridRelu = 3;
constexpr int kNumGrids = 4;

struct GridRange {
  float qmin;
  float qmax;
  float zero_point;
  float x_floor;  // x < x_floor quantizes as 0, and in = 0 unless x > x_floor: 0 (relu grid) or -inf
};

// Integer range, zero point and input floor of `grid` at `bits` (1..16).
QD_HOST_DEVICE GridRange grid_range(int grid, int bits) {
  const float half = static_cast<float>(1 << (bits - 1));
  const float unsigned_max = static_cast<float>((1 << bits) - 1);
  if (grid == kGridSigned) return {-half, half - 1.0f, 0.0f, -INFINITY};
  if (grid == kGridUnsigned) return {0.0f, unsigned_max, 0.0f, -INFINITY};
  if (grid == kGridRelu) return {0.0f, unsigned_max, 0.0f, 0.0f};
  return {-half + 1.0f, half, 0.5f, -INFINITY};
}

// relu(x) on the relu grid (x_floor 0; as torch.relu: -0.0 and NaN stay), x itself on the others.
QD_HOST_DEVICE float floored_input(float x, float x_floor) { return x < x_floor ? 0.0f : x; }

// Round half to even in the current (default: to nearest even) rounding mode.
//
// On the host this is the add-and-subtract-2^23 trick rather than std::nearbyint: at baseline x86-64
// (SSE2, the default clone of the CPU kernels) nearbyint is a libm call that stops the loop from
// vectorising. For |v| < 2^23, |v| + 2^23 lies in [2^23, 2^24) where the float spacing is 1, so the
// addition itself rounds |v| to an integer in the current rounding mode (ties to even, as 2^23 is
// even), and subtracting 2^23 is exact; copysign restores the sign, including that of -0.0. Floats
// with |v| >= 2^23 are integers already: they get a shift of 0, as does NaN (the comparison is
// false), which stays NaN. The shift is a select between two constants, which vectorises without
// speculating any arithmetic. Checked bit for bit against std::nearbyint on all 2^32 floats.
// Needs IEEE arithmetic without -ffast-math/-fassociative-math, which would fold the addition and
// subtraction away.
QD_HOST_DEVICE float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  constexpr float kTwoPow23 = 8388608.0f;
  const float magnitude = std::fabs(v);
  const float shift = magnitude < kTwoPow23 ? kTwoPow23 : 0.0f;
  return std::copysign((magnitude + shift) - shift, v);
#endif
}

// clamp(r, lo, hi), where a NaN r stays NaN, as in the reference's torch.clamp. On the host it is
// written with comparisons (fminf/fmaxf's NaN rules stop vectorisation on CPU); on the GPU (sm_80 and
// newer) PTX's max.NaN / min.NaN do the same in one instruction each instead of two (a NaN in gives
// the canonical NaN, which every GPU arithmetic instruction gives anyway).
QD_HOST_DEVICE float clamp_range(float r, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float c;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(c) : "f"(r), "f"(lo));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(c) : "f"(c), "f"(hi));
  return c;
#else
  r = r < lo ? lo : r;
  return r > hi ? hi : r;
#endif
}

// a * b + c rounded once, for the gradients' sums (the builds contract nothing by themselves).
QD_HOST_DEVICE float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The least and the greatest v whose rounding lies in [qmin, qmax]: in = (lo <= v <= hi) is the
// same as qmin <= round_half_even(v) <= qmax (a tie at qmin - 0.5 rounds up to qmin when qmin is
// even, a tie at qmax + 0.5 down to qmax when qmax is even), with one comparison per side.
struct InRangeBounds {
  float lo;
  float hi;
};

inline InRangeBounds in_range_bounds(const GridRange& g) {
  const bool qmin_even = std::fmod(g.qmin, 2.0f) == 0.0f;
  const bool qmax_even = std::fmod(g.qmax, 2.0f) == 0.0f;
  const float lo = g.qmin - 0.5f;
  const float hi = g.qmax + 0.5f;
  return {qmin_even ? lo : std::nextafter(lo, INFINITY), qmax_even ? hi : std::nextafter(hi, -INFINITY)};
}

// One bit-width's quantizer as the GPU kernels evaluate it (made on the host once):
//   r = rint(v),  q = clamp(r, qmin, qmax),  q - z = q + level_offset,  in = (q == r)
// level_offset is -z, but +0.0 where z = 0, so that one addition gives (q - z) with level 0 as +0.0,
// as in PyTorch's fake-quant (integer levels), where rint(v) is -0.0 for a v in [-0.5, 0): -0.0 +
// +0.0 is +0.0, and with z = 1/2 no level is 0. in = (q == r): the clamp left r as it was exactly
// when qmin <= r <= qmax (false for a NaN r, as it must be; -0.0 == +0.0).
struct QuantLevels {
  float qmin;
  float qmax;
  float zero_point;
  float level_offset;
};

QD_HOST_DEVICE QuantLevels quant_levels(const GridRange& g) {
  return {g.qmin, g.qmax, g.zero_point, g.zero_point == 0.0f ? 0.0f : -g.zero_point};
}

struct QuantResult {
  float q_minus_z;  // (q - z), the integer level relative to the zero point
  bool in_range;    // qmin <= r <= qmax, and x above the grid's floor
  float scaled;     // floored(x) * inv_s, which is x * inv_s wherever in_range
};

// The quantizer at one bit-width, for x_floored = floored_input(x, x_floor) and above_floor =
// (x > x_floor), which the grid's bit-widths share and a caller computes once per element.
QD_HOST_DEVICE QuantResult quantize(float x_floored, bool above_floor, float inv_s, const QuantLevels& l) {
  const float scaled = x_floored * inv_s;
  const float r = round_half_even(scaled + l.zero_point);
  const float q = clamp_range(r, l.qmin, l.qmax);
  return {q + l.level_offset, above_floor && q == r, scaled};
}

}  // namespace qdarts
