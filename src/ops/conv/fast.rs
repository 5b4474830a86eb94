//! Convolutions on the fast CPU backend.

use crate::Result;
use crate::backend::fast::{FastCpu, PoolBuf, images_per_chunk};
use crate::backend::linalg::{CpuGemm, cpu_gemm, gemm};

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
        // gemm's AVX-512 kernels write a row-major [co, kd] result at 1.6x the rate they write dW's
        // [kd, co] (docs/BENCHMARKS.md): on them, dWᵀ = dzᵀ · col into a pooled buffer, added to dW
        // transposed once at the end; matrixmultiply writes dW directly
        let mut dwt = match cpu_gemm() {
            CpuGemm::Avx512 => Some(self.take(co * kd, |_| {})?),
            CpuGemm::Avx2 => None,
        };
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                let (col, dzc) = (&col[..nb * npix * kd], &dz[b0 * npix * co..(b0 + nb) * npix * co]);
                match dwt.as_mut() {
                    // dWᵀ (=, then +=) dzᵀ · col, with dz [rows, co] read transposed through its strides
                    Some(dwt) => {
                        let beta = if b0 == 0 { 0.0 } else { 1.0 };
                        gemm(co, nb * npix, kd, dzc, (1, co), col, (kd, 1), dwt, beta);
                    }
                    // dW += colᵀ · dz, with col [rows, kd] read transposed through its strides
                    None => gemm(kd, nb * npix, co, col, (1, kd), dzc, (co, 1), dw, 1.0),
                }
            }
        })?;
        if let Some(dwt) = dwt {
            add_transposed(&dwt, co, kd, dw);
        }
        Ok(())
    }
}

/// `out` [cols, rows] += `a` [rows, cols]ᵀ, in square tiles so that both sides stay in cache, the
/// rows of `out` split over the threads.
fn add_transposed(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    debug_assert_eq!(a.len(), rows * cols);
    debug_assert_eq!(out.len(), rows * cols);
    crate::par::par_blocks(out, rows, rows, |first, block| {
        let n = block.len() / rows.max(1);
        for c0 in (0..n).step_by(TILE) {
            let c1 = (c0 + TILE).min(n);
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for c in c0..c1 {
                    let o = &mut block[c * rows..(c + 1) * rows];
                    for r in r0..r1 {
                        o[r] += a[r * cols + first + c];
                    }
                }
            }
        }
    });
}
