// Large output tensors of the CPU kernels come from a cache of freed buffers.
//
// Why: a large new tensor is memory fresh from the operating system (glibc maps big allocations
// and unmaps them when they are freed, and trims the top of its heap), and the first write to each
// 4 KiB page of it is a page fault. Measured on the 2-core VM of bench/results (torch 2.13, glibc
// 2.36): 4096 faults, ~2.5 us each, turned a 3 ms forward pass over 16 MiB into 13 ms. A training
// or search step asks for the same sizes every step, so the buffers the previous step freed are
// reused as they are, already mapped. (CUDA's caching allocator does the same for device memory;
// jemalloc or tcmalloc, preloaded, do it for every CPU tensor.)
//
// Only outputs of at least kMinCachedBytes go through the cache; smaller ones come from PyTorch's
// CPU allocator as before. Sizes are rounded up to kCachedSizeQuantum and a freed buffer is reused
// for the same rounded size only. The cache keeps at most
//
//   QDARTS_CPU_CACHE_MB   (default 1024; 0 turns the cache off; read once, at the first output)
//
// mebibytes of freed buffers; a buffer freed beyond that goes back to the system.
// torch.ops.qdarts_C.empty_cpu_output_cache() frees them all; cpu_output_cache_stats() reports.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace qdarts {
namespace cpu {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;
constexpr int64_t kCachedSizeQuantum = int64_t{64} << 10;

// An uninitialised contiguous CPU tensor of these sizes and dtype.
at::Tensor empty_output(c10::IntArrayRef sizes, c10::ScalarType dtype);

// An uninitialised contiguous tensor with the sizes, dtype and device (CPU) of `like`.
at::Tensor empty_output_like(const at::Tensor& like);

// {bytes of cached free buffers, limit in bytes, hits, misses, bytes of buffers in use}.
std::vector<int64_t> output_cache_stats();

// Returns every cached free buffer to the system.
void empty_output_cache();

}  // namespace cpu
}  // namespace qdarts
