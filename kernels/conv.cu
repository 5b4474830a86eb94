// conv.cu: valid 2-D convolution over channels-last images as implicit GEMMs (gemm.cuh).
//
//   forward       y[r, co]  = act(Σ_q patch(x)[r, q] · w[q, co] + b[co])
//                 r = (b, oy, ox) of B·OH·OW rows, q = (ky, kx, ci) of K·K·Cin
//   input grad    dx[p, ci] += Σ_{(ky,kx,co)} dz[(b, oy, ox), co] · w[(ky, kx, ci), co]
//                 p = (b, iy, ix), over the (ky, kx) with iy = oy·s + ky, ix = ox·s + kx in range
//   weight grad   dw[q, co] += Σ_r patch(x)[r, q] · dz[r, co]
//
// dz is the gradient before the activation (act_bwd in elementwise.cu applies it); the bias
// gradient is bias_bwd. Shapes: conv1 (1→256, 28→20) and the primary conv (256→256, stride 2,
// 20→6). Version 1: the tiled GEMM of gemm.cuh with index arithmetic per element.
#include "common.cuh"
#include "gemm.cuh"

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
