// selftest.cu: kernels that test the emulated device itself (tests/emulator.rs). NVRTC compiles them
// like every kernel, and the emulator's build includes them; the model never launches them.
//
//   emu_test_warp          every warp collective, 64 threads: 8 floats and 3 votes per thread
//   emu_test_block_sum     a shared-memory tree sum per block (blockDim.x a power of two)
//   emu_test_block_sum_racy  the same without the barrier after the stores: a race
//   emu_test_smem_copy     copies the dynamic shared memory as the block finds it
//   emu_test_bounded       __launch_bounds__(64)
//   emu_test_oob_read      reads one element past its input (for AddressSanitizer)
//   emu_test_oob_write     writes one element past its output; emu_test_smem_oob_write the same in
//                          dynamic shared memory
//   emu_test_divergent_barrier, emu_test_exited_lane, emu_test_deadlock   misuses the emulator must stop
// and what hardware refuses, which the emulator must refuse too:
//   emu_test_many_registers  over 64 registers a thread and no launch bounds: 1024 threads of it
//                          exceed a block's 65,536 registers, 512 do not
//   emu_test_static_smem   40 KiB of static shared memory, beside which at most 187 KiB can be dynamic
//   emu_test_vector_load   a float4 load at a float offset: aligned when it is a multiple of 4
//   emu_test_ldmatrix      ldmatrix x4 at a byte offset into shared memory (a multiple of 16 is
//                          aligned), or (from_global) at rows of its input in device memory
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif
#include "../mma.cuh"

extern "C" __global__ void emu_test_warp(const float* in, float* out, unsigned* votes) {
    const int t = threadIdx.x, lane = t % 32;
    const float v = in[t];
    float* o = out + t * 8;
    o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3);
    o[2] = __shfl_down_sync(0xffffffffu, v, 5);
    o[3] = __shfl_xor_sync(0xffffffffu, v, 9);
    o[4] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
    o[5] = __shfl_down_sync(0xffffffffu, v, 2, 16);
    o[6] = lane < 16 ? __shfl_sync(0x0000ffffu, v, 15 - lane) : -1.f;
    __syncwarp();
    o[7] = __shfl_sync(0xffffffffu, t * 2.f, 31);
    votes[t * 3 + 0] = __ballot_sync(0xffffffffu, v > 0.f);
    votes[t * 3 + 1] = __any_sync(0xffffffffu, v > 0.9f);
    votes[t * 3 + 2] = __all_sync(0xffffffffu, v > -2.f);
}

template <bool RACY>
__device__ void block_sum(const float* in, float* out) {
    DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    if (!RACY) __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}
extern "C" __global__ void emu_test_block_sum(const float* in, float* out) { block_sum<false>(in, out); }
extern "C" __global__ void emu_test_block_sum_racy(const float* in, float* out) { block_sum<true>(in, out); }

extern "C" __global__ void emu_test_smem_copy(float* out, int n) {
    DYNAMIC_SMEM(float, s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[blockIdx.x * n + i] = s[i];
}

extern "C" __global__ void __launch_bounds__(64) emu_test_bounded(float* out) { out[threadIdx.x] = 1.f; }

extern "C" __global__ void emu_test_oob_read(const float* in, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i + 1];
}

extern "C" __global__ void emu_test_oob_write(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i + 1] = 1.f;
}

extern "C" __global__ void emu_test_smem_oob_write(float* out, int n) {
    DYNAMIC_SMEM(float, s);
    if (threadIdx.x == 0) s[n] = 1.f;
    out[threadIdx.x] = 0.f;
}

extern "C" __global__ void emu_test_divergent_barrier(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

extern "C" __global__ void emu_test_exited_lane(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 0);
}

extern "C" __global__ void emu_test_deadlock(float* out) {
    if (threadIdx.x < 16)
        __syncwarp();
    else
        __syncthreads();
    out[threadIdx.x] = 1.f;
}

// 96 values a thread keeps live through 6 rounds of products: ptxas holds them in registers
extern "C" __global__ void emu_test_many_registers(const float* in, float* out) {
    constexpr int N = 96;
    float r[N];
#pragma unroll
    for (int i = 0; i < N; ++i) r[i] = in[threadIdx.x + i * blockDim.x];
    float acc = 0.f;
#pragma unroll
    for (int j = 1; j <= 6; ++j)
#pragma unroll
        for (int i = 0; i < N; ++i) acc = fmaf(acc, r[i], r[(i * j + 1) % N]);
    out[threadIdx.x] = acc;
}

extern "C" __global__ void emu_test_static_smem(float* out) {
    __shared__ float s[10240];
    for (int i = threadIdx.x; i < 10240; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    out[threadIdx.x] = s[10239 - threadIdx.x];
}

extern "C" __global__ void emu_test_vector_load(const float* in, float* out, int offset) {
    const float4 v = *reinterpret_cast<const float4*>(in + offset);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// one warp: 4 matrices of 8 rows of 8 b16 values, laid out row after row (row r of matrix m at
// element (m·8 + r)·8), at `offset` bytes into shared memory or from `in` itself
extern "C" __global__ void emu_test_ldmatrix(const unsigned short* in, unsigned* out, int offset, int from_global) {
    __shared__ __align__(16) unsigned short tile[256 + 16];
    const unsigned char* base = reinterpret_cast<const unsigned char*>(tile) + offset;
    for (int i = threadIdx.x; i < 256; i += 32) reinterpret_cast<unsigned short*>(const_cast<unsigned char*>(base))[i] = in[i];
    __syncwarp();
    const int lane = threadIdx.x;
    const void* row = from_global ? static_cast<const void*>(in + lane * 8) : static_cast<const void*>(base + lane * 16);
    unsigned r[4];
    ldmatrix_x4<false>(r, row);
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}
