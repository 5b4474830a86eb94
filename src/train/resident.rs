//! The training or validation set on a backend that keeps data resident.

use crate::data;
use crate::dataset::Source;
use crate::runtime::StepRuntime;
use crate::runtime::{ResidentSet, StepRow};
use crate::{Error, Result};

/// The training set on the device: its images (bytes, packed four to a word) and labels, uploaded
/// once; the current epoch's shuffle (uploaded once per epoch, the same [`epoch_order`] as the host
/// path's, so a run's batches are the same on every backend), with each image's shift that epoch
/// where training shifts images (the same [`data::shift_of`]); and the epoch's step plan (the position
/// and Adam values of each step, [`crate::runtime::plan_words`]), written once per epoch. These keep
/// their buffers from epoch to epoch, so a captured step reads the new ones.
pub(crate) struct Resident<B: StepRuntime> {
    pub(crate) pixels: usize,
    images: B::Idx,
    labels: B::Idx,
    /// Largest shift in pixels (0: none).
    shift: usize,
    pub(crate) order: Option<(usize, B::Idx)>,
    /// (its key, the shifts) as for the order.
    shifts: Option<(usize, B::Idx)>,
    /// (its key, the plan) as for the order.
    pub(crate) plan: Option<(usize, B::Idx)>,
}

impl<B: StepRuntime> Resident<B> {
    /// The MNIST split on `be`, its images shifted by up to `shift` pixels, when the backend keeps data
    /// resident; else None (MultiMNIST composes its pairs on the host).
    pub(crate) fn new(be: &B, src: &Source, shift: usize) -> Result<Option<Self>> {
        let Source::Mnist(split) = src else {
            return Ok(None);
        };
        if !be.keeps_data_resident() {
            return Ok(None);
        }
        let labels: Vec<u32> = split.labels.iter().map(|&l| l as u32).collect();
        Ok(Some(Resident {
            pixels: data::MNIST_PIXELS,
            images: be.upload_bytes(&split.images)?,
            labels: be.upload_idx(&labels)?,
            shift,
            order: None,
            shifts: None,
            plan: None,
        }))
    }

    /// Writes the order of examples `key` names (an epoch's shuffle), once per key; whether it went
    /// to a new buffer (a captured step reads the old one).
    pub(crate) fn set_order(&mut self, be: &B, key: usize, order: &[usize]) -> Result<bool> {
        if self.order.as_ref().is_some_and(|o| o.0 == key) {
            return Ok(false);
        }
        let host: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        let (buf, moved) = write_or_upload(be, self.order.take().map(|o| o.1), &host)?;
        self.order = Some((key, buf));
        Ok(moved)
    }

    /// Writes each image's shift in epoch `epoch` of a run seeded `seed`, where images are shifted;
    /// whether it went to a new buffer.
    pub(crate) fn set_shifts(&mut self, be: &B, epoch: usize, seed: u64) -> Result<bool> {
        if self.shift == 0 || self.shifts.as_ref().is_some_and(|s| s.0 == epoch) {
            return Ok(false);
        }
        let host: Vec<u32> = (0..be.idx_len(&self.labels))
            .map(|i| crate::runtime::pack_shift(data::shift_of(seed, epoch, i, self.shift)))
            .collect();
        let (buf, moved) = write_or_upload(be, self.shifts.take().map(|s| s.1), &host)?;
        self.shifts = Some((epoch, buf));
        Ok(moved)
    }

    /// Writes the step plan of epoch `key`: its cursor at row `first`, `rows` its steps in order;
    /// whether it went to a new buffer.
    pub(crate) fn set_plan(&mut self, be: &B, key: usize, first: usize, rows: &[StepRow]) -> Result<bool> {
        let words = crate::runtime::plan_words(first, rows)?;
        let (buf, moved) = write_or_upload(be, self.plan.take().map(|p| p.1), &words)?;
        self.plan = Some((key, buf));
        Ok(moved)
    }

    /// The set as the backend gathers from it: the current order, and its epoch's shifts.
    pub(crate) fn set(&self) -> Result<ResidentSet<'_, B>> {
        let (key, order) = self
            .order
            .as_ref()
            .ok_or_else(|| Error::msg("no example order on the device"))?;
        let shifts = match &self.shifts {
            _ if self.shift == 0 => None,
            Some((k, s)) if k == key => Some(s),
            _ => return Err(Error::msg("no shifts for this epoch on the device")),
        };
        Ok(ResidentSet {
            pixels: self.pixels,
            images: &self.images,
            labels: &self.labels,
            order,
            shifts,
        })
    }

    /// The plan of the current epoch.
    pub(crate) fn plan(&self) -> Result<&B::Idx> {
        match (&self.order, &self.plan) {
            (Some(o), Some(p)) if o.0 == p.0 => Ok(&p.1),
            _ => Err(Error::msg("no step plan for this epoch's order on the device")),
        }
    }

    /// The batch of examples order[start .. start + n] into x [n·pixels] and y [n].
    pub(crate) fn gather(&self, be: &B, start: usize, n: usize, x: &mut B::Buf, y: &mut B::Idx) -> Result<()> {
        be.gather_batch(&self.set()?, start, n, x, y)
    }
}

/// `host` written over `buf` where it has the same length (its address kept), else uploaded anew
/// (then true).
fn write_or_upload<B: StepRuntime>(be: &B, buf: Option<B::Idx>, host: &[u32]) -> Result<(B::Idx, bool)> {
    match buf {
        Some(mut b) if be.idx_len(&b) == host.len() => {
            be.write_idx(&mut b, host)?;
            Ok((b, false))
        }
        _ => Ok((be.upload_idx(host)?, true)),
    }
}
