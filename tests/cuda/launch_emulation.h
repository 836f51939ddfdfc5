// Host emulation of the CUDA execution model, enough to run whole launches of the kernels in
// csrc/cuda/*.cu on the CPU (tests/cuda/launch_emulation_test.cpp). The .cu files are compiled by
// g++ after tests/cuda/emulate_launches.py has rewritten every `kernel<<<grid, kThreads, 0, stream>>>(args)`
// into `kernel | emu::Grid(dim3(grid), stream).args(args)`, and with this header force-included
// (g++ -include) ahead of them, so that the real kernels, block_sum and the launch_* functions run
// unchanged, with quant_math.h's host paths (its device-only branches are checked on a GPU).
//
// What it emulates:
//   - a launch: the grid is checked as CUDA would (no empty grid, x < 2^31, y and z < 65536), the
//     arguments are copied at the launch (kernel arguments are by value), and the blocks run one
//     after another in index order (x fastest), gridDim / blockIdx / blockDim set;
//   - a block: its kThreads threads are fibers (ucontext), scheduled round robin; a fiber runs
//     until it finishes or waits at a barrier, so that code between two barriers runs thread by
//     thread, as it may on a GPU;
//   - __syncthreads(): a barrier of the whole block; a block in which some threads finished while
//     the others wait at a barrier (a barrier under divergence: a hang or undefined on a GPU)
//     aborts;
//   - __shfl_down_sync(full mask, v, offset): a warp exchange through memory with a warp barrier,
//     the value of lane + offset, or the caller's own value past lane 31, as on a GPU;
//   - __shared__: a static variable, one per kernel instantiation; correct because blocks do not
//     overlap in time.
// What it cannot show: timing and occupancy; memory ordering and visibility (every write is seen
// at once by every later reader, so a missing __syncthreads between a shared write and another
// thread's read shows only when the round-robin order happens to read first); the cost or the
// correctness of warp divergence beyond what the kernels use (every shuffle is called by all 32
// lanes with the full mask, which is what this checks, not partial masks); device arithmetic
// (rintf, max.NaN / min.NaN, __fmaf_rn: quant_math.h's host branches run instead); streams (every
// launch completes before the next starts, which is the order one stream gives).
#pragma once

// The execution-space keywords of the kernel files for a host compiler: cuda_runtime.h defines
// them empty for a non-CUDA compiler unless defined already, and does not define the others.
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

namespace emu {

constexpr int kBlockThreads = 256;  // qdarts::gpu::kThreads; every kernel here launches with it
constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;  // per fiber: the kernels keep little on the stack

[[noreturn]] inline void fail(const char* what, unsigned a, unsigned b) {
  std::fprintf(stderr, "launch emulation: %s (%u, %u)\n", what, a, b);
  std::abort();
}

struct Barrier {
  int arrived = 0;
  long generation = 0;
};

struct Block {
  ucontext_t scheduler;
  ucontext_t fibers[kBlockThreads];
  std::vector<char> stacks[kBlockThreads];
  bool finished[kBlockThreads];
  int current = 0;
  long progress = 0;  // barriers passed and threads finished: a round without any is a deadlock
  Barrier block_barrier;
  Barrier warp_barriers[kBlockThreads / kWarpSize];
  // Shuffle slots, two per thread: shuffle number s of a warp uses set s % 2, so that a lane may
  // write its next value while a slower lane still reads the current one; a lane cannot get two
  // shuffles ahead, as the barrier of the next one waits for the whole warp.
  float shuffle_slots[2][kBlockThreads];
  long shuffles[kBlockThreads];
  const std::function<void()>* body = nullptr;
};

inline Block block;
inline long long launches = 0;
inline long long blocks_run = 0;

inline void fiber_main(int thread) {
  (*block.body)();
  block.finished[thread] = true;
  ++block.progress;
  swapcontext(&block.fibers[thread], &block.scheduler);
}

inline void wait(Barrier& barrier, int count) {
  const long generation = barrier.generation;
  if (++barrier.arrived == count) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++block.progress;
    return;
  }
  const int thread = block.current;
  while (barrier.generation == generation) swapcontext(&block.fibers[thread], &block.scheduler);
}

inline void run_block(const std::function<void()>& body) {
  block.body = &body;
  block.block_barrier = {};
  for (Barrier& b : block.warp_barriers) b = {};
  for (int t = 0; t < kBlockThreads; ++t) {
    if (block.stacks[t].empty()) block.stacks[t].resize(kStackBytes);
    getcontext(&block.fibers[t]);
    block.fibers[t].uc_stack.ss_sp = block.stacks[t].data();
    block.fibers[t].uc_stack.ss_size = block.stacks[t].size();
    block.fibers[t].uc_link = nullptr;
    makecontext(&block.fibers[t], reinterpret_cast<void (*)()>(fiber_main), 1, t);
    block.finished[t] = false;
    block.shuffles[t] = 0;
  }
  for (bool running = true; running;) {
    running = false;
    const long before = block.progress;
    for (int t = 0; t < kBlockThreads; ++t) {
      if (block.finished[t]) continue;
      running = true;
      block.current = t;
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      swapcontext(&block.scheduler, &block.fibers[t]);
    }
    if (running && block.progress == before) fail("deadlock: threads wait at a barrier others never reach in block",
                                                  blockIdx.x, blockIdx.y);
  }
}

template <typename F>
void launch(dim3 grid, F&& kernel) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty launch grid", grid.x, grid.y);
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    fail("launch grid over CUDA's limits", grid.x, grid.y);
  }
  ++launches;
  const std::function<void()> body(std::forward<F>(kernel));
  gridDim = grid;
  blockDim = dim3(kBlockThreads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        ++blocks_run;
        blockIdx = {x, y, z};
        run_block(body);
      }
}

// `kernel | Grid(g, stream).args(a...)`, the rewritten form of `kernel<<<g, kThreads, 0, stream>>>(a...)`:
// a form whose left operand is the kernel as the source names it, so the rewrite needs no parsing
// of the expression before `<<<`. The tests launch on the null stream; any stream runs in order.
template <typename... Args>
struct BoundLaunch {
  dim3 grid;
  std::tuple<Args...> values;
};

struct Grid {
  Grid(dim3 g, cudaStream_t) : grid(g) {}
  dim3 grid;
  template <typename... Args>
  BoundLaunch<std::decay_t<Args>...> args(Args&&... values) const {
    return {grid, std::tuple<std::decay_t<Args>...>(std::forward<Args>(values)...)};
  }
};

template <typename... Params, typename... Args>
void operator|(void (*kernel)(Params...), const BoundLaunch<Args...>& bound) {
  launch(bound.grid, [&] { std::apply(kernel, bound.values); });
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::block.block_barrier, emu::kBlockThreads); }

inline float __shfl_down_sync(unsigned mask, float value, int offset) {
  if (mask != 0xffffffffu) emu::fail("__shfl_down_sync with a partial mask in block", blockIdx.x, blockIdx.y);
  const int thread = static_cast<int>(threadIdx.x);
  const int lane = thread % emu::kWarpSize;
  float* slots = emu::block.shuffle_slots[emu::block.shuffles[thread]++ % 2];
  slots[thread] = value;
  emu::wait(emu::block.warp_barriers[thread / emu::kWarpSize], emu::kWarpSize);
  return lane + offset < emu::kWarpSize ? slots[thread + offset] : value;
}
