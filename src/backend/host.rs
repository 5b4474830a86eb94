//! Small ops both CPU backends run the same way, on host slices of any [`Float`]: masking, argmax and
//! the losses (a few thousand terms per batch, summed in f64).

use super::{LAMBDA, M_MINUS, M_PLUS, check, check_labels, class_index};
use crate::Result;
use crate::float::Float;

/// [`super::Backend::mask_fwd`] on host slices.
pub(crate) fn mask_fwd<T: Float>(
    batch: usize,
    caps: usize,
    dim: usize,
    v: &[T],
    idx: &[u32],
    out: &mut [T],
) -> Result<()> {
    check("mask_fwd", "v", v.len(), batch * caps * dim)?;
    check("mask_fwd", "idx", idx.len(), batch)?;
    check("mask_fwd", "out", out.len(), batch * caps * dim)?;
    out.fill(T::default());
    for (b, &k) in idx.iter().enumerate() {
        let k = class_index("mask_fwd", k, caps)?;
        let at = (b * caps + k) * dim;
        out[at..at + dim].copy_from_slice(&v[at..at + dim]);
    }
    Ok(())
}

/// [`super::Backend::mask_bwd`] on host slices.
pub(crate) fn mask_bwd<T: Float>(
    batch: usize,
    caps: usize,
    dim: usize,
    dout: &[T],
    idx: &[u32],
    dv: &mut [T],
) -> Result<()> {
    check("mask_bwd", "dout", dout.len(), batch * caps * dim)?;
    check("mask_bwd", "idx", idx.len(), batch)?;
    check("mask_bwd", "dv", dv.len(), batch * caps * dim)?;
    for (b, &k) in idx.iter().enumerate() {
        let k = class_index("mask_bwd", k, caps)?;
        let at = (b * caps + k) * dim;
        for (o, g) in dv[at..at + dim].iter_mut().zip(&dout[at..at + dim]) {
            *o = T::from_f64(o.to_f64() + g.to_f64());
        }
    }
    Ok(())
}

/// [`super::Backend::argmax`] on host slices.
pub(crate) fn argmax<T: Float>(rows: usize, cols: usize, x: &[T], idx: &mut [u32]) -> Result<()> {
    check("argmax", "x", x.len(), rows * cols)?;
    check("argmax", "idx", idx.len(), rows)?;
    for (o, r) in idx.iter_mut().zip(x.chunks(cols.max(1))) {
        let mut best = 0;
        for (c, v) in r.iter().enumerate() {
            if v.to_f64() > r[best].to_f64() {
                best = c;
            }
        }
        *o = best as u32;
    }
    Ok(())
}

/// Whether class k is one of an image's `per` labels, each checked to be a class.
fn present_classes(op: &str, labels: &[u32], classes: usize) -> Result<Vec<bool>> {
    let mut t = vec![false; classes];
    for &y in labels {
        t[class_index(op, y, classes)?] = true;
    }
    Ok(t)
}

/// [`super::Backend::margin_loss_fwd`] on host slices.
pub(crate) fn margin_loss_fwd<T: Float>(
    batch: usize,
    classes: usize,
    per: usize,
    l: &[T],
    labels: &[u32],
    loss: &mut [T],
) -> Result<()> {
    check("margin_loss_fwd", "l", l.len(), batch * classes)?;
    check_labels("margin_loss_fwd", batch, per, labels.len())?;
    check("margin_loss_fwd", "loss", loss.len(), 1)?;
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

/// [`super::Backend::margin_loss_bwd`] on host slices.
pub(crate) fn margin_loss_bwd<T: Float>(
    batch: usize,
    classes: usize,
    per: usize,
    l: &[T],
    labels: &[u32],
    dloss: &[T],
    dl: &mut [T],
) -> Result<()> {
    check("margin_loss_bwd", "l", l.len(), batch * classes)?;
    check_labels("margin_loss_bwd", batch, per, labels.len())?;
    check("margin_loss_bwd", "dloss", dloss.len(), 1)?;
    check("margin_loss_bwd", "dl", dl.len(), batch * classes)?;
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

/// [`super::Backend::sq_err_fwd`] on host slices.
pub(crate) fn sq_err_fwd<T: Float>(
    rows: usize,
    cols: usize,
    pred: &[T],
    target: &[T],
    scale: f64,
    loss: &mut [T],
) -> Result<()> {
    check("sq_err_fwd", "pred", pred.len(), rows * cols)?;
    check("sq_err_fwd", "target", target.len(), rows * cols)?;
    check("sq_err_fwd", "loss", loss.len(), 1)?;
    let total: f64 = pred
        .iter()
        .zip(target)
        .map(|(p, t)| (p.to_f64() - t.to_f64()).powi(2))
        .sum();
    loss[0] = T::from_f64(scale * total / rows.max(1) as f64);
    Ok(())
}

/// [`super::Backend::sq_err_bwd`] on host slices.
pub(crate) fn sq_err_bwd<T: Float>(
    rows: usize,
    cols: usize,
    pred: &[T],
    target: &[T],
    scale: f64,
    dloss: &[T],
    dpred: &mut [T],
) -> Result<()> {
    check("sq_err_bwd", "pred", pred.len(), rows * cols)?;
    check("sq_err_bwd", "target", target.len(), rows * cols)?;
    check("sq_err_bwd", "dloss", dloss.len(), 1)?;
    check("sq_err_bwd", "dpred", dpred.len(), rows * cols)?;
    let g = 2.0 * scale * dloss[0].to_f64() / rows.max(1) as f64;
    for ((o, p), t) in dpred.iter_mut().zip(pred).zip(target) {
        *o = T::from_f64(o.to_f64() + g * (p.to_f64() - t.to_f64()));
    }
    Ok(())
}
