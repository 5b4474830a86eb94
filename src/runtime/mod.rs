//! The training step's runtime, apart from the ops: a data set resident on the backend and its batches
//! gathered there, step plans (each step's batch position and Adam's per-step factors, read by the
//! device), the step's summary in one buffer, and steps captured once and replayed.
//! [`StepRuntime`]'s defaults run on the host (the CPU backends); the GPU's is in cuda.rs.

mod cuda;

use crate::backend::cpu::CpuBackend;
use crate::backend::fast::FastCpu;
use crate::backend::{PLAN_HEADER, PLAN_ROW, check, check_labels};
use crate::float::Float;
use crate::ops::{AdamHyper, Backend};
use crate::{Error, Result};

/// `bytes` packed four to a little-endian u32 (the last word padded with zeros).
pub fn pack_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| c.iter().enumerate().fold(0u32, |w, (k, &b)| w | (b as u32) << (8 * k)))
        .collect()
}

/// A data set resident on a backend, as [`StepRuntime::gather_batch`] reads it.
pub struct ResidentSet<'a, B: Backend + ?Sized> {
    /// Bytes per image: a square image's side².
    pub pixels: usize,
    /// The images' bytes, packed four to a word ([`StepRuntime::upload_bytes`]).
    pub images: &'a B::Idx,
    pub labels: &'a B::Idx,
    /// The examples in the order batches take them (an epoch's shuffle).
    pub order: &'a B::Idx,
    /// Per image, the shift that moves it this epoch ([`pack_shift`]), or None.
    pub shifts: Option<&'a B::Idx>,
}

/// A shift (dx, dy), each within ±127 (right and down positive), as [`ResidentSet::shifts`] holds it.
pub fn pack_shift((dx, dy): (i32, i32)) -> u32 {
    ((dx + 128) as u32 & 0xff) | ((dy + 128) as u32 & 0xff) << 8
}

/// [`StepRuntime::gather_batch`] on host data, checked: pixels / 255 in f64 (the data loader's scaling,
/// before it rounds to the backend's type), each image moved by its shift
/// ([`crate::data::shift_images`]) where `shifts` holds them, and labels of images order[start ..
/// start + batch].
pub fn gather_host(
    pixels: usize,
    words: &[u32],
    labels: &[u32],
    order: &[u32],
    shifts: Option<&[u32]>,
    start: usize,
    batch: usize,
) -> Result<(Vec<f64>, Vec<u32>)> {
    if start + batch > order.len() {
        return Err(Error::msg(format!(
            "gather_batch: images {start}..{} of an order of {}",
            start + batch,
            order.len()
        )));
    }
    let (mut xs, mut ys) = (Vec::with_capacity(batch * pixels), Vec::with_capacity(batch));
    for &img in &order[start..start + batch] {
        let img = img as usize;
        if img >= labels.len() || (img + 1) * pixels > 4 * words.len() {
            return Err(Error::msg(format!(
                "gather_batch: image {img} of {} images",
                labels.len()
            )));
        }
        let at = xs.len();
        for p in img * pixels..(img + 1) * pixels {
            let byte = (words[p / 4] >> (8 * (p % 4))) & 0xff;
            xs.push(byte as f64 / 255.0);
        }
        if let Some(shifts) = shifts {
            let side = image_side(pixels)?;
            let w = *shifts
                .get(img)
                .ok_or_else(|| Error::msg(format!("gather_batch: no shift for image {img}")))?;
            let shift = ((w & 0xff) as i32 - 128, ((w >> 8) & 0xff) as i32 - 128);
            crate::data::shift_images(&mut xs[at..], side, &[shift]);
        }
        ys.push(labels[img]);
    }
    Ok((xs, ys))
}

/// The side of a square image of `pixels` pixels, or why there is none.
pub fn image_side(pixels: usize) -> Result<usize> {
    let side = (pixels as f64).sqrt().round() as usize;
    if side * side != pixels {
        return Err(Error::msg(format!(
            "gather_batch: {pixels} pixels are not a square image"
        )));
    }
    Ok(side)
}

/// One training step's row of a step plan ([`StepRuntime::gather_planned`], [`crate::ops::AdamOps::adam_step_planned`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRow {
    /// The batch's first position in the epoch's order.
    pub start: usize,
    pub adam: AdamHyper,
}

/// A step plan's words: the cursor at row `cursor`, then each row as kernels/common.cuh lays it out.
pub fn plan_words(cursor: usize, rows: &[StepRow]) -> Result<Vec<u32>> {
    let mut w = Vec::with_capacity(PLAN_HEADER + PLAN_ROW * rows.len());
    w.push(u32::try_from(cursor).map_err(|_| Error::msg("step plan: more than 2^32 steps"))?);
    for r in rows {
        let start = u32::try_from(r.start)
            .map_err(|_| Error::msg(format!("step plan: position {} does not fit 32 bits", r.start)))?;
        w.push(start);
        w.extend(r.adam.per_step_f32().map(f32::to_bits));
    }
    Ok(w)
}

/// The batch position in the current row of a step plan read back to the host.
pub fn plan_start(words: &[u32]) -> Result<usize> {
    let at = words
        .first()
        .map(|&c| PLAN_HEADER + PLAN_ROW * c as usize)
        .filter(|&at| at + PLAN_ROW <= words.len())
        .ok_or_else(|| Error::msg("step plan: the cursor is past the last row"))?;
    Ok(words[at] as usize)
}

/// A step captured on a backend ([`StepRuntime::end_capture`]), to replay with [`crate::runtime::StepRuntime::launch_graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphId(pub usize);

/// The `per` longest capsules of each image, longest first (ties: the lower class).
pub fn top_classes(lengths: &[f32], classes: usize, per: usize) -> Vec<u32> {
    lengths
        .chunks(classes)
        .flat_map(|l| {
            let mut k: Vec<u32> = (0..classes as u32).collect();
            k.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            k.truncate(per);
            k
        })
        .collect()
}

/// (images whose `per` longest capsules are exactly their labels, labels found among them).
pub fn count_correct(top: &[u32], labels: &[u32], per: usize) -> (usize, usize) {
    let (mut exact, mut digits) = (0, 0);
    for (t, y) in top.chunks(per).zip(labels.chunks(per)) {
        let found = y.iter().filter(|l| t.contains(l)).count();
        digits += found;
        exact += (found == per) as usize;
    }
    (exact, digits)
}

/// The training step's runtime on a backend.
pub trait StepRuntime: Backend {
    /// Whether training keeps its data set on this backend ([`StepRuntime::upload_bytes`],
    /// [`StepRuntime::gather_batch`]) instead of copying each batch from the host: a device backend's
    /// choice, false here.
    fn keeps_data_resident(&self) -> bool {
        false
    }
    /// Bytes (a data set's pixels) on the backend, packed four to an index word, little-endian.
    fn upload_bytes(&self, bytes: &[u8]) -> Result<Self::Idx> {
        self.upload_idx(&pack_bytes(bytes))
    }
    /// One batch of a resident data set: x[b, p] = byte p of image order[start + b] / 255 and
    /// y[b] = labels[order[start + b]] for b < batch (x holds batch·pixels values, y batch), each image
    /// moved by its shift where the set has shifts ([`ResidentSet`]). `order` entries are below the
    /// number of images (a device reads none above: NaN pixels). This default reads the data back to
    /// the host.
    fn gather_batch(
        &self,
        set: &ResidentSet<'_, Self>,
        start: usize,
        batch: usize,
        x: &mut Self::Buf,
        y: &mut Self::Idx,
    ) -> Result<()> {
        check("gather_batch", "x", self.buf_len(x), batch * set.pixels)?;
        let (words, labels, order) = (
            self.download_idx(set.images)?,
            self.download_idx(set.labels)?,
            self.download_idx(set.order)?,
        );
        let shifts = set.shifts.map(|s| self.download_idx(s)).transpose()?;
        let (xs, ys) = gather_host(set.pixels, &words, &labels, &order, shifts.as_deref(), start, batch)?;
        *x = self.upload(&xs.iter().map(|&v| Self::E::from_f64(v)).collect::<Vec<_>>())?;
        *y = self.upload_idx(&ys)?;
        Ok(())
    }
    /// What a training step reports, in one buffer to read once: out = [loss, margin loss,
    /// reconstruction loss, images whose `per` longest capsules are exactly their labels, labels found
    /// among their image's `per` longest capsules] (ties go to the lower class, as [`CapsuleOps::argmax`](crate::ops::CapsuleOps::argmax)
    /// and [`top_classes`] breaks them). This default reads the inputs back and computes on the
    /// host; a device backend computes it on the device.
    #[allow(clippy::too_many_arguments)]
    fn step_summary(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        losses: [&Self::Buf; 3],
        lengths: &Self::Buf,
        labels: &Self::Idx,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let labels = self.download_idx(labels)?;
        check_labels("step_summary", batch, per, labels.len())?;
        check("step_summary", "lengths", self.buf_len(lengths), batch * classes)?;
        let mut row = vec![];
        for l in losses {
            check("step_summary", "a loss", self.buf_len(l), 1)?;
            row.push(self.download(l)?[0]);
        }
        let l: Vec<f32> = self.download(lengths)?.iter().map(|x| x.to_f64() as f32).collect();
        let top = top_classes(&l, classes, per);
        let (exact, found) = count_correct(&top, &labels, per);
        row.extend([Self::E::from_f64(exact as f64), Self::E::from_f64(found as f64)]);
        *out = self.upload(&row)?;
        Ok(())
    }
    /// Writes `host` over `dst`, which holds as many words. A device backend writes in place, so a
    /// captured step that reads `dst` sees the new words; this default replaces the buffer.
    fn write_idx(&self, dst: &mut Self::Idx, host: &[u32]) -> Result<()> {
        check("write_idx", "destination", self.idx_len(dst), host.len())?;
        *dst = self.upload_idx(host)?;
        Ok(())
    }
    /// [`StepRuntime::gather_batch`] from the position in the current row of the step plan `plan`
    /// ([`plan_words`]), which a device reads there: a captured step gathers each step's batch. This
    /// default reads the plan back.
    fn gather_planned(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: &Self::Idx,
        batch: usize,
        x: &mut Self::Buf,
        y: &mut Self::Idx,
    ) -> Result<()> {
        let start = plan_start(&self.download_idx(plan)?)?;
        self.gather_batch(set, start, batch, x, y)
    }
    /// Moves the plan's cursor to the next row: the last op of a planned step.
    fn advance_plan(&self, plan: &mut Self::Idx) -> Result<()> {
        let mut w = self.download_idx(plan)?;
        plan_start(&w)?;
        w[0] += 1;
        self.write_idx(plan, &w)
    }
    /// Whether this backend can record a step's ops once ([`StepRuntime::begin_capture`]) and replay
    /// them as one launch ([`StepRuntime::launch_graph`]): false here.
    fn can_capture(&self) -> bool {
        false
    }
    /// From here until [`StepRuntime::end_capture`], ops are recorded, not run. Every buffer they allocate
    /// stays the captured step's (it returns only to the step's own reserve), so a replay never writes
    /// memory that anything else was given; the buffers a step allocates must all be pooled already
    /// (an eager step of the same shapes ran before).
    fn begin_capture(&self) -> Result<()> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
    /// Ends the capture begun last (also after an op failed inside it); the recorded ops as a graph.
    fn end_capture(&self) -> Result<GraphId> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
    /// Runs a captured step again: the same ops on the same buffers.
    fn launch_graph(&self, _graph: GraphId) -> Result<()> {
        Err(Error::msg(format!("{} cannot capture steps", self.name())))
    }
}

impl<T: Float> StepRuntime for CpuBackend<T> {}
impl StepRuntime for FastCpu {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_longest_capsules_must_be_exactly_the_two_labels() {
        let l = [
            0.1, 0.9, 0.2, 0.8, /* */ 0.7, 0.1, 0.1, 0.6, /* */ 0.5, 0.5, 0.9, 0.1,
        ];
        let top = top_classes(&l, 4, 2);
        assert_eq!(top, vec![1, 3, 0, 3, 2, 0]);
        // labels {3, 1} (any order): exact; {0, 2}: one found; {2, 1}: one found
        assert_eq!(count_correct(&top, &[3, 1, 0, 2, 2, 1], 2), (1, 4));
        assert_eq!(count_correct(&top_classes(&l, 4, 1), &[1, 0, 2], 1), (3, 3));
    }
}
