// quant_math.h's device branch of round_half_even (rintf), which the launch emulation does not run
// (it compiles the host branches): built here as nvcc's device pass sees it (__CUDA_ARCH__ set, below
// sm_80 so that clamp_range keeps its comparisons: the sm_80 PTX max.NaN/min.NaN run on a GPU only),
// under another namespace name so as not to clash with the host build's inline functions.
// rintf runs in the host's default rounding mode, to nearest even, as the device's rint does.
#include <cmath>
#include <cstdio>

// the device intrinsic fused_multiply_add names, which no host header declares
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

#define __CUDA_ARCH__ 700
#define qdarts qdarts_device_branch
#include "quant_math.h"
#undef qdarts
#undef __CUDA_ARCH__

int check_device_rounding() {
  int failures = 0;
  const float ties[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 127.5f, 8388607.5f, -0.0f, 1e30f, 0.49999997f};
  for (float v : ties) {
    const float got = qdarts_device_branch::round_half_even(v), want = std::nearbyint(v);
    if (!(got == want && std::signbit(got) == std::signbit(want)) && ++failures <= 5)
      std::printf("FAIL device round_half_even(%.9g) = %.9g, want %.9g\n", v, got, want);
  }
  return failures;
}
