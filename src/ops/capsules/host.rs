//! Masks and argmax, which both CPU backends run the same way on host slices of any [`Float`].

use super::{check_argmax, check_mask_bwd, check_mask_fwd};
use crate::Result;
use crate::backend::class_index;
use crate::float::Float;

/// [`super::CapsuleOps::mask_fwd`] on host slices.
pub(crate) fn mask_fwd<T: Float>(
    batch: usize,
    caps: usize,
    dim: usize,
    v: &[T],
    idx: &[u32],
    out: &mut [T],
) -> Result<()> {
    check_mask_fwd(batch, caps, dim, v.len(), idx.len(), out.len())?;
    out.fill(T::default());
    for (b, &k) in idx.iter().enumerate() {
        let k = class_index("mask_fwd", k, caps)?;
        let at = (b * caps + k) * dim;
        out[at..at + dim].copy_from_slice(&v[at..at + dim]);
    }
    Ok(())
}

/// [`super::CapsuleOps::mask_bwd`] on host slices.
pub(crate) fn mask_bwd<T: Float>(
    batch: usize,
    caps: usize,
    dim: usize,
    dout: &[T],
    idx: &[u32],
    dv: &mut [T],
) -> Result<()> {
    check_mask_bwd(batch, caps, dim, dout.len(), idx.len(), dv.len())?;
    for (b, &k) in idx.iter().enumerate() {
        let k = class_index("mask_bwd", k, caps)?;
        let at = (b * caps + k) * dim;
        for (o, g) in dv[at..at + dim].iter_mut().zip(&dout[at..at + dim]) {
            *o = T::from_f64(o.to_f64() + g.to_f64());
        }
    }
    Ok(())
}

/// [`super::CapsuleOps::argmax`] on host slices.
pub(crate) fn argmax<T: Float>(rows: usize, cols: usize, x: &[T], idx: &mut [u32]) -> Result<()> {
    check_argmax(rows, cols, x.len(), idx.len())?;
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
