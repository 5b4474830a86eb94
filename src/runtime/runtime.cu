// runtime.cu: the training step's runtime on the device, apart from the ops.
//
//   gather_batch    x[b, p] = byte p of image order[start + b] / 255, y[b] = labels[order[start + b]]
//                   (start from the step plan's current row where a plan is given, else the argument;
//                   each image moved by its shift where shifts are given)
//   step_summary    out = [loss, margin, recon, images whose `per` longest capsules are their labels,
//                   labels among their image's `per` longest] (one block; ties to the lower class)
//   plan_advance    plan[0] += 1: the next step's row (one thread; the last launch of a planned step)
#include "common.cuh"

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

// A training step's report in one buffer (the host reads it once per step). Label y is among the `per`
// longest capsules when fewer than `per` classes rank above it (longer, or as long with a lower index:
// argmax_f32's and the host's tie rule). Counts are sums of whole numbers in a fixed tree: exact.
extern "C" __global__ void __launch_bounds__(MARGIN_LOSS_FWD_THREADS)
step_summary(const float* loss, const float* margin, const float* recon, const float* l, const unsigned* labels,
             float* out, int batch, int classes, int per) {
    __shared__ float scratch[MARGIN_LOSS_FWD_THREADS];
    float exact = 0.f, found = 0.f;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const float* lb = l + (size_t)b * classes;
        int hits = 0;
        for (int j = 0; j < per; ++j) {
            const unsigned y = labels[b * per + j];
            if (y >= (unsigned)classes) continue;
            int above = 0;
            for (int k = 0; k < classes; ++k) above += lb[k] > lb[y] || (lb[k] == lb[y] && k < (int)y);
            hits += above < per;
        }
        found += (float)hits;
        exact += hits == per ? 1.f : 0.f;
    }
    exact = block_sum(exact, scratch);
    __syncthreads();  // every thread has read the first sum before scratch is reused
    found = block_sum(found, scratch);
    if (threadIdx.x == 0) {
        out[0] = loss[0];
        out[1] = margin[0];
        out[2] = recon[0];
        out[3] = exact;
        out[4] = found;
    }
}

extern "C" __global__ void plan_advance(unsigned* plan) {
    if (blockIdx.x == 0 && threadIdx.x == 0) plan[0] += 1;
}
