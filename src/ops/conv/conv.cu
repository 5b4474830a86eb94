// conv.cu: valid 2-D convolution over channels-last images as implicit GEMMs (gemm.cuh).
//
//   forward       y[r, co]  = act(Σ_q patch(x)[r, q] · w[q, co] + b[co])
//                 r = (b, oy, ox) of B·OH·OW rows, q = (ky, kx, ci) of K·K·Cin
//   input grad    dx[p, ci] += Σ_{(ky,kx,co)} dz[(b, oy, ox), co] · w[(ky, kx, ci), co]
//                 p = (b, iy, ix), over the (ky, kx) with iy = oy·s + ky, ix = ox·s + kx in range
//     v1          one GEMM over every (ky, kx, co) tap, most of them zero at stride 2
//     v2          cols[r, q] = Σ_co dz[r, co] · w[q, co], a GEMM with no zero products, then
//                 dx[p, ci] += Σ_{(ky,kx)} cols[(b, oy, ox), (ky, kx, ci)] in ascending (ky, kx)
//   weight grad   dw[q, co] += Σ_r patch(x)[r, q] · dz[r, co]
//
// dz is the gradient before the activation (act_bwd in elementwise.cu applies it); the bias
// gradient is bias_bwd. Shapes: conv1 (1→256, 28→20) and the primary conv (256→256, stride 2,
// 20→6). Version 1: the tiled GEMM of gemm.cuh with index arithmetic per element.
#include "common.cuh"
#include "gemm.cuh"
#include "gemm_mma.cuh"

struct ConvPatch {  // A(r, q) of the forward: x at the pixel patch q of output position r reads
    const float* x;
    ConvParams p;
    __device__ float operator()(int r, int q) const {
        const int ci = q % p.in_c, kx = (q / p.in_c) % p.k, ky = q / (p.in_c * p.k);
        const int ox = r % p.out_w, oy = (r / p.out_w) % p.out_h, b = r / (p.out_w * p.out_h);
        const int iy = oy * p.stride + ky, ix = ox * p.stride + kx;
        return x[((size_t)(b * p.in_h + iy) * p.in_w + ix) * p.in_c + ci];
    }
};

struct RowMajor {  // element (i, j) of a row-major matrix with `ld` columns
    const float* a;
    int ld;
    __device__ float operator()(int i, int j) const { return a[(size_t)i * ld + j]; }
};

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
conv2d_fwd_v1(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
              float* __restrict__ y, ConvParams p, int act) {
    const int M = p.batch * p.out_h * p.out_w, N = p.out_c, K = p.k * p.k * p.in_c;
    auto store = [=](int m, int n, float acc) { y[(size_t)m * N + n] = act_fwd(act, acc + bias[n]); };
    gemm_tile_v1(M, N, K, ConvPatch{x, p}, RowMajor{w, N}, store);
}

struct ConvGradGather {  // A(pix, (ky,kx,co)) of the input gradient: dz at the output that read pix
    const float* dz;
    ConvParams p;
    __device__ float operator()(int pix, int q) const {
        const int co = q % p.out_c, kx = (q / p.out_c) % p.k, ky = q / (p.out_c * p.k);
        const int ix = pix % p.in_w, iy = (pix / p.in_w) % p.in_h, b = pix / (p.in_w * p.in_h);
        const int ty = iy - ky, tx = ix - kx;
        if (ty < 0 || tx < 0 || ty % p.stride || tx % p.stride) return 0.f;
        const int oy = ty / p.stride, ox = tx / p.stride;
        if (oy >= p.out_h || ox >= p.out_w) return 0.f;
        return dz[((size_t)(b * p.out_h + oy) * p.out_w + ox) * p.out_c + co];
    }
};

struct ConvWeightT {  // B((ky,kx,co), ci) = w[(ky,kx,ci), co]
    const float* w;
    ConvParams p;
    __device__ float operator()(int q, int ci) const {
        const int co = q % p.out_c, kk = q / p.out_c;
        return w[((size_t)kk * p.in_c + ci) * p.out_c + co];
    }
};

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
conv2d_bwd_input_v1(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx, ConvParams p) {
    const int M = p.batch * p.in_h * p.in_w, N = p.in_c, K = p.k * p.k * p.out_c;
    auto store = [=](int m, int n, float acc) { dx[(size_t)m * N + n] += acc; };
    gemm_tile_v1(M, N, K, ConvGradGather{dz, p}, ConvWeightT{w, p}, store);
}

struct ConvPatchT {  // A(q, r) = patch(x)[r, q]
    ConvPatch patch;
    __device__ float operator()(int q, int r) const { return patch(r, q); }
};

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
conv2d_bwd_weight_v1(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw, ConvParams p) {
    const int M = p.k * p.k * p.in_c, N = p.out_c, K = p.batch * p.out_h * p.out_w;
    auto store = [=](int m, int n, float acc) { dw[(size_t)m * N + n] += acc; };
    gemm_tile_v1(M, N, K, ConvPatchT{ConvPatch{x, p}}, RowMajor{dz, N}, store);
}

// ---- input gradient, version 2: a GEMM into cols, then col2im -----------------------------------------
// Images b0 .. b0+nb at a time (the host bounds the cols buffer); cols is [nb·OH·OW, K·K·Cin].

struct Transposed {  // element (i, j) = a[j, i] of a row-major matrix with `ld` columns
    const float* a;
    int ld;
    __device__ float operator()(int i, int j) const { return a[(size_t)j * ld + i]; }
};

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
conv2d_bwd_cols_v2(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ cols, ConvParams p,
                   int b0, int nb) {
    const int M = nb * p.out_h * p.out_w, N = p.k * p.k * p.in_c, K = p.out_c;
    const float* dz0 = dz + (size_t)b0 * p.out_h * p.out_w * p.out_c;
    auto store = [=](int m, int n, float acc) { cols[(size_t)m * N + n] = acc; };
    gemm_tile_v1(M, N, K, RowMajor{dz0, K}, Transposed{w, K}, store);
}

// One thread per element of dx (images b0 .. b0+nb): the sum over the taps that read it, ky then kx
// ascending, only those with iy − ky and ix − kx multiples of the stride inside the output. 32-bit
// indices: the host checks nb·H·W·Cin and the cols size fit.
extern "C" __global__ void __launch_bounds__(FLAT_THREADS)
col2im_add_v2(const float* __restrict__ cols, float* __restrict__ dx, ConvParams p, int b0, int nb) {
    const int n = nb * p.in_h * p.in_w * p.in_c, ncols = p.k * p.k * p.in_c, s = p.stride;
    float* dx0 = dx + (size_t)b0 * p.in_h * p.in_w * p.in_c;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        const int ci = e % p.in_c, pix = e / p.in_c;
        const int ix = pix % p.in_w, iy = (pix / p.in_w) % p.in_h, b = pix / (p.in_w * p.in_h);
        // the first ky ≡ iy (mod s) with oy = (iy − ky)/s ≤ OH − 1 (both bounds are ≡ iy), likewise kx
        const int ky_start = max(iy - s * (p.out_h - 1), iy % s), kx_start = max(ix - s * (p.out_w - 1), ix % s);
        float acc = 0.f;
        for (int ky = ky_start; ky < p.k && ky <= iy; ky += s) {
            const int oy = (iy - ky) / s;
            for (int kx = kx_start; kx < p.k && kx <= ix; kx += s) {
                const int ox = (ix - kx) / s;
                acc += cols[((b * p.out_h + oy) * p.out_w + ox) * ncols + (ky * p.k + kx) * p.in_c + ci];
            }
        }
        dx0[e] += acc;
    }
}

// ---- tensor-core versions (gemm_mma.cuh): tf32 and bf16 inputs, fp32 sums ------------------------------
// The input gradient's tensor-core versions compute cols this way and share col2im_add_v2.

template <bool BF16>
__device__ void conv2d_fwd_mma(const float* x, const float* w, const float* bias, float* y, ConvParams p, int act) {
    const int M = p.batch * p.out_h * p.out_w, N = p.out_c, K = p.k * p.k * p.in_c;
    auto store = [=](int m, int n, float acc) { y[(size_t)m * N + n] = act_fwd(act, acc + bias[n]); };
    gemm_tile_mma<BF16>(M, N, K, PatchOp{x, p}, StridedOp{w, N, 1}, store);
}

template <bool BF16>
__device__ void conv2d_bwd_cols_mma(const float* dz, const float* w, float* cols, ConvParams p, int b0, int nb) {
    const int M = nb * p.out_h * p.out_w, N = p.k * p.k * p.in_c, K = p.out_c;
    const float* dz0 = dz + (size_t)b0 * p.out_h * p.out_w * p.out_c;
    auto store = [=](int m, int n, float acc) { cols[(size_t)m * N + n] = acc; };
    gemm_tile_mma<BF16>(M, N, K, StridedOp{dz0, K, 1}, StridedOp{w, 1, K}, store);
}

// Split over gridDim.z slices of K (the B·OH·OW output pixels): with one slice dw += the sum; with
// more, slice z writes its partial sums to ws[z] and splitk_reduce_add (elementwise.cu) adds them to
// dw in slice order, so the result does not depend on the schedule.
template <bool BF16>
__device__ void conv2d_bwd_weight_mma(const float* x, const float* dz, float* dw, float* ws, ConvParams p) {
    const int M = p.k * p.k * p.in_c, N = p.out_c, K = p.batch * p.out_h * p.out_w;
    float* part = ws + (size_t)blockIdx.z * M * N;
    auto store = [=](int m, int n, float acc) {
        if (gridDim.z == 1) dw[(size_t)m * N + n] += acc;
        else part[(size_t)m * N + n] = acc;
    };
    gemm_tile_mma<BF16>(M, N, K, PatchTOp{{x, p}}, StridedOp{dz, N, 1}, store);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_fwd_tf32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                float* __restrict__ y, ConvParams p, int act) {
    conv2d_fwd_mma<false>(x, w, bias, y, p, act);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_fwd_bf16(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                float* __restrict__ y, ConvParams p, int act) {
    conv2d_fwd_mma<true>(x, w, bias, y, p, act);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_bwd_cols_tf32(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ cols, ConvParams p,
                     int b0, int nb) {
    conv2d_bwd_cols_mma<false>(dz, w, cols, p, b0, nb);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_bwd_cols_bf16(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ cols, ConvParams p,
                     int b0, int nb) {
    conv2d_bwd_cols_mma<true>(dz, w, cols, p, b0, nb);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_bwd_weight_tf32(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                       float* __restrict__ ws, ConvParams p) {
    conv2d_bwd_weight_mma<false>(x, dz, dw, ws, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
conv2d_bwd_weight_bf16(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                       float* __restrict__ ws, ConvParams p) {
    conv2d_bwd_weight_mma<true>(x, dz, dw, ws, p);
}
