// 3D patchify / unpatchify (torch-free): video (B, C, T, H, W) <-> patch tokens (B, S, K).
//
// The same mapping as triton_kernels/patchify.py and the readable references in
// dit_fast/ops/patchify.py: token s = (t' H' + h') W' + w' of the (T', H', W') grid, feature
// f = (c, i, j, k) flattened as (C, pt, ph, pw) ("cthw", Conv3d weight layout) or (pt, ph, pw, C)
// ("thwc", DiT final layer layout), holds video[b, c, t' pt + i, h' ph + j, w' pw + k].
// A pure permutation: the kernel moves bytes and works for any 2- or 4-byte dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dit_fast {

// Shared memory one block may use for its slab of tokens: one token's K elements (+16 bytes of
// padding) must fit, so K * element size <= kPatchifyMaxTokenBytes.
constexpr int64_t kPatchifyMaxTokenBytes = 32768;

struct PatchifyParams {
  void* video;          // (B, C, T, H, W), strides below (elements); read by patchify, written by unpatchify
  void* tokens;         // contiguous (B, S, K); written by patchify, read by unpatchify
  int64_t batch;        // B
  int64_t channels;     // C
  int64_t grid_t;       // T' = T / pt
  int64_t grid_h;       // H' = H / ph
  int64_t grid_w;       // W' = W / pw
  int64_t patch_t;      // pt
  int64_t patch_h;      // ph
  int64_t patch_w;      // pw
  int64_t stride_vb;
  int64_t stride_vc;
  int64_t stride_vt;
  int64_t stride_vh;
  int64_t stride_vw;
  bool channels_last;   // feature order (pt, ph, pw, C) instead of (C, pt, ph, pw)
  bool to_tokens;       // patchify (video -> tokens) or unpatchify (tokens -> video)
};

// Launch on `stream`; element_size is 2 or 4 bytes. Throws std::invalid_argument on bad sizes and
// std::runtime_error on CUDA errors.
void patchify_3d(const PatchifyParams& params, int element_size, cudaStream_t stream);

}  // namespace dit_fast
