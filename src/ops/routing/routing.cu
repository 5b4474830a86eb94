// routing.cu: routing by agreement, all rounds fused into one forward and one backward kernel.
//
// Forward, per image (û [I,J,D] → v [J,D]), R rounds:
//   b = 0;  for r < R:  c_i = softmax_j(b_i);  s_j = Σ_i c_ij û_ij;  v_j = squash(s_j);
//                       if r < R−1:  b_ij += û_ij · v_j
// saving c [B,R,I,J], s [B,R,J,D], v [B,R,J,D] for the backward. Backward, rounds in reverse, with
// db = d(loss)/d(b_{r+1}) (zero for the last round):
//   dv_r = (r = R−1) ? dv : Σ_i db_ij û_ij;         dû_ij += db_ij v_r,j   (r < R−1)
//   ds_j = squash_bwd(s_r,j, dv_r,j);               dû_ij += c_ij ds_j;   dc_ij = û_ij · ds_j
//   db_ij += c_ij (dc_ij − Σ_j' c_ij' dc_ij')
//
// Version 1: one block per image. The routing logits b (forward) or their gradient (backward) and
// the couplings stay in shared memory for the whole op: up to 2·I·J + 4·J·D floats (92.5 KiB for I = 1152,
// J = 10, D = 16; the launcher opts in to that much dynamic shared memory). Every sum is owned by one
// thread, so results are deterministic.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
routing_fwd_v1(const float* __restrict__ uhat, float* __restrict__ v_out, float* __restrict__ saved_c,
               float* __restrict__ saved_s, float* __restrict__ saved_v, CapsParams p, int rounds) {
    DYNAMIC_SMEM(float, sm);
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, b = blockIdx.x;
    float* logit = sm;        // [I, J]
    float* c = logit + I * J; // [I, J]
    float* s = c + I * J;     // [J, D]
    float* v = s + J * D;     // [J, D]
    const float* uh = uhat + (size_t)b * I * J * D;
    for (int e = threadIdx.x; e < I * J; e += blockDim.x) logit[e] = 0.f;
    __syncthreads();
    for (int r = 0; r < rounds; ++r) {
        float* sc = saved_c + ((size_t)b * rounds + r) * I * J;
        for (int i = threadIdx.x; i < I; i += blockDim.x) {
            float mx = logit[i * J];
            for (int j = 1; j < J; ++j) mx = fmaxf(mx, logit[i * J + j]);
            float den = 0.f;
            for (int j = 0; j < J; ++j) den += expf(logit[i * J + j] - mx);
            for (int j = 0; j < J; ++j) {
                const float cij = expf(logit[i * J + j] - mx) / den;
                c[i * J + j] = cij;
                sc[i * J + j] = cij;
            }
        }
        __syncthreads();
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            const int j = jd / D, d = jd % D;
            float acc = 0.f;
            for (int i = 0; i < I; ++i) acc = fmaf(c[i * J + j], uh[((size_t)i * J + j) * D + d], acc);
            s[jd] = acc;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < J; j += blockDim.x) squash_vec(s + j * D, v + j * D, D);
        __syncthreads();
        const size_t at = ((size_t)b * rounds + r) * J * D;
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            saved_s[at + jd] = s[jd];
            saved_v[at + jd] = v[jd];
        }
        if (r + 1 < rounds) {
            for (int ij = threadIdx.x; ij < I * J; ij += blockDim.x) {
                const int j = ij % J;
                float a = 0.f;
                for (int d = 0; d < D; ++d) a = fmaf(uh[(size_t)ij * D + d], v[j * D + d], a);
                logit[ij] += a;
            }
        }
        __syncthreads();
    }
    for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) v_out[(size_t)b * J * D + jd] = v[jd];
}

extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
routing_bwd_v1(const float* __restrict__ uhat, const float* __restrict__ saved_c, const float* __restrict__ saved_s,
               const float* __restrict__ saved_v, const float* __restrict__ dv, float* __restrict__ duhat, CapsParams p,
               int rounds) {
    DYNAMIC_SMEM(float, sm);
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, b = blockIdx.x;
    float* db = sm;           // [I, J]  d(loss)/d(b_{r+1})
    float* dc = db + I * J;   // [I, J]
    float* dvr = dc + I * J;  // [J, D]
    float* ds = dvr + J * D;  // [J, D]
    float* sr = ds + J * D;   // [J, D]
    float* vr = sr + J * D;   // [J, D]
    const float* uh = uhat + (size_t)b * I * J * D;
    float* duh = duhat + (size_t)b * I * J * D;
    for (int e = threadIdx.x; e < I * J; e += blockDim.x) db[e] = 0.f;
    __syncthreads();
    for (int r = rounds - 1; r >= 0; --r) {
        const float* c = saved_c + ((size_t)b * rounds + r) * I * J;
        const size_t at = ((size_t)b * rounds + r) * J * D;
        const bool last = r + 1 == rounds;
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            sr[jd] = saved_s[at + jd];
            vr[jd] = saved_v[at + jd];
            if (last) {
                dvr[jd] = dv[(size_t)b * J * D + jd];
            } else {
                const int j = jd / D, d = jd % D;
                float acc = 0.f;
                for (int i = 0; i < I; ++i) acc = fmaf(db[i * J + j], uh[((size_t)i * J + j) * D + d], acc);
                dvr[jd] = acc;
            }
        }
        __syncthreads();
        for (int j = threadIdx.x; j < J; j += blockDim.x) squash_vec_bwd(sr + j * D, dvr + j * D, ds + j * D, D, false);
        __syncthreads();
        // û receives the agreement term (with db = db_{r+1}, before this round updates it) and the sum term
        for (int e = threadIdx.x; e < I * J * D; e += blockDim.x) {  // 32-bit: the host checks I·J·D
            const int ij = e / D, d = e % D, j = ij % J;
            float g = c[ij] * ds[j * D + d];
            if (!last) g = fmaf(db[ij], vr[j * D + d], g);
            duh[e] += g;
        }
        for (int ij = threadIdx.x; ij < I * J; ij += blockDim.x) {
            const int j = ij % J;
            float a = 0.f;
            for (int d = 0; d < D; ++d) a = fmaf(uh[(size_t)ij * D + d], ds[j * D + d], a);
            dc[ij] = a;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < I; i += blockDim.x) {
            float m = 0.f;
            for (int j = 0; j < J; ++j) m = fmaf(c[i * J + j], dc[i * J + j], m);
            for (int j = 0; j < J; ++j) db[i * J + j] += c[i * J + j] * (dc[i * J + j] - m);
        }
        __syncthreads();
    }
}

// Version 2: any number of input capsules. One block per image as in v1, but nothing of size I·J
// lives in shared memory, so MultiMNIST's I = 3,200 (v1: 257 KB) runs on any GPU:
// - forward: the couplings go straight into saved_c (global, read back by the sums); the logits are
//   recomputed for each round from the earlier rounds' v (kept in shared memory, R·J·D floats):
//   b_r = Σ_{r'<r} û · v_r', added in v1's order, so the result equals v1's bit for bit;
// - backward: db lives in `scratch` ([B, I, J] of global memory); dc is recomputed where it is used.
// Shared memory: (R + 1)·J·D floats forward, 4·J·D backward.
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
routing_fwd_v2(const float* __restrict__ uhat, float* __restrict__ v_out, float* __restrict__ saved_c,
               float* __restrict__ saved_s, float* __restrict__ saved_v, CapsParams p, int rounds) {
    DYNAMIC_SMEM(float, sm);
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, b = blockIdx.x;
    float* s = sm;         // [J, D]
    float* vs = s + J * D; // [R, J, D]: every round's v
    const float* uh = uhat + (size_t)b * I * J * D;
    for (int r = 0; r < rounds; ++r) {
        float* sc = saved_c + ((size_t)b * rounds + r) * I * J;
        for (int i = threadIdx.x; i < I; i += blockDim.x) {
            float* row = sc + (size_t)i * J;
            float mx = 0.f;
            for (int j = 0; j < J; ++j) {
                float logit = 0.f;
                for (int q = 0; q < r; ++q) {
                    float a = 0.f;
                    for (int d = 0; d < D; ++d) a = fmaf(uh[((size_t)i * J + j) * D + d], vs[(q * J + j) * D + d], a);
                    logit += a;
                }
                row[j] = logit;
                mx = j == 0 ? logit : fmaxf(mx, logit);
            }
            float den = 0.f;
            for (int j = 0; j < J; ++j) den += expf(row[j] - mx);
            for (int j = 0; j < J; ++j) row[j] = expf(row[j] - mx) / den;
        }
        __syncthreads();
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            const int j = jd / D, d = jd % D;
            float acc = 0.f;
            for (int i = 0; i < I; ++i) acc = fmaf(sc[(size_t)i * J + j], uh[((size_t)i * J + j) * D + d], acc);
            s[jd] = acc;
        }
        __syncthreads();
        float* v = vs + r * J * D;
        for (int j = threadIdx.x; j < J; j += blockDim.x) squash_vec(s + j * D, v + j * D, D);
        __syncthreads();
        const size_t at = ((size_t)b * rounds + r) * J * D;
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            saved_s[at + jd] = s[jd];
            saved_v[at + jd] = v[jd];
        }
        __syncthreads();
    }
    const float* v = vs + (rounds - 1) * J * D;
    for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) v_out[(size_t)b * J * D + jd] = v[jd];
}

extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
routing_bwd_v2(const float* __restrict__ uhat, const float* __restrict__ saved_c, const float* __restrict__ saved_s,
               const float* __restrict__ saved_v, const float* __restrict__ dv, float* __restrict__ duhat, CapsParams p,
               int rounds, float* __restrict__ scratch) {
    DYNAMIC_SMEM(float, sm);
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, b = blockIdx.x;
    float* dvr = sm;          // [J, D]
    float* ds = dvr + J * D;  // [J, D]
    float* sr = ds + J * D;   // [J, D]
    float* vr = sr + J * D;   // [J, D]
    float* db = scratch + (size_t)b * I * J; // [I, J]  d(loss)/d(b_{r+1})
    const float* uh = uhat + (size_t)b * I * J * D;
    float* duh = duhat + (size_t)b * I * J * D;
    for (int e = threadIdx.x; e < I * J; e += blockDim.x) db[e] = 0.f;
    __syncthreads();
    for (int r = rounds - 1; r >= 0; --r) {
        const float* c = saved_c + ((size_t)b * rounds + r) * I * J;
        const size_t at = ((size_t)b * rounds + r) * J * D;
        const bool last = r + 1 == rounds;
        for (int jd = threadIdx.x; jd < J * D; jd += blockDim.x) {
            sr[jd] = saved_s[at + jd];
            vr[jd] = saved_v[at + jd];
            if (last) {
                dvr[jd] = dv[(size_t)b * J * D + jd];
            } else {
                const int j = jd / D, d = jd % D;
                float acc = 0.f;
                for (int i = 0; i < I; ++i) acc = fmaf(db[(size_t)i * J + j], uh[((size_t)i * J + j) * D + d], acc);
                dvr[jd] = acc;
            }
        }
        __syncthreads();
        for (int j = threadIdx.x; j < J; j += blockDim.x) squash_vec_bwd(sr + j * D, dvr + j * D, ds + j * D, D, false);
        __syncthreads();
        for (int e = threadIdx.x; e < I * J * D; e += blockDim.x) {  // 32-bit: the host checks I·J·D
            const int ij = e / D, d = e % D, j = ij % J;
            float g = c[ij] * ds[j * D + d];
            if (!last) g = fmaf(db[ij], vr[j * D + d], g);
            duh[e] += g;
        }
        // every thread has read the db it needs for dû and dv before any row of db changes
        __syncthreads();
        for (int i = threadIdx.x; i < I; i += blockDim.x) {
            const float* ci = c + (size_t)i * J;
            float m = 0.f;
            for (int j = 0; j < J; ++j) {
                float dc = 0.f;
                for (int d = 0; d < D; ++d) dc = fmaf(uh[((size_t)i * J + j) * D + d], ds[j * D + d], dc);
                m = fmaf(ci[j], dc, m);
            }
            for (int j = 0; j < J; ++j) {
                float dc = 0.f;
                for (int d = 0; d < D; ++d) dc = fmaf(uh[((size_t)i * J + j) * D + d], ds[j * D + d], dc);
                db[(size_t)i * J + j] += ci[j] * (dc - m);
            }
        }
        __syncthreads();
    }
}
