// Pieces shared by the C++ CPU kernels: dtype staging, streaming stores, and deterministic partial
// sums.
//
// Work is cut into *tiles* whose boundaries depend only on the tensor shapes (never on the number
// of threads); at::parallel_for hands whole tiles to threads. Inside a tile, elements are processed
// in *runs* of at most kRunLength contiguous elements, converted to fp32 when the dtype is not
// fp32. A reduction keeps its fp32 partial sums either in kLanes register lanes (simd.h: the term
// of position j goes to lane j mod kLanes) or, where a run crosses channels, one per *position*
// (RunAccumulator below); either way it moves them into fp64 after a few terms each, each tile
// writes its fp64 partial sums to its own slot, and one thread adds the slots up in tile order.
// The reduced gradients are therefore the same bits for any thread count and any instruction set
// (the vector width changes nothing in this order), and their rounding error is that of a few
// fp32 additions per term plus fp64 sums.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/simd.h"

// QD_CPU_CONVERT marks the dtype conversions: on x86-64 Linux with GCC they are compiled three times
// (baseline SSE2, x86-64-v3 = AVX2, x86-64-v4 = AVX-512) and the loader picks the best clone for the
// machine once (an ifunc). The kernels themselves choose their instruction set in simd.h.
// -ffp-contract=off (setup.py) keeps every instruction set bit-identical: none may fuse a multiply
// and an add.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define QD_CPU_CONVERT __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4"), noinline))
#elif defined(__GNUC__)
#define QD_CPU_CONVERT __attribute__((noinline))
#else
#define QD_CPU_CONVERT
#endif

namespace qdarts {
namespace cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Planes (images x channels) per at::parallel_for chunk for a kernel doing `work_per_plane`
// multiply-adds or comparisons per plane: about 64k per chunk, so that small tensors stay on one thread.
inline int64_t plane_grain(int64_t work_per_plane) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_plane));
}

// The h x w plane x copied into xp, a (h + 2 ph) x (w + 2 pw) plane with `fill` around it: the
// padded layout of the depthwise-conv and max-pool kernels.
inline void pad_plane(const float* x, int64_t h, int64_t w, int64_t ph, int64_t pw, float fill, float* xp) {
  const int64_t wp = w + 2 * pw;
  std::fill(xp, xp + (h + 2 * ph) * wp, fill);
  for (int64_t r = 0; r < h; ++r) std::copy(x + r * w, x + (r + 1) * w, xp + (r + ph) * wp + pw);
}

// The padded plane xp (hp rows of wp) split by column phase for a column stride sw: phase q holds
// the columns q, q + sw, q + 2 sw, ... of every row, in rows of wq = ceil(wp / sw) with `fill` past
// the last, one phase after the other. Tap (i, j) of a strided kernel then reads, for the outputs of
// one row, one contiguous run: phase (j dw) mod sw, row oh sh + i dh, from column (j dw) div sw (a
// strided gather per output had cost the max pool PyTorch's time). For the max pool's and the
// depthwise conv's strides other than 1.
inline void split_column_phases(const float* xp, int64_t hp, int64_t wp, int64_t sw, float fill, float* phases) {
  const int64_t wq = ceil_div(wp, sw);
  for (int64_t q = 0; q < sw; ++q) {
    const int64_t n = ceil_div(wp - q, sw);
    for (int64_t r = 0; r < hp; ++r) {
      float* dst = phases + (q * hp + r) * wq;
      const float* src = xp + r * wp + q;
      for (int64_t c = 0; c < n; ++c) dst[c] = src[c * sw];
      std::fill(dst + n, dst + wq, fill);
    }
  }
}

// The kLanes fp64 lane totals of a reduction added in lane order (the fixed order of the file comment).
inline double sum_lanes(const double* totals) {
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += totals[l];
  return sum;
}

// The kLanes fp32 lane sums of a run as one fp64 value, added pairwise in a fixed tree: lane l and
// lane l + 8, then l and l + 4, l and l + 2, and the last two. Every step adds elementwise, so
// vectors of any width (or none) give the same bits; four dependent additions instead of sixteen
// (the sequential chain had been most of a small depthwise plane's weight gradient).
inline double lane_tree_sum(const float* lanes) {
  static_assert(kLanes == 16, "lane_tree_sum adds 16 lanes");
  double d[8];
  for (int l = 0; l < 8; ++l) d[l] = static_cast<double>(lanes[l]) + static_cast<double>(lanes[l + 8]);
  for (int l = 0; l < 4; ++l) d[l] += d[l + 4];
  return (d[0] + d[2]) + (d[1] + d[3]);
}

// Longest contiguous run processed at once: fp32 staging buffers and per-position accumulators of
// this length stay in the L1 cache.
constexpr int64_t kRunLength = 256;
// Elements per tile (the unit of parallel work and of partial sums): fixed, so that the tiles, and
// with them the reduced gradients, do not depend on the number of threads.
constexpr int64_t kTileElements = 16384;
// fp32 terms per position between moves of the per-position accumulators into fp64.
constexpr int kFlushRuns = 16;

enum class Dtype { kFloat, kHalf, kBFloat16 };

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case c10::ScalarType::Half:
      return Dtype::kHalf;
    case c10::ScalarType::BFloat16:
      return Dtype::kBFloat16;
    default:
      return Dtype::kFloat;  // the op's argument checks admit only these three
  }
}

// Conversions between a run of fp16/bf16 elements and fp32, rounding to nearest even as Tensor.to
// does. Kept out of line (and cloned on their own) so that the templated kernels, which call them
// once per run, are not compiled once more per dtype. `static`: each kernel file has its own copy,
// as the clones of a target_clones function are local symbols.
static QD_CPU_CONVERT void convert_to_fp32(Dtype dtype, const void* src, int64_t offset, int64_t n, float* dst) {
  if (dtype == Dtype::kHalf) {
    const c10::Half* s = static_cast<const c10::Half*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  } else {
    const c10::BFloat16* s = static_cast<const c10::BFloat16*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  }
}

static QD_CPU_CONVERT void convert_from_fp32(Dtype dtype, const float* src, void* dst, int64_t offset, int64_t n) {
  if (dtype == Dtype::kHalf) {
    c10::Half* d = static_cast<c10::Half*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::Half>(src[i]);
  } else {
    c10::BFloat16* d = static_cast<c10::BFloat16*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::BFloat16>(src[i]);
  }
}

inline int64_t round_up_to_lanes(int64_t n) { return ceil_div(n, kLanes) * kLanes; }

// Reads n elements of dtype `dtype` at src + offset as fp32, readable up to round_up_to_lanes(n)
// with zeros past n (the kernels work in whole groups of kLanes; a zero x and a zero gradient add
// nothing to any sum): a pointer into src itself for fp32 when n is a multiple of kLanes (any n),
// else the copy in `stage` (kRunLength floats; n <= kRunLength).
inline const float* load_run(Dtype dtype, const void* src, int64_t offset, int64_t n, float* stage) {
  if (dtype == Dtype::kFloat) {
    const float* p = static_cast<const float*>(src) + offset;
    if (n % kLanes == 0) return p;
    std::memcpy(stage, p, static_cast<size_t>(n) * sizeof(float));
  } else {
    convert_to_fp32(dtype, src, offset, n, stage);
  }
  std::fill(stage + n, stage + round_up_to_lanes(n), 0.0f);
  return stage;
}

// Writes the n fp32 results in `stage` to dst + offset, converted to `dtype`; fp32 with
// non-temporal stores when `stream` (see copy_floats in simd.h).
inline void store_run(Dtype dtype, void* dst, int64_t offset, int64_t n, const float* stage, bool stream) {
  if (dtype == Dtype::kFloat) {
    copy_floats(static_cast<float*>(dst) + offset, stage, n, stream);
  } else {
    convert_from_fp32(dtype, stage, dst, offset, n);
  }
}

// Least number of elements worth a thread of its own: waking a thread costs microseconds, as much
// as a pass over a small tensor; a search on small images makes hundreds of such calls per step.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;

// The grain of at::parallel_for over n_tiles tiles holding numel elements in all.
inline int64_t parallel_grain(int64_t numel, int64_t n_tiles) {
  if (n_tiles <= 0) return 1;
  const int64_t per_tile = std::max<int64_t>(1, numel / n_tiles);
  return std::max<int64_t>(1, ceil_div(kMinElementsPerThread, per_tile));
}

// Outputs of at least this many bytes per call are written with non-temporal stores: larger than
// the private L2 caches, so the next kernel would find most of them in the shared L3 at best, and
// streaming them saves reading each output line into the cache before writing it and evicting
// inputs that the backward pass reads again. Measured on the 2-core VM of bench/results
// (mixed_op_sum K=8, 1M fp32 per input, forward+backward, sampled in turn): a 4 MiB y streamed
// made the pair 11-16% faster than cached; 8 MiB had been the threshold before.
constexpr int64_t kStreamingStoreBytes = int64_t{2} << 20;

// Per-position sums: `rows` rows of `capacity` positions. A run adds its terms at the positions it
// covers; the fp32 sums move into fp64 before any position would take a (kFlushRuns + 1)-th term
// (see the file comment). A "pass" is a sequence of runs over the positions that starts at
// position 0; call begin_run(position) before each run. Row r's fp32 sums are at sum(r), with row
// stride capacity. One accumulator serves a thread's share of tiles, reset per tile.
class RunAccumulator {
 public:
  RunAccumulator(int64_t rows, int64_t capacity)
      : rows_(rows), capacity_(capacity), partial_(rows * capacity), total_(rows * capacity) {}

  void reset(int64_t positions) {
    width_ = positions;
    passes_ = 0;
    for (int64_t r = 0; r < rows_; ++r) {
      float* p = partial_.data() + r * capacity_;
      double* t = total_.data() + r * capacity_;
      for (int64_t j = 0; j < width_; ++j) {
        p[j] = 0.0f;
        t[j] = 0.0;
      }
    }
  }
  int64_t stride() const { return capacity_; }
  float* sum(int64_t r) { return partial_.data() + r * capacity_; }
  void begin_run(int64_t position) {
    if (position != 0) return;
    if (passes_ == kFlushRuns) flush();
    ++passes_;
  }
  // Moves the fp32 sums into fp64 (begin_run does it as needed; call once more before total()).
  void flush() {
    for (int64_t r = 0; r < rows_; ++r) {
      float* p = partial_.data() + r * capacity_;
      double* t = total_.data() + r * capacity_;
      for (int64_t j = 0; j < width_; ++j) {
        t[j] += static_cast<double>(p[j]);
        p[j] = 0.0f;
      }
    }
    passes_ = 0;
  }
  // fp64 sum of row r, position j (after flush()).
  double total(int64_t r, int64_t j) const { return total_[r * capacity_ + j]; }

 private:
  int64_t rows_;
  int64_t capacity_;
  std::vector<float> partial_;
  std::vector<double> total_;
  int64_t width_ = 0;
  int passes_ = 0;
};

}  // namespace cpu
}  // namespace qdarts
