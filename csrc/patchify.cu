// 3D patchify / unpatchify: the CUDA twin of triton_kernels/patchify.py (see patchify.h).
//
// A gather whose two sides are contiguous in different orders: the video along w, the tokens
// along features. One block owns a slab of up to `block_tokens` consecutive tokens of one token row
// (b, t', h'), i.e. the same elements seen from both sides:
//   video side : C * pt * ph rows, each a run of n * pw contiguous (along w) elements;
//   token side : n tokens of K contiguous features.
// The block stages the slab in shared memory (token-major, each token padded by 16 bytes so that
// the video side's writes spread over the banks), so that both the global reads and the global
// writes are coalesced; the token side moves 16-byte vectors when K and the pointer allow.
#include "patchify.h"

#include "common.h"

#include <algorithm>
#include <string>

namespace dit_fast {
namespace {

constexpr int kPatchifyThreads = 256;
constexpr int64_t kSmemBudget = kPatchifyMaxTokenBytes;  // bytes of slab per block: several blocks per SM

template <typename E, bool VEC16>
__global__ void __launch_bounds__(kPatchifyThreads)
patchify_3d_kernel(const PatchifyParams p, int64_t block_tokens, int64_t blocks_per_row) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* slab = reinterpret_cast<E*>(smem_raw);
  const int64_t pt = p.patch_t, ph = p.patch_h, pw = p.patch_w;
  const int64_t K = p.channels * pt * ph * pw;
  const int64_t row_stride = K + 16 / sizeof(E);  // padded token row in shared memory (elements)

  // which slab: token row (b, t', h') and the first token w0 of the slab in it
  const int64_t block = blockIdx.x;
  const int64_t row = block / blocks_per_row;
  const int64_t w0 = (block % blocks_per_row) * block_tokens;
  const int64_t n = std::min(block_tokens, p.grid_w - w0);
  const int64_t h_tok = row % p.grid_h;
  const int64_t t_tok = (row / p.grid_h) % p.grid_t;
  const int64_t b = row / (p.grid_h * p.grid_t);

  E* tokens = static_cast<E*>(p.tokens) + (row * p.grid_w + w0) * K;  // row * W' = b S + (t' H' + h') W'
  E* video = static_cast<E*>(p.video) + b * p.stride_vb + t_tok * pt * p.stride_vt +
             h_tok * ph * p.stride_vh + w0 * pw * p.stride_vw;

  auto token_side = [&](bool load) {
    if constexpr (VEC16) {
      constexpr int kPerVec = 16 / sizeof(E);
      const int64_t vecs_per_token = K / kPerVec;
      for (int64_t e = threadIdx.x; e < n * vecs_per_token; e += blockDim.x) {
        const int64_t tok = e / vecs_per_token;
        const int64_t f = (e - tok * vecs_per_token) * kPerVec;
        uint4* g = reinterpret_cast<uint4*>(tokens + tok * K + f);
        uint4* sh = reinterpret_cast<uint4*>(slab + tok * row_stride + f);
        if (load) *sh = *g; else *g = *sh;
      }
    } else {
      for (int64_t e = threadIdx.x; e < n * K; e += blockDim.x) {
        const int64_t tok = e / K;
        const int64_t f = e - tok * K;
        if (load) slab[tok * row_stride + f] = tokens[e]; else tokens[e] = slab[tok * row_stride + f];
      }
    }
  };

  // video side: one warp per (c, i, j) row at a time, lanes along the row's n * pw elements
  auto video_side = [&](bool load) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int64_t rows = p.channels * pt * ph;
    const int64_t run = n * pw;
    for (int64_t r = warp; r < rows; r += warps) {
      const int64_t j = r % ph, i = (r / ph) % pt, c = r / (ph * pt);
      // feature of (c, i, j, k) = f0 + k * fk
      const int64_t f0 = p.channels_last ? (i * ph + j) * pw * p.channels + c : ((c * pt + i) * ph + j) * pw;
      const int64_t fk = p.channels_last ? p.channels : 1;
      E* src = video + c * p.stride_vc + i * p.stride_vt + j * p.stride_vh;
      for (int64_t x = lane; x < run; x += 32) {
        const int64_t tok = x / pw, k = x - tok * pw;
        E& sh = slab[tok * row_stride + f0 + k * fk];
        if (load) sh = src[x * p.stride_vw]; else src[x * p.stride_vw] = sh;
      }
    }
  };

  if (p.to_tokens) {
    video_side(true);
    __syncthreads();
    token_side(false);
  } else {
    token_side(true);
    __syncthreads();
    video_side(false);
  }
}

template <typename E>
void launch(const PatchifyParams& p, cudaStream_t stream) {
  const int64_t K = p.channels * p.patch_t * p.patch_h * p.patch_w;
  const int64_t row_bytes = (K + 16 / static_cast<int64_t>(sizeof(E))) * static_cast<int64_t>(sizeof(E));
  const int64_t block_tokens = std::max<int64_t>(1, std::min<int64_t>(p.grid_w, kSmemBudget / row_bytes));
  const int64_t blocks_per_row = (p.grid_w + block_tokens - 1) / block_tokens;
  const int64_t blocks = p.batch * p.grid_t * p.grid_h * blocks_per_row;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("patchify_3d: too many blocks for one launch");
  const size_t smem = static_cast<size_t>(block_tokens * row_bytes);
  const bool vec16 = (K * sizeof(E)) % 16 == 0 && is_aligned(p.tokens, 16);
  // smem <= kSmemBudget < 48 KiB: no opt-in to large dynamic shared memory needed
  if (vec16) {
    patchify_3d_kernel<E, true><<<static_cast<unsigned>(blocks), kPatchifyThreads, smem, stream>>>(p, block_tokens, blocks_per_row);
  } else {
    patchify_3d_kernel<E, false><<<static_cast<unsigned>(blocks), kPatchifyThreads, smem, stream>>>(p, block_tokens, blocks_per_row);
  }
  DIT_FAST_CHECK_LAUNCH("patchify_3d_kernel");
}

}  // namespace

void patchify_3d(const PatchifyParams& p, int element_size, cudaStream_t stream) {
  if (p.batch < 0 || p.channels <= 0 || p.grid_t < 0 || p.grid_h < 0 || p.grid_w < 0 || p.patch_t <= 0 ||
      p.patch_h <= 0 || p.patch_w <= 0) {
    throw std::invalid_argument("patchify_3d: bad sizes");
  }
  const int64_t K = p.channels * p.patch_t * p.patch_h * p.patch_w;
  if (K * element_size + 16 > kPatchifyMaxTokenBytes) {
    throw std::invalid_argument("patchify_3d: one token's K = " + std::to_string(K) + " features of " +
                                std::to_string(element_size) + " bytes exceed the CUDA kernel's " +
                                std::to_string(kPatchifyMaxTokenBytes) + "-byte shared memory slab");
  }
  if (p.batch * p.grid_t * p.grid_h * p.grid_w == 0) return;
  switch (element_size) {
    case 2: launch<uint16_t>(p, stream); break;
    case 4: launch<uint32_t>(p, stream); break;
    default:
      throw std::invalid_argument("patchify_3d: element size must be 2 or 4 bytes, got " + std::to_string(element_size));
  }
}

}  // namespace dit_fast
