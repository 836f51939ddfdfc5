// See output_cache.h.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace qdarts {
namespace cpu {
namespace {

// Alignment of the cached buffers: a cache line, and enough for any vector load.
constexpr size_t kAlignment = 64;
constexpr long long kMaxCacheMb = std::numeric_limits<int64_t>::max() >> 20;

int64_t limit_from_environment() {
  const char* text = std::getenv("QDARTS_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return int64_t{1024} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);  // LLONG_MAX where the number is too long
  // the limit is kept in bytes, an int64: more MiB would wrap round (to a negative or small limit)
  TORCH_CHECK(end != nullptr && *end == '\0' && mb >= 0 && mb <= kMaxCacheMb,
              "QDARTS_CPU_CACHE_MB must be a whole number of MiB in [0, ", kMaxCacheMb, "], got '", text, "'");
  return static_cast<int64_t>(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_environment()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const int64_t size = rounded(nbytes);
    if (static_cast<int64_t>(nbytes) < kMinCachedBytes || limit_ == 0) {
      return c10::GetCPUAllocator()->allocate(nbytes);
    }
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        data = it->second;
        free_.erase(it);
        cached_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (data == nullptr) {
      data = std::aligned_alloc(kAlignment, static_cast<size_t>(size));
      TORCH_CHECK(data != nullptr, "qdarts CPU kernels: out of memory allocating ", size, " bytes");
    }
    report_to_profiler(data, size);
    return {data, new Block{this, data, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, limit_, hits_, misses_, in_use_bytes_};
  }

  void empty() {
    std::unordered_multimap<int64_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& entry : blocks) std::free(entry.second);
  }

 private:
  struct Block {
    OutputCache* cache;
    void* data;
    int64_t size;
  };

  static int64_t rounded(size_t nbytes) {
    const int64_t n = static_cast<int64_t>(nbytes);
    return (n + kCachedSizeQuantum - 1) / kCachedSizeQuantum * kCachedSizeQuantum;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    block->cache->give_back(block->data, block->size);
    delete block;
  }

  // What PyTorch's own CPU allocator does for each allocation and free, so that the profiler's
  // memory view (profile_memory=True, qdarts.benchmark.profile --memory) counts these outputs too:
  // the size handed out or given back, and the bytes in use and held (in use + cached) after it.
  void report_to_profiler(void* data, int64_t delta) {
    int64_t in_use = 0, held = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ += delta;
      in_use = in_use_bytes_;
      held = in_use_bytes_ + cached_bytes_;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, delta, static_cast<size_t>(in_use), static_cast<size_t>(held),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  void give_back(void* data, int64_t size) {
    report_to_profiler(data, -size);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + size <= limit_) {
        free_.emplace(size, data);
        cached_bytes_ += size;
        return;
      }
    }
    std::free(data);
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::unordered_multimap<int64_t, void*> free_;
  int64_t cached_bytes_ = 0;
  int64_t in_use_bytes_ = 0;  // handed out and not yet given back
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors holding its buffers may be freed during interpreter shutdown, after
// static destructors would have run.
OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();
  return *cache;
}

}  // namespace

at::Tensor empty_output(c10::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(sizes, &output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              dtype, c10::MemoryFormat::Contiguous));
}

at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.scalar_type()); }

std::vector<int64_t> output_cache_stats() { return output_cache().stats(); }

void empty_output_cache() { output_cache().empty(); }

TORCH_LIBRARY_FRAGMENT(qdarts_C, m) {
  m.def("cpu_output_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_cpu_output_cache() -> ()", &empty_output_cache);
}

}  // namespace cpu
}  // namespace qdarts
