//! The training step's runtime on the GPU: batches gathered on the device, step plans, the step's
//! summary, and captured steps replayed.

use cudarc::driver::PushKernelArg;

use crate::backend::{check, check_labels};
use crate::cuda::launch::{de, flat, launch, single};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg};
use crate::cuda::{CudaBackend, CudaBuf, CudaIdx};
use crate::{Error, Result};

use super::{GraphId, ResidentSet, StepRuntime, image_side};
use crate::cuda::params::check_plan;

impl StepRuntime for CudaBackend {
    fn keeps_data_resident(&self) -> bool {
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn gather_batch(
        &self,
        set: &ResidentSet<'_, Self>,
        start: usize,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        if start + batch > set.order.len() {
            return Err(Error::msg(format!(
                "gather_batch: images {start}..{} of an order of {}",
                start + batch,
                set.order.len()
            )));
        }
        i32_of("gather_batch: end of the batch", start + batch)?;
        self.gather(set, None, start, batch, x, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn step_summary(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        losses: [&CudaBuf; 3],
        lengths: &CudaBuf,
        labels: &CudaIdx,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "step_summary";
        check_labels(OP, batch, per, labels.len())?;
        check(OP, "lengths", lengths.len(), batch * classes)?;
        for l in losses {
            check(OP, "a loss", l.len(), 1)?;
        }
        if out.len() != 5 {
            *out = self.take::<f32>(5)?;
        }
        let (b, c, pr) = (i32_of("step_summary: batch", batch)?, classes as i32, per as i32);
        i32_of("step_summary: labels", batch * per)?;
        // SAFETY: step_summary(loss, margin, recon, lengths, labels, out [5], int batch, int classes,
        // int per), one block of MARGIN_LOSS_FWD_THREADS; lengths checked above.
        launch!(
            self,
            reg::STEP_SUMMARY,
            single(reg::MARGIN_LOSS_FWD_THREADS),
            [
                losses[0].slice(),
                losses[1].slice(),
                losses[2].slice(),
                lengths.slice(),
                labels.slice(),
                out.slice_mut(),
                &b,
                &c,
                &pr
            ]
        )
    }

    fn write_idx(&self, dst: &mut CudaIdx, host: &[u32]) -> Result<()> {
        check("write_idx", "destination", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(host, dst.slice_mut()).map_err(de("write_idx"))
    }

    fn gather_planned(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: &CudaIdx,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        check_plan("gather_planned", plan)?;
        self.gather(set, Some(plan), 0, batch, x, y)
    }

    fn advance_plan(&self, plan: &mut CudaIdx) -> Result<()> {
        check_plan("advance_plan", plan)?;
        // SAFETY: plan_advance(unsigned* plan) adds one to plan[0]; the plan holds at least one word.
        launch!(self, reg::PLAN_ADVANCE, single(1), [plan.slice_mut()])
    }

    fn can_capture(&self) -> bool {
        true
    }

    fn begin_capture(&self) -> Result<()> {
        self.capture_begin()
    }

    fn end_capture(&self) -> Result<GraphId> {
        self.capture_end().map(GraphId)
    }

    fn launch_graph(&self, id: GraphId) -> Result<()> {
        self.replay(id.0)
    }
}

impl CudaBackend {
    /// gather_batch from position `start`, or, given a step plan, from the position its current row
    /// holds, which the kernel reads (a position past the order reads NaN pixels there).
    fn gather(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: Option<&CudaIdx>,
        start: usize,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        const OP: &str = "gather_batch";
        let (pixels, n) = (set.pixels, set.labels.len());
        check(OP, "image words", set.images.len(), (n * pixels).div_ceil(4))?;
        i32_of("gather_batch: pixels of the data set", n * pixels)?;
        check(OP, "x", x.len(), batch * pixels)?;
        check(OP, "y", y.len(), batch)?;
        let order_len = i32_of("gather_batch: the order", set.order.len())?;
        let side = match set.shifts {
            Some(s) => {
                check(OP, "shifts", s.len(), n)?;
                image_side(pixels)? as i32
            }
            None => 0,
        };
        if batch == 0 {
            return Ok(());
        }
        let (b, px, nn) = (batch as i32, pixels as i32, n as i32);
        let st = start as i32;
        let plan_words = i32_of("gather_batch: the plan", plan.map_or(0, |p| p.len()))?;
        let (plan, shifts) = (self.addr_or_null(plan), self.addr_or_null(set.shifts));
        // SAFETY: gather_batch(images, labels, order, x [batch·pixels], y [batch], int start, int batch,
        // int pixels, int n, const unsigned* plan, int plan_words, int order_len, const unsigned*
        // shifts, int side); the kernel reads order below order_len, images below n, whose n·pixels
        // bytes `images` holds (checked), a plan (else null) below plan_words, shifts (else null) of
        // images below n (n of them, checked), pixels = side² (checked).
        launch!(
            self,
            reg::GATHER_BATCH,
            flat(batch * pixels),
            [
                set.images.slice(),
                set.labels.slice(),
                set.order.slice(),
                x.slice_mut(),
                y.slice_mut(),
                &st,
                &b,
                &px,
                &nn,
                &plan,
                &plan_words,
                &order_len,
                &shifts,
                &side
            ]
        )
    }
}
