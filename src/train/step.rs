//! One training step: on the host path (the batch built and uploaded), or planned on a backend that
//! keeps the training set resident (everything the step needs already on the device), eagerly or
//! replayed as a captured graph.

use std::rc::Rc;

use super::progress::Running;
use super::resident::Resident;
use super::schedule::lr_at;
use crate::checkpoint::TrainState;
use crate::data;
use crate::dataset::Source;
use crate::float::Float;
use crate::model::CapsNet;
use crate::ops::Adam;
use crate::runtime::StepRuntime;
use crate::tape::Tape;
use crate::{Error, Result};

pub(crate) fn scalar<B: StepRuntime>(t: &Tape<B>, v: crate::tape::Var) -> Result<f64> {
    Ok(t.backend().download(&t.value(v).buf)?[0].to_f64())
}

/// [`StepRuntime::step_summary`] of forward pass `f` over `batch` images: one buffer of [loss, margin,
/// reconstruction, images right, labels found], to read once.
pub(crate) fn summarize<B: StepRuntime>(
    tape: &Tape<B>,
    f: &crate::model::Forward<B::Idx>,
    batch: usize,
    classes: usize,
    per: usize,
) -> Result<B::Buf> {
    let be = tape.backend();
    let mut out = be.alloc_out(5)?;
    let losses = [
        &tape.value(f.loss).buf,
        &tape.value(f.margin).buf,
        &tape.value(f.recon_loss).buf,
    ];
    be.step_summary(
        batch,
        classes,
        per,
        losses,
        &tape.value(f.lengths).buf,
        &f.labels,
        &mut out,
    )?;
    Ok(out)
}

/// One training step (forward, backward, Adam) on the base digits `chunk` of `src` (the examples
/// of epoch `state.epoch`); adds the batch to the running sums. When the training set is `resident`
/// on the device, the batch is gathered there at the position the epoch's step plan holds, and the
/// step runs as [`planned_step`]: eagerly the first time a batch size comes, then captured as a graph
/// and replayed (unless `graphs` is eager). A non-finite loss skips the update on the backend, so the
/// weights stay as they were, and stops.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step<B: StepRuntime>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    adam: &mut Adam<B>,
    src: &Source,
    chunk: &[usize],
    state: &TrainState,
    r: &mut Running,
    resident: Option<&mut Resident<B>>,
    graphs: &mut StepGraphs<B>,
) -> Result<StepFigures> {
    adam.lr = lr_at(state.run.lr, state.run.lr_decay, state.run.lr_decay_steps, adam.step);
    let n = chunk.len();
    let report = match resident {
        Some(res) => graphs.step(tape, model, adam, res, n)?,
        None => {
            tape.reset();
            let examples: Vec<usize> = chunk.iter().map(|&d| src.example_of(d, state.epoch)).collect();
            let mut b = src.batch::<B::E>(&examples);
            if state.run.shift > 0 {
                let shifts: Vec<(i32, i32)> = chunk
                    .iter()
                    .map(|&i| data::shift_of(state.run.seed, state.epoch, i, state.run.shift))
                    .collect();
                data::shift_images(&mut b.images, model.cfg.image_side, &shifts);
            }
            let f = model.forward_batch(tape, &b, true)?;
            tape.backward(f.loss)?;
            // the step's report in one buffer, and the update, which changes nothing if the loss is
            // not finite: the host reads the report once, after the whole step
            let summary = summarize(tape, &f, n, model.cfg.classes, b.per)?;
            adam.update_if_finite(tape, &summary)?;
            tape.backend().download(&summary)?
        }
    };
    let report: Vec<f64> = report.iter().map(|x| x.to_f64()).collect();
    let (loss, margin, recon) = (report[0], report[1], report[2]);
    if !loss.is_finite() {
        let term = if !margin.is_finite() {
            format!("margin loss is {margin}")
        } else {
            format!("reconstruction loss is {recon}")
        };
        return Err(Error::msg(format!(
            "training diverged at step {}: the {term}; the run's last checkpoint is the last good state",
            adam.step
        )));
    }
    let n = n as f64;
    r.loss += n * loss;
    r.margin += n * margin;
    r.recon += n * recon;
    r.correct += report[3] as usize;
    r.images += chunk.len();
    Ok(StepFigures {
        loss,
        margin,
        recon,
        accuracy: report[3] / n,
        lr: adam.lr,
    })
}

/// One step's figures, as steps.jsonl records them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StepFigures {
    pub loss: f64,
    pub margin: f64,
    pub recon: f64,
    /// Of the batch's images (MultiMNIST: both digits right).
    pub accuracy: f64,
    pub lr: f64,
}

/// A step on the resident training set, everything it needs already on the device: the batch of `n`
/// images gathered at the position in the step plan's current row, forward, backward, the summary,
/// Adam with the row's lr and bias corrections, and the plan's cursor moved to the next row. Nothing
/// is read or written by the host, so the same calls can be captured as a graph. Returns the summary
/// buffer ([`summarize`]), unread.
fn planned_step<B: StepRuntime>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    adam: &mut Adam<B>,
    res: &mut Resident<B>,
    n: usize,
) -> Result<B::Buf> {
    let be = tape.backend();
    let (mut x, mut y) = (be.alloc_out(n * res.pixels)?, be.alloc_idx(n)?);
    be.gather_planned(&res.set()?, res.plan()?, n, &mut x, &mut y)?;
    let f = model.forward_on_backend(tape, x, Rc::new(y), true)?;
    tape.backward(f.loss)?;
    let summary = summarize(tape, &f, n, model.cfg.classes, 1)?;
    adam.update_planned(tape, &summary, res.plan()?)?;
    let plan = res.plan.as_mut().map(|p| &mut p.1).expect("plan() found it");
    tape.backend().advance_plan(plan)?;
    Ok(summary)
}

/// Training steps captured as graphs, one per batch size, on a backend that can capture them: the
/// first step of a size runs eagerly (its buffers then sit in the pool, so the capture allocates
/// nothing), the second is captured and launched, every later one is a replay of it.
pub(crate) struct StepGraphs<B: StepRuntime> {
    pub(crate) capture: bool,
    /// Batch sizes stepped eagerly once.
    warm: Vec<usize>,
    /// By batch size: the graph and the summary buffer it writes.
    graphs: Vec<(usize, crate::runtime::GraphId, B::Buf)>,
}

impl<B: StepRuntime> StepGraphs<B> {
    pub(crate) fn new(be: &B, eager: bool) -> Self {
        StepGraphs {
            capture: be.can_capture() && !eager,
            warm: vec![],
            graphs: vec![],
        }
    }

    /// One [`planned_step`] of `n` images, run as this size's graph where there is one; its summary,
    /// read.
    pub(crate) fn step(
        &mut self,
        tape: &mut Tape<B>,
        model: &CapsNet,
        adam: &mut Adam<B>,
        res: &mut Resident<B>,
        n: usize,
    ) -> Result<Vec<B::E>> {
        if let Some((_, id, summary)) = self.graphs.iter().find(|g| g.0 == n) {
            tape.backend().launch_graph(*id)?;
            adam.count_replayed_update();
            return tape.backend().download(summary);
        }
        tape.reset();
        if !self.capture || !self.warm.contains(&n) {
            let summary = planned_step(tape, model, adam, res, n)?;
            if self.capture {
                self.warm.push(n);
            }
            return tape.backend().download(&summary);
        }
        // captured: recorded, not run, until the graph's first launch
        let failed = |e: Error| {
            Error::msg(format!(
                "capturing the training step as a CUDA graph failed: {e}; --eager trains without graphs"
            ))
        };
        tape.backend().begin_capture().map_err(failed)?;
        let summary = planned_step(tape, model, adam, res, n);
        let id = tape.backend().end_capture();
        let (summary, id) = (summary.map_err(failed)?, id.map_err(failed)?);
        tape.backend().launch_graph(id).map_err(failed)?;
        let report = tape.backend().download(&summary)?;
        self.graphs.push((n, id, summary));
        Ok(report)
    }

    /// Drops the graphs (their step reads buffers that were replaced); later steps capture anew.
    pub(crate) fn forget(&mut self) {
        self.graphs.clear();
        self.warm.clear();
    }

    pub(crate) fn captured(&self) -> usize {
        self.graphs.len()
    }
}
