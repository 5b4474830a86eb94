//! The losses, which both CPU backends run the same way on host slices of any [`Float`] (a few
//! thousand terms per batch, summed in f64).

use super::{
    LAMBDA, M_MINUS, M_PLUS, check_margin_loss_bwd, check_margin_loss_fwd, check_sq_err_bwd, check_sq_err_fwd,
};
use crate::Result;
use crate::backend::class_index;
use crate::float::Float;

/// Whether class k is one of an image's `per` labels, each checked to be a class.
fn present_classes(op: &str, labels: &[u32], classes: usize) -> Result<Vec<bool>> {
    let mut t = vec![false; classes];
    for &y in labels {
        t[class_index(op, y, classes)?] = true;
    }
    Ok(t)
}

/// [`super::LossOps::margin_loss_fwd`] on host slices.
pub(crate) fn margin_loss_fwd<T: Float>(
    batch: usize,
    classes: usize,
    per: usize,
    l: &[T],
    labels: &[u32],
    loss: &mut [T],
) -> Result<()> {
    check_margin_loss_fwd(batch, classes, per, l.len(), labels.len(), loss.len())?;
    let mut total = 0.0;
    for (b, ys) in labels.chunks(per).enumerate() {
        let present = present_classes("margin_loss_fwd", ys, classes)?;
        for (k, &t) in present.iter().enumerate() {
            let len = l[b * classes + k].to_f64();
            total += if t {
                (M_PLUS - len).max(0.0).powi(2)
            } else {
                LAMBDA * (len - M_MINUS).max(0.0).powi(2)
            };
        }
    }
    loss[0] = T::from_f64(total / batch.max(1) as f64);
    Ok(())
}

/// [`super::LossOps::margin_loss_bwd`] on host slices.
pub(crate) fn margin_loss_bwd<T: Float>(
    batch: usize,
    classes: usize,
    per: usize,
    l: &[T],
    labels: &[u32],
    dloss: &[T],
    dl: &mut [T],
) -> Result<()> {
    check_margin_loss_bwd(batch, classes, per, l.len(), labels.len(), dloss.len(), dl.len())?;
    let g = dloss[0].to_f64() / batch.max(1) as f64;
    for (b, ys) in labels.chunks(per).enumerate() {
        let present = present_classes("margin_loss_bwd", ys, classes)?;
        for (k, &t) in present.iter().enumerate() {
            let len = l[b * classes + k].to_f64();
            let d = if t {
                -2.0 * (M_PLUS - len).max(0.0)
            } else {
                2.0 * LAMBDA * (len - M_MINUS).max(0.0)
            };
            let o = &mut dl[b * classes + k];
            *o = T::from_f64(o.to_f64() + g * d);
        }
    }
    Ok(())
}

/// [`super::LossOps::sq_err_fwd`] on host slices.
pub(crate) fn sq_err_fwd<T: Float>(
    rows: usize,
    cols: usize,
    pred: &[T],
    target: &[T],
    scale: f64,
    loss: &mut [T],
) -> Result<()> {
    check_sq_err_fwd(rows, cols, pred.len(), target.len(), loss.len())?;
    let total: f64 = pred
        .iter()
        .zip(target)
        .map(|(p, t)| (p.to_f64() - t.to_f64()).powi(2))
        .sum();
    loss[0] = T::from_f64(scale * total / rows.max(1) as f64);
    Ok(())
}

/// [`super::LossOps::sq_err_bwd`] on host slices.
pub(crate) fn sq_err_bwd<T: Float>(
    rows: usize,
    cols: usize,
    pred: &[T],
    target: &[T],
    scale: f64,
    dloss: &[T],
    dpred: &mut [T],
) -> Result<()> {
    check_sq_err_bwd(rows, cols, pred.len(), target.len(), dloss.len(), dpred.len())?;
    let g = 2.0 * scale * dloss[0].to_f64() / rows.max(1) as f64;
    for ((o, p), t) in dpred.iter_mut().zip(pred).zip(target) {
        *o = T::from_f64(o.to_f64() + g * (p.to_f64() - t.to_f64()));
    }
    Ok(())
}
