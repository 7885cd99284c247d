// Standalone 3D rotary position embedding (torch-free).
//
// The same convention as triton_kernels/rope.py and the readable reference in dit_fast/ops/rope.py:
// x is (B, S, heads, D) with S = T * H * W tokens in (t, h, w) raster order; pair p = (x[2p], x[2p+1])
// of a token is rotated by angle = pos_axis(p) * inv_freq[p], axis(p) = t for p < pairs_t, h for
// p < pairs_th, else w. Angles come from the token index and the (D / 2,) fp32 frequency table; the
// rotation is computed in fp32 with accurate sincosf.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dit_fast {

constexpr int64_t kRopeMaxHeadDim = 1024;

struct RopeParams {
  const void* x;          // (B, S, heads, D), strides (stride_xb, stride_xs, stride_xh, 1) in elements
  void* out;              // out: contiguous (B, S, heads, D)
  const float* inv_freq;  // (D / 2,) fp32
  int64_t batch;          // B
  int64_t tokens;         // S = T * H * W
  int64_t heads;
  int64_t head_dim;       // D, even, <= kRopeMaxHeadDim
  int64_t grid_h;         // H
  int64_t grid_w;         // W
  int64_t stride_xb;
  int64_t stride_xs;
  int64_t stride_xh;
  int64_t pairs_t;        // d_t / 2
  int64_t pairs_th;       // (d_t + d_h) / 2
  bool inverse;           // rotate by -angle (the backward)
};

// Launch on `stream`; throws std::invalid_argument on bad sizes or misaligned pointers / strides
// (every pair must be 2-element aligned: even strides, pointers aligned to 2 elements) and
// std::runtime_error on CUDA errors.
void rope_3d(const RopeParams& params, int dtype, cudaStream_t stream);

}  // namespace dit_fast
