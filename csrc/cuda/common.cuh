// Device helpers shared by the CUDA kernel files: dtype conversion, vectorised access, the
// element loops, the deterministic block reduction, launch geometry and template dispatch.
// No torch headers; compiled only by nvcc. The code must also build under the flags torch's
// CUDAExtension adds (-D__CUDA_NO_HALF_OPERATORS__, -D__CUDA_NO_HALF_CONVERSIONS__,
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__, ...), so every half/bfloat16 conversion is explicit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels.h"

namespace qdarts {
namespace gpu {

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kWarps = kThreads / 32;
// Elements one thread handles per sweep when sizing a grid (two float4 or one 8 x half load).
constexpr int64_t kElementsPerThread = 8;
// Grid caps. A reducing kernel writes one row of partials per block, so its grid is kept small;
// 4096 blocks still fill an H100 or an A100 several times over (< 5 % wave-quantisation loss).
// The grid of a reducing kernel depends only on the shape: the summation order, hence every bit
// of the result, does not depend on the device or on timing.
constexpr int64_t kReduceBlocks = 4096;
constexpr int64_t kElementwiseBlocks = 65536;
constexpr int64_t kMaxGridY = 65535;

template <int N>
struct Width {
  static constexpr int value = N;
};
template <typename T>
struct TypeTag {
  using type = T;
};

QD_HOST_DEVICE float to_float(float v) { return v; }
QD_HOST_DEVICE float to_float(__half v) { return __half2float(v); }
QD_HOST_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
QD_HOST_DEVICE T from_float(float v);
template <>
QD_HOST_DEVICE float from_float<float>(float v) {
  return v;
}
template <>
QD_HOST_DEVICE __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
QD_HOST_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector access: float4 for fp32, 8 halves for fp16 / bf16.
template <typename T>
constexpr int vector_width() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool is_vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// N consecutive elements moved as one access (one 16-byte load or store when N = vector_width).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
QD_HOST_DEVICE Pack<T, N> load_pack(const T* base, int64_t offset) {
  return *reinterpret_cast<const Pack<T, N>*>(base + offset);
}

template <typename T, int N>
QD_HOST_DEVICE void store_pack(T* base, int64_t offset, const Pack<T, N>& p) {
  *reinterpret_cast<Pack<T, N>*>(base + offset) = p;
}

// Position of one thread in its launch. The element loops take it as an argument instead of
// reading blockIdx / threadIdx, so that tests/cuda/loops_test.cu can run them on the host for
// every thread of a grid and check that each element is visited exactly once.
struct ThreadCoords {
  int64_t block_x, block_y;  // blockIdx
  int64_t grid_x, grid_y;    // gridDim
  int64_t thread;            // threadIdx.x; blockDim.x is kThreads
};

__device__ __forceinline__ ThreadCoords this_thread() {
  return {blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, threadIdx.x};
}

// The offsets of the M groups of elements that one step of a thread's loop hands its body at once:
// a body that loads all M groups before it stores any lets them be issued together, M times the bytes
// in flight per thread (ptxas may still schedule a load later where it knows the pointers apart and
// wants the registers: it does so in the K = 3 fp32 backward, and not in the forward).
template <int M>
struct GroupOffsets {
  static constexpr int count = M;
  int64_t at[M];
};

// Grid-stride loop over a flat range of n elements: body(Width<VEC>{}, GroupOffsets<M>) on the
// aligned groups of VEC elements, M of them a step (u, u + stride, ...: the order of a plain
// grid-stride loop), the last < M one at a time; then body(Width<1>{}, GroupOffsets<1>) on the
// < VEC elements of the tail.
#pragma nv_exec_check_disable
template <int VEC, int M, typename Body>
QD_HOST_DEVICE void for_each_flat(int64_t n, const ThreadCoords& t, Body& body) {
  const int64_t first = t.block_x * kThreads + t.thread;
  const int64_t stride = t.grid_x * kThreads;
  const int64_t groups = n / VEC;
  int64_t u = first;
  for (; u + (M - 1) * stride < groups; u += M * stride) {
    GroupOffsets<M> step;
#pragma unroll
    for (int m = 0; m < M; ++m) step.at[m] = (u + m * stride) * VEC;
    body(Width<VEC>{}, step);
  }
  if constexpr (M > 1) {
    for (; u < groups; u += stride) body(Width<VEC>{}, GroupOffsets<1>{{u * VEC}});
  }
  if (VEC > 1 && first < n - groups * VEC) body(Width<1>{}, GroupOffsets<1>{{groups * VEC + first}});
}

// Grid-stride loop over the elements of channel c = block_x of a [outer, C, inner] tensor, split
// over grid_y blocks (block_y is this block's split), one group of VEC at a time
// (body(Width<VEC>{}, GroupOffsets<1>)). VEC must divide inner, so a group of VEC never crosses a
// row. The (row, position) pair is advanced without a division per step.
#pragma nv_exec_check_disable
template <int VEC, typename Body>
QD_HOST_DEVICE void for_each_in_channel(const ChannelView& view, const ThreadCoords& t, Body& body) {
  const int64_t c = t.block_x;
  const int64_t row_groups = view.inner / VEC;
  const int64_t first = t.block_y * kThreads + t.thread;
  const int64_t stride = t.grid_y * kThreads;
  const int64_t stride_rows = stride / row_groups;
  const int64_t stride_pos = stride % row_groups;
  int64_t row = first / row_groups;
  int64_t pos = first % row_groups;
  while (row < view.outer) {
    body(Width<VEC>{}, GroupOffsets<1>{{((row * view.channels + c) * row_groups + pos) * VEC}});
    pos += stride_pos;
    row += stride_rows;
    if (pos >= row_groups) {
      pos -= row_groups;
      ++row;
    }
  }
}

// Per-tensor layout: a 1-D grid over the flat tensor, M groups a step. Per-channel layout: grid
// (C, splits), each block inside one channel, so that its partial sums belong to that channel alone.
#pragma nv_exec_check_disable
template <int VEC, bool PER_CHANNEL, int M, typename Body>
QD_HOST_DEVICE void for_each_element(const ChannelView& view, const ThreadCoords& t, Body& body) {
  if constexpr (PER_CHANNEL) {
    for_each_in_channel<VEC>(view, t, body);
  } else {
    for_each_flat<VEC, M>(view.numel(), t, body);
  }
}

// Index of a block's row of partials: c * splits + split (per channel) or block_x (per tensor).
// launch_sum_partials relies on this layout: channel c's rows are the segment [c * splits, (c + 1) * splits).
QD_HOST_DEVICE int64_t block_row(const ThreadCoords& t) { return t.block_x * t.grid_y + t.block_y; }

// Row of the j-th partial that launch_sum_partials adds for output segment `segment`.
QD_HOST_DEVICE int64_t segment_row(int64_t segment, int64_t segment_length, int64_t j) {
  return segment * segment_length + j;
}

// Sums each of the NR per-thread values over the block and writes the NR sums to out[0..NR).
// The order is fixed (shuffle tree in each warp, then warps in index order), so the result is
// the same bits on every run. Every thread of the block must call it, once per kernel: a second
// call would need a __syncthreads() before it, as threads < NR may still read warp_sums.
template <int NR>
__device__ __forceinline__ void block_sum(const float (&values)[NR], float* out) {
  __shared__ float warp_sums[kWarps][NR];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float v = values[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < NR) {
    float total = warp_sums[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    out[threadIdx.x] = total;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for n elements (at least 1, at most cap).
inline int64_t flat_blocks(int64_t n, int64_t cap) {
  const int64_t want = ceil_div(n, kThreads * kElementsPerThread);
  return want < 1 ? 1 : (want > cap ? cap : want);
}

// Launch grid of a kernel over `view`: 1-D for per tensor; (C, splits) for per channel, splits
// chosen so that the whole grid stays near `cap` blocks.
inline dim3 element_grid(const ChannelView& view, int64_t cap) {
  if (!view.per_channel) return dim3(static_cast<unsigned>(flat_blocks(view.numel(), cap)));
  int64_t split_cap = cap / view.channels;
  split_cap = split_cap < 1 ? 1 : (split_cap > kMaxGridY ? kMaxGridY : split_cap);
  const int64_t splits = flat_blocks(view.outer * view.inner, split_cap);
  return dim3(static_cast<unsigned>(view.channels), static_cast<unsigned>(splits));
}

inline int64_t grid_blocks(const dim3& g) { return static_cast<int64_t>(g.x) * g.y; }

// One group of outputs of the second pass, out[o] for o = col * segments + seg < num_columns * segments:
//   out[o] = (scale ? scale[col] : 1) * sum_{j < segment_length} partials[segment_row(seg, segment_length, j)
//            * row_length + first_column + col]
// Summation in a fixed order (see block_sum).
struct PartialColumns {
  int first_column;
  int num_columns;  // 0: no group
  int64_t segments;
  int64_t segment_length;
  const float* scale;
  float* out;
};

QD_HOST_DEVICE int64_t partial_outputs(const PartialColumns& c) { return c.num_columns * c.segments; }

// The group of output `o` of a launch over `first` then `second`, with o made its index in that group.
QD_HOST_DEVICE PartialColumns columns_of_output(const PartialColumns& first, const PartialColumns& second,
                                                int64_t& o) {
  if (o < partial_outputs(first)) return first;
  o -= partial_outputs(first);
  return second;
}

// Both groups' outputs in one launch (one block each), so that a backward needing dprobs and
// dscales pays one launch for its second pass, not two. Defined in reduce.cu.
void launch_sum_partials(const float* partials, int64_t row_length, const PartialColumns& first,
                         const PartialColumns& second, cudaStream_t stream);

// Host-side dispatch: call f with a tag for the runtime value, so that f can instantiate the
// kernel template for it.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(TypeTag<float>{});
      break;
    case DType::kFloat16:
      f(TypeTag<__half>{});
      break;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
  }
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(Width<1>{});
  } else {
    f(Width<0>{});
  }
}

// f(Width<V>{}) for the V in Values... equal to value; the caller has checked that one matches.
template <int... Values, typename F>
void dispatch_int(int value, F&& f) {
  (void)((value == Values ? (f(Width<Values>{}), true) : false) || ...);
}

// The compile-time configuration of a quantizer kernel: f(TypeTag<T>, Width<K>, Width<VEC>,
// Width<PER_CHANNEL>) for the dtype, the number of bit-widths (1..4), the elements per access
// (vector_width<T>() when vectorize(TypeTag<T>) says the pointers allow it, else 1) and whether
// the scales are per channel.
template <typename V, typename F>
void dispatch_quantizer_kernel(DType dtype, int num_bits, V&& vectorize, bool per_channel, F&& f) {
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const bool vec = vectorize(type);
    dispatch_int<1, 2, 3, 4>(num_bits, [&](auto k) {
      dispatch_bool(vec, [&](auto v) {
        constexpr int VEC = decltype(v)::value ? vector_width<T>() : 1;
        dispatch_bool(per_channel, [&](auto pc) { f(type, k, Width<VEC>{}, pc); });
      });
    });
  });
}

// f(Width<DX>, Width<DP>, Width<DS>) for the gradients a quantizer backward computes; nothing when
// none is needed.
template <typename F>
void dispatch_quantizer_gradients(bool need_dx, bool need_dprobs, bool need_dscales, F&& f) {
  dispatch_bool(need_dx, [&](auto dx) {
    dispatch_bool(need_dprobs, [&](auto dp) {
      dispatch_bool(need_dscales, [&](auto ds) {
        // decay: inside a nested generic lambda, GCC gives a captured parameter reference type
        if constexpr (std::decay_t<decltype(dx)>::value || std::decay_t<decltype(dp)>::value ||
                      std::decay_t<decltype(ds)>::value) {
          f(dx, dp, ds);
        }
      });
    });
  });
}

}  // namespace gpu
}  // namespace qdarts
