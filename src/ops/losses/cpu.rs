//! The losses on the CPU reference backend (f64 sums).

use crate::Result;
use crate::backend::cpu::CpuBackend;
use crate::float::Float;

use super::host;

use super::LossOps;

impl<T: Float> LossOps for CpuBackend<T> {
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
}
