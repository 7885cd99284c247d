#pragma once
// CPU emulation of the CUDA features csrc/adaln.cu and csrc/common.h use (tests/adaln_emulation/run.py):
// one std::thread per CUDA thread; blocks run one after another over a 2-D grid (so a static array
// stands in for __shared__ memory); __syncthreads is a block-wide std::barrier and __shfl_xor_sync
// a real exchange between the 32 lanes of a warp (a per-warp barrier around a slot per thread).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

struct uint3_emu { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local uint3_emu threadIdx;
inline thread_local uint3_emu blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline std::vector<float> emu_lane_slots;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  std::barrier<>& warp = *emu_warp_barriers[t / 32];
  emu_lane_slots[t] = v;
  warp.arrive_and_wait();
  const float other = emu_lane_slots[t ^ static_cast<unsigned>(lane_mask)];
  warp.arrive_and_wait();  // nobody overwrites a slot before its reader has read it
  return other;
}

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

template <typename... KArgs, typename... Args>
void emu_launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t, cudaStream_t, Args... args) {
  if (threads == 0 || threads > 1024 || threads % 32 != 0)
    throw std::runtime_error("emulated launch: block of " + std::to_string(threads) + " threads");
  blockDim = dim3(threads);
  gridDim = grid;
  emu_lane_slots.assign(threads, 0.0f);
  std::barrier<> block(threads);
  emu_block_barrier = &block;
  emu_warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  // One std::thread per CUDA thread for the whole launch; the threads walk the blocks in the same
  // order and meet at a barrier after each, so a block's shared memory is never touched by the next.
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx.x = bx;
          blockIdx.y = by;
          kernel(args...);
          block.arrive_and_wait();
        }
      }
    });
  }
  for (auto& th : pool) th.join();
}
