// gemm.cuh: the tiled f32 GEMM that every convolution and dense kernel instantiates.
//
//   C[m, n] = store(m, n, Σ_k A(m, k) · B(k, n)),   0 ≤ m < M, 0 ≤ n < N, 0 ≤ k < K
//
// A and B are functors that read one element (zero outside the matrix), so a convolution is an
// implicit GEMM: A gathers im2col patches straight from the image, no patch buffer in memory.
// Version 1: 64x64 output tile per block of 256 threads, 4x4 outputs per thread, K in steps of 16
// staged through shared memory; plain fp32 FMAs on CUDA cores. Each output is summed by one thread
// in a fixed order, so results are deterministic.
// GEMM_BM, GEMM_BN (the output tile), GEMM_BK and GEMM_THREADS come from the Rust registry as -D
// definitions (src/cuda/registry.rs, DEFINES); the code below assumes 64x64x16 and 256 threads.
#pragma once

template <class LoadA, class LoadB, class Store>
__device__ __forceinline__ void gemm_tile_v1(int M, int N, int K, const LoadA& A, const LoadB& B, const Store& store) {
    __shared__ float As[GEMM_BK][GEMM_BM];
    __shared__ float Bs[GEMM_BK][GEMM_BN];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < K; k0 += GEMM_BK) {
        for (int e = threadIdx.x; e < GEMM_BM * GEMM_BK; e += GEMM_THREADS) {
            const int mm = e / GEMM_BK, kk = e % GEMM_BK;
            const int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < M && k < K) ? A(m, k) : 0.f;
        }
        for (int e = threadIdx.x; e < GEMM_BK * GEMM_BN; e += GEMM_THREADS) {
            const int kk = e / GEMM_BN, nn = e % GEMM_BN;
            const int k = k0 + kk, n = n0 + nn;
            Bs[kk][nn] = (k < K && n < N) ? B(k, n) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) store(m, n, acc[i][j]);
        }
}
