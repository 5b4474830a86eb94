//! Convolutions on the CPU reference backend (f64 sums).

use crate::Result;
use crate::backend::cpu::{CpuBackend, add_into};
use crate::backend::linalg::gemm;
use crate::float::Float;

use super::im2col::{col2im_add, im2col};
use super::{ConvOps, ConvShape, check_conv2d_bwd_input, check_conv2d_bwd_weight, check_conv2d_fwd};
use crate::ops::dense::Act;
use crate::ops::dense::cpu::act_fwd;

/// Largest im2col chunk, in f64 elements (32 MiB).
const CHUNK_ELEMS: usize = 1 << 22;

impl<T: Float> CpuBackend<T> {
    pub(crate) fn images_per_chunk(row_elems: usize) -> usize {
        (CHUNK_ELEMS / row_elems.max(1)).max(1)
    }

    /// Patch matrix of images b0..b0+nb, in f64.
    pub(crate) fn im2col(s: &ConvShape, x: &[T], b0: usize, nb: usize) -> Vec<f64> {
        let mut col = vec![0.0; nb * s.out_h() * s.out_w() * s.patch_len()];
        im2col(s, x, b0, nb, &mut col, T::to_f64);
        col
    }
}

impl<T: Float> ConvOps for CpuBackend<T> {
    fn conv2d_fwd(&self, s: &ConvShape, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, y: &mut Vec<T>, act: Act) -> Result<()> {
        check_conv2d_fwd(s, x.len(), w.len(), b.len(), y.len())?;
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
        check_conv2d_bwd_input(s, dz.len(), w.len(), dx.len())?;
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
        check_conv2d_bwd_weight(s, x.len(), dz.len(), dw.len())?;
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
}
