// Shared helpers for dit_fast's torch-free CUDA kernels: dtype codes and dispatch, error checks,
// fp32 conversion, 128-bit vector loads/stores and block-wide sums.
//
// Every kernel takes raw pointers, sizes and a cudaStream_t, so nothing here includes torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dit_fast {

// Must match DTYPE_CODES in dit_fast/_extension.py.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// Runs the statements with `T` bound to the element type of `code`; throws (-> Python ValueError)
// on an unknown code. Usage: DIT_FAST_DISPATCH_FLOAT(dtype, T, launch<T>(...));
#define DIT_FAST_DISPATCH_FLOAT(code, T, ...)                                                   \
  switch (code) {                                                                               \
    case ::dit_fast::kFloat32: { using T = float; __VA_ARGS__; break; }                         \
    case ::dit_fast::kFloat16: { using T = __half; __VA_ARGS__; break; }                        \
    case ::dit_fast::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }                \
    default:                                                                                    \
      throw std::invalid_argument("dit_fast: unsupported dtype code " + std::to_string(code) +  \
                                  " (expected 0 float32, 1 float16, 2 bfloat16)");              \
  }

// Throws std::runtime_error (-> Python RuntimeError) naming the call, the place and CUDA's message.
inline void cuda_check(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("dit_fast CUDA error in ") + what + " (" + file + ":" +
                             std::to_string(line) + "): " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}
#define DIT_FAST_CUDA_CHECK(expr) ::dit_fast::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a <<<...>>> launch: catches bad launch configurations (the kernel itself runs async).
#define DIT_FAST_CHECK_LAUNCH(name) ::dit_fast::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)

inline bool is_aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ---- element conversions: all arithmetic happens in fp32 ----

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 128-bit access: 4 fp32 or 8 fp16/bf16.
template <typename T> constexpr int kVec128 = 16 / static_cast<int>(sizeof(T));

// N consecutive elements moved as one access (one 128-bit ld/st when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* ptr, float (&out)[N]) {
  const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* ptr, const float (&in)[N]) {
  Packed<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, N>*>(ptr) = packed;
}

// fp32 stores in 128-bit pieces where N allows (N = 8 fp32 values are two float4 stores).
template <int N>
__device__ __forceinline__ void store_fp32(float* ptr, const float (&in)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      *reinterpret_cast<float4*>(ptr + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) ptr[i] = in[i];
  }
}

// ---- reductions ----

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums N values over the whole block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the totals. `smem` holds 33 * N floats: 32 per-warp slots per value plus one result slot,
// so that back-to-back calls need no extra barrier (results are read before the next call's
// first barrier, and written only after it).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) smem[warp * N + i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float s = lane < num_warps ? smem[lane * N + i] : 0.0f;
      s = warp_sum(s);
      if (lane == 0) smem[32 * N + i] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = smem[32 * N + i];
}

}  // namespace dit_fast
