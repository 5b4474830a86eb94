// losses.cu: the margin loss and the reconstruction's squared error.
//
//   margin_loss_fwd loss[0] = mean_b Σ_k T max(0, 0.9−l)² + 0.5 (1−T) max(0, l−0.1)²  (one block);
//                   T = 1 for each of the image's `per` labels ([batch, per]: MultiMNIST has two)
//   margin_loss_bwd dl[b,k] += dloss[0] / B · d/dl of that term
//   sq_err_fwd_f32  loss[0] = scale / rows · Σ (pred − target)²     (one block, tree sum)
//   sq_err_bwd_f32  dpred[i] += 2 · scale / rows · dloss[0] · (pred[i] − target[i])
//
// Reductions use a fixed tree (deterministic). Class indices are checked on the host; a label ≥ classes
// would count as absent.
#include "common.cuh"

// the margin loss's loops index in 32 bits, the squared error's in 64
#define GRID_STRIDE_32(i, n) for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n); i += gridDim.x * blockDim.x)
#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)
#define M_PLUS 0.9f
#define M_MINUS 0.1f
#define LAMBDA 0.5f

__device__ __forceinline__ float margin_term(float len, bool present) {
    if (present) {
        const float d = fmaxf(M_PLUS - len, 0.f);
        return d * d;
    }
    const float d = fmaxf(len - M_MINUS, 0.f);
    return LAMBDA * d * d;
}

// Whether class k is one of image b's `per` labels (labels is [batch, per]).
__device__ __forceinline__ bool is_label(const unsigned* labels, int b, int k, int per) {
    bool present = false;
    for (int j = 0; j < per; ++j) present |= labels[b * per + j] == (unsigned)k;
    return present;
}

// One block of MARGIN_LOSS_FWD_THREADS threads.
extern "C" __global__ void __launch_bounds__(MARGIN_LOSS_FWD_THREADS)
margin_loss_fwd(const float* l, const unsigned* labels, float* loss, int batch, int classes, int per) {
    __shared__ float scratch[MARGIN_LOSS_FWD_THREADS];
    float s = 0.f;
    for (int e = threadIdx.x; e < batch * classes; e += blockDim.x)
        s += margin_term(l[e], is_label(labels, e / classes, e % classes, per));
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) loss[0] = s / (float)max(batch, 1);
}

extern "C" __global__ void margin_loss_bwd(const float* l, const unsigned* labels, const float* dloss, float* dl,
                                           int batch, int classes, int per) {
    const float g = dloss[0] / (float)max(batch, 1);
    GRID_STRIDE_32(e, batch * classes) {
        const bool present = is_label(labels, (int)(e / classes), (int)(e % classes), per);
        const float d = present ? -2.f * fmaxf(M_PLUS - l[e], 0.f) : 2.f * LAMBDA * fmaxf(l[e] - M_MINUS, 0.f);
        dl[e] += g * d;
    }
}

// One block of SQ_ERR_FWD_THREADS threads.
extern "C" __global__ void __launch_bounds__(SQ_ERR_FWD_THREADS)
sq_err_fwd_f32(const float* pred, const float* target, float* loss, int rows, int cols, float scale) {
    __shared__ float scratch[SQ_ERR_FWD_THREADS];
    const size_t n = (size_t)rows * cols;
    float s = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = pred[i] - target[i];
        s += d * d;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) loss[0] = scale * s / (float)max(rows, 1);
}

extern "C" __global__ void sq_err_bwd_f32(const float* pred, const float* target, const float* dloss, float* dpred,
                                          int rows, int cols, float scale) {
    const size_t n = (size_t)rows * cols;
    const float g = 2.f * scale * dloss[0] / (float)max(rows, 1);
    GRID_STRIDE(i, n) dpred[i] += g * (pred[i] - target[i]);
}
