// adam.cu: one fused Adam step over every parameter tensor in one launch (Kingma & Ba, Alg. 1).
//
//   m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − lr · (m / bc1) / (√(v / bc2) + ε)
//
// with bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ from the host. Grid (x, tensors): blockIdx.y picks the tensor
// from the table, the x blocks stride over its elements. With a `guard` (else null), nothing changes
// unless guard[0] is finite: the step's loss, tested here rather than read by the host first. With a
// step plan of plan_words words (else null), lr, bc1 and bc2 are its current row's, not h's (a cursor
// past the rows, which the host never leaves, changes nothing rather than read past the plan).
#include "common.cuh"

extern "C" __global__ void adam_step_v1(const AdamTensor* tensors, AdamParams h, const float* guard,
                                        const unsigned* plan, unsigned plan_words) {
    if (guard && !isfinite(guard[0])) return;  // a diverged step changes nothing
    if (plan) {
        const unsigned* row = plan_row(plan, plan_words);
        if (!row) return;
        h.lr = __uint_as_float(row[1]);
        h.bc1 = __uint_as_float(row[2]);
        h.bc2 = __uint_as_float(row[3]);
    }
    const AdamTensor t = tensors[blockIdx.y];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < t.n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = t.g[i];
        const float m = h.beta1 * t.m[i] + (1.f - h.beta1) * g;
        const float v = h.beta2 * t.v[i] + (1.f - h.beta2) * g * g;
        t.m[i] = m;
        t.v[i] = v;
        t.p[i] -= h.lr * (m / h.bc1) / (sqrtf(v / h.bc2) + h.eps);
    }
}
