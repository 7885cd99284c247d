// GaLoreAdamW elementwise Adam step and 8-bit blockwise moment update (see galore.h).
//
// Adam (https://arxiv.org/abs/1412.6980) as galore-torch / HF write it:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  N = m / (sqrt(v) + eps)
// 8-bit moments (blockwise absmax, https://arxiv.org/abs/2110.02861), companded so that small values
// keep resolution (dit_fast/optim/reference.py):
//   m: q = round(127 sign(m) sqrt(|m| / absmax)),  m = sign(q) (q / 127)^2 absmax     (int8)
//   v: q = round(255 (v / absmax)^(1/4)),          v = (q / 255)^4 absmax             (uint8)
// with round(x) = floor(x + 0.5) and IEEE-rounded division and sqrt (__fdiv_rn, __fsqrt_rn) so the
// codes agree with the PyTorch reference and the Triton twin (triton_kernels/galore.py).
#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.h"
#include "galore.h"

namespace dit_fast {
namespace {

constexpr float kMLevels = 127.0f;
constexpr float kVLevels = 255.0f;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over the block of kGaloreQBlock threads; every thread gets it. smem: 8 floats per call site.
__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float r = smem[0];
#pragma unroll
  for (int i = 1; i < kGaloreQBlock / 32; ++i) r = fmaxf(r, smem[i]);
  return r;
}

template <typename W>
__device__ __forceinline__ void write_result(const GaloreAdamParams& p, int64_t i, float n) {
  if (p.param != nullptr) {
    W* w = static_cast<W*>(p.param);
    const float updated = (to_float(w[i]) * p.pre_decay - p.alpha * n) * p.post_decay;
    w[i] = from_float<W>(updated);
  } else {
    p.n_out[i] = n;
  }
}

// fp32 / bf16 moments: a grid-stride loop, one element per thread per iteration.
template <typename G, typename S, typename W>
__global__ void adam_float_kernel(GaloreAdamParams p) {
  const G* grad = static_cast<const G*>(p.grad);
  S* m_ptr = static_cast<S*>(p.exp_avg);
  S* v_ptr = static_cast<S*>(p.exp_avg_sq);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_float(grad[i]);
    const float m = to_float(m_ptr[i]) * p.beta1 + g * (1.0f - p.beta1);
    const float v = to_float(v_ptr[i]) * p.beta2 + g * g * (1.0f - p.beta2);
    m_ptr[i] = from_float<S>(m);
    v_ptr[i] = from_float<S>(v);
    write_result<W>(p, i, __fdiv_rn(m, __fsqrt_rn(v) + p.eps));
  }
}

// 8-bit moments: one block of kGaloreQBlock threads per quantization block, one element per thread.
template <typename G, typename W>
__global__ void __launch_bounds__(kGaloreQBlock) adam_8bit_kernel(GaloreAdamParams p) {
  __shared__ float smem[2][kGaloreQBlock / 32];
  const int64_t block = blockIdx.x;
  const int64_t i = block * kGaloreQBlock + threadIdx.x;
  const bool valid = i < p.numel;
  int8_t* m_codes = static_cast<int8_t*>(p.exp_avg);
  uint8_t* v_codes = static_cast<uint8_t*>(p.exp_avg_sq);

  float m = 0.0f, v = 0.0f;
  if (valid) {
    const float g = to_float(static_cast<const G*>(p.grad)[i]);
    const float tm = __fdiv_rn(static_cast<float>(m_codes[i]), kMLevels);
    const float tv = __fdiv_rn(static_cast<float>(v_codes[i]), kVLevels);
    m = tm * fabsf(tm) * p.m_absmax[block];
    v = (tv * tv) * (tv * tv) * p.v_absmax[block];
    m = m * p.beta1 + g * (1.0f - p.beta1);
    v = v * p.beta2 + g * g * (1.0f - p.beta2);
  }
  const float m_abs = block_max(fabsf(m), smem[0]);  // invalid lanes hold 0: never the max of |x| >= 0
  const float v_abs = block_max(v, smem[1]);
  if (valid) {
    const float m_safe = m_abs > 0.0f ? m_abs : 1.0f;
    const float v_safe = v_abs > 0.0f ? v_abs : 1.0f;
    float qm = floorf(kMLevels * __fsqrt_rn(__fdiv_rn(fabsf(m), m_safe)) + 0.5f);
    qm = m < 0.0f ? -qm : qm;
    const float qv = floorf(kVLevels * __fsqrt_rn(__fsqrt_rn(__fdiv_rn(v, v_safe))) + 0.5f);
    m_codes[i] = static_cast<int8_t>(qm);
    v_codes[i] = static_cast<uint8_t>(qv);
    write_result<W>(p, i, __fdiv_rn(m, __fsqrt_rn(v) + p.eps));
  }
  if (threadIdx.x == 0) {
    p.m_absmax[block] = m_abs;
    p.v_absmax[block] = v_abs;
  }
}

template <typename G, typename W>
void launch(const GaloreAdamParams& p, int state, cudaStream_t stream) {
  if (state == kStateInt8) {
    const int blocks = ceil_div(p.numel, kGaloreQBlock);
    adam_8bit_kernel<G, W><<<blocks, kGaloreQBlock, 0, stream>>>(p);
    DIT_FAST_CHECK_LAUNCH("galore adam_8bit_kernel");
    return;
  }
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(p.numel, threads), 65535 * 8));
  if (state == kStateFloat32) {
    adam_float_kernel<G, float, W><<<blocks, threads, 0, stream>>>(p);
  } else {
    adam_float_kernel<G, __nv_bfloat16, W><<<blocks, threads, 0, stream>>>(p);
  }
  DIT_FAST_CHECK_LAUNCH("galore adam_float_kernel");
}

}  // namespace

void galore_adam_step(const GaloreAdamParams& p, int grad_dtype, int state, int param_dtype, cudaStream_t stream) {
  if (p.numel <= 0) return;
  if (state != kStateFloat32 && state != kStateBFloat16 && state != kStateInt8)
    throw std::invalid_argument("galore_adam_step: state must be 0 (fp32), 1 (bf16) or 2 (int8), got " +
                                std::to_string(state));
  if (state == kStateInt8 && (p.m_absmax == nullptr || p.v_absmax == nullptr))
    throw std::invalid_argument("galore_adam_step: 8-bit moments need m_absmax and v_absmax");
  if ((p.param == nullptr) == (p.n_out == nullptr))
    throw std::invalid_argument("galore_adam_step: give exactly one of param and n_out");
  if (p.param == nullptr) param_dtype = kFloat32;  // unused: no parameter to write
  DIT_FAST_DISPATCH_FLOAT(grad_dtype, G, DIT_FAST_DISPATCH_FLOAT(param_dtype, W, launch<G, W>(p, state, stream)));
}

}  // namespace dit_fast
