//! Capsule ops on the GPU: the launches of its kernels.

use cudarc::driver::{DeviceRepr, PushKernelArg};

use crate::Result;
use crate::cuda::launch::{de, flat, launch};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg};
use crate::cuda::{CudaBackend, CudaBuf, CudaIdx};

use super::{
    CapsShape, CapsuleOps, check_argmax, check_lengths_bwd, check_lengths_fwd, check_mask_bwd, check_mask_fwd,
    check_predict_bwd_input, check_predict_bwd_weight, check_predict_fwd, check_squash_bwd, check_squash_fwd,
};

/// kernels/common.cuh's CapsParams, field by field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CapsParams {
    pub batch: i32,
    pub in_caps: i32,
    pub in_dim: i32,
    pub out_caps: i32,
    pub out_dim: i32,
}
// SAFETY: five i32 fields, as the C struct CapsParams.
unsafe impl DeviceRepr for CapsParams {}

impl CapsParams {
    pub(crate) fn new(s: &CapsShape) -> crate::Result<Self> {
        i32_of("capsule pairs", s.in_caps * s.out_caps * s.out_dim.max(s.in_dim))?;
        // the capsule kernels index û, u and W with 32-bit element indices
        i32_of("elements of û", s.uhat_len().max(s.u_len()).max(s.w_len()))?;
        Ok(CapsParams {
            batch: i32_of("batch", s.batch)?,
            in_caps: s.in_caps as i32,
            in_dim: s.in_dim as i32,
            out_caps: s.out_caps as i32,
            out_dim: s.out_dim as i32,
        })
    }
}

impl CapsuleOps for CudaBackend {
    fn squash_fwd(&self, rows: usize, dim: usize, s: &CudaBuf, v: &mut CudaBuf) -> Result<()> {
        check_squash_fwd(rows, dim, s.len(), v.len())?;
        let (r, d) = (i32_of("squash_fwd: rows", rows)?, dim as i32);
        // SAFETY: squash_fwd(s, v, int rows, int dim); both hold rows·dim floats.
        launch!(self, reg::SQUASH_FWD, flat(rows), [s.slice(), v.slice_mut(), &r, &d])
    }

    fn squash_bwd(&self, rows: usize, dim: usize, s: &CudaBuf, dv: &CudaBuf, ds: &mut CudaBuf) -> Result<()> {
        check_squash_bwd(rows, dim, s.len(), dv.len(), ds.len())?;
        let (r, d) = (i32_of("squash_bwd: rows", rows)?, dim as i32);
        // SAFETY: squash_bwd(s, dv, ds, int rows, int dim); all hold rows·dim floats.
        launch!(
            self,
            reg::SQUASH_BWD,
            flat(rows),
            [s.slice(), dv.slice(), ds.slice_mut(), &r, &d]
        )
    }

    fn predict_fwd(&self, s: &CapsShape, u: &CudaBuf, w: &CudaBuf, uhat: &mut CudaBuf) -> Result<()> {
        check_predict_fwd(s, u.len(), w.len(), uhat.len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_fwd(u, w, uhat, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_FWD,
            flat(s.uhat_len()),
            [u.slice(), w.slice(), uhat.slice_mut(), &p]
        )
    }

    fn predict_bwd_input(&self, s: &CapsShape, duhat: &CudaBuf, w: &CudaBuf, du: &mut CudaBuf) -> Result<()> {
        check_predict_bwd_input(s, duhat.len(), w.len(), du.len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_bwd_input(duhat, w, du, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_BWD_INPUT,
            flat(s.u_len()),
            [duhat.slice(), w.slice(), du.slice_mut(), &p]
        )
    }

    fn predict_bwd_weight(&self, s: &CapsShape, u: &CudaBuf, duhat: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        check_predict_bwd_weight(s, u.len(), duhat.len(), dw.len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_bwd_weight(u, duhat, dw, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_BWD_WEIGHT,
            flat(s.w_len()),
            [u.slice(), duhat.slice(), dw.slice_mut(), &p]
        )
    }

    fn lengths_fwd(&self, rows: usize, dim: usize, v: &CudaBuf, l: &mut CudaBuf) -> Result<()> {
        check_lengths_fwd(rows, dim, v.len(), l.len())?;
        let (r, d) = (i32_of("lengths_fwd: rows", rows)?, dim as i32);
        // SAFETY: lengths_fwd(v [rows, dim], l [rows], int rows, int dim).
        launch!(self, reg::LENGTHS_FWD, flat(rows), [v.slice(), l.slice_mut(), &r, &d])
    }

    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &CudaBuf,
        l: &CudaBuf,
        dl: &CudaBuf,
        dv: &mut CudaBuf,
    ) -> Result<()> {
        check_lengths_bwd(rows, dim, v.len(), l.len(), dl.len(), dv.len())?;
        i32_of("lengths_bwd: rows x dim", rows * dim)?;
        let (r, d) = (rows as i32, dim as i32);
        // SAFETY: lengths_bwd(v, l, dl, dv, int rows, int dim); lengths checked above.
        launch!(
            self,
            reg::LENGTHS_BWD,
            flat(rows * dim),
            [v.slice(), l.slice(), dl.slice(), dv.slice_mut(), &r, &d]
        )
    }

    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &CudaBuf,
        idx: &CudaIdx,
        out: &mut CudaBuf,
    ) -> Result<()> {
        check_mask_fwd(batch, caps, dim, v.len(), idx.len(), out.len())?;
        i32_of("mask_fwd: batch x capsules x dim", batch * caps * dim)?;
        let (b, c, d) = (batch as i32, caps as i32, dim as i32);
        // SAFETY: mask_fwd(v, idx, out, int batch, int caps, int dim); an index ≥ caps matches no
        // capsule, so it zeroes the row instead of reading out of bounds.
        launch!(
            self,
            reg::MASK_FWD,
            flat(batch * caps * dim),
            [v.slice(), idx.slice(), out.slice_mut(), &b, &c, &d]
        )
    }

    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &CudaBuf,
        idx: &CudaIdx,
        dv: &mut CudaBuf,
    ) -> Result<()> {
        check_mask_bwd(batch, caps, dim, dout.len(), idx.len(), dv.len())?;
        i32_of("mask_bwd: batch x capsules x dim", batch * caps * dim)?;
        let (b, c, d) = (batch as i32, caps as i32, dim as i32);
        // SAFETY: mask_bwd(dout, idx, dv, int batch, int caps, int dim); lengths checked above.
        launch!(
            self,
            reg::MASK_BWD,
            flat(batch * caps * dim),
            [dout.slice(), idx.slice(), dv.slice_mut(), &b, &c, &d]
        )
    }

    fn argmax(&self, rows: usize, cols: usize, x: &CudaBuf, idx: &mut CudaIdx) -> Result<()> {
        check_argmax(rows, cols, x.len(), idx.len())?;
        let (r, c) = (i32_of("argmax: rows", rows)?, cols as i32);
        // SAFETY: argmax_f32(x [rows, cols], idx [rows], int rows, int cols).
        launch!(self, reg::ARGMAX, flat(rows), [x.slice(), idx.slice_mut(), &r, &c])
    }
}
