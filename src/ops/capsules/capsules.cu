// capsules.cu: the capsule ops other than routing (routing.cu).
//
//   squash_fwd      v[r,:] = squash(s[r,:])                 rows of dim d       (one thread per row)
//   squash_bwd      ds[r,:] += (∂v/∂s)ᵀ dv[r,:]
//   predict_fwd     û[b,i,j,k] = Σ_l W[i,j,k,l] u[b,i,l]     u [B,I,8], W [I,J,16,8], û [B,I,J,16]
//   predict_bwd_input   du[b,i,l] += Σ_{j,k} W[i,j,k,l] dû[b,i,j,k]
//   predict_bwd_weight  dW[i,j,k,l] += Σ_b dû[b,i,j,k] u[b,i,l]     (sum over the batch in one thread)
//   lengths_fwd     l[r] = √(‖v[r,:]‖² + ε);  lengths_bwd  dv[r,:] += dl[r] v[r,:] / l[r]
//   mask_fwd        out[b,:] = v[b,:,:] with every capsule but idx[b] zeroed;  mask_bwd the reverse
//   argmax_f32      idx[r] = the first index of the row maximum
//
// Version 1: one thread per output element; every sum is owned by one thread (deterministic).
// Element indices are 32-bit (the host checks every array fits: CapsParams, check_index32), so no index
// is split by a 64-bit division; offsets into arrays are widened before multiplying.
// Class indices are checked on the host (labels at load time, predictions by construction); a label
// ≥ classes would zero its image's mask.
#include "common.cuh"

#define GRID_STRIDE(i, n) for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n); i += gridDim.x * blockDim.x)

extern "C" __global__ void squash_fwd(const float* s, float* v, int rows, int dim) {
    GRID_STRIDE(r, rows) squash_vec(s + (size_t)r * dim, v + (size_t)r * dim, dim);
}

extern "C" __global__ void squash_bwd(const float* s, const float* dv, float* ds, int rows, int dim) {
    GRID_STRIDE(r, rows) squash_vec_bwd(s + (size_t)r * dim, dv + (size_t)r * dim, ds + (size_t)r * dim, dim, true);
}

extern "C" __global__ void predict_fwd(const float* u, const float* w, float* uhat, CapsParams p) {
    const unsigned jk_n = p.out_caps * p.out_dim;
    GRID_STRIDE(e, p.batch * p.in_caps * jk_n) {
        const unsigned jk = e % jk_n, bi = e / jk_n, i = bi % p.in_caps;
        const float* wr = w + ((size_t)i * jk_n + jk) * p.in_dim;
        const float* ur = u + (size_t)bi * p.in_dim;
        float acc = 0.f;
        for (int l = 0; l < p.in_dim; ++l) acc = fmaf(wr[l], ur[l], acc);
        uhat[e] = acc;
    }
}

extern "C" __global__ void predict_bwd_input(const float* duhat, const float* w, float* du, CapsParams p) {
    const int jk_n = p.out_caps * p.out_dim;
    GRID_STRIDE(e, p.batch * p.in_caps * p.in_dim) {
        const unsigned l = e % p.in_dim, bi = e / p.in_dim, i = bi % p.in_caps;
        const float* g = duhat + (size_t)bi * jk_n;
        const float* wi = w + (size_t)i * jk_n * p.in_dim + l;
        float acc = 0.f;
        for (int jk = 0; jk < jk_n; ++jk) acc = fmaf(wi[(size_t)jk * p.in_dim], g[jk], acc);
        du[e] += acc;
    }
}

extern "C" __global__ void predict_bwd_weight(const float* u, const float* duhat, float* dw, CapsParams p) {
    const unsigned jk_n = p.out_caps * p.out_dim;
    GRID_STRIDE(e, p.in_caps * jk_n * p.in_dim) {
        const unsigned l = e % p.in_dim, ijk = e / p.in_dim, jk = ijk % jk_n, i = ijk / jk_n;
        // image b's dû[b, i, jk] and u[b, i, l], one image apart per step
        const float* g = duhat + (size_t)i * jk_n + jk;
        const float* ub = u + (size_t)i * p.in_dim + l;
        const size_t g_step = (size_t)p.in_caps * jk_n, u_step = (size_t)p.in_caps * p.in_dim;
        float acc = 0.f;
        for (int b = 0; b < p.batch; ++b, g += g_step, ub += u_step) acc = fmaf(*g, *ub, acc);
        dw[e] += acc;
    }
}

extern "C" __global__ void lengths_fwd(const float* v, float* l, int rows, int dim) {
    GRID_STRIDE(r, rows) {
        const float* vr = v + (size_t)r * dim;
        float n2 = 0.f;
        for (int t = 0; t < dim; ++t) n2 += vr[t] * vr[t];
        l[r] = sqrtf(n2 + NORM_EPS);
    }
}

extern "C" __global__ void lengths_bwd(const float* v, const float* l, const float* dl, float* dv, int rows, int dim) {
    GRID_STRIDE(e, rows * dim) {
        const unsigned r = e / dim;
        dv[e] += dl[r] / l[r] * v[e];
    }
}

extern "C" __global__ void mask_fwd(const float* v, const unsigned* idx, float* out, int batch, int caps, int dim) {
    GRID_STRIDE(e, batch * caps * dim) {
        const unsigned bk = e / dim, b = bk / caps, k = bk % caps;
        out[e] = (k == idx[b]) ? v[e] : 0.f;
    }
}

extern "C" __global__ void mask_bwd(const float* dout, const unsigned* idx, float* dv, int batch, int caps, int dim) {
    GRID_STRIDE(e, batch * caps * dim) {
        const unsigned bk = e / dim, b = bk / caps, k = bk % caps;
        if (k == idx[b]) dv[e] += dout[e];
    }
}

extern "C" __global__ void argmax_f32(const float* x, unsigned* idx, int rows, int cols) {
    GRID_STRIDE(r, rows) {
        const float* xr = x + (size_t)r * cols;
        int best = 0;
        for (int c = 1; c < cols; ++c)
            if (xr[c] > xr[best]) best = c;
        idx[r] = best;
    }
}
