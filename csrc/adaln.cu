// adaLN modulation kernels: LayerNorm + (1 + scale) / shift, and the gated residual.
// LayerNorm: https://arxiv.org/abs/1607.06450; adaLN modulation: DiT, https://arxiv.org/abs/2212.09748
//
// The CUDA twin of triton_kernels/adaln.py (same math, same partial-sum layout); see adaln.h for the
// conventions. One block owns one row (forward) or the rows of one (modulation row, chunk)
// (backward). Each thread keeps its columns in registers as up to MAX_VECS vectors of VEC
// elements, VEC = 16 bytes when C and every pointer allow 128-bit accesses, else 1.
#include "adaln.h"

#include "common.h"

#include <algorithm>
#include <initializer_list>
#include <string>
#include <type_traits>

namespace dit_fast {
namespace {

// Which modulation row a token row uses: one per group of N / G consecutive tokens of a sample.
__device__ __forceinline__ int64_t modulation_row(int64_t row, int64_t tokens, int64_t groups) {
  return (row / tokens) * groups + (row % tokens) / (tokens / groups);
}

// ---------------------------------------------------------------------------------------------
// Forward: h = x + gate * branch (rounded to the dtype), then out = LN(h) * (1 + scale) + shift.
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC, int MAX_VECS, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS) adaln_forward_kernel(const AdalnForwardParams p) {
  __shared__ float smem[33];
  const int64_t row = blockIdx.x;  // int64: R * C passes 2^31 at video sizes
  const int64_t C = p.channels;
  const int num_vecs = static_cast<int>(C / VEC);
  const int64_t mod_row = modulation_row(row, p.tokens, p.groups);
  const bool has_residual = p.gate != nullptr;
  const bool has_norm = p.shift != nullptr;

  float v[MAX_VECS][VEC];
  const T* x = static_cast<const T*>(p.x) + row * C;
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < num_vecs) {
      load_float<T, VEC>(x + j * VEC, v[i]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = 0.0f;  // padding must not enter the sums
    }
  }

  if (has_residual) {
    const T* gate = static_cast<const T*>(p.gate) + mod_row * C;
    const T* branch = static_cast<const T*>(p.branch) + row * C;
    T* h = static_cast<T*>(p.h) + row * C;
#pragma unroll
    for (int i = 0; i < MAX_VECS; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      if (j < num_vecs) {
        float g[VEC], b[VEC];
        load_float<T, VEC>(gate + j * VEC, g);
        load_float<T, VEC>(branch + j * VEC, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] += g[k] * b[k];
        store_float<T, VEC>(h + j * VEC, v[i]);
        // normalise the stored (rounded) h, so that the backward, which reloads h, sees the same values
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = to_float(from_float<T>(v[i][k]));
      }
    }
  }
  if (!has_norm) return;

  // Issue the modulation loads now, so that they complete while the block reduces its sums;
  // not in the 1024-thread variant, whose 64 registers per thread have no room for them.
  constexpr bool kPrefetch = MAX_THREADS <= 512;
  const T* shift = static_cast<const T*>(p.shift) + mod_row * C;
  const T* scale = static_cast<const T*>(p.scale) + mod_row * C;
  Packed<T, VEC> shift_raw[MAX_VECS], scale_raw[MAX_VECS];
  auto load_modulation = [&](int i, int j) {
    shift_raw[i] = *reinterpret_cast<const Packed<T, VEC>*>(shift + j * VEC);
    scale_raw[i] = *reinterpret_cast<const Packed<T, VEC>*>(scale + j * VEC);
  };
  if constexpr (kPrefetch) {
#pragma unroll
    for (int i = 0; i < MAX_VECS; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      if (j < num_vecs) load_modulation(i, j);
    }
  }

  // statistics in fp32; two passes over the registers (mean, then centred squares) for stability
  float sum[1] = {0.0f};
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[0] += v[i][k];
  block_sum<1>(sum, smem);
  const float mean = sum[0] / static_cast<float>(C);
  float sq[1] = {0.0f};
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i) {
    if (static_cast<int>(threadIdx.x + i * blockDim.x) < num_vecs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[i][k] -= mean;
        sq[0] += v[i][k] * v[i][k];
      }
    }
  }
  block_sum<1>(sq, smem);
  const float rstd = 1.0f / sqrtf(sq[0] / static_cast<float>(C) + p.eps);
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out) + row * C;
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < num_vecs) {
      if constexpr (!kPrefetch) load_modulation(i, j);
      float w[VEC], b[VEC], o[VEC];
      if (weight != nullptr) load_float<T, VEC>(weight + j * VEC, w);
      if (bias != nullptr) load_float<T, VEC>(bias + j * VEC, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float ln = v[i][k] * rstd;
        if (weight != nullptr) ln *= w[k];
        if (bias != nullptr) ln += b[k];
        o[k] = ln * (1.0f + to_float(scale_raw[i].v[k])) + to_float(shift_raw[i].v[k]);
      }
      store_float<T, VEC>(out + j * VEC, o);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. With xhat = (h - mean) * rstd, ln = xhat * w + b and out = ln * (1 + scale) + shift:
//   dshift = sum_rows(dout)                    dscale = sum_rows(dout * ln)      (rows of one group)
//   dln    = dout * (1 + scale)                dw = sum_rows(dln * xhat), db = sum_rows(dln)
//   dxhat  = dln * w
//   dh     = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))  (+ dH from h's own consumers)
// and through h = x + gate * y:
//   dx = dh          dy = dh * gate          dgate = sum_rows(dh * y)
// A block's rows share one modulation row, so scale, w and b are constant over its sums and two
// accumulators carry all five: with S0 = sum(dout) and S1 = sum(dout * xhat),
//   dshift = S0,  dscale = w * S1 + b * S0,  dw = (1 + scale) * S1,  db = (1 + scale) * S0.
// That keeps three fp32 arrays (S0, S1, dgate) in registers instead of five.
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC, int MAX_VECS, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS) adaln_backward_kernel(const AdalnBackwardParams p) {
  __shared__ float smem[33 * 2];
  const int64_t mod_row = blockIdx.x;  // = b * G + g
  const int64_t chunk = blockIdx.y;
  const int64_t C = p.channels;
  const int num_vecs = static_cast<int>(C / VEC);
  const int64_t tokens_per_group = p.tokens / p.groups;
  const int64_t group = mod_row % p.groups;
  const int64_t first_token = group * tokens_per_group + chunk * p.rows_per_chunk;
  const int64_t last_token = std::min(first_token + p.rows_per_chunk, (group + 1) * tokens_per_group);
  const int64_t row_base = (mod_row / p.groups) * p.tokens;
  const bool has_norm = p.dout != nullptr;
  const bool has_residual = p.dh != nullptr;
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* scale = has_norm ? static_cast<const T*>(p.scale) + mod_row * C : nullptr;
  const T* gate = has_residual ? static_cast<const T*>(p.gate) + mod_row * C : nullptr;

  float s0[MAX_VECS][VEC], s1[MAX_VECS][VEC], sgate[MAX_VECS][VEC];
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) s0[i][k] = s1[i][k] = sgate[i][k] = 0.0f;

  // xhat and dxhat of one vector of a row: x and dout from memory, scale and w from L1 (every
  // row of the block reads the same ones).
  auto normalised = [&](const T* x, const T* dout, int j, float mean, float rstd, float (&xhat)[VEC],
                        float (&dv)[VEC], float (&dxhat)[VEC]) {
    float xv[VEC], sc[VEC], w[VEC];
    load_float<T, VEC>(x + j * VEC, xv);
    load_float<T, VEC>(dout + j * VEC, dv);
    load_float<T, VEC>(scale + j * VEC, sc);
    if (weight != nullptr) load_float<T, VEC>(weight + j * VEC, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xhat[k] = (xv[k] - mean) * rstd;
      dxhat[k] = dv[k] * (1.0f + sc[k]);
      if (weight != nullptr) dxhat[k] *= w[k];
    }
  };
  // Up to 512 threads, xhat and dxhat stay in registers across the row sums; the 1024-thread
  // variant (C > 8192, or C > 4096 on the scalar path; 64 registers per thread) reloads the row
  // instead (an L1/L2 hit).
  constexpr bool kHoldRow = MAX_THREADS <= 512;
  constexpr int kHeld = kHoldRow ? MAX_VECS : 1;

  for (int64_t token = first_token; token < last_token; ++token) {
    const int64_t row = row_base + token;
    const T* x = static_cast<const T*>(p.x) + row * C;
    const T* dout = static_cast<const T*>(p.dout) + row * C;
    float xhat[kHeld][VEC], dxhat[kHeld][VEC];
    float mean = 0.0f, rstd = 0.0f, c1 = 0.0f, c2 = 0.0f;
    if (has_norm) {
      mean = p.mean[row];
      rstd = p.rstd[row];
      float sums[2] = {0.0f, 0.0f};  // sum(dxhat * xhat), sum(dxhat)
#pragma unroll
      for (int i = 0; i < MAX_VECS; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        if (j < num_vecs) {
          const int held = kHoldRow ? i : 0;
          float dv[VEC];
          normalised(x, dout, j, mean, rstd, xhat[held], dv, dxhat[held]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            s0[i][k] += dv[k];
            s1[i][k] += dv[k] * xhat[held][k];
            sums[0] += dxhat[held][k] * xhat[held][k];
            sums[1] += dxhat[held][k];
          }
        }
      }
      block_sum<2>(sums, smem);
      c1 = sums[0] / static_cast<float>(C);
      c2 = sums[1] / static_cast<float>(C);
    }
    T* dx = static_cast<T*>(p.dx) + row * C;
#pragma unroll
    for (int i = 0; i < MAX_VECS; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      if (j < num_vecs) {
        float dh[VEC];
        if (has_norm) {
          const int held = kHoldRow ? i : 0;
          if constexpr (!kHoldRow) {
            float dv[VEC];
            normalised(x, dout, j, mean, rstd, xhat[0], dv, dxhat[0]);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) dh[k] = rstd * (dxhat[held][k] - c2 - xhat[held][k] * c1);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dh[k] = 0.0f;
        }
        if (has_residual) {
          float dh_in[VEC], br[VEC], g[VEC], dbr[VEC];
          load_float<T, VEC>(static_cast<const T*>(p.dh) + row * C + j * VEC, dh_in);
          load_float<T, VEC>(static_cast<const T*>(p.branch) + row * C + j * VEC, br);
          load_float<T, VEC>(gate + j * VEC, g);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            dh[k] += dh_in[k];
            sgate[i][k] += dh[k] * br[k];
            dbr[k] = dh[k] * g[k];
          }
          store_float<T, VEC>(static_cast<T*>(p.dbranch) + row * C + j * VEC, dbr);
        }
        store_float<T, VEC>(dx + j * VEC, dh);
      }
    }
  }

  const int64_t part = (mod_row * p.chunks + chunk) * C;
#pragma unroll
  for (int i = 0; i < MAX_VECS; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j >= num_vecs) continue;
    const int64_t at = part + j * VEC;
    if (has_norm) {
      float sc[VEC], w[VEC], b[VEC], t[VEC];
      load_float<T, VEC>(scale + j * VEC, sc);
      if (weight != nullptr) load_float<T, VEC>(weight + j * VEC, w);
      if (bias != nullptr) load_float<T, VEC>(bias + j * VEC, b);
      store_fp32<VEC>(p.dshift_part + at, s0[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        t[k] = weight != nullptr ? w[k] * s1[i][k] : s1[i][k];
        if (bias != nullptr) t[k] += b[k] * s0[i][k];
      }
      store_fp32<VEC>(p.dscale_part + at, t);
      if (weight != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) t[k] = (1.0f + sc[k]) * s1[i][k];
        store_fp32<VEC>(p.dweight_part + at, t);
      }
      if (bias != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) t[k] = (1.0f + sc[k]) * s0[i][k];
        store_fp32<VEC>(p.dbias_part + at, t);
      }
    }
    if (has_residual) store_fp32<VEC>(p.dgate_part + at, sgate[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch shapes. A thread holds at most ITEMS elements per array, as ITEMS / VEC vectors; a block
// has a multiple of 32 threads. Within a variant we take the fewest vectors per thread that keep
// the block at <= 256 threads (cheap per-row barriers, many blocks resident per SM), more only
// when C needs them. Variants, tried in order (fewer elements per thread = fewer registers):
//   128-bit vectors:  8 elements x <= 512 threads (C <= 4096), then 16 x <= 512 (C <= 8192), then
//                     16 x <= 1024 (C <= 16384; 64 registers per thread, the backward spills there)
//   scalar fallback (C not a multiple of 16 bytes, or a misaligned pointer): 8 x <= 512, then
//                     16 x <= 1024
// 5 shapes x 3 dtypes x (forward, backward) = 30 kernels: the file compiles in ~15 s CPU for two archs.
// ---------------------------------------------------------------------------------------------

constexpr int kPreferredThreads = 256;

template <int ITEMS, int MAX_THREADS>
struct Variant {
  static constexpr int items = ITEMS;
  static constexpr int max_threads = MAX_THREADS;
};

int round_up_warp(int n) { return (n + 31) / 32 * 32; }

// Threads for num_vecs vectors with at most max_vecs per thread and max_threads per block; 0 if none.
int pick_threads(int num_vecs, int max_vecs, int max_threads) {
  for (int per_thread = 1; per_thread <= max_vecs; ++per_thread) {
    const int threads = round_up_warp(ceil_div(num_vecs, per_thread));
    if (threads <= kPreferredThreads) return threads;
  }
  const int threads = round_up_warp(ceil_div(num_vecs, max_vecs));
  return threads <= max_threads ? threads : 0;
}

// Calls fn(std::integral_constant<int, VEC>, Variant<ITEMS, MAX_THREADS>, threads) for this C.
template <typename T, typename Fn>
void with_launch_shape(int64_t channels, bool vectorize, Fn&& fn) {
  constexpr int kVec = kVec128<T>;
  using Vec = std::integral_constant<int, kVec>;
  if (vectorize && channels % kVec == 0) {
    const int num_vecs = static_cast<int>(channels / kVec);
    if (int t = pick_threads(num_vecs, 8 / kVec, 512)) return fn(Vec{}, Variant<8, 512>{}, t);
    if (int t = pick_threads(num_vecs, 16 / kVec, 512)) return fn(Vec{}, Variant<16, 512>{}, t);
    return fn(Vec{}, Variant<16, 1024>{}, pick_threads(num_vecs, 16 / kVec, 1024));
  }
  using Scalar = std::integral_constant<int, 1>;
  if (int t = pick_threads(static_cast<int>(channels), 8, 512)) return fn(Scalar{}, Variant<8, 512>{}, t);
  fn(Scalar{}, Variant<16, 1024>{}, pick_threads(static_cast<int>(channels), 16, 1024));
}

void check_sizes(int64_t rows_or_batch, int64_t tokens, int64_t groups, int64_t channels, const char* op) {
  const std::string where = std::string("dit_fast.") + op + ": ";
  if (channels < 1 || channels > kAdalnMaxChannels)
    throw std::invalid_argument(where + "C = " + std::to_string(channels) + " must be in [1, " +
                                std::to_string(kAdalnMaxChannels) + "]");
  if (tokens < 1 || groups < 1 || tokens % groups != 0)
    throw std::invalid_argument(where + "G = " + std::to_string(groups) + " must divide N = " +
                                std::to_string(tokens));
  if (rows_or_batch < 0 || rows_or_batch > INT32_MAX)
    throw std::invalid_argument(where + "too many rows for one grid: " + std::to_string(rows_or_batch));
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs)
    if (ptr != nullptr && !is_aligned(ptr, 16)) return false;
  return true;
}

}  // namespace

void adaln_forward(const AdalnForwardParams& p, int dtype, cudaStream_t stream) {
  check_sizes(p.rows, p.tokens, p.groups, p.channels, "adaln_forward");
  if (p.x == nullptr || (p.gate == nullptr && p.shift == nullptr))
    throw std::invalid_argument("dit_fast.adaln_forward: needs x and a gate (residual) or a shift (norm)");
  if (p.rows == 0) return;
  const bool aligned = all_aligned({p.x, p.gate, p.branch, p.h, p.shift, p.scale, p.weight, p.bias, p.out});
  DIT_FAST_DISPATCH_FLOAT(dtype, T, {
    with_launch_shape<T>(p.channels, aligned, [&](auto vec, auto variant, int threads) {
      constexpr int VEC = decltype(vec)::value;
      using V = decltype(variant);
      adaln_forward_kernel<T, VEC, V::items / VEC, V::max_threads>
          <<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
      DIT_FAST_CHECK_LAUNCH("adaln_forward_kernel");
    });
  });
}

void adaln_backward(const AdalnBackwardParams& p, int dtype, cudaStream_t stream) {
  check_sizes(p.batch * p.tokens, p.tokens, p.groups, p.channels, "adaln_backward");
  if (p.dout == nullptr && p.dh == nullptr)
    throw std::invalid_argument("dit_fast.adaln_backward: needs dout (norm) or dh (residual)");
  const int64_t tokens_per_group = p.tokens / p.groups;
  if (p.chunks < 1 || p.chunks > 65535 || p.rows_per_chunk < 1 || p.chunks * p.rows_per_chunk < tokens_per_group ||
      (p.chunks - 1) * p.rows_per_chunk >= tokens_per_group)
    throw std::invalid_argument("dit_fast.adaln_backward: chunks = " + std::to_string(p.chunks) +
                                " x rows_per_chunk = " + std::to_string(p.rows_per_chunk) +
                                " must cover N / G = " + std::to_string(tokens_per_group) +
                                " tokens with no empty chunk");
  if (p.batch == 0) return;
  const bool aligned = all_aligned({p.dout, p.dh, p.x, p.gate, p.branch, p.scale, p.weight, p.bias, p.dx,
                                    p.dbranch, p.dshift_part, p.dscale_part, p.dgate_part, p.dweight_part,
                                    p.dbias_part});
  const dim3 grid(static_cast<unsigned>(p.batch * p.groups), static_cast<unsigned>(p.chunks));
  DIT_FAST_DISPATCH_FLOAT(dtype, T, {
    with_launch_shape<T>(p.channels, aligned, [&](auto vec, auto variant, int threads) {
      constexpr int VEC = decltype(vec)::value;
      using V = decltype(variant);
      adaln_backward_kernel<T, VEC, V::items / VEC, V::max_threads><<<grid, threads, 0, stream>>>(p);
      DIT_FAST_CHECK_LAUNCH("adaln_backward_kernel");
    });
  });
}

int adaln_backward_blocks_per_sm(int64_t channels, int dtype) {
  check_sizes(1, 1, 1, channels, "adaln_backward_blocks_per_sm");
  int blocks = 1;
  DIT_FAST_DISPATCH_FLOAT(dtype, T, {
    with_launch_shape<T>(channels, true, [&](auto vec, auto variant, int threads) {
      constexpr int VEC = decltype(vec)::value;
      using V = decltype(variant);
      DIT_FAST_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, adaln_backward_kernel<T, VEC, V::items / VEC, V::max_threads>, threads, 0));
    });
  });
  return std::max(blocks, 1);
}

}  // namespace dit_fast
