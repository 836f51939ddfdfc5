// Conversions of runs between fp16/bf16 and fp32 (declared in cpu_common.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/cpu_common.h"

namespace qdarts {
namespace cpu {

QD_CPU_CONVERT void convert_to_fp32(Dtype dtype, const void* src, int64_t offset, int64_t n, float* dst) {
  if (dtype == Dtype::kHalf) {
    const c10::Half* s = static_cast<const c10::Half*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  } else if (dtype == Dtype::kBFloat16) {
    const c10::BFloat16* s = static_cast<const c10::BFloat16*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  } else {
    const float* s = static_cast<const float*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i];
  }
}

QD_CPU_CONVERT void convert_from_fp32(Dtype dtype, const float* src, void* dst, int64_t offset, int64_t n) {
  if (dtype == Dtype::kHalf) {
    c10::Half* d = static_cast<c10::Half*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::Half>(src[i]);
  } else if (dtype == Dtype::kBFloat16) {
    c10::BFloat16* d = static_cast<c10::BFloat16*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::BFloat16>(src[i]);
  } else {
    float* d = static_cast<float*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = src[i];
  }
}

}  // namespace cpu
}  // namespace qdarts
