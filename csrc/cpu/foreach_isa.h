// Includes QD_ISA_KERNELS once per instruction set, each time in its own namespace compiled for that
// instruction set (see cpu/simd.h). Include it once per kernel file, inside that file's namespace,
// after everything the kernels use; no include guard, on purpose.
#ifndef QD_ISA_KERNELS
#error "define QD_ISA_KERNELS (the kernel include file) before including cpu/foreach_isa.h"
#endif

#if defined(QD_SIMD_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
constexpr int kWidth = 16;
#define QD_ISA_WIDTH 16
#include "cpu/simd_vector.inc"
#include QD_ISA_KERNELS
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
constexpr int kWidth = 8;
#define QD_ISA_WIDTH 8
#include "cpu/simd_vector.inc"
#include QD_ISA_KERNELS
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_baseline {
constexpr int kWidth = 4;
#define QD_ISA_WIDTH 4
#include "cpu/simd_vector.inc"
#include QD_ISA_KERNELS
}  // namespace isa_baseline

#undef QD_ISA_KERNELS
