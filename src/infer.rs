//! Inference on host data: the digit capsules and lengths of images, and reconstructions from any
//! capsules. What `predict`, `eval` and the figures run; no gradients are recorded.

use std::rc::Rc;

use crate::float::Float;
use crate::model::CapsNet;
use crate::ops::Backend;
use crate::tape::Tape;
use crate::{Error, Result};

/// The encoder's output for N images, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    /// Capsule lengths [N, classes].
    pub lengths: Vec<f32>,
    /// The longest capsule of each image.
    pub pred: Vec<u32>,
    /// Digit capsules [N, classes, dim].
    pub v: Vec<f32>,
}

impl Classified {
    pub fn len(&self) -> usize {
        self.pred.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pred.is_empty()
    }
}

pub(crate) fn host<B: Backend>(be: &B, buf: &B::Buf) -> Result<Vec<f32>> {
    Ok(be.download(buf)?.iter().map(|x| x.to_f64() as f32).collect())
}

fn device<B: Backend>(xs: &[f32]) -> Vec<B::E> {
    xs.iter().map(|&x| B::E::from_f64(x as f64)).collect()
}

/// Runs `f` with the tape not recording, and leaves the tape empty and recording again.
pub(crate) fn untaped<B: Backend, T>(tape: &mut Tape<B>, f: impl FnOnce(&mut Tape<B>) -> Result<T>) -> Result<T> {
    tape.set_recording(false);
    let out = f(tape);
    tape.set_recording(true);
    tape.reset();
    out
}

/// Encodes `images` ([N·side²] in [0, 1]) `batch` images at a time.
pub fn classify<B: Backend>(tape: &mut Tape<B>, model: &CapsNet, images: &[f32], batch: usize) -> Result<Classified> {
    let px = model.cfg.image_pixels();
    if batch == 0 || !images.len().is_multiple_of(px) {
        return Err(Error::msg(format!(
            "classify: {} pixels in batches of {batch} are not whole {0}x{0} images",
            model.cfg.image_side
        )));
    }
    untaped(tape, |t| {
        let mut out = Classified {
            lengths: vec![],
            pred: vec![],
            v: vec![],
        };
        for chunk in images.chunks(batch * px) {
            t.reset();
            let enc = model.encode(t, &device::<B>(chunk))?;
            out.lengths.extend(host(t.backend(), &t.value(enc.lengths).buf)?);
            out.v.extend(host(t.backend(), &t.value(enc.v).buf)?);
            out.pred.extend(t.backend().download_idx(&enc.pred)?);
        }
        Ok(out)
    })
}

/// The decoder's reconstructions [N, side²] of the digit capsules `v` [N, classes, dim], each masked
/// to capsule `keep[n]`, `batch` at a time.
pub fn reconstruct<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    v: &[f32],
    keep: &[u32],
    batch: usize,
) -> Result<Vec<f32>> {
    let (classes, dim) = (model.cfg.classes, model.cfg.caps2_dim);
    if batch == 0 || v.len() != keep.len() * classes * dim {
        return Err(Error::msg(format!(
            "reconstruct: {} capsule values for {} images of {classes}x{dim}",
            v.len(),
            keep.len()
        )));
    }
    if let Some(k) = keep.iter().find(|&&k| k as usize >= classes) {
        return Err(Error::msg(format!("reconstruct: class {k} of {classes}")));
    }
    untaped(tape, |t| {
        let mut out = vec![];
        for (vs, ks) in v.chunks(batch * classes * dim).zip(keep.chunks(batch)) {
            t.reset();
            let buf = t.backend().upload(&device::<B>(vs))?;
            let var = t.input(buf, &[ks.len(), classes, dim])?;
            let keep = Rc::new(t.backend().upload_idx(ks)?);
            let recon = model.decode(t, var, keep)?;
            out.extend(host(t.backend(), &t.value(recon).buf)?);
        }
        Ok(out)
    })
}
