// dense.cu: dense layers y = act(x · w + b), x [rows, in], w [in, out], as GEMMs (gemm.cuh).
//
//   forward       y[r, o]  = act(Σ_i x[r, i] · w[i, o] + b[o])
//   input grad    dx[r, i] += Σ_o dz[r, o] · w[i, o]
//   weight grad   dw[i, o] += Σ_r x[r, i] · dz[r, o]
//
// dz is the gradient before the activation, and the bias gradient is its column sum (both kernels here,
// shared with the convolutions):
//   act_bwd_f32   dz[i] = dy[i] · act'(y[i])                      (overwrites: a temporary)
//   bias_bwd_f32  db[c] += Σ_r dz[r, c]                           (one block per column, tree sum)
// Shapes: the decoder, 160→512 ReLU, 512→1024 ReLU, 1024→784 sigmoid. Version 1: gemm_tile_v1.
#include "common.cuh"
#include "gemm.cuh"
#include "gemm_mma.cuh"

struct Mat {  // element (i, j) with strides (rs, cs): row-major or a transposed view
    const float* a;
    int rs, cs;
    __device__ float operator()(int i, int j) const { return a[(size_t)i * rs + (size_t)j * cs]; }
};

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_fwd_v1(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
             float* __restrict__ y, DenseParams p, int act) {
    auto store = [=](int m, int n, float acc) { y[(size_t)m * p.out + n] = act_fwd(act, acc + bias[n]); };
    gemm_tile_v1(p.rows, p.out, p.in, Mat{x, p.in, 1}, Mat{w, p.out, 1}, store);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_bwd_input_v1(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx, DenseParams p) {
    auto store = [=](int m, int n, float acc) { dx[(size_t)m * p.in + n] += acc; };
    gemm_tile_v1(p.rows, p.in, p.out, Mat{dz, p.out, 1}, Mat{w, 1, p.out}, store);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
dense_bwd_weight_v1(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw, DenseParams p) {
    auto store = [=](int m, int n, float acc) { dw[(size_t)m * p.out + n] += acc; };
    gemm_tile_v1(p.in, p.out, p.rows, Mat{x, 1, p.in}, Mat{dz, p.out, 1}, store);
}

// ---- tensor-core versions (gemm_mma.cuh): tf32 and bf16 inputs, fp32 sums ------------------------------

template <bool BF16>
__device__ void dense_fwd_mma(const float* x, const float* w, const float* bias, float* y, DenseParams p, int act) {
    auto store = [=](int m, int n, float acc) { y[(size_t)m * p.out + n] = act_fwd(act, acc + bias[n]); };
    gemm_tile_mma<BF16>(p.rows, p.out, p.in, StridedOp{x, p.in, 1}, StridedOp{w, p.out, 1}, store);
}

template <bool BF16>
__device__ void dense_bwd_input_mma(const float* dz, const float* w, float* dx, DenseParams p) {
    auto store = [=](int m, int n, float acc) { dx[(size_t)m * p.in + n] += acc; };
    gemm_tile_mma<BF16>(p.rows, p.in, p.out, StridedOp{dz, p.out, 1}, StridedOp{w, 1, p.out}, store);
}

// Split over gridDim.z slices of the rows, as conv2d_bwd_weight_mma (conv.cu).
template <bool BF16>
__device__ void dense_bwd_weight_mma(const float* x, const float* dz, float* dw, float* ws, DenseParams p) {
    float* part = ws + (size_t)blockIdx.z * p.in * p.out;
    auto store = [=](int m, int n, float acc) {
        if (gridDim.z == 1) dw[(size_t)m * p.out + n] += acc;
        else part[(size_t)m * p.out + n] = acc;
    };
    gemm_tile_mma<BF16>(p.in, p.out, p.rows, StridedOp{x, 1, p.in}, StridedOp{dz, p.out, 1}, store);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_fwd_tf32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
               float* __restrict__ y, DenseParams p, int act) {
    dense_fwd_mma<false>(x, w, bias, y, p, act);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_fwd_bf16(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
               float* __restrict__ y, DenseParams p, int act) {
    dense_fwd_mma<true>(x, w, bias, y, p, act);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_bwd_input_tf32(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx, DenseParams p) {
    dense_bwd_input_mma<false>(dz, w, dx, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_bwd_input_bf16(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx, DenseParams p) {
    dense_bwd_input_mma<true>(dz, w, dx, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_bwd_weight_tf32(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                      float* __restrict__ ws, DenseParams p) {
    dense_bwd_weight_mma<false>(x, dz, dw, ws, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
dense_bwd_weight_bf16(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                      float* __restrict__ ws, DenseParams p) {
    dense_bwd_weight_mma<true>(x, dz, dw, ws, p);
}

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void act_bwd_f32(const float* y, const float* dy, float* dz, int act, size_t n) {
    GRID_STRIDE(i, n) dz[i] = dy[i] * act_deriv(act, y[i]);
}

// blockDim.x = BIAS_BWD_THREADS; grid.x = cols.
extern "C" __global__ void __launch_bounds__(BIAS_BWD_THREADS) bias_bwd_f32(const float* dz, float* db, int rows, int cols) {
    __shared__ float scratch[BIAS_BWD_THREADS];
    const int c = blockIdx.x;
    float s = 0.f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) s += dz[(size_t)r * cols + c];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) db[c] += s;
}
