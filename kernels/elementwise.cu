// elementwise.cu: fills, sums, activation backward, bias gradient and the reconstruction loss.
//
//   fill_f32        buf[i] = value
//   add_assign_f32  dst[i] += src[i]
//   add_fwd_f32     out[i] = a[i] + b[i]
//   act_bwd_f32     dz[i] = dy[i] · act'(y[i])                      (overwrites: a temporary)
//   bias_bwd_f32    db[c] += Σ_r dz[r, c]                           (one block per column, tree sum)
//   sq_err_fwd_f32  loss[0] = scale / rows · Σ (pred − target)²     (one block, tree sum)
//   sq_err_bwd_f32  dpred[i] += 2 · scale / rows · dloss[0] · (pred[i] − target[i])
//   splitk_reduce_add  out[i] += Σ_z ws[z, i]                         (slices in order)
//   gather_batch    x[b, p] = byte p of image order[start + b] / 255, y[b] = labels[order[start + b]]
//                   (start from the step plan's current row where a plan is given, else the argument;
//                   each image moved by its shift where shifts are given)
//
// Flat loops are grid-stride over n elements; reductions use a fixed tree (deterministic).
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

// out[e] += Σ_z ws[z·n + e] for z = 0 .. split−1 in that order: the deterministic second pass of a
// split-K GEMM (gemm_mma.cuh). 32-bit indices: the host checks split·n fits.
extern "C" __global__ void splitk_reduce_add(const float* __restrict__ ws, float* __restrict__ out, int n, int split) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int z = 0; z < split; ++z) acc += ws[z * n + e];
        out[e] += acc;
    }
}

// One batch of a data set resident on the device: images [n, pixels] bytes packed four to a word
// (little-endian), labels [n], order [n] (the epoch's shuffle). Pixels scale as the host loader scales
// them (byte / 255 in double, rounded to float), so a batch is the same bits as one copied from the host.
// 32-bit indices: the host checks n · pixels fits.
// A position past the order's end, an order entry ≥ n or a plan's cursor past its rows (none comes
// from the host's shuffle or plan) reads nothing: NaN pixels, label n.
// Shifts (else null): word img holds image img's (dx + 128) | (dy + 128) << 8; pixel (y, x) of the
// side x side image then comes from (y − dy, x − dx), 0 where that is outside (the host's shift_images).
extern "C" __global__ void gather_batch(const unsigned* images, const unsigned* labels, const unsigned* order,
                                        float* x, unsigned* y, int start, int batch, int pixels, int n,
                                        const unsigned* plan, int plan_words, int order_len,
                                        const unsigned* shifts, int side) {
    const unsigned* row = plan ? plan_row(plan, (unsigned)plan_words) : nullptr;
    const unsigned first = !plan ? (unsigned)start : row ? row[0] : (unsigned)order_len;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < (unsigned)(batch * pixels);
         e += gridDim.x * blockDim.x) {
        const unsigned b = e / pixels, at_order = first + b;
        unsigned p = e % pixels;
        const unsigned img = at_order < (unsigned)order_len ? order[at_order] : (unsigned)n;
        if (img >= (unsigned)n) {
            x[e] = __int_as_float(0x7fc00000);  // NaN
            if (p == 0) y[b] = (unsigned)n;
            continue;
        }
        if (p == 0) y[b] = labels[img];
        if (shifts) {
            const int w = (int)shifts[img], dx = (w & 0xff) - 128, dy = ((w >> 8) & 0xff) - 128;
            const int sy = (int)(p / side) - dy, sx = (int)(p % side) - dx;
            if (sy < 0 || sy >= side || sx < 0 || sx >= side) {
                x[e] = 0.f;
                continue;
            }
            p = (unsigned)(sy * side + sx);
        }
        const unsigned at = img * pixels + p;
        const unsigned byte = (images[at / 4] >> (8 * (at % 4))) & 0xffu;
        x[e] = (float)((double)byte / 255.0);
    }
}
