//! One epoch of training over its shuffle, from where a step checkpoint left it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::progress::{Progress, Running};
use super::resident::Resident;
use super::run_dir::{LAST, StepLog, StepSaver, resume_command, snapshot};
use super::schedule::{epoch_order, lr_at};
use super::step::{StepGraphs, train_step};
use super::{INTERRUPT, TrainOptions};
use crate::Result;
use crate::checkpoint::{self, TrainState};
use crate::dataset::Source;
use crate::model::CapsNet;
use crate::ops::Adam;
use crate::runtime::StepRow;
use crate::runtime::StepRuntime;
use crate::tape::Tape;

/// Epoch `state.epoch` over its shuffle, from where a step checkpoint left it (`state.partial`),
/// writing step checkpoints as `saver` says. Returns the epoch's running sums, or None when
/// [`INTERRUPT`] stopped it (the last completed step is then saved).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_epoch<B: StepRuntime>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    adam: &mut Adam<B>,
    set: &Source,
    state: &mut TrainState,
    opts: &TrainOptions,
    saver: &mut StepSaver,
    history: &[serde_json::Value],
    mut resident: Option<&mut Resident<B>>,
    graphs: &mut StepGraphs<B>,
    log: &mut StepLog,
) -> Result<Option<Running>> {
    let order = epoch_order(set.digits(), state.run.seed, state.epoch);
    let batches = order.len().div_ceil(state.run.batch_size);
    let mut r = state.partial.take().unwrap_or_default();
    if let Some(res) = resident.as_deref_mut() {
        // the epoch's order and step plan: one row per batch, from the batch this epoch resumes at
        // (rows before it are never read, so they repeat its values)
        let rows: Vec<StepRow> = (0..batches)
            .map(|k| {
                let step = adam.step + (k.max(r.batches) - r.batches) as u64;
                StepRow {
                    start: k * state.run.batch_size,
                    adam: adam.hyper_at(
                        lr_at(state.run.lr, state.run.lr_decay, state.run.lr_decay_steps, step),
                        step + 1,
                    ),
                }
            })
            .collect();
        let moved = res.set_order(tape.backend(), state.epoch, &order)?
            | res.set_shifts(tape.backend(), state.epoch, state.run.seed)?
            | res.set_plan(tape.backend(), state.epoch, r.batches, &rows)?;
        if moved {
            graphs.forget();
        }
    }
    let (start, before) = (Instant::now(), r.seconds);
    let mut bar = Progress::new(
        format!("epoch {}/{}", state.epoch + 1, opts.epochs),
        set.digits(),
        r.images,
    );
    let last = opts.run_dir.join(LAST);
    for chunk in order.chunks(state.run.batch_size).skip(r.batches) {
        if INTERRUPT.load(Ordering::SeqCst) {
            eprintln!(
                "\ninterrupted before a new step: {} is the latest state\ncontinue with:\n  {}",
                last.display(),
                resume_command()
            );
            return Ok(None);
        }
        let figures = train_step(
            tape,
            model,
            adam,
            set,
            chunk,
            state,
            &mut r,
            resident.as_deref_mut(),
            graphs,
        )?;
        log.record(state.epoch + 1, adam.step, &figures)?;
        r.batches += 1;
        r.seconds = before + start.elapsed().as_secs_f64();
        bar.update(r.images, &r);
        let stop = INTERRUPT.load(Ordering::SeqCst);
        if stop || saver.due(adam.step) {
            let mut st = state.clone();
            st.step = adam.step;
            st.partial = Some(r.clone());
            checkpoint::save(&last, &snapshot(tape, adam, model, st, history, saver.last_step())?)?;
            log.flush()?;
            saver.saved(adam.step);
            if stop {
                eprintln!(
                    "\ninterrupted: saved step {} (epoch {}, batch {} of {batches}) to {}\ncontinue with:\n  {}",
                    adam.step,
                    state.epoch + 1,
                    r.batches,
                    last.display(),
                    resume_command()
                );
                return Ok(None);
            }
        }
    }
    tape.reset();
    Ok(Some(r))
}
