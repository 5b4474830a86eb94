//! The losses on the GPU: the launches of its kernels.

use cudarc::driver::PushKernelArg;

use crate::Result;
use crate::cuda::launch::{de, flat, launch, single};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg};
use crate::cuda::{CudaBackend, CudaBuf, CudaIdx};

use super::LossOps;
use super::{check_margin_loss_bwd, check_margin_loss_fwd, check_sq_err_bwd, check_sq_err_fwd};

impl LossOps for CudaBackend {
    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &CudaBuf,
        labels: &CudaIdx,
        loss: &mut CudaBuf,
    ) -> Result<()> {
        check_margin_loss_fwd(batch, classes, per, l.len(), labels.len(), loss.len())?;
        let (b, c, k) = (batch as i32, classes as i32, per as i32);
        // SAFETY: margin_loss_fwd(l, labels [batch, per], loss [1], int batch, int classes, int per),
        // one block of 256 threads; lengths checked above.
        launch!(
            self,
            reg::MARGIN_LOSS_FWD,
            single(reg::MARGIN_LOSS_FWD_THREADS),
            [l.slice(), labels.slice(), loss.slice_mut(), &b, &c, &k]
        )
    }

    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &CudaBuf,
        labels: &CudaIdx,
        dloss: &CudaBuf,
        dl: &mut CudaBuf,
    ) -> Result<()> {
        check_margin_loss_bwd(batch, classes, per, l.len(), labels.len(), dloss.len(), dl.len())?;
        i32_of("margin_loss_bwd: batch x classes", batch * classes)?;
        let (b, c, k) = (batch as i32, classes as i32, per as i32);
        // SAFETY: margin_loss_bwd(l, labels [batch, per], dloss [1], dl, int batch, int classes, int per);
        // lengths checked above.
        launch!(
            self,
            reg::MARGIN_LOSS_BWD,
            flat(batch * classes),
            [l.slice(), labels.slice(), dloss.slice(), dl.slice_mut(), &b, &c, &k]
        )
    }

    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &CudaBuf,
        target: &CudaBuf,
        scale: f64,
        loss: &mut CudaBuf,
    ) -> Result<()> {
        check_sq_err_fwd(rows, cols, pred.len(), target.len(), loss.len())?;
        let (r, c, sc) = (rows as i32, cols as i32, scale as f32);
        // SAFETY: sq_err_fwd_f32(pred, target, loss [1], int rows, int cols, float scale), one block of 1024.
        launch!(
            self,
            reg::SQ_ERR_FWD,
            single(reg::SQ_ERR_FWD_THREADS),
            [pred.slice(), target.slice(), loss.slice_mut(), &r, &c, &sc]
        )
    }

    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &CudaBuf,
        target: &CudaBuf,
        scale: f64,
        dloss: &CudaBuf,
        dpred: &mut CudaBuf,
    ) -> Result<()> {
        check_sq_err_bwd(rows, cols, pred.len(), target.len(), dloss.len(), dpred.len())?;
        let (r, c, sc) = (rows as i32, cols as i32, scale as f32);
        // SAFETY: sq_err_bwd_f32(pred, target, dloss [1], dpred, int rows, int cols, float scale).
        launch!(
            self,
            reg::SQ_ERR_BWD,
            flat(rows * cols),
            [
                pred.slice(),
                target.slice(),
                dloss.slice(),
                dpred.slice_mut(),
                &r,
                &c,
                &sc
            ]
        )
    }
}
