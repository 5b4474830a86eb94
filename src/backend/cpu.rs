//! The CPU reference backend: the spec every other backend is tested against.
//!
//! Storage is `T` (f32 for training, f64 for finite-difference gradient checks); every sum is
//! accumulated in f64, the GEMMs included (`matrixmultiply::dgemm` on f64 copies). Convolutions
//! are im2col + GEMM over chunks of images, so the patch matrix stays under [`CHUNK_ELEMS`].
//! Loops are split over threads by output rows (see [`crate::par`]), so results are deterministic.

use std::borrow::Cow;
use std::marker::PhantomData;

use super::host;
use super::linalg::{col2im_add, gemm, im2col};
use super::{
    Act, AdamGroup, AdamHyper, Backend, CapsShape, ConvShape, DenseShape, NORM_EPS, RoutingSaved, alloc_zeros, check,
    check_adam_group, check_routing,
};
use crate::float::{Float, Precision};
use crate::par::{par_map, par_rows};
use crate::{Error, Result};

/// Largest im2col chunk, in f64 elements (32 MiB).
const CHUNK_ELEMS: usize = 1 << 22;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T: Float = f32> {
    _t: PhantomData<T>,
    /// Rounds every GEMM input (the convolutions' and dense layers') as the tensor cores do, then
    /// computes in f64 as always: the specification of the GPU's tf32 and bf16 kernel versions.
    gemm_inputs: Option<Precision>,
}

impl<T: Float> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            _t: PhantomData,
            gemm_inputs: None,
        }
    }

    /// The reference with every GEMM input rounded to `p` (through f32, as the GPU holds it).
    pub fn with_gemm_inputs(p: Precision) -> Self {
        CpuBackend {
            _t: PhantomData,
            gemm_inputs: (p != Precision::Fp32).then_some(p),
        }
    }

    /// A GEMM operand as f64, rounded when this backend rounds GEMM inputs.
    fn operand<'a>(&self, x: &'a [T]) -> Cow<'a, [f64]> {
        match self.gemm_inputs {
            None => f64s(x),
            Some(p) => Cow::Owned(x.iter().map(|v| p.round(v.to_f64() as f32) as f64).collect()),
        }
    }

    /// An im2col patch matrix rounded in place when this backend rounds GEMM inputs.
    fn round_patch(&self, mut col: Vec<f64>) -> Vec<f64> {
        if let Some(p) = self.gemm_inputs {
            col.iter_mut().for_each(|v| *v = p.round(*v as f32) as f64);
        }
        col
    }
}

fn f64s<T: Float>(x: &[T]) -> Cow<'_, [f64]> {
    match T::as_f64_slice(x) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(x.iter().map(|v| v.to_f64()).collect()),
    }
}

fn add_into<T: Float>(dst: &mut [T], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = T::from_f64(d.to_f64() + s);
    }
}

fn act_fwd(act: Act, x: f64) -> f64 {
    match act {
        Act::None => x,
        Act::Relu => x.max(0.0),
        Act::Sigmoid => {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }
    }
}

/// d act / dx, written in terms of the activation's output y.
fn act_deriv(act: Act, y: f64) -> f64 {
    match act {
        Act::None => 1.0,
        Act::Relu => {
            if y > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Act::Sigmoid => y * (1.0 - y),
    }
}

/// squash of one vector, in f64.
pub(crate) fn squash_vec(s: &[f64], v: &mut [f64]) {
    let n2: f64 = s.iter().map(|x| x * x).sum();
    let f = n2 / ((1.0 + n2) * (n2 + NORM_EPS).sqrt());
    for (o, x) in v.iter_mut().zip(s) {
        *o = f * x;
    }
}

/// ds += (∂squash(s)/∂s)ᵀ dv. With n = ‖s‖², v = f(n) s, f(n) = n g(n), g(n) = 1 / ((1+n) √(n+ε)):
/// ds = f dv + 2 f'(n) (dv·s) s, and f'(n) = g(n) (1/(1+n) − n / (2(n+ε))) is finite at n = 0.
pub(crate) fn squash_vec_bwd(s: &[f64], dv: &[f64], ds: &mut [f64]) {
    let n2: f64 = s.iter().map(|x| x * x).sum();
    let g = 1.0 / ((1.0 + n2) * (n2 + NORM_EPS).sqrt());
    let f = n2 * g;
    let fp = g * (1.0 / (1.0 + n2) - n2 / (2.0 * (n2 + NORM_EPS)));
    let dot: f64 = dv.iter().zip(s).map(|(a, b)| a * b).sum();
    for ((o, x), d) in ds.iter_mut().zip(s).zip(dv) {
        *o += f * d + 2.0 * fp * dot * x;
    }
}

impl<T: Float> CpuBackend<T> {
    fn images_per_chunk(row_elems: usize) -> usize {
        (CHUNK_ELEMS / row_elems.max(1)).max(1)
    }

    /// Patch matrix of images b0..b0+nb, in f64.
    fn im2col(s: &ConvShape, x: &[T], b0: usize, nb: usize) -> Vec<f64> {
        let mut col = vec![0.0; nb * s.out_h() * s.out_w() * s.patch_len()];
        im2col(s, x, b0, nb, &mut col, T::to_f64);
        col
    }
}

impl<T: Float> Backend for CpuBackend<T> {
    type E = T;
    type Buf = Vec<T>;
    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {} storage, f64 sums)",
            crate::par::threads(),
            T::DTYPE
        )
    }

    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        alloc_zeros(n)
    }
    fn upload(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }
    fn download(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn upload_idx(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }
    fn download_idx(&self, idx: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(idx.clone())
    }
    fn idx_len(&self, idx: &Vec<u32>) -> usize {
        idx.len()
    }
    fn buf_len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut Vec<T>, value: f64) -> Result<()> {
        buf.fill(T::from_f64(value));
        Ok(())
    }
    fn add_assign(&self, dst: &mut Vec<T>, src: &Vec<T>) -> Result<()> {
        check("add_assign", "src", src.len(), dst.len())?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = T::from_f64(d.to_f64() + s.to_f64());
        }
        Ok(())
    }
    fn add_fwd(&self, a: &Vec<T>, b: &Vec<T>, out: &mut Vec<T>) -> Result<()> {
        check("add_fwd", "b", b.len(), a.len())?;
        check("add_fwd", "out", out.len(), a.len())?;
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = T::from_f64(x.to_f64() + y.to_f64());
        }
        Ok(())
    }

    // ---- convolution ----------------------------------------------------------------------------

    fn conv2d_fwd(&self, s: &ConvShape, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, y: &mut Vec<T>, act: Act) -> Result<()> {
        const OP: &str = "conv2d_fwd";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "b", b.len(), s.out_c)?;
        check(OP, "y", y.len(), s.y_len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let wf = self.operand(w);
        let bias: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
        let chunk = Self::images_per_chunk(npix * kd);
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            let col = self.round_patch(Self::im2col(s, x, b0, nb));
            let mut out = vec![0.0; nb * npix * co];
            gemm(nb * npix, kd, co, &col, (kd, 1), &wf, (co, 1), &mut out, 0.0);
            let ys = &mut y[b0 * npix * co..(b0 + nb) * npix * co];
            for (yr, or) in ys.chunks_mut(co).zip(out.chunks(co)) {
                for ((yv, ov), bv) in yr.iter_mut().zip(or).zip(&bias) {
                    *yv = T::from_f64(act_fwd(act, ov + bv));
                }
            }
        }
        Ok(())
    }

    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &Vec<T>, w: &Vec<T>, dx: &mut Vec<T>) -> Result<()> {
        const OP: &str = "conv2d_bwd_input";
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "dx", dx.len(), s.x_len())?;
        let (npix, kd, co, ci) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c, s.in_c);
        let img = s.in_h * s.in_w * ci;
        let wf = self.operand(w);
        let chunk = Self::images_per_chunk(npix * kd);
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            let dzf = self.operand(&dz[b0 * npix * co..(b0 + nb) * npix * co]);
            // dcol = dz · Wᵀ, with W [kd, co] read transposed through its strides
            let mut dcol = vec![0.0; nb * npix * kd];
            gemm(nb * npix, co, kd, &dzf, (co, 1), &wf, (1, co), &mut dcol, 0.0);
            let mut dxf = vec![0.0; nb * img];
            col2im_add(s, &dcol, &mut dxf);
            add_into(&mut dx[b0 * img..(b0 + nb) * img], &dxf);
        }
        Ok(())
    }

    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &Vec<T>, dz: &Vec<T>, dw: &mut Vec<T>) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "dw", dw.len(), s.w_len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let mut dwf = vec![0.0; kd * co];
        let chunk = Self::images_per_chunk(npix * kd);
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            let col = self.round_patch(Self::im2col(s, x, b0, nb));
            let dzf = self.operand(&dz[b0 * npix * co..(b0 + nb) * npix * co]);
            // dW += colᵀ · dz, with col [rows, kd] read transposed through its strides
            gemm(kd, nb * npix, co, &col, (1, kd), &dzf, (co, 1), &mut dwf, 1.0);
        }
        add_into(dw, &dwf);
        Ok(())
    }

    fn bias_bwd(&self, rows: usize, cols: usize, dz: &Vec<T>, db: &mut Vec<T>) -> Result<()> {
        check("bias_bwd", "dz", dz.len(), rows * cols)?;
        check("bias_bwd", "db", db.len(), cols)?;
        let mut acc = vec![0.0; cols];
        for r in dz.chunks(cols.max(1)) {
            for (a, v) in acc.iter_mut().zip(r) {
                *a += v.to_f64();
            }
        }
        add_into(db, &acc);
        Ok(())
    }

    fn act_bwd(&self, act: Act, y: &Vec<T>, dy: &Vec<T>, dz: &mut Vec<T>) -> Result<()> {
        check("act_bwd", "dy", dy.len(), y.len())?;
        check("act_bwd", "dz", dz.len(), y.len())?;
        for ((o, yv), g) in dz.iter_mut().zip(y).zip(dy) {
            *o = T::from_f64(g.to_f64() * act_deriv(act, yv.to_f64()));
        }
        Ok(())
    }

    // ---- dense ----------------------------------------------------------------------------------

    fn dense_fwd(&self, s: &DenseShape, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, y: &mut Vec<T>, act: Act) -> Result<()> {
        const OP: &str = "dense_fwd";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "b", b.len(), s.out)?;
        check(OP, "y", y.len(), s.rows * s.out)?;
        let mut out = vec![0.0; s.rows * s.out];
        gemm(
            s.rows,
            s.inp,
            s.out,
            &self.operand(x),
            (s.inp, 1),
            &self.operand(w),
            (s.out, 1),
            &mut out,
            0.0,
        );
        for (yr, or) in y.chunks_mut(s.out).zip(out.chunks(s.out)) {
            for ((yv, ov), bv) in yr.iter_mut().zip(or).zip(b) {
                *yv = T::from_f64(act_fwd(act, ov + bv.to_f64()));
            }
        }
        Ok(())
    }

    fn dense_bwd_input(&self, s: &DenseShape, dz: &Vec<T>, w: &Vec<T>, dx: &mut Vec<T>) -> Result<()> {
        const OP: &str = "dense_bwd_input";
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "dx", dx.len(), s.rows * s.inp)?;
        let mut dxf = vec![0.0; s.rows * s.inp];
        gemm(
            s.rows,
            s.out,
            s.inp,
            &self.operand(dz),
            (s.out, 1),
            &self.operand(w),
            (1, s.out),
            &mut dxf,
            0.0,
        );
        add_into(dx, &dxf);
        Ok(())
    }

    fn dense_bwd_weight(&self, s: &DenseShape, x: &Vec<T>, dz: &Vec<T>, dw: &mut Vec<T>) -> Result<()> {
        const OP: &str = "dense_bwd_weight";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "dw", dw.len(), s.inp * s.out)?;
        let mut dwf = vec![0.0; s.inp * s.out];
        gemm(
            s.inp,
            s.rows,
            s.out,
            &self.operand(x),
            (1, s.inp),
            &self.operand(dz),
            (s.out, 1),
            &mut dwf,
            0.0,
        );
        add_into(dw, &dwf);
        Ok(())
    }

    // ---- capsules -------------------------------------------------------------------------------

    fn squash_fwd(&self, rows: usize, dim: usize, s: &Vec<T>, v: &mut Vec<T>) -> Result<()> {
        check("squash_fwd", "s", s.len(), rows * dim)?;
        check("squash_fwd", "v", v.len(), rows * dim)?;
        let mut sf = vec![0.0; dim];
        let mut vf = vec![0.0; dim];
        for (vr, sr) in v.chunks_mut(dim.max(1)).zip(s.chunks(dim.max(1))) {
            sf.iter_mut().zip(sr).for_each(|(o, x)| *o = x.to_f64());
            squash_vec(&sf, &mut vf);
            vr.iter_mut().zip(&vf).for_each(|(o, x)| *o = T::from_f64(*x));
        }
        Ok(())
    }

    fn squash_bwd(&self, rows: usize, dim: usize, s: &Vec<T>, dv: &Vec<T>, ds: &mut Vec<T>) -> Result<()> {
        check("squash_bwd", "s", s.len(), rows * dim)?;
        check("squash_bwd", "dv", dv.len(), rows * dim)?;
        check("squash_bwd", "ds", ds.len(), rows * dim)?;
        let d = dim.max(1);
        for ((dsr, sr), dvr) in ds.chunks_mut(d).zip(s.chunks(d)).zip(dv.chunks(d)) {
            let sf: Vec<f64> = sr.iter().map(|x| x.to_f64()).collect();
            let dvf: Vec<f64> = dvr.iter().map(|x| x.to_f64()).collect();
            let mut acc = vec![0.0; dim];
            squash_vec_bwd(&sf, &dvf, &mut acc);
            add_into(dsr, &acc);
        }
        Ok(())
    }

    fn predict_fwd(&self, s: &CapsShape, u: &Vec<T>, w: &Vec<T>, uhat: &mut Vec<T>) -> Result<()> {
        check("predict_fwd", "u", u.len(), s.u_len())?;
        check("predict_fwd", "w", w.len(), s.w_len())?;
        check("predict_fwd", "uhat", uhat.len(), s.uhat_len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        par_rows(uhat, ni * nj * dout, ni * nj * dout * din, |b, out| {
            for i in 0..ni {
                let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
                for jk in 0..nj * dout {
                    let wr = &w[(i * nj * dout + jk) * din..(i * nj * dout + jk + 1) * din];
                    let acc: f64 = wr.iter().zip(ui).map(|(a, x)| a.to_f64() * x.to_f64()).sum();
                    out[i * nj * dout + jk] = T::from_f64(acc);
                }
            }
        });
        Ok(())
    }

    fn predict_bwd_input(&self, s: &CapsShape, duhat: &Vec<T>, w: &Vec<T>, du: &mut Vec<T>) -> Result<()> {
        check("predict_bwd_input", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_input", "w", w.len(), s.w_len())?;
        check("predict_bwd_input", "du", du.len(), s.u_len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        par_rows(du, ni * din, ni * nj * dout * din, |b, dub| {
            let mut acc = vec![0.0; din];
            for i in 0..ni {
                acc.fill(0.0);
                for jk in 0..nj * dout {
                    let g = duhat[(b * ni + i) * nj * dout + jk].to_f64();
                    let wr = &w[(i * nj * dout + jk) * din..(i * nj * dout + jk + 1) * din];
                    for (a, wv) in acc.iter_mut().zip(wr) {
                        *a += g * wv.to_f64();
                    }
                }
                add_into(&mut dub[i * din..(i + 1) * din], &acc);
            }
        });
        Ok(())
    }

    fn predict_bwd_weight(&self, s: &CapsShape, u: &Vec<T>, duhat: &Vec<T>, dw: &mut Vec<T>) -> Result<()> {
        check("predict_bwd_weight", "u", u.len(), s.u_len())?;
        check("predict_bwd_weight", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_weight", "dw", dw.len(), s.w_len())?;
        let (ni, nj, dout, din) = (s.in_caps, s.out_caps, s.out_dim, s.in_dim);
        // one row per primary capsule i: the sum over the batch stays inside one thread
        par_rows(dw, nj * dout * din, s.batch * nj * dout * din, |i, dwi| {
            let mut acc = vec![0.0; nj * dout * din];
            for b in 0..s.batch {
                let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
                for jk in 0..nj * dout {
                    let g = duhat[(b * ni + i) * nj * dout + jk].to_f64();
                    for (a, x) in acc[jk * din..(jk + 1) * din].iter_mut().zip(ui) {
                        *a += g * x.to_f64();
                    }
                }
            }
            add_into(dwi, &acc);
        });
        Ok(())
    }

    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Vec<T>,
        v: &mut Vec<T>,
        saved: &mut RoutingSaved<Vec<T>>,
    ) -> Result<()> {
        const OP: &str = "routing_fwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check(OP, "v", v.len(), s.v_len())?;
        let per_image = par_map(s.batch, rounds * ni * nj * d * 2, |b| {
            let uh: Vec<f64> = uhat[b * ni * nj * d..(b + 1) * ni * nj * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let mut logits = vec![0.0; ni * nj];
            let (mut cs, mut ss, mut vs) = (
                vec![0.0; rounds * ni * nj],
                vec![0.0; rounds * nj * d],
                vec![0.0; rounds * nj * d],
            );
            for r in 0..rounds {
                let c = &mut cs[r * ni * nj..(r + 1) * ni * nj];
                for (cr, lr) in c.chunks_mut(nj).zip(logits.chunks(nj)) {
                    softmax(lr, cr);
                }
                let sr = &mut ss[r * nj * d..(r + 1) * nj * d];
                for i in 0..ni {
                    for j in 0..nj {
                        let cij = c[i * nj + j];
                        let u = &uh[(i * nj + j) * d..(i * nj + j + 1) * d];
                        for (o, x) in sr[j * d..(j + 1) * d].iter_mut().zip(u) {
                            *o += cij * x;
                        }
                    }
                }
                let vr = &mut vs[r * nj * d..(r + 1) * nj * d];
                for j in 0..nj {
                    squash_vec(&sr[j * d..(j + 1) * d], &mut vr[j * d..(j + 1) * d]);
                }
                if r + 1 < rounds {
                    for i in 0..ni {
                        for j in 0..nj {
                            let u = &uh[(i * nj + j) * d..(i * nj + j + 1) * d];
                            logits[i * nj + j] += dot(u, &vr[j * d..(j + 1) * d]);
                        }
                    }
                }
            }
            (cs, ss, vs)
        });
        let store = |dst: &mut [T], src: &[f64]| dst.iter_mut().zip(src).for_each(|(o, x)| *o = T::from_f64(*x));
        for (b, (cs, ss, vs)) in per_image.iter().enumerate() {
            store(&mut saved.c[b * rounds * ni * nj..(b + 1) * rounds * ni * nj], cs);
            store(&mut saved.s[b * rounds * nj * d..(b + 1) * rounds * nj * d], ss);
            store(&mut saved.v[b * rounds * nj * d..(b + 1) * rounds * nj * d], vs);
            store(&mut v[b * nj * d..(b + 1) * nj * d], &vs[(rounds - 1) * nj * d..]);
        }
        Ok(())
    }

    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Vec<T>,
        saved: &RoutingSaved<Vec<T>>,
        dv: &Vec<T>,
        duhat: &mut Vec<T>,
    ) -> Result<()> {
        const OP: &str = "routing_bwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check(OP, "dv", dv.len(), s.v_len())?;
        check(OP, "duhat", duhat.len(), s.uhat_len())?;
        par_rows(duhat, ni * nj * d, rounds * ni * nj * d * 4, |b, dub| {
            let uh: Vec<f64> = uhat[b * ni * nj * d..(b + 1) * ni * nj * d]
                .iter()
                .map(|x| x.to_f64())
                .collect();
            let cs = &saved.c[b * rounds * ni * nj..(b + 1) * rounds * ni * nj];
            let ss = &saved.s[b * rounds * nj * d..(b + 1) * rounds * nj * d];
            let vs = &saved.v[b * rounds * nj * d..(b + 1) * rounds * nj * d];
            let mut duh = vec![0.0; ni * nj * d];
            // gradient with respect to the logits b_{r+1} entering the round after this one
            let mut db_next = vec![0.0; ni * nj];
            let mut dvr = vec![0.0; nj * d];
            let mut ds = vec![0.0; nj * d];
            let mut dc = vec![0.0; ni * nj];
            for r in (0..rounds).rev() {
                let c: Vec<f64> = cs[r * ni * nj..(r + 1) * ni * nj].iter().map(|x| x.to_f64()).collect();
                let sr: Vec<f64> = ss[r * nj * d..(r + 1) * nj * d].iter().map(|x| x.to_f64()).collect();
                let vr: Vec<f64> = vs[r * nj * d..(r + 1) * nj * d].iter().map(|x| x.to_f64()).collect();
                if r + 1 == rounds {
                    // only the last round's v is the op's output
                    dvr.iter_mut()
                        .zip(&dv[b * nj * d..(b + 1) * nj * d])
                        .for_each(|(o, x)| *o = x.to_f64());
                } else {
                    // b_{r+1} = b_r + û·v_r: v_r and û receive db_{r+1}
                    dvr.fill(0.0);
                    for i in 0..ni {
                        for j in 0..nj {
                            let g = db_next[i * nj + j];
                            let k = (i * nj + j) * d;
                            for t in 0..d {
                                dvr[j * d + t] += g * uh[k + t];
                                duh[k + t] += g * vr[j * d + t];
                            }
                        }
                    }
                }
                ds.fill(0.0);
                for j in 0..nj {
                    squash_vec_bwd(
                        &sr[j * d..(j + 1) * d],
                        &dvr[j * d..(j + 1) * d],
                        &mut ds[j * d..(j + 1) * d],
                    );
                }
                // s_j = Σ_i c_ij û_{j|i}
                for i in 0..ni {
                    for j in 0..nj {
                        let k = (i * nj + j) * d;
                        let dsj = &ds[j * d..(j + 1) * d];
                        for t in 0..d {
                            duh[k + t] += c[i * nj + j] * dsj[t];
                        }
                        dc[i * nj + j] = dot(&uh[k..k + d], dsj);
                    }
                }
                // c_i = softmax(b_i): db_ij = c_ij (dc_ij − Σ_j' c_ij' dc_ij'); b_r also flows on to b_{r+1}
                for i in 0..ni {
                    let ci = &c[i * nj..(i + 1) * nj];
                    let dci = &dc[i * nj..(i + 1) * nj];
                    let m = dot(ci, dci);
                    for j in 0..nj {
                        db_next[i * nj + j] += ci[j] * (dci[j] - m);
                    }
                }
            }
            add_into(dub, &duh);
        });
        Ok(())
    }

    fn lengths_fwd(&self, rows: usize, dim: usize, v: &Vec<T>, l: &mut Vec<T>) -> Result<()> {
        check("lengths_fwd", "v", v.len(), rows * dim)?;
        check("lengths_fwd", "l", l.len(), rows)?;
        for (o, vr) in l.iter_mut().zip(v.chunks(dim.max(1))) {
            let n2: f64 = vr.iter().map(|x| x.to_f64() * x.to_f64()).sum();
            *o = T::from_f64((n2 + NORM_EPS).sqrt());
        }
        Ok(())
    }

    fn lengths_bwd(&self, rows: usize, dim: usize, v: &Vec<T>, l: &Vec<T>, dl: &Vec<T>, dv: &mut Vec<T>) -> Result<()> {
        check("lengths_bwd", "v", v.len(), rows * dim)?;
        check("lengths_bwd", "l", l.len(), rows)?;
        check("lengths_bwd", "dl", dl.len(), rows)?;
        check("lengths_bwd", "dv", dv.len(), rows * dim)?;
        for (r, dvr) in dv.chunks_mut(dim.max(1)).enumerate() {
            let k = dl[r].to_f64() / l[r].to_f64();
            for (o, x) in dvr.iter_mut().zip(&v[r * dim..(r + 1) * dim]) {
                *o = T::from_f64(o.to_f64() + k * x.to_f64());
            }
        }
        Ok(())
    }

    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &Vec<T>,
        idx: &Vec<u32>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        host::mask_fwd(batch, caps, dim, v, idx, out)
    }
    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &Vec<T>,
        idx: &Vec<u32>,
        dv: &mut Vec<T>,
    ) -> Result<()> {
        host::mask_bwd(batch, caps, dim, dout, idx, dv)
    }
    fn argmax(&self, rows: usize, cols: usize, x: &Vec<T>, idx: &mut Vec<u32>) -> Result<()> {
        host::argmax(rows, cols, x, idx)
    }

    // ---- losses ---------------------------------------------------------------------------------

    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Vec<T>,
        labels: &Vec<u32>,
        loss: &mut Vec<T>,
    ) -> Result<()> {
        host::margin_loss_fwd(batch, classes, per, l, labels, loss)
    }
    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Vec<T>,
        labels: &Vec<u32>,
        dloss: &Vec<T>,
        dl: &mut Vec<T>,
    ) -> Result<()> {
        host::margin_loss_bwd(batch, classes, per, l, labels, dloss, dl)
    }
    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Vec<T>,
        target: &Vec<T>,
        scale: f64,
        loss: &mut Vec<T>,
    ) -> Result<()> {
        host::sq_err_fwd(rows, cols, pred, target, scale, loss)
    }
    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Vec<T>,
        target: &Vec<T>,
        scale: f64,
        dloss: &Vec<T>,
        dpred: &mut Vec<T>,
    ) -> Result<()> {
        host::sq_err_bwd(rows, cols, pred, target, scale, dloss, dpred)
    }

    // ---- optimiser ------------------------------------------------------------------------------

    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::msg("adam_step: step numbers start at 1"));
        }
        let bc1 = 1.0 - hp.beta1.powf(hp.step as f64);
        let bc2 = 1.0 - hp.beta2.powf(hp.step as f64);
        for (n, g) in groups.iter_mut().enumerate() {
            let len = g.param.len();
            check_adam_group(n, len, g.grad.len(), g.m.len(), g.v.len())?;
            for k in 0..len {
                let gr = g.grad[k].to_f64();
                let m = hp.beta1 * g.m[k].to_f64() + (1.0 - hp.beta1) * gr;
                let v = hp.beta2 * g.v[k].to_f64() + (1.0 - hp.beta2) * gr * gr;
                let p = g.param[k].to_f64() - hp.lr * (m / bc1) / ((v / bc2).sqrt() + hp.eps);
                g.m[k] = T::from_f64(m);
                g.v[k] = T::from_f64(v);
                g.param[k] = T::from_f64(p);
            }
        }
        Ok(())
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(x: &[f64], out: &mut [f64]) {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut z = 0.0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        z += *o;
    }
    out.iter_mut().for_each(|o| *o /= z);
}
