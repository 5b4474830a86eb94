//! The losses on the fast CPU backend.

use crate::Result;
use crate::backend::fast::{FastCpu, PoolBuf};

use super::host;

use super::LossOps;

impl LossOps for FastCpu {
    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &PoolBuf,
        labels: &Vec<u32>,
        loss: &mut PoolBuf,
    ) -> Result<()> {
        host::margin_loss_fwd(batch, classes, per, l, labels, loss)
    }

    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &PoolBuf,
        labels: &Vec<u32>,
        dloss: &PoolBuf,
        dl: &mut PoolBuf,
    ) -> Result<()> {
        host::margin_loss_bwd(batch, classes, per, l, labels, dloss, dl)
    }

    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &PoolBuf,
        target: &PoolBuf,
        scale: f64,
        loss: &mut PoolBuf,
    ) -> Result<()> {
        host::sq_err_fwd(rows, cols, pred, target, scale, loss)
    }

    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &PoolBuf,
        target: &PoolBuf,
        scale: f64,
        dloss: &PoolBuf,
        dpred: &mut PoolBuf,
    ) -> Result<()> {
        host::sq_err_bwd(rows, cols, pred, target, scale, dloss, dpred)
    }
}
