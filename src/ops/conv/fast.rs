//! Convolutions on the fast CPU backend.

use crate::Result;
use crate::backend::fast::{FastCpu, PoolBuf, images_per_chunk};
use crate::backend::linalg::gemm;

use super::im2col::{col2im_add, im2col};
use super::{ConvOps, ConvShape, check_conv2d_bwd_input, check_conv2d_bwd_weight, check_conv2d_fwd};
use crate::ops::dense::Act;
use crate::ops::dense::fast::affine;

impl ConvOps for FastCpu {
    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<()> {
        check_conv2d_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                let ys = &mut y[b0 * npix * co..(b0 + nb) * npix * co];
                affine(nb * npix, kd, co, col, w, b, ys, act);
            }
        })
    }

    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &PoolBuf, w: &PoolBuf, dx: &mut PoolBuf) -> Result<()> {
        check_conv2d_bwd_input(s, dz.len(), w.len(), dx.len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let img = s.in_h * s.in_w * s.in_c;
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |dcol| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                let dcol = &mut dcol[..nb * npix * kd];
                // dcol = dz · Wᵀ, with W [kd, co] read transposed through its strides
                let dzc = &dz[b0 * npix * co..(b0 + nb) * npix * co];
                gemm(nb * npix, co, kd, dzc, (co, 1), w, (1, co), dcol, 0.0);
                col2im_add(s, dcol, &mut dx[b0 * img..(b0 + nb) * img]);
            }
        })
    }

    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &PoolBuf, dz: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        check_conv2d_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                // dW += colᵀ · dz, with col [rows, kd] read transposed through its strides
                let dzc = &dz[b0 * npix * co..(b0 + nb) * npix * co];
                gemm(
                    kd,
                    nb * npix,
                    co,
                    &col[..nb * npix * kd],
                    (1, kd),
                    dzc,
                    (co, 1),
                    dw,
                    1.0,
                );
            }
        })
    }
}
