// adaLN modulation kernels (torch-free): LayerNorm + (1 + scale) / shift, and the gated residual.
//
// The same math and conventions as the Triton kernels in triton_kernels/adaln.py; the readable
// PyTorch reference is in dit_fast/ops/adaln.py. Which op runs follows from which pointers are set:
//   layernorm_modulate           shift, scale (and optionally weight, bias); gate = nullptr
//   gated_residual               gate, branch, h;                            shift = nullptr
//   residual_layernorm_modulate  gate, branch, h and shift, scale
//
// x is R = B * N rows of C features, contiguous. Modulations (shift, scale, gate) are (B * G, C):
// row r uses modulation row (r / N) * G + (r % N) / (N / G). Statistics are computed in fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dit_fast {

constexpr int64_t kAdalnMaxChannels = 16384;

struct AdalnForwardParams {
  const void* x;       // (R, C): the input, or with a residual the stream x of h = x + gate * branch
  const void* gate;    // (B * G, C) or nullptr: no residual
  const void* branch;  // (R, C), with gate
  void* h;             // out (R, C): x + gate * branch rounded to the dtype, with gate
  const void* shift;   // (B * G, C) or nullptr: no normalisation
  const void* scale;   // (B * G, C), with shift
  const void* weight;  // (C,) LayerNorm weight or nullptr
  const void* bias;    // (C,) LayerNorm bias or nullptr
  void* out;           // out (R, C): LN(h) * (1 + scale) + shift, with shift
  float* mean;         // out (R,): per-row mean, with shift
  float* rstd;         // out (R,): per-row 1 / sqrt(var + eps), with shift
  int64_t rows;        // R = B * N
  int64_t tokens;      // N
  int64_t groups;      // G, divides N
  int64_t channels;    // C <= kAdalnMaxChannels
  float eps;
};

struct AdalnBackwardParams {
  const void* dout;    // (R, C) grad of out, or nullptr: no normalisation
  const void* dh;      // (R, C) grad of h from its other consumers, or nullptr: no residual
  const void* x;       // (R, C) the normalised input (h with a residual, else x), with dout
  const void* gate;    // (B * G, C), with dh
  const void* branch;  // (R, C), with dh
  const void* scale;   // (B * G, C), with dout
  const void* weight;  // (C,) or nullptr
  const void* bias;    // (C,) or nullptr
  const float* mean;   // (R,), with dout
  const float* rstd;   // (R,), with dout
  void* dx;            // out (R, C)
  void* dbranch;       // out (R, C), with dh
  // fp32 partial sums over the rows of one (modulation row, chunk): (B * G, chunks, C) each.
  // The caller adds them over chunks (and, for dweight / dbias, over modulation rows).
  float* dshift_part;  // with dout
  float* dscale_part;  // with dout
  float* dgate_part;   // with dh
  float* dweight_part; // with weight
  float* dbias_part;   // with bias
  int64_t batch;       // B
  int64_t tokens;      // N
  int64_t groups;      // G
  int64_t channels;    // C
  int64_t chunks;           // programs per modulation row, <= 65535
  int64_t rows_per_chunk;   // ceil((N / G) / chunks); every chunk has at least one row
};

// Launch on `stream`; throw std::invalid_argument on bad sizes and std::runtime_error on CUDA errors.
void adaln_forward(const AdalnForwardParams& params, int dtype, cudaStream_t stream);
void adaln_backward(const AdalnBackwardParams& params, int dtype, cudaStream_t stream);

// How many backward blocks fit on one SM of the current device for this C and dtype: the
// Python launcher sizes `chunks` so that the grid fills the GPU.
int adaln_backward_blocks_per_sm(int64_t channels, int dtype);

}  // namespace dit_fast
