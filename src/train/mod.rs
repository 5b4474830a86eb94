//! Training: the loop (here, [`train`], which reads as a table of contents), one step
//! ([`step`]), one epoch ([`epoch`]), the run directory and its checkpoints ([`run_dir`]), the data
//! set on the device ([`resident`]), the schedule ([`schedule`]), what a run prints ([`progress`]),
//! evaluation ([`evaluate`]) and the step benchmark ([`bench`]). Generic over the backend.

mod bench;
mod epoch;
pub mod evaluate;
mod progress;
mod resident;
mod run_dir;
pub mod schedule;
mod step;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use bench::{BenchReport, bench, profile};
pub use evaluate::{EvalOptions, EvalReport, TestSet, check_side, eval_checkpoint, evaluate};
pub use run_dir::{BEST, LAST, METRICS, STEPS};
pub use schedule::{epoch_order, lr_at};

use crate::checkpoint::{Checkpoint, TrainState};
use crate::config::{Config, RunSettings};
use crate::data::{self, Split, Which};
use crate::dataset::Source;
use crate::model::{CapsNet, init_params};
use crate::ops::Adam;
use crate::runtime::StepRuntime;
use crate::tape::Tape;
use crate::{Error, Result};
use evaluate::evaluate_on;
use progress::Running;
use resident::Resident;
use run_dir::{StepLog, StepSaver};
use step::StepGraphs;

/// What `capsnet train` asks for: the model, what the run is, where its data and files are, and how
/// it runs (none of which changes its results).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub config: Config,
    pub run: RunSettings,
    /// Total epochs to reach (a resumed run continues up to this count).
    pub epochs: usize,
    /// Continue from `run_dir/last.safetensors`.
    pub resume: bool,
    /// Step checkpoints: last.safetensors is also written once this much time has passed since the
    /// last write (None: only at the end of each epoch)...
    pub checkpoint_every: Option<Duration>,
    /// ...or every this many steps (None: not by count).
    pub checkpoint_steps: Option<u64>,
    /// Launch every op of every step from the host, also where the backend can replay a captured
    /// step ([`StepRuntime::can_capture`]); the results are the same bit for bit.
    pub eager: bool,
    /// The flags given on the command line. A resumed run takes the stored model and settings, and
    /// refuses only the given flags that differ from them; None: every setting here is meant (and
    /// checked against the stored run), as for a caller of the library.
    pub given: Option<Vec<GivenFlag>>,
}

/// A flag given on the command line: its name (`--batch-size`), and the preset flag that set it, if
/// a preset did (`--preset paper`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GivenFlag {
    pub flag: String,
    pub via: Option<String>,
}

impl TrainOptions {
    /// The checks that need no file: each names its flag. (A resumed run's model is the stored one.)
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 && !self.resume {
            return Err(Error::msg("--epochs 0: nothing to train; give at least 1"));
        }
        self.run.validate()?;
        if !self.resume {
            self.config.validate()?;
        }
        Ok(())
    }
}

/// Set (by the binary's Ctrl-C / SIGTERM handler) to ask a training run to save its last completed
/// step and return; [`train`] then returns with [`interrupted`] true.
pub static INTERRUPT: AtomicBool = AtomicBool::new(false);

/// Whether the last [`train`] call stopped because of [`INTERRUPT`].
pub fn interrupted() -> bool {
    INTERRUPT.load(Ordering::SeqCst)
}

/// Per-epoch figures, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    pub train_margin: f64,
    pub train_recon: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Device memory held by the backend (None on the CPU).
    pub device_mib: Option<f64>,
}

impl EpochMetrics {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "epoch": self.epoch, "step": self.step,
            "train_loss": self.train_loss, "train_margin": self.train_margin,
            "train_recon": self.train_recon, "train_acc": self.train_acc,
            "val_loss": self.val_loss, "val_acc": self.val_acc,
            "seconds": self.seconds, "images_per_s": self.images_per_s, "device_mib": self.device_mib,
        })
    }
}

/// Trains as `opts` says; returns the metrics of the epochs run in this call.
pub fn train<B: StepRuntime>(backend: B, opts: &TrainOptions) -> Result<Vec<EpochMetrics>> {
    opts.validate()?;
    // a resumed run is the stored one: its settings come first; a fresh run's flags and data come
    // before its directory, so a bad flag is reported as such wherever it points
    let (resumed, stored_opts) = match opts.resume {
        true => {
            let (lock, ck, stored) = run_dir::open_resume(opts)?;
            (Some((lock, ck)), Some(stored))
        }
        false => (None, None),
    };
    let opts = stored_opts.as_ref().unwrap_or(opts);
    let (train_set, val_set) = data::train_val(
        data::load(&opts.data_dir, Which::Train)?,
        opts.run.limit,
        opts.run.val_limit,
    )?;
    let (_lock, resumed) = match resumed {
        Some((lock, ck)) => (lock, Some(ck)),
        None => (run_dir::open_fresh(opts)?, None),
    };
    let fresh = resumed.is_none();
    let mut run = Run::new(backend, opts, resumed, &train_set, &val_set)?;
    if fresh {
        // the run exists on disk from its first moment: a write that fails later leaves it resumable
        run.save(opts, false)?;
    }
    let mut history = vec![];
    while run.state.epoch < opts.epochs {
        if run.state.should_stop() {
            eprintln!(
                "early stop: validation loss has not improved for {} epochs",
                run.state.bad_epochs
            );
            break;
        }
        let Some(sums) = run.train_epoch(opts)? else {
            return Ok(history); // interrupted: the last completed step is saved
        };
        let val = run.validate()?;
        let (m, improved) = run.end_epoch(&sums, val.loss, val.accuracy);
        run.save(opts, improved)?;
        progress::epoch_done(&m, improved, run.graphs.captured());
        history.push(m);
        if interrupted() {
            // the interrupt came during validation, which ran to the epoch's end and was saved
            eprintln!(
                "interrupted: saved the end of epoch {} to {}\ncontinue with:\n  {}",
                run.state.epoch,
                opts.run_dir.join(LAST).display(),
                run_dir::resume_command()
            );
            return Ok(history);
        }
    }
    Ok(history)
}

/// A run in progress: the model and its optimiser on the tape, the run's state and history, and
/// what it keeps between steps (the data set on the device, the captured steps, when to save).
struct Run<'a, B: StepRuntime> {
    tape: Tape<B>,
    model: CapsNet,
    adam: Adam<B>,
    state: TrainState,
    /// metrics.jsonl's lines, also stored in every checkpoint.
    history: Vec<serde_json::Value>,
    train: Source<'a>,
    val: Source<'a>,
    /// The validation examples: each held-out digit once, in its first pairing.
    val_examples: Vec<usize>,
    saver: StepSaver,
    resident: Option<Resident<B>>,
    val_resident: Option<Resident<B>>,
    graphs: StepGraphs<B>,
    /// steps.jsonl, opened before the first epoch (after a fresh run's step-0 checkpoint, so a run
    /// whose first write fails leaves nothing behind).
    log: Option<StepLog>,
}

impl<'a, B: StepRuntime> Run<'a, B> {
    /// A fresh run of `opts`, or the `resumed` one continued where its checkpoint left it.
    fn new(
        backend: B,
        opts: &TrainOptions,
        resumed: Option<Checkpoint>,
        train_set: &'a Split,
        val_set: &'a Split,
    ) -> Result<Self> {
        let cfg = resumed
            .as_ref()
            .map_or_else(|| opts.config.clone(), |c| c.config.clone());
        let train = Source::new(opts.run.dataset, train_set, opts.run.seed)?;
        let val = Source::new(opts.run.dataset, val_set, opts.run.seed)?;
        let val_examples = val.eval_examples(1);
        progress::announce(
            &backend.name(),
            &cfg,
            opts,
            train_set.len(),
            val_set.len(),
            val_examples.len(),
        );
        let mut tape = Tape::new(backend);
        let model = match &resumed {
            Some(ck) => CapsNet::from_checkpoint(&mut tape, ck)?,
            None => CapsNet::new(cfg.clone(), &mut tape, &init_params(&cfg, opts.run.seed))?,
        };
        let mut adam = Adam::new(&tape, opts.run.lr)?;
        let (mut state, history) = match resumed {
            None => (TrainState::start(opts.run.clone()), vec![]),
            Some(ck) => run_dir::resume(opts, ck, &tape, &mut adam)?,
        };
        state.target_epochs = Some(opts.epochs);
        let resident = Resident::new(tape.backend(), &train, state.run.shift)?;
        if resident.is_some() {
            let shifted = if state.run.shift > 0 { " and shifted" } else { "" };
            eprintln!("data: the training set lives on the device; each batch is gathered{shifted} there");
        }
        // the validation images too stay on the device from one epoch to the next
        let val_resident = Resident::new(tape.backend(), &val, 0)?;
        let graphs = StepGraphs::new(tape.backend(), opts.eager);
        if state.epoch >= opts.epochs {
            eprintln!(
                "nothing to do: {} epoch{} done already, --epochs is {}",
                state.epoch,
                if state.epoch == 1 { "" } else { "s" },
                opts.epochs
            );
        }
        Ok(Run {
            log: None,
            saver: StepSaver::new(opts, state.step),
            tape,
            model,
            adam,
            state,
            history,
            train,
            val,
            val_examples,
            resident,
            val_resident,
            graphs,
        })
    }

    /// The next epoch's steps ([`epoch::run_epoch`]); None when interrupted.
    fn train_epoch(&mut self, opts: &TrainOptions) -> Result<Option<Running>> {
        // the steps of the checkpoint this run starts from (a partial epoch's too)
        let log = match &mut self.log {
            Some(log) => log,
            None => self.log.insert(StepLog::open(&opts.run_dir, self.state.step)?),
        };
        epoch::run_epoch(
            &mut self.tape,
            &self.model,
            &mut self.adam,
            &self.train,
            &mut self.state,
            opts,
            &mut self.saver,
            &self.history,
            self.resident.as_mut(),
            &mut self.graphs,
            log,
        )
    }

    /// The validation pass.
    fn validate(&mut self) -> Result<EvalReport> {
        let batch = self.state.run.batch_size;
        evaluate_on(
            &mut self.tape,
            &self.model,
            &self.val,
            &self.val_examples,
            batch,
            "  validation",
            self.val_resident.as_mut(),
        )
    }

    /// Closes the epoch: the state moves on, the metrics join the history; whether the validation
    /// loss is the best so far.
    fn end_epoch(&mut self, sums: &Running, val_loss: f64, val_acc: f64) -> (EpochMetrics, bool) {
        let s = &mut self.state;
        s.epoch += 1;
        s.step = self.adam.step;
        s.partial = None;
        let improved = s.record_val_loss(val_loss);
        let mean = |x: f64| progress::mean(sums, x);
        let m = EpochMetrics {
            epoch: s.epoch,
            step: s.step,
            train_loss: mean(sums.loss),
            train_margin: mean(sums.margin),
            train_recon: mean(sums.recon),
            train_acc: mean(sums.correct as f64),
            val_loss,
            val_acc,
            seconds: sums.seconds,
            images_per_s: sums.images as f64 / sums.seconds.max(1e-9),
            device_mib: self.tape.backend().device_bytes().map(|b| b as f64 / (1 << 20) as f64),
        };
        self.history.push(m.to_json());
        (m, improved)
    }

    /// Saves the epoch's end: last.safetensors, best.safetensors when it `improved`, metrics.jsonl.
    fn save(&mut self, opts: &TrainOptions, improved: bool) -> Result<()> {
        let ck = run_dir::snapshot(
            &self.tape,
            &self.adam,
            &self.model,
            self.state.clone(),
            &self.history,
            self.saver.last_step(),
        )?;
        run_dir::save_epoch(opts, &ck, improved)?;
        if let Some(log) = &mut self.log {
            log.flush()?;
        }
        self.saver.saved(self.state.step);
        Ok(())
    }
}
