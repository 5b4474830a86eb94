// common.cuh: launch contracts shared with the Rust side (src/cuda/params.rs mirrors every struct
// here field by field) and small device helpers used by several kernel files.
//
// Launch sizes that Rust and C share are not written here: the Rust registry (src/cuda/registry.rs,
// DEFINES) passes them to every compile as -D definitions, so they are stated once.
#pragma once

#if !defined(GEMM_BM) || !defined(GEMM_BN) || !defined(GEMM_BK) || !defined(GEMM_THREADS) || !defined(BIAS_BWD_THREADS) || !defined(SQ_ERR_FWD_THREADS) || \
    !defined(MARGIN_LOSS_FWD_THREADS) || !defined(ROUTING_THREADS) || !defined(FLAT_THREADS) || \
    !defined(MMA_BM) || !defined(MMA_BN) || !defined(MMA_BK) || !defined(MMA_THREADS)
#error "compile with the -D definitions of src/cuda/registry.rs (DEFINES)"
#endif

// The kernel's dynamic shared memory as `T* name`. The emulated device (kernels/emulator) defines its
// own: exactly the launch's size, NaN-filled at the start of each block.
#ifndef DYNAMIC_SMEM
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// Activation codes: the Rust enum Act as i32.
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_SIGMOID 2

// The safe-norm epsilon of squash and lengths (backend::NORM_EPS).
#define NORM_EPS 1e-7f

// A valid 2-D convolution over channels-last images: x [B,H,W,Cin], w [K,K,Cin,Cout], y [B,OH,OW,Cout].
struct ConvParams {
    int batch, in_h, in_w, in_c, out_c, k, stride, out_h, out_w;
};

// A dense layer: x [rows, in], w [in, out], y [rows, out].
struct DenseParams {
    int rows, in, out;
};

// Prediction vectors and routing: u [B,I,Din], W [I,J,Dout,Din], û [B,I,J,Dout].
struct CapsParams {
    int batch, in_caps, in_dim, out_caps, out_dim;
};

// One tensor of a fused Adam step.
struct AdamTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    unsigned long long n;
};

// Adam hyper-parameters with the bias corrections 1 − β^t already computed (in f64) on the host.
struct AdamParams {
    float lr, beta1, beta2, eps, bc1, bc2;
};

// A step plan: what changes from one training step to the next, read on the device, so that a step
// captured once (a CUDA graph) replays with each step's values and no new launch arguments. Word 0 is
// the cursor, the row of the current step; row r is the PLAN_ROW words from PLAN_HEADER + PLAN_ROW·r:
// the batch's first position in the epoch's order, then Adam's lr, bc1 and bc2 as f32 bits (the host
// computes them as it does for an eager step). plan_advance moves the cursor on at the step's end.
#define PLAN_HEADER 1
#define PLAN_ROW 4
// The current row of a plan of `words` words, or null when the cursor is past its last row.
__device__ __forceinline__ const unsigned* plan_row(const unsigned* plan, unsigned words) {
    const unsigned long long at = PLAN_HEADER + PLAN_ROW * (unsigned long long)plan[0];
    return at + PLAN_ROW <= words ? plan + at : nullptr;
}

__device__ __forceinline__ float act_fwd(int act, float x) {
    if (act == ACT_RELU) return fmaxf(x, 0.f);
    if (act == ACT_SIGMOID) return 1.f / (1.f + expf(-x));
    return x;
}

// d act / dx in terms of the output y.
__device__ __forceinline__ float act_deriv(int act, float y) {
    if (act == ACT_RELU) return y > 0.f ? 1.f : 0.f;
    if (act == ACT_SIGMOID) return y * (1.f - y);
    return 1.f;
}

// v = squash(s) for one vector of length d: ‖s‖²/(1+‖s‖²) · s/√(‖s‖²+ε).
__device__ __forceinline__ void squash_vec(const float* s, float* v, int d) {
    float n2 = 0.f;
    for (int t = 0; t < d; ++t) n2 += s[t] * s[t];
    float f = n2 / ((1.f + n2) * sqrtf(n2 + NORM_EPS));
    for (int t = 0; t < d; ++t) v[t] = f * s[t];
}

// ds (+)= (∂squash/∂s)ᵀ dv: ds = f dv + 2 f'(n) (dv·s) s with n = ‖s‖², g = 1/((1+n)√(n+ε)),
// f = n g and f' = g (1/(1+n) − n/(2(n+ε))), finite at n = 0. `accumulate` adds instead of writing.
__device__ __forceinline__ void squash_vec_bwd(const float* s, const float* dv, float* ds, int d, bool accumulate) {
    float n2 = 0.f, dot = 0.f;
    for (int t = 0; t < d; ++t) {
        n2 += s[t] * s[t];
        dot += dv[t] * s[t];
    }
    float g = 1.f / ((1.f + n2) * sqrtf(n2 + NORM_EPS));
    float f = n2 * g;
    float fp = g * (1.f / (1.f + n2) - n2 / (2.f * (n2 + NORM_EPS)));
    for (int t = 0; t < d; ++t) {
        float x = f * dv[t] + 2.f * fp * dot * s[t];
        ds[t] = accumulate ? ds[t] + x : x;
    }
}

// Sum of `x` over the block (blockDim.x a power of two ≤ 1024); the result is valid in thread 0.
// A fixed tree, so the sum is the same on every run.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    scratch[threadIdx.x] = x;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) scratch[threadIdx.x] += scratch[threadIdx.x + h];
        __syncthreads();
    }
    return scratch[0];
}
