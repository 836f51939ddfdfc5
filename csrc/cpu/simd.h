// Explicit SIMD for the C++ CPU kernels: kernel code compiled once per instruction set, written with
// a vector type of W floats (GCC/Clang vector extensions); a run-time choice of the instruction set;
// non-temporal stores.
//
// Why explicit vectors rather than auto-vectorised loops: the reductions keep their sums in
// registers, in kLanes fixed *lanes* (lane l holds the terms of positions l, l + kLanes, l + 2 kLanes,
// ... of a run, added in that order). The auto-vectoriser does not keep such sums in registers, nor
// vectorise the quantizer with its selects reliably; with vector types it has no choice. As the lane
// of every term is fixed by its position, not by W, every instruction set gives the same bits.
//
// Compiling per instruction set: a kernel file defines QD_ISA_KERNELS as the name of its kernel
// include file and includes cpu/foreach_isa.h, which includes that file (and cpu/simd_vector.inc,
// the vector type) once per instruction set, each time in its own namespace under
// `#pragma GCC target`: isa_avx512 (x86-64-v4, W = 16), isa_avx2 (x86-64-v3, W = 8) and isa_baseline
// (SSE2 on x86-64, NEON on AArch64; W = 4). Whole functions must be compiled for the target: vector
// code inlined from a function compiled for the baseline would already have been split into
// baseline-sized pieces. Functions defined before the pragma (std::, torch, cpu_common.h) keep the
// baseline target, so nothing the other files share is compiled for a wider instruction set than
// the machine may have. QD_ISA_DISPATCH(fn, args...) calls the `fn` of the widest instruction set
// the CPU has. The switch
//
//   QDARTS_CPU_ISA=avx512|avx2|baseline   (read once, at the first kernel call)
//
// caps the level (it never raises it above what the CPU has): for tests that compare the levels,
// and to rule a level out when chasing a problem.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
// GCC declares the AVX2/AVX-512 intrinsics whatever the command-line target; the kernels compiled
// for those instruction sets (foreach_isa.h) use their non-temporal stores.
#include <immintrin.h>
#endif

namespace qdarts {
namespace cpu {

constexpr int kLanes = 16;

enum class SimdLevel { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// GCC 11 is the first to know the x86-64-v3/v4 targets; older compilers build the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define QD_SIMD_X86_DISPATCH 1
#endif

inline SimdLevel detect_simd_level() {
  SimdLevel level = SimdLevel::kBaseline;
#if defined(QD_SIMD_X86_DISPATCH)
  // The features of each level that the kernels' compiler may use (the level names themselves are
  // known to __builtin_cpu_supports only from GCC 12 on).
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("f16c");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) {
    level = SimdLevel::kAvx512;
  } else if (v3) {
    level = SimdLevel::kAvx2;
  }
#endif
  const char* cap = std::getenv("QDARTS_CPU_ISA");
  if (cap != nullptr && *cap != '\0') {  // set but empty: unset, as QDARTS_BACKEND and QDARTS_CPU_CACHE_MB
    SimdLevel limit = level;
    if (std::strcmp(cap, "baseline") == 0) {
      limit = SimdLevel::kBaseline;
    } else if (std::strcmp(cap, "avx2") == 0) {
      limit = SimdLevel::kAvx2;
    } else {
      TORCH_CHECK(std::strcmp(cap, "avx512") == 0, "QDARTS_CPU_ISA must be avx512, avx2 or baseline, got '", cap, "'");
    }
    if (static_cast<int>(limit) < static_cast<int>(level)) level = limit;
  }
  return level;
}

inline SimdLevel simd_level() {
  static const SimdLevel level = detect_simd_level();
  return level;
}

#if defined(QD_SIMD_X86_DISPATCH)
#define QD_ISA_DISPATCH(fn, ...)                   \
  do {                                             \
    switch (::qdarts::cpu::simd_level()) {         \
      case ::qdarts::cpu::SimdLevel::kAvx512:      \
        isa_avx512::fn(__VA_ARGS__);               \
        break;                                     \
      case ::qdarts::cpu::SimdLevel::kAvx2:        \
        isa_avx2::fn(__VA_ARGS__);                 \
        break;                                     \
      default:                                     \
        isa_baseline::fn(__VA_ARGS__);             \
    }                                              \
  } while (0)
#else
#define QD_ISA_DISPATCH(fn, ...) isa_baseline::fn(__VA_ARGS__)
#endif

// Copies n floats to dst, with non-temporal (cache-bypassing) stores when `stream` and the target
// allows: a large output that the next kernel reads from memory anyway is then written without
// first being read into the cache. The caller issues stream_fence() before its results are used.
inline void copy_floats(float* __restrict dst, const float* __restrict src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace qdarts
