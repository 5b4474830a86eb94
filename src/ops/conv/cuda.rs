//! Convolutions on the GPU: the launches of its kernels.

use cudarc::driver::{DeviceRepr, PushKernelArg};

use crate::cuda::launch::{de, flat, gemm_grid, launch, launch_gemm};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg};
use crate::cuda::{CudaBackend, CudaBuf};
use crate::{Error, Result};

use super::{ConvOps, ConvShape, check_conv2d_bwd_input, check_conv2d_bwd_weight, check_conv2d_fwd};
use crate::ops::dense::Act;

/// kernels/common.cuh's ConvParams, field by field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvParams {
    pub batch: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub in_c: i32,
    pub out_c: i32,
    pub k: i32,
    pub stride: i32,
    pub out_h: i32,
    pub out_w: i32,
}
// SAFETY: plain old data of i32 fields, laid out as the C struct ConvParams.
unsafe impl DeviceRepr for ConvParams {}

impl ConvParams {
    pub(crate) fn new(s: &ConvShape) -> crate::Result<Self> {
        // every flat index the kernels form in 32 bits stays below these products
        i32_of("conv input elements", s.x_len())?;
        i32_of("conv output elements", s.y_len())?;
        i32_of("conv GEMM K", s.patch_len().max(s.k * s.k * s.out_c))?;
        Ok(ConvParams {
            batch: i32_of("batch", s.batch)?,
            in_h: s.in_h as i32,
            in_w: s.in_w as i32,
            in_c: s.in_c as i32,
            out_c: s.out_c as i32,
            k: s.k as i32,
            stride: s.stride as i32,
            out_h: s.out_h() as i32,
            out_w: s.out_w() as i32,
        })
    }
}

impl ConvOps for CudaBackend {
    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        y: &mut CudaBuf,
        act: Act,
    ) -> Result<()> {
        check_conv2d_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        let p = ConvParams::new(s)?;
        let a = act as i32;
        let k = self.version(reg::CONV2D_FWD)[0];
        // SAFETY: conv2d_fwd_*(x, w, bias, y, ConvParams, int act): lengths checked against p above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows(), s.out_c)?,
            [x.slice(), w.slice(), b.slice(), y.slice_mut(), &p, &a]
        )
    }

    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &CudaBuf, w: &CudaBuf, dx: &mut CudaBuf) -> Result<()> {
        const OP: &str = "conv2d_bwd_input";
        check_conv2d_bwd_input(s, dz.len(), w.len(), dx.len())?;
        let p = ConvParams::new(s)?;
        let ks = self.version(reg::CONV2D_BWD_INPUT);
        if let [k] = ks {
            let grid = gemm_grid(*k, s.batch * s.in_h * s.in_w, s.in_c)?;
            // SAFETY: conv2d_bwd_input_v1(dz, w, dx, ConvParams): lengths checked against p above.
            return launch_gemm!(self, *k, grid, [dz.slice(), w.slice(), dx.slice_mut(), &p]);
        }
        let [gemm, col2im] = ks else {
            unreachable!("conv2d_bwd_input versions launch one kernel or a GEMM and col2im")
        };
        // cols [images·OH·OW, K·K·Cin] for as many images at a time as COLS_CHUNK_FLOATS allows
        let per_image = s.out_h() * s.out_w() * s.patch_len();
        if per_image == 0 || s.batch == 0 {
            return Ok(());
        }
        let chunk = (reg::COLS_CHUNK_FLOATS / per_image).clamp(1, s.batch);
        if chunk * per_image > i32::MAX as usize || chunk * s.in_h * s.in_w * s.in_c > i32::MAX as usize {
            return Err(Error::msg(format!(
                "{OP}: one image of {}x{}x{} needs {per_image} floats of cols, more than 32-bit indices reach",
                s.in_h, s.in_w, s.in_c
            )));
        }
        let mut cols = self.take::<f32>(chunk * per_image)?;
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            let (b0i, nbi) = (b0 as i32, nb as i32);
            let grid = gemm_grid(*gemm, nb * s.out_h() * s.out_w(), s.patch_len())?;
            // SAFETY: conv2d_bwd_cols_v2(dz, w, cols, ConvParams, b0, nb) writes nb·OH·OW·K·K·Cin ≤
            // cols.len() floats and reads images b0..b0+nb < batch of dz; lengths checked above.
            launch_gemm!(
                self,
                *gemm,
                grid,
                [dz.slice(), w.slice(), cols.slice_mut(), &p, &b0i, &nbi]
            )?;
            // SAFETY: col2im_add_v2(cols, dx, ConvParams, b0, nb) reads what the GEMM wrote and adds
            // to images b0..b0+nb of dx, one thread per element.
            launch!(
                self,
                *col2im,
                flat(nb * s.in_h * s.in_w * s.in_c),
                [cols.slice(), dx.slice_mut(), &p, &b0i, &nbi]
            )?;
        }
        Ok(())
    }

    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &CudaBuf, dz: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        check_conv2d_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        let p = ConvParams::new(s)?;
        let ks = self.version(reg::CONV2D_BWD_WEIGHT);
        let (m, n, depth) = (s.patch_len(), s.out_c, s.rows());
        if let [k] = ks {
            // SAFETY: conv2d_bwd_weight_v1(x, dz, dw, ConvParams): lengths checked against p above.
            return launch_gemm!(
                self,
                *k,
                gemm_grid(*k, m, n)?,
                [x.slice(), dz.slice(), dw.slice_mut(), &p]
            );
        }
        let Some((cfg, split, mut ws)) = self.splitk_plan(ks[0], m, n, depth)? else {
            return Ok(());
        };
        // SAFETY: conv2d_bwd_weight_{tf32,bf16}(x, dz, dw, ws, ConvParams) over `split` slices of K: dw
        // gets the sum (split 1) or slice z writes m·n partial sums to ws[z] (ws holds split·m·n).
        launch!(
            self,
            ks[0],
            cfg,
            [x.slice(), dz.slice(), dw.slice_mut(), ws.slice_mut(), &p]
        )?;
        self.splitk_reduce(ks, &ws, dw, m * n, split)
    }
}
