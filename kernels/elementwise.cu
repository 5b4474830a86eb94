// elementwise.cu: what every backend's core and every GEMM family share.
//
//   fill_f32        buf[i] = value
//   add_assign_f32  dst[i] += src[i]
//   add_fwd_f32     out[i] = a[i] + b[i]
//   splitk_reduce_add  out[i] += Σ_z ws[z, i]                         (slices in order)
//
// Flat loops are grid-stride over n elements. The op families' kernels are in their folders
// (src/ops/<family>/*.cu), the training step's runtime's in src/runtime/runtime.cu.
#include "common.cuh"

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void fill_f32(float* buf, float value, size_t n) {
    GRID_STRIDE(i, n) buf[i] = value;
}

extern "C" __global__ void add_assign_f32(float* dst, const float* src, size_t n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

extern "C" __global__ void add_fwd_f32(const float* a, const float* b, float* out, size_t n) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

// out[e] += Σ_z ws[z·n + e] for z = 0 .. split−1 in that order: the deterministic second pass of a
// split-K GEMM (gemm_mma.cuh). 32-bit indices: the host checks split·n fits.
extern "C" __global__ void splitk_reduce_add(const float* __restrict__ ws, float* __restrict__ out, int n, int split) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int z = 0; z < split; ++z) acc += ws[z * n + e];
        out[e] += acc;
    }
}
