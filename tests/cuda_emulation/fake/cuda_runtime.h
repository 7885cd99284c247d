#pragma once
// CPU emulation of the CUDA features dit_fast's kernels use (csrc/*.cu, csrc/common.h), for
// tests/cuda_emulation/run.py, which compiles the .cu files as host C++ against this header.
//
// Every CUDA thread of a block is a fiber (ucontext) on ONE OS thread: a launch creates no threads
// and waits on no futexes. A fiber runs until it waits:
//   __syncthreads   until every thread of the block has arrived (threads that returned count as
//                   arrived, as on the hardware);
//   __shfl_*_sync   until the 32 lanes of its warp have deposited their values: a real exchange
//                   through double-buffered slots (a lane that runs on to the next shuffle writes
//                   the other buffer);
// the last thread to arrive releases the others and carries on. Threads run in index order, and in
// reverse order in every other block, so that a missing barrier shows up whichever thread writes
// first. A block ends when all its threads have returned; blocks run one after another (x fastest),
// so a function-local static stands in for __shared__ memory. Dynamic shared memory (extern
// __shared__, rewritten by run.py to emu_dynamic_smem) is filled with 0xff bytes (NaN / -1) before
// each block, so that reading what no thread wrote shows up.
// Errors: a wait that can never be satisfied (a barrier or shuffle some threads never reach, a
// shuffle in a partial warp) throws std::runtime_error instead of hanging; a launch configuration
// the hardware refuses is reported by cudaGetLastError, as on a GPU.
// No kernel uses atomics yet; with one OS thread and no preemption they are plain read-modify-writes.
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <math.h>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3_emu { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

// Set by the scheduler before it resumes a fiber (only one fiber runs at a time).
inline uint3_emu threadIdx;
inline uint3_emu blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

constexpr size_t kEmuMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute opt-in
alignas(128) inline unsigned char emu_dynamic_smem[kEmuMaxDynamicSmem];

// ---- runtime API ----

typedef void* cudaStream_t;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
namespace emu { inline cudaError_t last_error = cudaSuccess; }
inline cudaError_t cudaGetLastError() { return std::exchange(emu::last_error, cudaSuccess); }
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInvalidValue ? "cudaErrorInvalidValue"
                                                                        : "cudaErrorInvalidConfiguration";
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch error"; }
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}

// ---- math intrinsics (host libm is IEEE-rounded) ----

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

namespace emu {

enum class State : unsigned char { ready, at_sync, at_shuffle, returned };

struct Machine {
  static constexpr size_t kStack = 256 * 1024;  // per fiber, below a PROT_NONE guard page
  std::vector<unsigned char*> stacks;
  std::vector<ucontext_t> contexts;
  std::vector<State> state;
  ucontext_t scheduler;
  unsigned threads = 0, current = 0;
  unsigned at_sync = 0, returned = 0;
  std::vector<unsigned> warp_arrived, warp_generation;
  std::vector<uint64_t> slots[2];  // one per thread, per buffer
  std::function<void()> body;       // runs the kernel once for (threadIdx, blockIdx)
  std::exception_ptr error;
  std::mutex mutex;                 // one launch at a time

  void reserve(unsigned n) {
    const size_t page = 4096;
    while (stacks.size() < n) {
      void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("emulated launch: cannot map a fiber stack");
      mprotect(p, page, PROT_NONE);  // stacks grow down: overflow faults instead of corrupting a neighbour
      stacks.push_back(static_cast<unsigned char*>(p) + page);
    }
  }

  void yield() { swapcontext(&contexts[current], &scheduler); }

  void release(State waiting, unsigned first, unsigned count) {
    for (unsigned t = first; t < first + count; ++t)
      if (state[t] == waiting) state[t] = State::ready;
  }

  void sync() {
    if (at_sync + returned + 1 == threads) {  // the last to arrive releases the others
      at_sync = 0;
      release(State::at_sync, 0, threads);
      return;
    }
    ++at_sync;
    state[current] = State::at_sync;
    yield();
  }

  uint64_t exchange(uint64_t bits, unsigned src_lane) {
    const unsigned t = current, warp = t / 32, first = warp * 32;
    if (first + 32 > threads)
      throw std::runtime_error("emulated __shfl_*_sync with a full mask in a partial warp (blockDim = " +
                               std::to_string(threads) + ")");
    const unsigned buffer = warp_generation[warp] & 1;
    slots[buffer][t] = bits;
    if (++warp_arrived[warp] == 32) {
      warp_arrived[warp] = 0;
      ++warp_generation[warp];
      release(State::at_shuffle, first, 32);
    } else {
      state[t] = State::at_shuffle;
      yield();
    }
    return slots[buffer][first + src_lane];
  }

  static void fiber_main() {
    Machine& m = machine();
    try {
      for (;;) {  // one block per pass; the scheduler moves blockIdx on when every thread has returned
        m.body();
        ++m.returned;
        m.state[m.current] = State::returned;
        if (m.at_sync > 0 && m.at_sync + m.returned == m.threads) {
          m.at_sync = 0;
          m.release(State::at_sync, 0, m.threads);
        }
        m.yield();
      }
    } catch (...) {
      m.error = std::current_exception();
      m.yield();  // never resumed: the scheduler abandons the launch
    }
  }

  void resume(unsigned t) {
    current = t;
    threadIdx.x = t % blockDim.x;
    threadIdx.y = t / blockDim.x % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
    swapcontext(&scheduler, &contexts[t]);
    if (error) std::rethrow_exception(std::exchange(error, nullptr));
  }

  void run(dim3 grid, dim3 block, size_t smem) {
    threads = block.x * block.y * block.z;
    reserve(threads);
    contexts.resize(threads);
    state.assign(threads, State::ready);
    warp_arrived.assign((threads + 31) / 32, 0);
    warp_generation.assign((threads + 31) / 32, 0);
    slots[0].assign(threads, 0);
    slots[1].assign(threads, 0);
    at_sync = returned = 0;
    for (unsigned t = 0; t < threads; ++t) {
      getcontext(&contexts[t]);
      contexts[t].uc_stack.ss_sp = stacks[t];
      contexts[t].uc_stack.ss_size = kStack;
      contexts[t].uc_link = nullptr;
      makecontext(&contexts[t], &Machine::fiber_main, 0);
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = {bx, by, bz};
          std::memset(emu_dynamic_smem, 0xff, smem);
          at_sync = returned = 0;
          std::fill(state.begin(), state.end(), State::ready);
          // odd blocks run their threads in reverse order: a read of another thread's write with no
          // barrier in between sees stale data in one of the two orders
          const bool reverse = (bx + by + bz) % 2 == 1;
          while (returned < threads) {
            bool ran = false;
            for (unsigned i = 0; i < threads; ++i) {
              const unsigned t = reverse ? threads - 1 - i : i;
              if (state[t] != State::ready) continue;
              resume(t);
              ran = true;
            }
            if (!ran)
              throw std::runtime_error(
                  "emulated kernel deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                  std::to_string(bz) + "): " + std::to_string(at_sync) + " threads wait at __syncthreads, " +
                  std::to_string(threads - at_sync - returned) + " at a warp shuffle, " + std::to_string(returned) +
                  " returned (a barrier or shuffle that not every thread reaches)");
          }
        }
  }

  static Machine& machine() {
    static Machine m;
    return m;
  }
};

template <typename T>
T shuffle(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = Machine::machine().exchange(bits, src_lane);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// The calling thread's lane (warps are formed from the linear thread index); checks the mask.
inline unsigned lane(unsigned mask, int width) {
  if (mask != 0xffffffffu || width != 32)
    throw std::runtime_error("emulated warp shuffles support only the full mask and width 32");
  return Machine::machine().current & 31;
}

}  // namespace emu

inline void __syncthreads() { emu::Machine::machine().sync(); }

// Other shuffles (__shfl_sync, __shfl_down_sync, ...) are one line each over emu::shuffle; add them
// with the first kernel that uses them.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::shuffle(v, emu::lane(mask, width) ^ (static_cast<unsigned>(lane_mask) & 31));
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten by run.py to emu_launch(kernel, grid, block, smem,
// stream, args): arguments are converted to the kernel's parameter types once, as a real launch copies them.
template <typename... KArgs, typename... Args>
void emu_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 ||
      grid.y > 65535 || grid.z == 0 || grid.z > 65535) {
    emu::last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > kEmuMaxDynamicSmem) {
    emu::last_error = cudaErrorInvalidValue;
    return;
  }
  emu::Machine& m = emu::Machine::machine();
  std::lock_guard<std::mutex> lock(m.mutex);
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  m.body = [&] { std::apply(kernel, params); };
  blockDim = dim3(block.x, block.y, block.z);
  gridDim = grid;
  m.run(grid, block, smem);
}
