// gemm_mma.cuh: the tensor-core GEMM of the tf32 and bf16 kernel versions.
//
//   C[m, n] = store(m, n, Σ_k A(m, k) · B(k, n)),   A and B rounded to tf32 or bf16, sums in fp32
//
// Operands are "separable": element (i, j) is base[row(i) + col(j)]. Every operand of the model's
// GEMMs is: a row-major or transposed matrix, and the im2col patch of a convolution, whose element
// (r, q) is x[row(r) + col(q)] with row(r) the offset of output pixel r's window and col(q) that of tap
// q in it. So the index arithmetic (div/mod for a patch) runs once per row of the block's tile and once
// per K-tile per thread, never per element: an element costs one add and one load.
//
// Block: MMA_THREADS = 128 threads (4 warps, 2x2), output tile MMA_BM x MMA_BN = 64x64, each warp
// 32x32 as 2x4 tiles of m16n8; K in steps of MMA_BK = 32. Global loads for tile k+1 go to registers
// while tile k is multiplied from shared memory, then to the other of two shared buffers: one
// barrier per K-tile. Inputs are rounded once, when stored to shared memory (cvt.rna.tf32.f32,
// cvt.rn.bf16x2.f32). Shared rows are padded (A: 4 words, B: 8 words for tf32; A: 8, B: 8 halves for
// bf16) so that the fragment reads and ldmatrix's eight 16-byte rows fall in 32 distinct banks.
// Each output is summed by one thread in a fixed order: results are deterministic.
#pragma once

#include "mma.cuh"

struct StridedOp {  // a row-major (rs = ld, cs = 1) or transposed (rs = 1, cs = ld) matrix
    const float* base;
    int rs, cs;
    __device__ int row(int i) const { return i * rs; }
    __device__ int col(int j) const { return j * cs; }
};

struct PatchOp {  // A(r, q) of a valid convolution: x at tap q = (ky, kx, ci) of output pixel r = (b, oy, ox)
    const float* base;
    ConvParams p;
    __device__ int row(int r) const {
        const int ox = r % p.out_w, oy = (r / p.out_w) % p.out_h, b = r / (p.out_w * p.out_h);
        return ((b * p.in_h + oy * p.stride) * p.in_w + ox * p.stride) * p.in_c;
    }
    __device__ int col(int q) const {
        const int ci = q % p.in_c, kx = (q / p.in_c) % p.k, ky = q / (p.in_c * p.k);
        return (ky * p.in_w + kx) * p.in_c + ci;
    }
};

struct PatchTOp : PatchOp {  // the patch transposed: A(q, r), same base and offsets, roles swapped
    __device__ int row(int q) const { return PatchOp::col(q); }
    __device__ int col(int r) const { return PatchOp::row(r); }
};

template <bool BF16>
struct MmaElem;
template <>
struct MmaElem<false> {
    using T = unsigned;
    static constexpr int KSTEP = 8, PAD_A = 4, PAD_B = 8;
    __device__ static T round(float x) { return to_tf32(x); }
};
template <>
struct MmaElem<true> {
    using T = unsigned short;
    static constexpr int KSTEP = 16, PAD_A = 8, PAD_B = 8;
    __device__ static T round(float x) { return (T)(pack_bf16(x, 0.f) & 0xffffu); }
};

// Split-K: block z of gridDim.z sums only its slice of K, whole K-tiles [z·kp, (z+1)·kp) with
// kp = ceil(K-tiles / gridDim.z); with gridDim.z = 1 that is all of K.
template <bool BF16, class OpA, class OpB, class Store>
__device__ __forceinline__ void gemm_tile_mma(int M, int N, int K, const OpA& A, const OpB& B, const Store& store) {
    static_assert(MMA_BM == 64 && MMA_BN == 64 && MMA_BK == 32 && MMA_THREADS == 128, "written for 64x64x32, 128 threads");
    using E = MmaElem<BF16>;
    using T = typename E::T;
    constexpr int LDA = MMA_BK + E::PAD_A, LDB = MMA_BN + E::PAD_B;
    static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "ldmatrix rows are 16-byte aligned");
    __shared__ __align__(16) T As[2][MMA_BM * LDA];
    __shared__ __align__(16) T Bs[2][MMA_BK * LDB];
    __shared__ int a_row[MMA_BM];
    __shared__ int b_col[MMA_BN];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kp = ((K + MMA_BK - 1) / MMA_BK + gridDim.z - 1) / gridDim.z * MMA_BK;
    const int k_begin = blockIdx.z * kp, k_end = min(K, k_begin + kp);
    const int m0 = blockIdx.y * MMA_BM, n0 = blockIdx.x * MMA_BN;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    if (tid < MMA_BM) a_row[tid] = m0 + tid < M ? A.row(m0 + tid) : 0;
    else if (tid < MMA_BM + MMA_BN) b_col[tid - MMA_BM] = n0 + tid - MMA_BM < N ? B.col(n0 + tid - MMA_BM) : 0;
    __syncthreads();

    // this thread's share of a K-tile: A column ka, rows am + 4i; B row bk + 2i, column bn
    const int ka = tid % MMA_BK, am = tid / MMA_BK, bn = tid % MMA_BN, bk = tid / MMA_BN;
    const int a_rows_valid = M - m0, b_col_off = b_col[bn];
    const bool b_col_valid = n0 + bn < N;
    float ra[16], rb[16];
    auto load = [&](int k0) {
        const int k = k0 + ka;
        const bool kv = k < k_end;
        const int ac = kv ? A.col(k) : 0;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int r = am + 4 * i;
            ra[i] = (kv && r < a_rows_valid) ? A.base[a_row[r] + ac] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int kb = k0 + bk + 2 * i;
            rb[i] = (b_col_valid && kb < k_end) ? B.base[B.row(kb) + b_col_off] : 0.f;
        }
    };
    auto stash = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 16; ++i) As[buf][(am + 4 * i) * LDA + ka] = E::round(ra[i]);
#pragma unroll
        for (int i = 0; i < 16; ++i) Bs[buf][(bk + 2 * i) * LDB + bn] = E::round(rb[i]);
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    load(k_begin);
    stash(0);
    __syncthreads();
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += MMA_BK) {
        const bool more = k0 + MMA_BK < k_end;
        if (more) load(k0 + MMA_BK);  // in flight while this tile is multiplied
        const T* as = As[buf];
        const T* bs = Bs[buf];
#pragma unroll
        for (int ks = 0; ks < MMA_BK; ks += E::KSTEP) {
            unsigned a[2][4], b[4][2];
            if constexpr (!BF16) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const FragPos p = frag_tf32_a(lane, r);
                        a[i][r] = as[(wm + 16 * i + p.row) * LDA + ks + p.col];
                    }
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const FragPos p = frag_tf32_b(lane, r);
                        b[j][r] = bs[(ks + p.row) * LDB + wn + 8 * j + p.col];
                    }
            } else {
                const int lr = (lane & 7) + 8 * ((lane >> 3) & 1), lc = 8 * (lane >> 4);
#pragma unroll
                for (int i = 0; i < 2; ++i) ldmatrix_x4<false>(a[i], &as[(wm + 16 * i + lr) * LDA + ks + lc]);
#pragma unroll
                for (int jp = 0; jp < 2; ++jp) {
                    unsigned r[4];
                    ldmatrix_x4<true>(r, &bs[(ks + lr) * LDB + wn + 16 * jp + lc]);
                    b[2 * jp][0] = r[0];
                    b[2 * jp][1] = r[1];
                    b[2 * jp + 1][0] = r[2];
                    b[2 * jp + 1][1] = r[3];
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if constexpr (BF16) mma_bf16(acc[i][j], a[i], b[j], acc[i][j]);
                    else mma_tf32(acc[i][j], a[i], b[j], acc[i][j]);
                }
        }
        if (more) stash(buf ^ 1);
        __syncthreads();
        buf ^= 1;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const FragPos p = frag_acc(lane, c);
                const int m = m0 + wm + 16 * i + p.row, n = n0 + wn + 8 * j + p.col;
                if (m < M && n < N) store(m, n, acc[i][j][c]);
            }
}
