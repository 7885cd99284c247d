// GaLoreAdamW's elementwise Adam step on (low-rank) gradients, with fp32 / bf16 moments or 8-bit
// blockwise-quantized moments (dequantize, update, requantize with a new per-block absmax).
// Torch-free: raw pointers, sizes, dtype codes (csrc/common.h) and a cudaStream_t.
// The math and the 8-bit format are those of dit_fast/optim/reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dit_fast {

constexpr int kGaloreQBlock = 256;  // elements per absmax block; = reference.QBLOCK

// How the moments are stored.
enum GaloreState : int { kStateFloat32 = 0, kStateBFloat16 = 1, kStateInt8 = 2 };

struct GaloreAdamParams {
  const void* grad;  // numel elements of grad_dtype
  void* exp_avg;     // float / bf16, or int8 codes (kStateInt8), updated in place
  void* exp_avg_sq;  // float / bf16, or uint8 codes (kStateInt8), updated in place
  float* m_absmax;   // ceil(numel / 256) floats (kStateInt8 only)
  float* v_absmax;   // ceil(numel / 256) floats (kStateInt8 only)
  float* n_out;      // out: N = m / (sqrt(v) + eps), numel floats; null when param is given
  void* param;       // with param: W = (W * pre_decay - alpha * N) * post_decay in place; else null
  int64_t numel;
  float beta1, beta2, eps;
  float alpha, pre_decay, post_decay;
};

// Throws std::invalid_argument on bad sizes or codes, std::runtime_error on a CUDA launch error.
void galore_adam_step(const GaloreAdamParams& p, int grad_dtype, int state, int param_dtype, cudaStream_t stream);

}  // namespace dit_fast
