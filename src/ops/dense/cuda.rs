//! Dense layers, biases and activations on the GPU: the launches of its kernels.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::Result;
use crate::cuda::launch::{de, flat, gemm_grid, launch, launch_gemm};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg};
use crate::cuda::{CudaBackend, CudaBuf};

use super::{
    Act, DenseOps, DenseShape, check_act_bwd, check_bias_bwd, check_dense_bwd_input, check_dense_bwd_weight,
    check_dense_fwd,
};

/// kernels/common.cuh's DenseParams, field by field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DenseParams {
    pub rows: i32,
    pub inp: i32,
    pub out: i32,
}
// SAFETY: three i32 fields, as the C struct DenseParams.
unsafe impl DeviceRepr for DenseParams {}

impl DenseParams {
    pub(crate) fn new(s: &DenseShape) -> crate::Result<Self> {
        i32_of("dense elements", s.rows * s.inp.max(s.out))?;
        Ok(DenseParams {
            rows: s.rows as i32,
            inp: s.inp as i32,
            out: s.out as i32,
        })
    }
}

impl DenseOps for CudaBackend {
    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        y: &mut CudaBuf,
        act: Act,
    ) -> Result<()> {
        check_dense_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        let (p, a) = (DenseParams::new(s)?, act as i32);
        let k = self.version(reg::DENSE_FWD)[0];
        // SAFETY: dense_fwd_*(x, w, bias, y, DenseParams, int act): lengths checked above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows, s.out)?,
            [x.slice(), w.slice(), b.slice(), y.slice_mut(), &p, &a]
        )
    }

    fn dense_bwd_input(&self, s: &DenseShape, dz: &CudaBuf, w: &CudaBuf, dx: &mut CudaBuf) -> Result<()> {
        check_dense_bwd_input(s, dz.len(), w.len(), dx.len())?;
        let p = DenseParams::new(s)?;
        let k = self.version(reg::DENSE_BWD_INPUT)[0];
        // SAFETY: dense_bwd_input_*(dz, w, dx, DenseParams): lengths checked above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows, s.inp)?,
            [dz.slice(), w.slice(), dx.slice_mut(), &p]
        )
    }

    fn dense_bwd_weight(&self, s: &DenseShape, x: &CudaBuf, dz: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        check_dense_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        let p = DenseParams::new(s)?;
        let ks = self.version(reg::DENSE_BWD_WEIGHT);
        if let [k] = ks {
            // SAFETY: dense_bwd_weight_v1(x, dz, dw, DenseParams): lengths checked above.
            return launch_gemm!(
                self,
                *k,
                gemm_grid(*k, s.inp, s.out)?,
                [x.slice(), dz.slice(), dw.slice_mut(), &p]
            );
        }
        let Some((cfg, split, mut ws)) = self.splitk_plan(ks[0], s.inp, s.out, s.rows)? else {
            return Ok(());
        };
        // SAFETY: dense_bwd_weight_{tf32,bf16}(x, dz, dw, ws, DenseParams), as conv2d_bwd_weight's.
        launch!(
            self,
            ks[0],
            cfg,
            [x.slice(), dz.slice(), dw.slice_mut(), ws.slice_mut(), &p]
        )?;
        self.splitk_reduce(ks, &ws, dw, s.inp * s.out, split)
    }

    fn bias_bwd(&self, rows: usize, cols: usize, dz: &CudaBuf, db: &mut CudaBuf) -> Result<()> {
        check_bias_bwd(rows, cols, dz.len(), db.len())?;
        if cols == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i32, cols as i32);
        let cfg = LaunchConfig {
            grid_dim: (cols as u32, 1, 1),
            block_dim: (reg::BIAS_BWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bias_bwd_f32(dz [rows, cols], db [cols], int rows, int cols), one block per column.
        launch!(self, reg::BIAS_BWD, cfg, [dz.slice(), db.slice_mut(), &r, &c])
    }

    fn act_bwd(&self, act: Act, y: &CudaBuf, dy: &CudaBuf, dz: &mut CudaBuf) -> Result<()> {
        let n = y.len();
        check_act_bwd(n, dy.len(), dz.len())?;
        if n == 0 {
            return Ok(());
        }
        let a = act as i32;
        // SAFETY: act_bwd_f32(y, dy, dz, int act, size_t n); all hold n floats.
        launch!(
            self,
            reg::ACT_BWD,
            flat(n),
            [y.slice(), dy.slice(), dz.slice_mut(), &a, &n]
        )
    }
}
