// fragments.cu: one warp runs each tensor-core wrapper of kernels/mma.cuh on registers the host filled,
// so tests/fragments.rs can check, lane by lane, that every element sits where the PTX ISA's fragment
// tables put it: on the emulated device (the emulated bodies) and on a GPU (the hardware). The model
// never launches them.
//
//   frag_mma_tf32     d[32][4] = mma_tf32(a[32][4], b[32][2], c[32][4]), registers per lane
//   frag_mma_bf16     the same for mma_bf16 (a and b hold two bf16 each)
//   frag_ldmatrix     four 8x8 matrices of u16 (m[4][8][8]) staged in shared memory with a row stride of
//                     24 halves; out[32][4] from ldmatrix_x4, out_t[32][4] from its .trans form
//   frag_convert      tf32[i] = to_tf32(x[i]); bf16[i] = pack_bf16(x[2i], x[2i+1])
#include "../mma.cuh"

template <bool BF16>
__device__ void frag_mma(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int l = threadIdx.x;
    unsigned ra[4], rb[2];
    float rc[4], rd[4];
    for (int i = 0; i < 4; ++i) ra[i] = a[l * 4 + i], rc[i] = c[l * 4 + i];
    for (int i = 0; i < 2; ++i) rb[i] = b[l * 2 + i];
    if (BF16) mma_bf16(rd, ra, rb, rc);
    else mma_tf32(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[l * 4 + i] = rd[i];
}

extern "C" __global__ void frag_mma_tf32(const unsigned* a, const unsigned* b, const float* c, float* d) {
    frag_mma<false>(a, b, c, d);
}

extern "C" __global__ void frag_mma_bf16(const unsigned* a, const unsigned* b, const float* c, float* d) {
    frag_mma<true>(a, b, c, d);
}

#define FRAG_STRIDE 24
extern "C" __global__ void frag_ldmatrix(const unsigned short* m, unsigned* out, unsigned* out_t) {
    __shared__ __align__(16) unsigned short s[4 * 8 * FRAG_STRIDE];
    const int l = threadIdx.x;
    for (int e = l; e < 4 * 64; e += 32) s[(e / 8) * FRAG_STRIDE + e % 8] = m[e];
    __syncthreads();
    const unsigned short* row = &s[((l / 8) * 8 + l % 8) * FRAG_STRIDE];
    unsigned r[4];
    ldmatrix_x4<false>(r, row);
    for (int j = 0; j < 4; ++j) out[l * 4 + j] = r[j];
    ldmatrix_x4<true>(r, row);
    for (int j = 0; j < 4; ++j) out_t[l * 4 + j] = r[j];
}

extern "C" __global__ void frag_convert(const float* x, unsigned* tf32, unsigned* bf16, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        tf32[i] = to_tf32(x[i]);
        if (2 * i + 1 < n) bf16[i] = pack_bf16(x[2 * i], x[2 * i + 1]);
    }
}
