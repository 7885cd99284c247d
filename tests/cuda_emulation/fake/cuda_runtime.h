#pragma once
// CPU emulation of the bits of the CUDA runtime dit_fast's kernels use (tests/cuda_emulation/run.py):
// one std::thread per CUDA thread, a std::barrier per block for __syncthreads, blocks one after another
// (so a static array stands in for __shared__ memory), launches through emu_launch.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <algorithm>
struct uint3_emu { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local uint3_emu threadIdx;
inline uint3_emu blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* emu_bar = nullptr;
inline std::vector<unsigned char> emu_smem;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorName(cudaError_t) { return "emu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }

template <typename... KArgs, typename... Args>
void emu_launch(void (*kernel)(KArgs...), dim3 grid, unsigned threads, size_t smem, cudaStream_t, Args... args) {
  blockDim = dim3(threads);
  gridDim = grid;
  emu_smem.assign(smem + 16, 0);
  for (unsigned b = 0; b < grid.x; ++b) {
    blockIdx.x = b;
    std::barrier<> bar(threads);
    emu_bar = &bar;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { threadIdx.x = t; kernel(args...); });
    for (auto& th : pool) th.join();
  }
}
