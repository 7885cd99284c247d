// Standalone 3D RoPE: the CUDA twin of triton_kernels/rope.py (see rope.h for the convention).
// RoFormer, https://arxiv.org/abs/2104.09864; 3D split as Wan2.1 / CogVideoX.
//
// One block owns one token (b, s): it computes the token's D / 2 (cos, sin) pairs once into shared
// memory with accurate sincosf (not __sincosf: angles reach hundreds of radians, where the fast
// intrinsic loses digits), then its threads stream every head of that token through 128-bit
// loads and stores (VEC pairs per access) when the sizes, strides and pointers allow, else one pair.
#include "rope.h"

#include "common.h"

#include <algorithm>
#include <string>

namespace dit_fast {
namespace {

constexpr int kRopeThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kRopeThreads) rope_3d_kernel(const RopeParams p) {
  __shared__ float cos_s[kRopeMaxHeadDim / 2];
  __shared__ float sin_s[kRopeMaxHeadDim / 2];
  const int64_t token = blockIdx.x;  // b * S + s; int64: offsets pass 2^31 at video sizes
  const int64_t b = token / p.tokens;
  const int64_t s = token % p.tokens;
  const int64_t hw = p.grid_h * p.grid_w;
  const float pos_t = static_cast<float>(s / hw);
  const float pos_h = static_cast<float>((s / p.grid_w) % p.grid_h);
  const float pos_w = static_cast<float>(s % p.grid_w);
  const int pairs = static_cast<int>(p.head_dim / 2);
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    const float pos = q < p.pairs_t ? pos_t : (q < p.pairs_th ? pos_h : pos_w);
    float sn, cs;
    sincosf(pos * p.inv_freq[q], &sn, &cs);
    cos_s[q] = cs;
    sin_s[q] = p.inverse ? -sn : sn;
  }
  __syncthreads();

  constexpr int N = 2 * VEC;  // elements per access
  const int vecs_per_head = static_cast<int>(p.head_dim / N);
  const int units = static_cast<int>(p.heads) * vecs_per_head;
  const T* x = static_cast<const T*>(p.x) + b * p.stride_xb + s * p.stride_xs;
  T* out = static_cast<T*>(p.out) + token * p.heads * p.head_dim;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const int head = u / vecs_per_head;
    const int col = (u - head * vecs_per_head) * N;
    float v[N], r[N];
    load_float<T, N>(x + head * p.stride_xh + col, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int q = col / 2 + i;
      const float c = cos_s[q], sn = sin_s[q];
      r[2 * i] = v[2 * i] * c - v[2 * i + 1] * sn;
      r[2 * i + 1] = v[2 * i] * sn + v[2 * i + 1] * c;
    }
    store_float<T, N>(out + head * p.head_dim + col, r);
  }
}

template <typename T>
void launch(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVecPairs = kVec128<T> / 2;  // pairs per 128-bit access
  constexpr int kWide = 2 * kVecPairs;
  const bool wide = p.head_dim % kWide == 0 && p.stride_xb % kWide == 0 && p.stride_xs % kWide == 0 &&
                    p.stride_xh % kWide == 0 && is_aligned(p.x, 16) && is_aligned(p.out, 16);
  const int64_t units = p.heads * p.head_dim / (wide ? kWide : 2);
  const int threads = static_cast<int>(std::min<int64_t>(kRopeThreads, (units + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(p.batch * p.tokens));
  if (wide) {
    rope_3d_kernel<T, kVecPairs><<<grid, threads, 0, stream>>>(p);
  } else {
    rope_3d_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
  }
  DIT_FAST_CHECK_LAUNCH("rope_3d_kernel");
}

}  // namespace

void rope_3d(const RopeParams& p, int dtype, cudaStream_t stream) {
  if (p.batch < 0 || p.tokens < 0 || p.heads < 0 || p.head_dim <= 0 || p.head_dim % 2 ||
      p.head_dim > kRopeMaxHeadDim) {
    throw std::invalid_argument("rope_3d: bad sizes B=" + std::to_string(p.batch) + " S=" +
                                std::to_string(p.tokens) + " heads=" + std::to_string(p.heads) +
                                " D=" + std::to_string(p.head_dim) + " (D must be even, <= " +
                                std::to_string(kRopeMaxHeadDim) + ")");
  }
  if (p.grid_h <= 0 || p.grid_w <= 0 || p.tokens % (p.grid_h * p.grid_w) != 0) {
    throw std::invalid_argument("rope_3d: grid (H, W) = (" + std::to_string(p.grid_h) + ", " +
                                std::to_string(p.grid_w) + ") does not tile S = " + std::to_string(p.tokens));
  }
  if (p.batch * p.tokens > 0x7fffffffLL) {
    throw std::invalid_argument("rope_3d: B * S = " + std::to_string(p.batch * p.tokens) +
                                " tokens exceed one launch (2^31 - 1 blocks)");
  }
  DIT_FAST_DISPATCH_FLOAT(dtype, T, {
    const int64_t pair_bytes = 2 * static_cast<int64_t>(sizeof(T));
    if (p.stride_xb % 2 || p.stride_xs % 2 || p.stride_xh % 2 || !is_aligned(p.x, pair_bytes) ||
        !is_aligned(p.out, pair_bytes)) {
      throw std::invalid_argument("rope_3d: x's strides must be even and its pointer pair-aligned");
    }
    if (p.batch * p.tokens * p.heads == 0) return;
    launch<T>(p, stream);
  });
}

}  // namespace dit_fast
