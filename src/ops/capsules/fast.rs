//! Capsule ops on the fast CPU backend.

use crate::Result;
use crate::backend::fast::{Arith, FastCpu, Fused, Plain, PoolBuf, axpy, dot, simd_fn, wide_simd};
use crate::par::{par_blocks, par_rows};

use super::host;

use super::{
    CapsShape, CapsuleOps, NORM_EPS, check_lengths_bwd, check_lengths_fwd, check_predict_bwd_input,
    check_predict_bwd_weight, check_predict_fwd, check_squash_bwd, check_squash_fwd,
};

pub(crate) const EPS: f32 = NORM_EPS as f32;

#[inline(always)]
pub(crate) fn squash_row<A: Arith>(s: &[f32], v: &mut [f32]) {
    let n2 = dot::<A>(s, s);
    let f = n2 / ((1.0 + n2) * (n2 + EPS).sqrt());
    for (o, x) in v.iter_mut().zip(s) {
        *o = f * x;
    }
}

/// ds += (∂squash(s)/∂s)ᵀ dv; the derivation is at [`super::cpu::squash_vec_bwd`].
#[inline(always)]
pub(crate) fn squash_row_bwd<A: Arith>(s: &[f32], dv: &[f32], ds: &mut [f32]) {
    let n2 = dot::<A>(s, s);
    let g = 1.0 / ((1.0 + n2) * (n2 + EPS).sqrt());
    let f = n2 * g;
    let fp = g * (1.0 / (1.0 + n2) - n2 / (2.0 * (n2 + EPS)));
    let k = 2.0 * fp * dot::<A>(dv, s);
    for ((o, x), d) in ds.iter_mut().zip(s).zip(dv) {
        *o = A::fma(k, *x, A::fma(f, *d, *o));
    }
}

/// û for a block of images: for each capsule i (outer, so its transposed weights stay in L1) and each
/// image b of the block, û[b,i,:] = Σ_t u[b,i,t] · Wᵀ[i,t,:].
#[inline(always)]
fn predict_fwd_body<A: Arith>(s: &CapsShape, b0: usize, block: &mut [f32], u: &[f32], wt: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    let nb = block.len() / (ni * njd);
    for i in 0..ni {
        let wti = &wt[i * din * njd..(i + 1) * din * njd];
        for bl in 0..nb {
            let ui = &u[((b0 + bl) * ni + i) * din..((b0 + bl) * ni + i + 1) * din];
            let out = &mut block[(bl * ni + i) * njd..(bl * ni + i + 1) * njd];
            if din == 8 && njd.is_multiple_of(32) {
                // 32 outputs at a time summed in registers over the 8 inputs, stored once
                let ui: &[f32; 8] = ui.try_into().expect("8 values");
                for (c, o) in out.chunks_exact_mut(32).enumerate() {
                    let mut acc = [0f32; 32];
                    for (t, &x) in ui.iter().enumerate() {
                        let w: &[f32; 32] = wti[t * njd + c * 32..][..32].try_into().expect("32 values");
                        for l in 0..32 {
                            acc[l] = A::fma(x, w[l], acc[l]);
                        }
                    }
                    o.copy_from_slice(&acc);
                }
                continue;
            }
            out.fill(0.0);
            for (t, &x) in ui.iter().enumerate() {
                axpy::<A>(x, &wti[t * njd..(t + 1) * njd], out);
            }
        }
    }
}
simd_fn!(fn predict_fwd_block(s: &CapsShape, b0: usize, block: &mut [f32], u: &[f32], wt: &[f32]) => predict_fwd_body;);

/// du[b,i,:] += Σ_jk dû[b,i,jk] · W[i,jk,:] for a block of images, capsule i outer so that W[i]
/// stays in L1 across the block.
#[inline(always)]
fn predict_bwd_input_body<A: Arith>(s: &CapsShape, b0: usize, block: &mut [f32], duhat: &[f32], w: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    let nb = block.len() / (ni * din);
    for i in 0..ni {
        let wi = &w[i * njd * din..(i + 1) * njd * din];
        for bl in 0..nb {
            let b = b0 + bl;
            let g = &duhat[(b * ni + i) * njd..(b * ni + i + 1) * njd];
            let acc = &mut block[(bl * ni + i) * din..(bl * ni + i + 1) * din];
            if din == 8 {
                // four independent accumulators: one chain of 160 dependent FMAs would wait on latency
                let mut a = [[0f32; 8]; 4];
                for (gq, wq) in g.chunks(4).zip(wi.chunks(32)) {
                    for (lane, (&gv, wr)) in gq.iter().zip(wq.chunks_exact(8)).enumerate() {
                        for l in 0..8 {
                            a[lane][l] = A::fma(gv, wr[l], a[lane][l]);
                        }
                    }
                }
                for l in 0..8 {
                    acc[l] += (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]);
                }
            } else {
                for (jk, &gv) in g.iter().enumerate() {
                    axpy::<A>(gv, &wi[jk * din..(jk + 1) * din], acc);
                }
            }
        }
    }
}
simd_fn!(fn predict_bwd_input_block(s: &CapsShape, b0: usize, block: &mut [f32], duhat: &[f32], w: &[f32]) => predict_bwd_input_body;);

/// dW[i,jk,:] += Σ_b dû[b,i,jk] · u[b,i,:] for one capsule i.
#[inline(always)]
fn predict_bwd_weight_body<A: Arith>(s: &CapsShape, i: usize, dwi: &mut [f32], u: &[f32], duhat: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    if din == 8 && njd.is_multiple_of(8) {
        // eight rows of dW[i] at a time in eight 8-lane accumulators, summed over the batch, then
        // added to dW once (one FMA per accumulator per image, no dW traffic inside the sum)
        for jk0 in (0..njd).step_by(8) {
            let mut acc = [[0f32; 8]; 8];
            for b in 0..s.batch {
                let ui: &[f32; 8] = u[(b * ni + i) * 8..][..8].try_into().expect("8 values");
                let g: &[f32; 8] = duhat[(b * ni + i) * njd + jk0..][..8].try_into().expect("8 values");
                for q in 0..8 {
                    for l in 0..8 {
                        acc[q][l] = A::fma(g[q], ui[l], acc[q][l]);
                    }
                }
            }
            let d: &mut [f32; 64] = (&mut dwi[jk0 * 8..][..64]).try_into().expect("64 values");
            for q in 0..8 {
                for l in 0..8 {
                    d[q * 8 + l] += acc[q][l];
                }
            }
        }
        return;
    }
    for b in 0..s.batch {
        let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
        let g = &duhat[(b * ni + i) * njd..(b * ni + i + 1) * njd];
        for (jk, &gv) in g.iter().enumerate() {
            axpy::<A>(gv, ui, &mut dwi[jk * din..(jk + 1) * din]);
        }
    }
}
simd_fn!(fn predict_bwd_weight_row(s: &CapsShape, i: usize, dwi: &mut [f32], u: &[f32], duhat: &[f32]) => predict_bwd_weight_body;);

/// Wᵀ[i, t, jk] = W[i, jk, t] into `wt`: each input dimension's row of a capsule's weights
/// contiguous.
pub(crate) fn transpose_weights(s: &CapsShape, w: &[f32], wt: &mut [f32]) {
    let (din, njd) = (s.in_dim, s.out_caps * s.out_dim);
    let wide16 = avx512_usable(s);
    par_rows(wt, din * njd, din * njd, |i, wti| {
        let wi = &w[i * njd * din..(i + 1) * njd * din];
        if wide16 {
            // SAFETY: the CPU has AVX-512F (`usable`); 16·J rows of 8
            #[cfg(target_arch = "x86_64")]
            return unsafe { super::avx512::transpose_capsule(njd, wi, wti) };
        }
        for jk in 0..njd {
            for t in 0..din {
                wti[t * njd + jk] = wi[jk * din + t];
            }
        }
    });
}

impl FastCpu {
    /// [`CapsuleOps::predict_fwd`] from the weights transposed ([`transpose_weights`]).
    pub(crate) fn predict_fwd_transposed(&self, s: &CapsShape, u: &[f32], wt: &[f32], uhat: &mut [f32]) {
        let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
        let wide16 = avx512_usable(s);
        par_blocks(uhat, ni * njd, ni * njd * din, |b0, block| {
            if wide16 {
                // SAFETY: the CPU has AVX-512F and s its shape (`usable`); whole images
                #[cfg(target_arch = "x86_64")]
                return unsafe { super::avx512::predict_fwd_block(s, b0, block, u, wt) };
            }
            predict_fwd_block(s, b0, block, u, wt)
        });
    }

    /// [`CapsuleOps::predict_bwd_input`] from the weights transposed, where the AVX-512 kernels run
    /// `s` (false: not done, the caller's to do from W).
    pub(crate) fn predict_bwd_input_transposed(
        &self,
        s: &CapsShape,
        duhat: &[f32],
        wt: &[f32],
        du: &mut [f32],
    ) -> bool {
        if !avx512_usable(s) {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        par_blocks(du, s.in_caps * s.in_dim, s.w_len(), |b0, block| {
            // SAFETY: the CPU has AVX-512F and s its shape (`usable`); whole images
            unsafe { super::avx512::predict_bwd_input_block(s, b0, block, duhat, wt) }
        });
        true
    }
}

/// Whether the AVX-512 kernels of 8-D into 16-D capsules run `s` here.
fn avx512_usable(s: &CapsShape) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx512::usable(s);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

impl CapsuleOps for FastCpu {
    fn squash_fwd(&self, rows: usize, dim: usize, s: &PoolBuf, v: &mut PoolBuf) -> Result<()> {
        check_squash_fwd(rows, dim, s.len(), v.len())?;
        let d = dim.max(1);
        // blocks of 64 rows over the threads
        par_blocks(v, 64 * d, 64 * d * 4, |r0, vb| {
            for (vr, sr) in vb.chunks_mut(d).zip(s[r0 * 64 * d..].chunks(d)) {
                squash_row::<Plain>(sr, vr);
            }
        });
        Ok(())
    }

    fn squash_bwd(&self, rows: usize, dim: usize, s: &PoolBuf, dv: &PoolBuf, ds: &mut PoolBuf) -> Result<()> {
        check_squash_bwd(rows, dim, s.len(), dv.len(), ds.len())?;
        let d = dim.max(1);
        par_blocks(ds, 64 * d, 64 * d * 8, |r0, db| {
            let (s, dv) = (&s[r0 * 64 * d..], &dv[r0 * 64 * d..]);
            for ((dsr, sr), dvr) in db.chunks_mut(d).zip(s.chunks(d)).zip(dv.chunks(d)) {
                squash_row_bwd::<Plain>(sr, dvr, dsr);
            }
        });
        Ok(())
    }

    fn predict_fwd(&self, s: &CapsShape, u: &PoolBuf, w: &PoolBuf, uhat: &mut PoolBuf) -> Result<()> {
        check_predict_fwd(s, u.len(), w.len(), uhat.len())?;
        self.with_scratch(w.len(), |wt| {
            transpose_weights(s, w, wt);
            self.predict_fwd_transposed(s, u, wt, uhat)
        })
    }

    fn predict_bwd_input(&self, s: &CapsShape, duhat: &PoolBuf, w: &PoolBuf, du: &mut PoolBuf) -> Result<()> {
        check_predict_bwd_input(s, duhat.len(), w.len(), du.len())?;
        if avx512_usable(s) {
            return self.with_scratch(w.len(), |wt| {
                transpose_weights(s, w, wt);
                self.predict_bwd_input_transposed(s, duhat, wt, du);
            });
        }
        par_blocks(du, s.in_caps * s.in_dim, s.w_len(), |b0, block| {
            predict_bwd_input_block(s, b0, block, duhat, w)
        });
        Ok(())
    }

    fn predict_bwd_weight(&self, s: &CapsShape, u: &PoolBuf, duhat: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        check_predict_bwd_weight(s, u.len(), duhat.len(), dw.len())?;
        let row = s.out_caps * s.out_dim * s.in_dim;
        // one row per primary capsule i: the sum over the batch stays inside one thread
        par_rows(dw, row, s.batch * row, |i, dwi| {
            predict_bwd_weight_row(s, i, dwi, u, duhat)
        });
        Ok(())
    }

    fn lengths_fwd(&self, rows: usize, dim: usize, v: &PoolBuf, l: &mut PoolBuf) -> Result<()> {
        check_lengths_fwd(rows, dim, v.len(), l.len())?;
        for (o, vr) in l.iter_mut().zip(v.chunks(dim.max(1))) {
            *o = (dot::<Plain>(vr, vr) + EPS).sqrt();
        }
        Ok(())
    }

    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &PoolBuf,
        l: &PoolBuf,
        dl: &PoolBuf,
        dv: &mut PoolBuf,
    ) -> Result<()> {
        check_lengths_bwd(rows, dim, v.len(), l.len(), dl.len(), dv.len())?;
        for (r, dvr) in dv.chunks_mut(dim.max(1)).enumerate() {
            axpy::<Plain>(dl[r] / l[r], &v[r * dim..(r + 1) * dim], dvr);
        }
        Ok(())
    }

    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &PoolBuf,
        idx: &Vec<u32>,
        out: &mut PoolBuf,
    ) -> Result<()> {
        host::mask_fwd(batch, caps, dim, v, idx, out)
    }

    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &PoolBuf,
        idx: &Vec<u32>,
        dv: &mut PoolBuf,
    ) -> Result<()> {
        host::mask_bwd(batch, caps, dim, dout, idx, dv)
    }

    fn argmax(&self, rows: usize, cols: usize, x: &PoolBuf, idx: &mut Vec<u32>) -> Result<()> {
        host::argmax(rows, cols, x, idx)
    }
}
