// cuda_emu.hpp: the CUDA thread model for host C++, so the unchanged sources in kernels/ compile with
// g++ and run on the CPU (the emulated device, emulator.cpp). It is included before each kernel file.
//
//   threadIdx, blockIdx, blockDim, gridDim      the running fiber's and block's coordinates
//   __syncthreads, __syncwarp                   barriers: every live thread of the block (warp) must
//                                               reach the same line, else the launch fails
//   __shfl_*_sync, __ballot_sync, __any_sync,   warp collectives: a rendezvous of the lanes the mask
//   __all_sync                                  names; a named lane that has exited fails the launch
//   __shared__                                  one copy per OS thread (static thread_local): a block
//                                               runs on one OS thread and its fibers never move
//   DYNAMIC_SMEM(T, name)                       the launch's dynamic shared memory, exactly its size,
//                                               NaN-filled at the start of each block
//   float2, float4, int4, uint4, ...            CUDA's vector types, aligned to their size
//   atomics, math functions                     what the kernels call
//
// One CUDA thread is one fiber; emulator.cpp schedules a block's fibers deterministically on one OS
// thread, and spreads blocks over OS threads.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct BlockCoords {
    uint3 idx;
    dim3 dim, grid;
    unsigned char* dyn_smem;
    size_t dyn_bytes;
    // how the emulated mma rounds its sums: 0 to nearest (fp32 FMAs in k order), 1 truncated (see
    // kernels/mma.cuh); the mode of the host thread that launched the kernel
    int mma_truncates;
};

// Set by the scheduler: the running fiber's threadIdx and the running block, per OS thread.
extern thread_local const uint3* tls_tid;
extern thread_local BlockCoords tls_block;

enum Op : int { OP_SYNCWARP, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ANY, OP_ALL, OP_GATHER };

void barrier(const char* file, int line);
// A warp collective of the lanes in `mask`: every one posts (op, value, arg, width) and waits until all
// have; returns this lane's result (the value read, or the vote).
uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

// OP_GATHER, for the emulated bodies of warp-wide instructions (mma.sync, ldmatrix in kernels/mma.cuh):
// every lane of the full warp posts a value (a pointer to its operands); returns the warp's 32 values,
// valid until the warp's next collective. A lane's operands on its stack stay valid only until it
// returns, so a body that reads other lanes' stacks ends with __syncwarp().
inline const uint64_t* gather(uint64_t value, const char* file, int line) {
    return reinterpret_cast<const uint64_t*>(collective(OP_GATHER, 0xffffffffu, value, 0, 32, file, line));
}
// The calling thread's lane: its linear index in the block, modulo 32 (warps are consecutive threads).
inline unsigned lane_id() {
    const uint3& t = *tls_tid;
    return (t.x + tls_block.dim.x * (t.y + tls_block.dim.y * t.z)) % 32;
}

// A fault a GPU would raise (a misaligned or out-of-space access): stops the launch with `code` (a
// CUresult) and a message naming the kernel, block, thread and file:line. Does not return.
[[noreturn]] void fault(int code, const char* what, const char* file, int line);
// ldmatrix's row address: 16-byte aligned and in this block's shared memory, or a fault.
void check_ldmatrix_row(const void* row, const char* file, int line);

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
template <class T>
inline T shfl(const char* file, int line, Op op, unsigned mask, T v, int arg, int width = 32) {
    return from_bits<T>(collective(op, mask, to_bits(v), arg, width, file, line));
}

// Binds a kernel's arguments from cuLaunchKernel's `void** kernelParams`, one pointer per argument.
template <class... A, size_t... I>
inline void invoke(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}
template <auto F>
struct Entry;
template <class... A, void (*F)(A...)>
struct Entry<F> {
    static void run(void** params) { invoke(F, params, std::index_sequence_for<A...>{}); }
    static constexpr size_t count = sizeof...(A);
    static inline const size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
};

// The kernel table: each kernel file's generated wrapper registers its `extern "C"` kernels here.
void register_kernel(const char* name, void (*run)(void**), size_t nparams, const size_t* sizes);
struct Registrar {
    Registrar(const char* name, void (*run)(void**), size_t n, const size_t* sizes) {
        register_kernel(name, run, n, sizes);
    }
};

}  // namespace emu

#define EMU_KERNEL(k) \
    static ::emu::Registrar emu_registrar_##k(#k, &::emu::Entry<&k>::run, ::emu::Entry<&k>::count, ::emu::Entry<&k>::sizes);

// ---- vector types, aligned to their size as CUDA's are: a misaligned access through one is a fault
// (the kernels are built with -fsanitize=alignment, whose reports emulator.cpp turns into faults) ----
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- qualifiers --------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::tls_block.dyn_smem)

// ---- coordinates ---------------------------------------------------------------------------------------
#define threadIdx (*::emu::tls_tid)
#define blockIdx (::emu::tls_block.idx)
#define blockDim (::emu::tls_block.dim)
#define gridDim (::emu::tls_block.grid)
#define warpSize 32

// ---- barriers and warp collectives ------------------------------------------------------------------
#define __syncthreads() ::emu::barrier(__FILE__, __LINE__)
#define __syncwarp(...) ((void)::emu::collective(::emu::OP_SYNCWARP, ::emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, v, lane, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_IDX, mask, v, lane, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_UP, mask, v, d, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_DOWN, mask, v, d, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) ::emu::shfl(__FILE__, __LINE__, ::emu::OP_SHFL_XOR, mask, v, m, ##__VA_ARGS__)
#define __ballot_sync(mask, p) ((unsigned)::emu::collective(::emu::OP_BALLOT, mask, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) ((int)::emu::collective(::emu::OP_ANY, mask, (p) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) ((int)::emu::collective(::emu::OP_ALL, mask, (p) != 0, 0, 32, __FILE__, __LINE__))

namespace emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }
}  // namespace emu

// ---- atomics (blocks run on several OS threads: real atomics) ---------------------------------------
template <class T>
inline T atomicAdd(T* p, T v) {
    if constexpr (std::is_floating_point_v<T>) {
        T old, want;
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        do {
            want = old + v;
        } while (!__atomic_compare_exchange(p, &old, &want, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
        return old;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <class T>
inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
template <class T>
inline T atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- math ----------------------------------------------------------------------------------------------
// CUDA's overloads of min and max for the integer types (float ones are fminf/fmaxf, also overloaded).
#define EMU_MINMAX(T)                                     \
    inline T min(T a, T b) { return a < b ? a : b; }      \
    inline T max(T a, T b) { return a > b ? a : b; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
#undef EMU_MINMAX
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
// CUDA's isfinite/isnan/isinf are global device functions; C++ has them in std
using std::isfinite;
using std::isinf;
using std::isnan;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.f), 1.f); }
inline int __float_as_int(float x) { return ::emu::from_bits<int>(::emu::to_bits(x)); }
inline float __int_as_float(int x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return ::emu::from_bits<unsigned>(::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
