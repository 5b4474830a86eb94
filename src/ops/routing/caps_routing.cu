// caps_routing.cu: prediction vectors fused into routing by agreement (routing version "fused").
//
// The op: û_ij = W_ij u_i (W [I,J,D,E], u [B,I,E]), then routing.cu's R rounds over û, and back. û and
// its gradient are never stored: every kernel that needs a chunk of û recomputes it in shared memory
// from its chunk of W (held once per block for a group of images) and the image's u.
//
// Every sum over the I input capsules is split in two deterministic phases: each block sums its chunk
// of `chunk` capsules into `partial` [B, chunks, J, D]; a reduce kernel adds the chunks in order. So the
// grid is chunks × image groups (about four blocks per SM where the batch allows: 576 for I = 1152 on
// 132 SMs at batch 128), any I runs (only a chunk lives in shared memory), and nothing is summed with
// atomics.
//
// Forward, round r (two launches):
//   partial:  c_ij = softmax_j(Σ_{q<r} û_ij·v_q,j) → saved_c;   partial_j = Σ_{i∈chunk} c_ij û_ij
//   reduce:   s_j = Σ_chunks partial_j → saved_s;  v_j = squash(s_j) → saved_v (and v_out, last round)
// Backward. With db_r = d(loss)/d(logits of round r) and db_R = 0, for r = R−1 … 0:
//   reduce:   dv_r = dv (r = R−1) or Σ_chunks partial;  ds_r = squash_bwd(s_r, dv_r) → ds [B, R, J, D]
//   partial (r ≥ 1):  dc_ij = û_ij·ds_r,j;  db_r,ij = db_{r+1},ij + c_ij (dc_ij − Σ_j' c_ij' dc_ij')
//             → db [B, R−1, I, J] (slot r−1);  partial_j = Σ_{i∈chunk} db_r,ij û_ij  (for dv_{r−1})
//   then, with dû_ij = Σ_r c_r,ij ds_r,j + Σ_{r≥1} db_r,ij v_{r−1},j recomputed where it is used:
//   input:    du_i += Σ_j W_ijᵀ dû_ij            (chunks × image groups, W's chunk in shared memory)
//   weight:   dW_ij += Σ_b dû_bij ⊗ u_bi        (a thread per (i, j, d), images in order: no atomics)
//
// Element indices are 32-bit (the host checks every array fits); blocks of ROUTING_THREADS threads.
#include "common.cuh"

// e = e0, e0 + step, … as (q, r) = (e / div, e % div), advanced without dividing (a runtime integer
// division costs ~20 instructions, more than the loop bodies it would index).
struct DivWalk {
    int q, r;
    const int dq, dr, div;
    __device__ DivWalk(int e0, int step, int d) : q(e0 / d), r(e0 % d), dq(step / d), dr(step % d), div(d) {}
    __device__ __forceinline__ void next() {
        q += dq;
        r += dr;
        if (r >= div) {
            r -= div;
            ++q;
        }
    }
};

// W's rows of capsules i0 .. i0+n (n·J·D·E consecutive floats) into shared memory.
__device__ __forceinline__ void load_w_chunk(const float* __restrict__ w, float* wsm, int i0, int n, const CapsParams& p) {
    const int per = p.out_caps * p.out_dim * p.in_dim;
    const float* src = w + (size_t)i0 * per;
    for (int e = threadIdx.x; e < n * per; e += blockDim.x) wsm[e] = src[e];
}

// û of capsules i0 .. i0+n of image b into uh [n, J, D], from W's chunk in shared memory; usm [n, E]
// receives u. Ends with a barrier.
__device__ __forceinline__ void predict_chunk(const float* __restrict__ u, const float* wsm, float* usm, float* uh,
                                              int b, int i0, int n, const CapsParams& p) {
    const int E = p.in_dim, jd_n = p.out_caps * p.out_dim;
    const float* ub = u + ((size_t)b * p.in_caps + i0) * E;
    for (int e = threadIdx.x; e < n * E; e += blockDim.x) usm[e] = ub[e];
    __syncthreads();
    DivWalk at(threadIdx.x, blockDim.x, jd_n);  // at.q: the capsule of û element e
    for (int e = threadIdx.x; e < n * jd_n; e += blockDim.x, at.next()) {
        const float* wr = wsm + e * E;
        const float* ur = usm + at.q * E;
        float acc = 0.f;
        for (int l = 0; l < E; ++l) acc = fmaf(wr[l], ur[l], acc);
        uh[e] = acc;
    }
    __syncthreads();
}

// partial[b, chunk, j, d] = Σ_{i<n} coef[i, j] uh[i, j, d]: one thread per (j, d), capsules in order.
__device__ __forceinline__ void chunk_sum(const float* coef, const float* uh, float* __restrict__ partial, int b,
                                          int n, const CapsParams& p) {
    const int J = p.out_caps, D = p.out_dim, jd_n = J * D;
    float* out = partial + ((size_t)b * gridDim.x + blockIdx.x) * jd_n;
    for (int jd = threadIdx.x; jd < jd_n; jd += blockDim.x) {
        const int j = jd / D;
        float acc = 0.f;
        for (int i = 0; i < n; ++i) acc = fmaf(coef[i * J + j], uh[i * jd_n + jd], acc);
        out[jd] = acc;
    }
}

// Grid (chunks, image groups): block (x, y) takes capsules x·chunk … and images y·group …
#define CHUNK_AND_GROUP                                                     \
    const int i0 = blockIdx.x * chunk, n = min(chunk, p.in_caps - i0);     \
    const int b0 = blockIdx.y * group, b1 = min(b0 + group, p.batch)

// Forward round r: the couplings of each capsule of the chunk, and the chunk's weighted sums.
// Shared memory: W chunk [chunk·J·D·E], u [chunk·E], û [chunk·J·D], v of rounds < r [r·J·D], c [chunk·J].
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_fwd_partial(const float* __restrict__ u, const float* __restrict__ w, float* __restrict__ saved_c,
                       const float* __restrict__ saved_v, float* __restrict__ partial, CapsParams p, int rounds,
                       int r, int chunk, int group) {
    DYNAMIC_SMEM(float, sm);
    CHUNK_AND_GROUP;
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, jd_n = J * D;
    float* wsm = sm;
    float* usm = wsm + chunk * jd_n * p.in_dim;
    float* uh = usm + chunk * p.in_dim;
    float* vs = uh + chunk * jd_n;
    float* c = vs + r * jd_n;
    load_w_chunk(w, wsm, i0, n, p);
    for (int b = b0; b < b1; ++b) {
        for (int e = threadIdx.x; e < r * jd_n; e += blockDim.x) vs[e] = saved_v[((size_t)b * rounds) * jd_n + e];
        predict_chunk(u, wsm, usm, uh, b, i0, n, p);
        // logits, summed round by round as routing v1 adds them
        for (int ij = threadIdx.x; ij < n * J; ij += blockDim.x) {
            const int j = ij % J;
            float logit = 0.f;
            for (int q = 0; q < r; ++q) {
                float a = 0.f;
                for (int d = 0; d < D; ++d) a = fmaf(uh[ij * D + d], vs[q * jd_n + j * D + d], a);
                logit += a;
            }
            c[ij] = logit;
        }
        __syncthreads();
        float* sc = saved_c + (((size_t)b * rounds + r) * I + i0) * J;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float* row = c + i * J;
            float mx = row[0];
            for (int j = 1; j < J; ++j) mx = fmaxf(mx, row[j]);
            float den = 0.f;
            for (int j = 0; j < J; ++j) den += expf(row[j] - mx);
            for (int j = 0; j < J; ++j) {
                row[j] = expf(row[j] - mx) / den;
                sc[i * J + j] = row[j];
            }
        }
        __syncthreads();
        chunk_sum(c, uh, partial, b, n, p);
        __syncthreads();  // before the next image overwrites u, û, v and c
    }
}

// s_j = Σ_chunks partial (in order), v_j = squash(s_j): one block per image. Shared memory: s, v [J·D].
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_fwd_reduce(const float* __restrict__ partial, float* __restrict__ saved_s, float* __restrict__ saved_v,
                      float* __restrict__ v_out, CapsParams p, int rounds, int r, int chunks) {
    DYNAMIC_SMEM(float, sm);
    const int J = p.out_caps, D = p.out_dim, jd_n = J * D, b = blockIdx.x;
    float* s = sm;
    float* v = s + jd_n;
    for (int jd = threadIdx.x; jd < jd_n; jd += blockDim.x) {
        const float* pj = partial + (size_t)b * chunks * jd_n + jd;
        float acc = 0.f;
        for (int k = 0; k < chunks; ++k) acc += pj[k * jd_n];
        s[jd] = acc;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < J; j += blockDim.x) squash_vec(s + j * D, v + j * D, D);
    __syncthreads();
    const size_t at = ((size_t)b * rounds + r) * jd_n;
    for (int jd = threadIdx.x; jd < jd_n; jd += blockDim.x) {
        saved_s[at + jd] = s[jd];
        saved_v[at + jd] = v[jd];
        if (r + 1 == rounds) v_out[(size_t)b * jd_n + jd] = v[jd];
    }
}

// Backward, round r: dv_r (the op's dv for the last round, else Σ_chunks partial in order), then
// ds_r = squash_bwd(s_r, dv_r) → ds [B, R, J, D]. One block per image. Shared memory: dv_r [J·D].
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_bwd_reduce(const float* __restrict__ partial, const float* __restrict__ dv, const float* __restrict__ saved_s,
                      float* __restrict__ ds, CapsParams p, int rounds, int r, int chunks) {
    DYNAMIC_SMEM(float, sm);
    const int J = p.out_caps, D = p.out_dim, jd_n = J * D, b = blockIdx.x;
    for (int jd = threadIdx.x; jd < jd_n; jd += blockDim.x) {
        float acc = 0.f;
        if (r + 1 == rounds) {
            acc = dv[(size_t)b * jd_n + jd];
        } else {
            const float* pj = partial + (size_t)b * chunks * jd_n + jd;
            for (int k = 0; k < chunks; ++k) acc += pj[k * jd_n];
        }
        sm[jd] = acc;
    }
    __syncthreads();
    const size_t at = ((size_t)b * rounds + r) * jd_n;
    for (int j = threadIdx.x; j < J; j += blockDim.x)
        squash_vec_bwd(saved_s + at + j * D, sm + j * D, ds + at + j * D, D, false);
}

// Backward, round r ≥ 1: db_r of each capsule of the chunk (slot r−1 of db), and the chunk's
// Σ_i db_r,ij û_ij for dv_{r−1}. Shared memory: W chunk, u, û, ds_r [J·D], dc [chunk·J], db_r [chunk·J].
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_bwd_partial(const float* __restrict__ u, const float* __restrict__ w, const float* __restrict__ saved_c,
                       const float* __restrict__ ds, float* __restrict__ db, float* __restrict__ partial, CapsParams p,
                       int rounds, int r, int chunk, int group) {
    DYNAMIC_SMEM(float, sm);
    CHUNK_AND_GROUP;
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, jd_n = J * D;
    float* wsm = sm;
    float* usm = wsm + chunk * jd_n * p.in_dim;
    float* uh = usm + chunk * p.in_dim;
    float* dsr = uh + chunk * jd_n;
    float* dc = dsr + jd_n;
    float* dbr = dc + chunk * J;
    load_w_chunk(w, wsm, i0, n, p);
    for (int b = b0; b < b1; ++b) {
        const size_t at = ((size_t)b * rounds + r) * jd_n;
        for (int jd = threadIdx.x; jd < jd_n; jd += blockDim.x) dsr[jd] = ds[at + jd];
        predict_chunk(u, wsm, usm, uh, b, i0, n, p);
        for (int ij = threadIdx.x; ij < n * J; ij += blockDim.x) {
            const int j = ij % J;
            float a = 0.f;
            for (int d = 0; d < D; ++d) a = fmaf(uh[ij * D + d], dsr[j * D + d], a);
            dc[ij] = a;
        }
        __syncthreads();
        const float* c = saved_c + (((size_t)b * rounds + r) * I + i0) * J;
        // db has R−1 slots per image: slot q holds db_{q+1}
        float* db_out = db + (((size_t)b * (rounds - 1) + (r - 1)) * I + i0) * J;
        const float* db_in = r + 1 < rounds ? db + (((size_t)b * (rounds - 1) + r) * I + i0) * J : nullptr;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float m = 0.f;
            for (int j = 0; j < J; ++j) m = fmaf(c[i * J + j], dc[i * J + j], m);
            for (int j = 0; j < J; ++j) {
                const float prev = db_in ? db_in[i * J + j] : 0.f;
                const float g = prev + c[i * J + j] * (dc[i * J + j] - m);
                dbr[i * J + j] = g;
                db_out[i * J + j] = g;
            }
        }
        __syncthreads();
        chunk_sum(dbr, uh, partial, b, n, p);
        __syncthreads();
    }
}

// dû of capsules i0 .. i0+n of image b into duh [n, J, D], from the coefficients in shared memory:
// cs [R][chunk·J] (c_r), dbs [R−1][chunk·J] (db_{r+1}), dss [R][J·D] (ds_r), vss [R−1][J·D] (v_r).
// caps_route_bwd_weight sums the same terms in the same order.
__device__ __forceinline__ void duhat_chunk(const float* cs, const float* dbs, const float* dss, const float* vss,
                                            float* duh, int n, int chunk, int R, const CapsParams& p) {
    const int J = p.out_caps, D = p.out_dim, jd_n = J * D;
    DivWalk ij(threadIdx.x, blockDim.x, D), jd(threadIdx.x, blockDim.x, jd_n);  // ij.q, jd.r
    for (int e = threadIdx.x; e < n * jd_n; e += blockDim.x, ij.next(), jd.next()) {
        float g = 0.f;
        for (int q = 0; q < R; ++q) g = fmaf(cs[q * chunk * J + ij.q], dss[q * jd_n + jd.r], g);
        for (int q = 1; q < R; ++q) g = fmaf(dbs[(q - 1) * chunk * J + ij.q], vss[(q - 1) * jd_n + jd.r], g);
        duh[e] = g;
    }
}

// Backward, input gradient: du[b, i, :] += Σ_{j,d} W[i, j, d, :] dû[b, i, j, d], dû recomputed per image
// from the saved coefficients. Grid (chunks, image groups) as the partial kernels. Shared memory:
// W chunk, dû [chunk·J·D], ds_r [R·J·D], v_r [(R−1)·J·D], c [R·chunk·J], db [(R−1)·chunk·J].
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_bwd_input(const float* __restrict__ w, const float* __restrict__ saved_c, const float* __restrict__ saved_v,
                     const float* __restrict__ ds, const float* __restrict__ db, float* __restrict__ du, CapsParams p,
                     int rounds, int chunk, int group) {
    DYNAMIC_SMEM(float, sm);
    CHUNK_AND_GROUP;
    const int I = p.in_caps, J = p.out_caps, E = p.in_dim, jd_n = J * p.out_dim, R = rounds;
    float* wsm = sm;
    float* duh = wsm + chunk * jd_n * E;
    float* dss = duh + chunk * jd_n;
    float* vss = dss + R * jd_n;
    float* cs = vss + (R - 1) * jd_n;
    float* dbs = cs + R * chunk * J;
    load_w_chunk(w, wsm, i0, n, p);
    for (int b = b0; b < b1; ++b) {
        for (int e = threadIdx.x; e < R * jd_n; e += blockDim.x) dss[e] = ds[(size_t)b * R * jd_n + e];
        for (int e = threadIdx.x; e < (R - 1) * jd_n; e += blockDim.x) vss[e] = saved_v[(size_t)b * R * jd_n + e];
        for (int q = 0; q < R; ++q)
            for (int ij = threadIdx.x; ij < n * J; ij += blockDim.x)
                cs[q * chunk * J + ij] = saved_c[(((size_t)b * R + q) * I + i0) * J + ij];
        for (int q = 0; q + 1 < R; ++q)
            for (int ij = threadIdx.x; ij < n * J; ij += blockDim.x)
                dbs[q * chunk * J + ij] = db[(((size_t)b * (R - 1) + q) * I + i0) * J + ij];
        __syncthreads();
        duhat_chunk(cs, dbs, dss, vss, duh, n, chunk, R, p);
        __syncthreads();
        for (int il = threadIdx.x; il < n * E; il += blockDim.x) {
            const int i = il / E, l = il % E;
            const float* wi = wsm + i * jd_n * E + l;
            const float* gi = duh + i * jd_n;
            float acc = 0.f;
            for (int jd = 0; jd < jd_n; ++jd) acc = fmaf(wi[jd * E], gi[jd], acc);
            du[((size_t)b * I + i0) * E + il] += acc;
        }
        __syncthreads();  // before the next image overwrites dû and the coefficients
    }
}

// One (i, j, d) of the weight gradient: its EN (≥ E) sums over the batch in registers. Called with
// E = EN = 8 (the model's primary capsules) the loops unroll without predicates.
template <int EN>
__device__ __forceinline__ void dw_sums(const float* cb, const float* dbb, const float* dsb, const float* vb,
                                        const float* ub, float* out, int E, int R, int batch, int I, int ij_n,
                                        int jd_n) {
    float acc[EN];
#pragma unroll
    for (int l = 0; l < EN; ++l) acc[l] = 0.f;
    for (int b = 0; b < batch; ++b) {
        float g = 0.f;
        for (int q = 0; q < R; ++q) g = fmaf(cb[q * ij_n], dsb[q * jd_n], g);
        for (int q = 1; q < R; ++q) g = fmaf(dbb[(q - 1) * ij_n], vb[(q - 1) * jd_n], g);
#pragma unroll
        for (int l = 0; l < EN; ++l)
            if (l < E) acc[l] = fmaf(g, ub[l], acc[l]);
        // the next image: c, ds and v are [B, R, …], db [B, R−1, I, J], u [B, I, E]
        cb += (size_t)R * ij_n;
        dbb += (size_t)(R - 1) * ij_n;
        dsb += (size_t)R * jd_n;
        vb += (size_t)R * jd_n;
        ub += (size_t)I * E;
    }
#pragma unroll
    for (int l = 0; l < EN; ++l)
        if (l < E) out[l] += acc[l];
}

// Backward, weight gradient: dW[i, j, d, :] += Σ_b dû[b, i, j, d] u[b, i, :], one thread per (i, j, d)
// holding its in_dim sums in registers over the whole batch, images in order: deterministic, no
// atomics, no shared memory. in_dim ≤ CAPS_MAX_IN_DIM (registry::FUSED_MAX_IN_DIM, checked on the host).
extern "C" __global__ void __launch_bounds__(ROUTING_THREADS)
caps_route_bwd_weight(const float* __restrict__ u, const float* __restrict__ saved_c, const float* __restrict__ saved_v,
                      const float* __restrict__ ds, const float* __restrict__ db, float* __restrict__ dw, CapsParams p,
                      int rounds) {
    const int I = p.in_caps, J = p.out_caps, D = p.out_dim, E = p.in_dim, jd_n = J * D, R = rounds, ij_n = I * J;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < I * jd_n; e += gridDim.x * blockDim.x) {
        const int i = e / jd_n, jd = e % jd_n, ij = e / D;
        const float *cb = saved_c + ij, *dbb = db + ij, *dsb = ds + jd, *vb = saved_v + jd, *ub = u + (size_t)i * E;
        float* out = dw + (size_t)e * E;
        if (E == 8)
            dw_sums<8>(cb, dbb, dsb, vb, ub, out, 8, R, p.batch, I, ij_n, jd_n);
        else
            dw_sums<CAPS_MAX_IN_DIM>(cb, dbb, dsb, vb, ub, out, E, R, p.batch, I, ij_n, jd_n);
    }
}
