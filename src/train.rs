//! The training loop, evaluation and the step benchmark, generic over the backend.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::adam::Adam;
use crate::backend::{Backend, ResidentSet, StepRow};
use crate::checkpoint::{self, Checkpoint, EpochProgress, TrainState};
use crate::config::Config;
use crate::data::MNIST_PIXELS;
use crate::data::{self, Split, Which};
use crate::dataset::{Dataset, Source};
use crate::figures;
use crate::float::Float;
use crate::model::{CapsNet, init_params};
use crate::multimnist;
use crate::tape::Tape;
use crate::{Error, Result};

pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const METRICS: &str = "metrics.jsonl";

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub config: Config,
    /// Total epochs to reach (a resumed run continues up to this count).
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Stop after this many epochs without a better validation loss (0: never).
    pub patience: usize,
    pub limit: Option<usize>,
    pub val_limit: Option<usize>,
    /// Continue from `run_dir/last.safetensors`.
    pub resume: bool,
    /// Step checkpoints: last.safetensors is also written once this much time has passed since the
    /// last write (None: only at the end of each epoch)...
    pub checkpoint_every: Option<Duration>,
    /// ...or every this many steps (None: not by count).
    pub checkpoint_steps: Option<u64>,
    /// MNIST, or MultiMNIST pairs of its digits.
    pub dataset: Dataset,
    /// Shift each training image by up to this many pixels each way, per image per epoch (0: never).
    pub shift: usize,
    /// Learning rate lr · lr_decay^(step / lr_decay_steps) (1: constant).
    pub lr_decay: f64,
    pub lr_decay_steps: u64,
    /// Launch every op of every step from the host, also where the backend can replay a captured
    /// step ([`Backend::can_capture`]); the results are the same bit for bit.
    pub eager: bool,
}

/// The largest `--shift` (a 28x28 digit moved further leaves the canvas).
pub const MAX_SHIFT: usize = 8;

/// The learning rate of update `step` (0-based: the updates made before it), the exponential decay
/// of the official code (TensorFlow's exponential_decay, not staircase).
pub fn lr_at(lr: f64, decay: f64, decay_steps: u64, step: u64) -> f64 {
    if decay == 1.0 {
        return lr;
    }
    lr * decay.powf(step as f64 / decay_steps as f64)
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

#[derive(Clone, Debug, Default)]
pub struct EvalReport {
    pub loss: f64,
    pub margin: f64,
    pub recon: f64,
    /// Images whose predicted digits are exactly their labels (MultiMNIST: the two longest capsules
    /// are the two labels).
    pub accuracy: f64,
    /// Labels found among their image's predicted digits (MNIST: the accuracy again).
    pub digit_accuracy: f64,
    pub images: usize,
    /// Digits per image.
    pub per: usize,
    /// confusion[true][predicted] (one digit per image only; empty otherwise).
    pub confusion: Vec<Vec<usize>>,
    /// The predicted digits of every image ([images, per], longest capsule first), in order.
    pub predictions: Vec<u32>,
    /// The labels, likewise.
    pub labels: Vec<u32>,
}

/// Sums of batch figures weighted by batch size.
/// An epoch's running sums (saved in step checkpoints as they are).
type Running = EpochProgress;

fn mean(r: &Running, x: f64) -> f64 {
    x / r.images.max(1) as f64
}

/// A one-line progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise.
struct Progress {
    label: String,
    total: usize,
    /// Images already done when this bar started (a resumed epoch).
    base: usize,
    start: Instant,
    last: Option<Instant>,
    tty: bool,
    quarter: usize,
}

impl Progress {
    fn new(label: String, total: usize, base: usize) -> Self {
        Progress {
            label,
            total,
            base,
            start: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
            quarter: 0,
        }
    }
    fn update(&mut self, done: usize, r: &Running) {
        let now = Instant::now();
        let finished = done == self.total;
        let line = || {
            let frac = done as f64 / self.total.max(1) as f64;
            let filled = (frac * 24.0) as usize;
            let secs = self.start.elapsed().as_secs_f64();
            let rate = (done - self.base.min(done)) as f64 / secs.max(1e-9);
            let left = if finished {
                String::new()
            } else if rate > 0.0 {
                format!(", {} left", clock((self.total - done) as f64 / rate))
            } else {
                ", ? left".into()
            };
            format!(
                "{} [{}{}] {done}/{} loss {:.4} acc {:.2}% {:.0} img/s {}{left}",
                self.label,
                "#".repeat(filled),
                ".".repeat(24 - filled),
                self.total,
                mean(r, r.loss),
                100.0 * mean(r, r.correct as f64),
                rate,
                clock(secs),
            )
        };
        let mut err = std::io::stderr();
        if self.tty {
            if finished || self.last.is_none_or(|t| now.duration_since(t).as_millis() >= 100) {
                let _ = write!(err, "\r{}\x1b[K{}", line(), if finished { "\n" } else { "" });
                self.last = Some(now);
            }
        } else {
            let q = done * 4 / self.total.max(1);
            if q > self.quarter || finished {
                self.quarter = q;
                let _ = writeln!(err, "{}", line());
            }
        }
    }
}

/// Seconds as m:ss, or h:mm:ss from an hour.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn scalar<B: Backend>(t: &Tape<B>, v: crate::tape::Var) -> Result<f64> {
    Ok(t.backend().download(&t.value(v).buf)?[0].to_f64())
}

/// [`Backend::step_summary`] of forward pass `f` over `batch` images: one buffer of [loss, margin,
/// reconstruction, images right, labels found], to read once.
fn summarize<B: Backend>(
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

/// Evaluates `examples` of `src`: on MNIST with the decoder masked by the predicted class (as at test
/// time); on MultiMNIST with each pass masked by its label (the loss is then the training objective
/// on held-out pairs) and the two longest capsules as the prediction. On a backend that keeps data
/// resident, MNIST's examples are uploaded once and gathered there in batches of 4 × `batch_size`.
pub fn evaluate<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    src: &Source,
    examples: &[usize],
    batch_size: usize,
    label: &str,
) -> Result<EvalReport> {
    let mut resident = Resident::new(tape.backend(), src, 0)?;
    evaluate_on(tape, model, src, examples, batch_size, label, resident.as_mut())
}

/// [`evaluate`] with `src` already resident on the backend where it keeps data resident (validation
/// keeps its images there from one epoch to the next).
fn evaluate_on<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    src: &Source,
    examples: &[usize],
    batch_size: usize,
    label: &str,
    mut resident: Option<&mut Resident<B>>,
) -> Result<EvalReport> {
    let classes = model.cfg.classes;
    let per = src.dataset().per_image();
    let mut confusion = if per == 1 {
        vec![vec![0usize; classes]; classes]
    } else {
        vec![]
    };
    let mut r = Running::default();
    let mut digits_found = 0;
    let (mut predictions, mut labels) = (vec![], vec![]);
    let mut bar = Progress::new(label.to_string(), examples.len(), 0);
    // on a device that keeps data resident, MNIST's examples are gathered there, each batch four
    // training batches large; the order is written anew (the examples may differ from the last call's)
    if let Some(res) = resident.as_deref_mut() {
        res.order = None;
        res.set_order(tape.backend(), usize::MAX, examples)?;
    }
    let batch_size = match resident {
        Some(_) => (4 * batch_size).min(Config::MAX_BATCH),
        None => batch_size,
    };
    crate::infer::untaped(tape, |tape| {
        for (k, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
            tape.reset();
            let (f, batch_labels) = match &resident {
                Some(res) => {
                    let be = tape.backend();
                    let (mut x, mut y) = (be.alloc_out(chunk.len() * res.pixels)?, be.alloc_idx(chunk.len())?);
                    res.gather(be, k * batch_size, chunk.len(), &mut x, &mut y)?;
                    let labels = Rc::new(y);
                    let f = model.forward_on_backend(tape, x, labels, false)?;
                    (f, src.batch_labels(chunk))
                }
                None => {
                    let b = src.batch::<B::E>(chunk);
                    (model.forward_batch(tape, &b, false)?, b.labels)
                }
            };
            // the three losses in one read
            let summary = summarize(tape, &f, chunk.len(), classes, per)?;
            let report: Vec<f64> = tape.backend().download(&summary)?.iter().map(|x| x.to_f64()).collect();
            let n = chunk.len() as f64;
            r.loss += n * report[0];
            r.margin += n * report[1];
            r.recon += n * report[2];
            let pred = predicted(tape, &f, classes, per)?;
            let (exact, found) = crate::backend::count_correct(&pred, &batch_labels, per);
            r.correct += exact;
            digits_found += found;
            if per == 1 {
                for (&t, &p) in batch_labels.iter().zip(&pred) {
                    confusion[t as usize][p as usize] += 1;
                }
            }
            predictions.extend(pred);
            labels.extend(batch_labels);
            r.images += chunk.len();
            bar.update(r.images, &r);
        }
        Ok(())
    })?;
    Ok(EvalReport {
        loss: mean(&r, r.loss),
        margin: mean(&r, r.margin),
        recon: mean(&r, r.recon),
        accuracy: mean(&r, r.correct as f64),
        digit_accuracy: digits_found as f64 / (r.images * per).max(1) as f64,
        images: r.images,
        per,
        confusion,
        predictions,
        labels,
    })
}

/// The predicted digits of a forward pass, [B, per]: the argmax for one digit per image, else the
/// `per` longest capsules.
fn predicted<B: Backend>(
    tape: &Tape<B>,
    f: &crate::model::Forward<B::Idx>,
    classes: usize,
    per: usize,
) -> Result<Vec<u32>> {
    if per == 1 {
        return tape.backend().download_idx(&f.pred);
    }
    let lengths: Vec<f32> = tape
        .backend()
        .download(&tape.value(f.lengths).buf)?
        .iter()
        .map(|x| x.to_f64() as f32)
        .collect();
    Ok(crate::backend::top_classes(&lengths, classes, per))
}

/// The shuffle of epoch `epoch` (0-based): a function of the seed and the epoch only, so a resumed
/// run sees the same batches as an uninterrupted one.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

fn snapshot<B: Backend>(
    tape: &Tape<B>,
    adam: &Adam<B>,
    model: &CapsNet,
    state: TrainState,
    history: &[serde_json::Value],
) -> Result<Checkpoint> {
    let be = tape.backend();
    let f32s = |buf: &B::Buf| -> Result<Vec<f32>> { Ok(be.download(buf)?.iter().map(|x| x.to_f64() as f32).collect()) };
    let params: Vec<Vec<f32>> = model
        .params
        .all()
        .iter()
        .map(|&p| f32s(&tape.value(p).buf))
        .collect::<Result<_>>()?;
    // a gradient that was not finite leaves weights that are not: never save them over a good state
    for (spec, p) in model.cfg.param_specs().iter().zip(&params) {
        if let Some(i) = p.iter().position(|x| !x.is_finite()) {
            return Err(Error::msg(format!(
                "training diverged by step {}: {}[{i}] is {} (a non-finite gradient); the run's last checkpoint is the last good state",
                state.step, spec.name, p[i]
            )));
        }
    }
    Ok(Checkpoint {
        config: model.cfg.clone(),
        state,
        params,
        adam_m: adam.m.iter().map(f32s).collect::<Result<_>>()?,
        adam_v: adam.v.iter().map(f32s).collect::<Result<_>>()?,
        history: history.to_vec(),
    })
}

fn upload_all<B: Backend>(be: &B, host: &[Vec<f32>]) -> Result<Vec<B::Buf>> {
    host.iter()
        .map(|v| be.upload(&v.iter().map(|&x| B::E::from_f64(x as f64)).collect::<Vec<_>>()))
        .collect()
}

/// Removes the temporary files of writes that a kill interrupted (`.last.safetensors.tmpPID`, written by
/// [`crate::error::write_atomic`]): the file they were to replace is intact, so they are only waste.
fn remove_leftover_temporaries(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = [LAST, BEST, METRICS].iter().any(|f| {
            name.strip_prefix(&format!(".{f}.tmp"))
                .is_some_and(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        });
        if ours && std::fs::remove_file(e.path()).is_ok() {
            eprintln!("removed {}, left by an interrupted write", e.path().display());
        }
    }
}

/// The lines of metrics.jsonl for epochs ≤ `epoch` (none if the file is missing).
fn read_metrics(path: &Path, epoch: usize) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v.get("epoch")
                .and_then(|e| e.as_u64())
                .is_some_and(|e| e as usize <= epoch)
        })
        .collect()
}

/// Writes metrics.jsonl: one line per completed epoch, atomically.
fn write_metrics(path: &Path, history: &[serde_json::Value]) -> Result<()> {
    let text: String = history.iter().map(|m| format!("{m}\n")).collect();
    crate::error::write_atomic(path, text.as_bytes())
}

/// When to write a step checkpoint: after `every` of time or `steps` steps since the last write.
struct StepSaver {
    every: Option<Duration>,
    steps: Option<u64>,
    last_time: Instant,
    last_step: u64,
}

impl StepSaver {
    /// `step`: the step the run starts from (that of the checkpoint it resumed, or 0).
    fn new(opts: &TrainOptions, step: u64) -> Self {
        StepSaver {
            every: opts.checkpoint_every,
            steps: opts.checkpoint_steps,
            last_time: Instant::now(),
            last_step: step,
        }
    }
    fn due(&self, step: u64) -> bool {
        self.every.is_some_and(|d| self.last_time.elapsed() >= d)
            || self.steps.is_some_and(|n| step >= self.last_step + n)
    }
    fn saved(&mut self, step: u64) {
        self.last_time = Instant::now();
        self.last_step = step;
    }
}

/// The command that continues this run: the one that started it, with --resume.
fn resume_command() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    args.iter()
        .map(|a| {
            if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One training step (forward, backward, Adam) on the base digits `chunk` of `src` (the examples
/// of epoch `state.epoch`); adds the batch to the running sums. When the training set is `resident`
/// on the device, the batch is gathered there at the position the epoch's step plan holds, and the
/// step runs as [`planned_step`]: eagerly the first time a batch size comes, then captured as a graph
/// and replayed (unless `graphs` is eager). A non-finite loss skips the update on the backend, so the
/// weights stay as they were, and stops.
#[allow(clippy::too_many_arguments)]
fn train_step<B: Backend>(
    tape: &mut Tape<B>,
    model: &CapsNet,
    adam: &mut Adam<B>,
    src: &Source,
    chunk: &[usize],
    state: &TrainState,
    r: &mut Running,
    resident: Option<&mut Resident<B>>,
    graphs: &mut StepGraphs<B>,
) -> Result<()> {
    adam.lr = lr_at(state.lr, state.lr_decay, state.lr_decay_steps, adam.step);
    let n = chunk.len();
    let report = match resident {
        Some(res) => graphs.step(tape, model, adam, res, n)?,
        None => {
            tape.reset();
            let examples: Vec<usize> = chunk.iter().map(|&d| src.example_of(d, state.epoch)).collect();
            let mut b = src.batch::<B::E>(&examples);
            if state.shift > 0 {
                let shifts: Vec<(i32, i32)> = chunk
                    .iter()
                    .map(|&i| data::shift_of(state.seed, state.epoch, i, state.shift))
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
    Ok(())
}

/// A step on the resident training set, everything it needs already on the device: the batch of `n`
/// images gathered at the position in the step plan's current row, forward, backward, the summary,
/// Adam with the row's lr and bias corrections, and the plan's cursor moved to the next row. Nothing
/// is read or written by the host, so the same calls can be captured as a graph. Returns the summary
/// buffer ([`summarize`]), unread.
fn planned_step<B: Backend>(
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
struct StepGraphs<B: Backend> {
    capture: bool,
    /// Batch sizes stepped eagerly once.
    warm: Vec<usize>,
    /// By batch size: the graph and the summary buffer it writes.
    graphs: Vec<(usize, crate::backend::GraphId, B::Buf)>,
}

impl<B: Backend> StepGraphs<B> {
    fn new(be: &B, eager: bool) -> Self {
        StepGraphs {
            capture: be.can_capture() && !eager,
            warm: vec![],
            graphs: vec![],
        }
    }

    /// One [`planned_step`] of `n` images, run as this size's graph where there is one; its summary,
    /// read.
    fn step(
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
    fn forget(&mut self) {
        self.graphs.clear();
        self.warm.clear();
    }

    fn captured(&self) -> usize {
        self.graphs.len()
    }
}

/// The training set on the device: its images (bytes, packed four to a word) and labels, uploaded
/// once; the current epoch's shuffle (uploaded once per epoch, the same [`epoch_order`] as the host
/// path's, so a run's batches are the same on every backend), with each image's shift that epoch
/// where training shifts images (the same [`data::shift_of`]); and the epoch's step plan (the position
/// and Adam values of each step, [`crate::backend::plan_words`]), written once per epoch. These keep
/// their buffers from epoch to epoch, so a captured step reads the new ones.
struct Resident<B: Backend> {
    pixels: usize,
    images: B::Idx,
    labels: B::Idx,
    /// Largest shift in pixels (0: none).
    shift: usize,
    order: Option<(usize, B::Idx)>,
    /// (its key, the shifts) as for the order.
    shifts: Option<(usize, B::Idx)>,
    /// (its key, the plan) as for the order.
    plan: Option<(usize, B::Idx)>,
}

impl<B: Backend> Resident<B> {
    /// The MNIST split on `be`, its images shifted by up to `shift` pixels, when the backend keeps data
    /// resident; else None (MultiMNIST composes its pairs on the host).
    fn new(be: &B, src: &Source, shift: usize) -> Result<Option<Self>> {
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
    fn set_order(&mut self, be: &B, key: usize, order: &[usize]) -> Result<bool> {
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
    fn set_shifts(&mut self, be: &B, epoch: usize, seed: u64) -> Result<bool> {
        if self.shift == 0 || self.shifts.as_ref().is_some_and(|s| s.0 == epoch) {
            return Ok(false);
        }
        let host: Vec<u32> = (0..be.idx_len(&self.labels))
            .map(|i| crate::backend::pack_shift(data::shift_of(seed, epoch, i, self.shift)))
            .collect();
        let (buf, moved) = write_or_upload(be, self.shifts.take().map(|s| s.1), &host)?;
        self.shifts = Some((epoch, buf));
        Ok(moved)
    }

    /// Writes the step plan of epoch `key`: its cursor at row `first`, `rows` its steps in order;
    /// whether it went to a new buffer.
    fn set_plan(&mut self, be: &B, key: usize, first: usize, rows: &[StepRow]) -> Result<bool> {
        let words = crate::backend::plan_words(first, rows)?;
        let (buf, moved) = write_or_upload(be, self.plan.take().map(|p| p.1), &words)?;
        self.plan = Some((key, buf));
        Ok(moved)
    }

    /// The set as the backend gathers from it: the current order, and its epoch's shifts.
    fn set(&self) -> Result<ResidentSet<'_, B>> {
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
    fn plan(&self) -> Result<&B::Idx> {
        match (&self.order, &self.plan) {
            (Some(o), Some(p)) if o.0 == p.0 => Ok(&p.1),
            _ => Err(Error::msg("no step plan for this epoch's order on the device")),
        }
    }

    /// The batch of examples order[start .. start + n] into x [n·pixels] and y [n].
    fn gather(&self, be: &B, start: usize, n: usize, x: &mut B::Buf, y: &mut B::Idx) -> Result<()> {
        be.gather_batch(&self.set()?, start, n, x, y)
    }
}

/// `host` written over `buf` where it has the same length (its address kept), else uploaded anew
/// (then true).
fn write_or_upload<B: Backend>(be: &B, buf: Option<B::Idx>, host: &[u32]) -> Result<(B::Idx, bool)> {
    match buf {
        Some(mut b) if be.idx_len(&b) == host.len() => {
            be.write_idx(&mut b, host)?;
            Ok((b, false))
        }
        _ => Ok((be.upload_idx(host)?, true)),
    }
}

/// Epoch `state.epoch` over its shuffle, from where a step checkpoint left it (`state.partial`),
/// writing step checkpoints as `saver` says. Returns the epoch's running sums, or None when
/// [`INTERRUPT`] stopped it (the last completed step is then saved).
#[allow(clippy::too_many_arguments)]
fn run_epoch<B: Backend>(
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
) -> Result<Option<Running>> {
    let order = epoch_order(set.digits(), state.seed, state.epoch);
    let batches = order.len().div_ceil(state.batch_size);
    let mut r = state.partial.take().unwrap_or_default();
    if let Some(res) = resident.as_deref_mut() {
        // the epoch's order and step plan: one row per batch, from the batch this epoch resumes at
        // (rows before it are never read, so they repeat its values)
        let rows: Vec<StepRow> = (0..batches)
            .map(|k| {
                let step = adam.step + (k.max(r.batches) - r.batches) as u64;
                StepRow {
                    start: k * state.batch_size,
                    adam: adam.hyper_at(lr_at(state.lr, state.lr_decay, state.lr_decay_steps, step), step + 1),
                }
            })
            .collect();
        let moved = res.set_order(tape.backend(), state.epoch, &order)?
            | res.set_shifts(tape.backend(), state.epoch, state.seed)?
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
    for chunk in order.chunks(state.batch_size).skip(r.batches) {
        if INTERRUPT.load(Ordering::SeqCst) {
            if last.exists() {
                eprintln!(
                    "\ninterrupted before a new step: {} is the latest state",
                    last.display()
                );
            } else {
                eprintln!("\ninterrupted before the first step: nothing was trained");
            }
            return Ok(None);
        }
        train_step(
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
        r.batches += 1;
        r.seconds = before + start.elapsed().as_secs_f64();
        bar.update(r.images, &r);
        let stop = INTERRUPT.load(Ordering::SeqCst);
        if stop || saver.due(adam.step) {
            let mut st = state.clone();
            st.step = adam.step;
            st.partial = Some(r.clone());
            checkpoint::save(&last, &snapshot(tape, adam, model, st, history)?)?;
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

/// Trains as `opts` says; returns the metrics of the epochs run in this call.
pub fn train<B: Backend>(backend: B, opts: &TrainOptions) -> Result<Vec<EpochMetrics>> {
    Config::check_batch_size(opts.batch_size)?;
    if opts.epochs == 0 && !opts.resume {
        return Err(Error::msg("--epochs 0: nothing to train; give at least 1"));
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        return Err(Error::msg(format!("--lr must be a positive number, got {}", opts.lr)));
    }
    if opts.shift > 0 && opts.dataset == Dataset::MultiMnist {
        return Err(Error::msg(
            "--shift: MultiMNIST examples are shifted already (each digit by up to 4 px); leave it at 0",
        ));
    }
    if opts.shift > MAX_SHIFT {
        return Err(Error::msg(format!(
            "--shift must be between 0 and {MAX_SHIFT} pixels, got {}",
            opts.shift
        )));
    }
    if !(opts.lr_decay.is_finite() && opts.lr_decay > 0.0 && opts.lr_decay <= 1.0) {
        return Err(Error::msg(format!(
            "--lr-decay must be in (0, 1] (1: a constant learning rate), got {}",
            opts.lr_decay
        )));
    }
    if opts.lr_decay_steps == 0 {
        return Err(Error::msg("--lr-decay-steps must be at least 1"));
    }
    for (flag, v) in [("--limit", opts.limit), ("--val-limit", opts.val_limit)] {
        if v == Some(0) {
            return Err(Error::msg(format!("{flag} must be at least 1")));
        }
    }
    // flags and data first, the run directory last: a bad flag is reported as such wherever it points
    if !opts.resume {
        opts.config.validate()?;
    }
    let (train_set, val_set) = data::train_val(data::load(&opts.data_dir, Which::Train)?, opts.limit, opts.val_limit)?;
    let last_path = opts.run_dir.join(LAST);
    let run_files: Vec<&str> = [LAST, BEST, METRICS]
        .into_iter()
        .filter(|f| opts.run_dir.join(f).exists())
        .collect();
    if !opts.resume && !run_files.is_empty() {
        return Err(Error::file(
            &opts.run_dir,
            format!(
                "already holds a run ({}); pass --resume to continue it, or choose another --checkpoint-dir",
                run_files.join(", ")
            ),
        ));
    }
    if opts.resume && !last_path.exists() {
        return Err(Error::file(
            &opts.run_dir,
            "there is no run to resume here (no last.safetensors); leave out --resume to start one",
        ));
    }
    let resumed = if opts.resume {
        Some(checkpoint::load(&last_path)?)
    } else {
        None
    };
    if let Some(ck) = &resumed {
        check_resume(ck, opts)?;
    }
    let cfg = resumed
        .as_ref()
        .map(|c| c.config.clone())
        .unwrap_or_else(|| opts.config.clone());
    cfg.validate()?;
    check_side(&cfg, opts.dataset, &last_path)?;
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|e| Error::file(&opts.run_dir, format!("cannot create run directory: {e}")))?;
    remove_leftover_temporaries(&opts.run_dir);

    eprintln!("backend: {}", backend.name());
    eprintln!(
        "model: {} parameters ({} primary capsules, {} routing rounds)",
        cfg.param_count(),
        cfg.primary_caps(),
        cfg.routing_rounds
    );
    let train_src = Source::new(opts.dataset, &train_set, opts.seed)?;
    let val_src = Source::new(opts.dataset, &val_set, opts.seed)?;
    // validation: each held-out digit once, in its first pairing
    let val_examples = val_src.eval_examples(1);
    match opts.dataset {
        Dataset::Mnist => eprintln!(
            "data: {} training, {} validation images from {}",
            train_set.len(),
            val_set.len(),
            opts.data_dir.display()
        ),
        Dataset::MultiMnist => eprintln!(
            "data: MultiMNIST pairs of {} training digits (a new pairing each epoch), {} validation pairs of the {} held-out digits, from {}",
            train_set.len(),
            val_examples.len(),
            val_set.len(),
            opts.data_dir.display()
        ),
    }

    let mut tape = Tape::new(backend);
    let model = match &resumed {
        Some(ck) => CapsNet::from_checkpoint(&mut tape, ck)?,
        None => {
            let values = init_params(&cfg, opts.seed);
            CapsNet::new(cfg, &mut tape, &values)?
        }
    };
    let mut adam = Adam::new(&tape, opts.lr)?;
    let mut state = TrainState {
        epoch: 0,
        step: 0,
        seed: opts.seed,
        batch_size: opts.batch_size,
        lr: opts.lr,
        patience: opts.patience,
        best_val_loss: None,
        bad_epochs: 0,
        limit: opts.limit,
        val_limit: opts.val_limit,
        dataset: opts.dataset,
        shift: opts.shift,
        lr_decay: opts.lr_decay,
        lr_decay_steps: opts.lr_decay_steps,
        partial: None,
    };
    let metrics_path = opts.run_dir.join(METRICS);
    let mut history_json: Vec<serde_json::Value> = vec![];
    if let Some(ck) = resumed {
        adam.m = upload_all(tape.backend(), &ck.adam_m)?;
        adam.v = upload_all(tape.backend(), &ck.adam_v)?;
        adam.step = ck.state.step;
        state = ck.state;
        history_json = ck.history;
        if history_json.is_empty() && state.epoch > 0 {
            // a checkpoint from before checkpoints carried the history: the file's lines up to it
            history_json = read_metrics(&metrics_path, state.epoch);
        }
        // metrics.jsonl is what the checkpoint says it is, whatever a kill left in between
        write_metrics(&metrics_path, &history_json)?;
        let at = match &state.partial {
            Some(p) => format!("epoch {} batch {}", state.epoch + 1, p.batches),
            None => format!("the end of epoch {}", state.epoch),
        };
        eprintln!("resumed from {} at {at} (step {})", last_path.display(), state.step);
    }
    let mut saver = StepSaver::new(opts, state.step);
    let mut resident = Resident::new(tape.backend(), &train_src, state.shift)?;
    if resident.is_some() {
        let shifted = if state.shift > 0 { " and shifted" } else { "" };
        eprintln!("data: the training set lives on the device; each batch is gathered{shifted} there");
    }
    let mut graphs = StepGraphs::new(tape.backend(), opts.eager);
    // the validation images too stay on the device from one epoch to the next
    let mut val_resident = Resident::new(tape.backend(), &val_src, 0)?;

    let mut history = vec![];
    if state.epoch >= opts.epochs {
        eprintln!(
            "nothing to do: {} epoch{} done already, --epochs is {}",
            state.epoch,
            if state.epoch == 1 { "" } else { "s" },
            opts.epochs
        );
    }
    while state.epoch < opts.epochs {
        if state.should_stop() {
            eprintln!(
                "early stop: validation loss has not improved for {} epochs",
                state.bad_epochs
            );
            break;
        }
        let Some(r) = run_epoch(
            &mut tape,
            &model,
            &mut adam,
            &train_src,
            &mut state,
            opts,
            &mut saver,
            &history_json,
            resident.as_mut(),
            &mut graphs,
        )?
        else {
            // interrupted: the last completed step is saved
            return Ok(history);
        };
        let val = evaluate_on(
            &mut tape,
            &model,
            &val_src,
            &val_examples,
            state.batch_size,
            "  validation",
            val_resident.as_mut(),
        )?;
        state.epoch += 1;
        state.step = adam.step;
        state.partial = None;
        let improved = state.record_val_loss(val.loss);
        let m = EpochMetrics {
            epoch: state.epoch,
            step: state.step,
            train_loss: mean(&r, r.loss),
            train_margin: mean(&r, r.margin),
            train_recon: mean(&r, r.recon),
            train_acc: mean(&r, r.correct as f64),
            val_loss: val.loss,
            val_acc: val.accuracy,
            seconds: r.seconds,
            images_per_s: r.images as f64 / r.seconds.max(1e-9),
            device_mib: tape.backend().device_bytes().map(|b| b as f64 / (1 << 20) as f64),
        };
        history_json.push(m.to_json());
        let ck = snapshot(&tape, &adam, &model, state.clone(), &history_json)?;
        if improved {
            checkpoint::save(&opts.run_dir.join(BEST), &ck)?;
        }
        checkpoint::save(&last_path, &ck)?;
        saver.saved(state.step);
        write_metrics(&metrics_path, &history_json)?;
        let mem = m
            .device_mib
            .map(|mib| format!(", {mib:.0} MiB on the device"))
            .unwrap_or_default();
        let replayed = match graphs.captured() {
            0 => String::new(),
            g => format!(
                ", steps replayed from {g} captured graph{}",
                if g == 1 { "" } else { "s" }
            ),
        };
        eprintln!(
            "epoch {}: train loss {:.5} acc {:.2}% | val loss {:.5} acc {:.2}%{} | {:.1} s, {:.1} img/s{mem}{replayed}",
            m.epoch,
            m.train_loss,
            100.0 * m.train_acc,
            m.val_loss,
            100.0 * m.val_acc,
            if improved { " (best)" } else { "" },
            m.seconds,
            m.images_per_s
        );
        history.push(m);
    }
    Ok(history)
}

/// A resumed run continues the stored one: flags that would change it must agree with it.
fn check_resume(ck: &Checkpoint, opts: &TrainOptions) -> Result<()> {
    let s = &ck.state;
    let mut diffs = vec![];
    if opts.config != ck.config {
        diffs.push(format!(
            "model config {} vs stored {}",
            opts.config.to_json(),
            ck.config.to_json()
        ));
    }
    if opts.batch_size != s.batch_size {
        diffs.push(format!("--batch-size {} vs stored {}", opts.batch_size, s.batch_size));
    }
    if opts.seed != s.seed {
        diffs.push(format!("--seed {} vs stored {}", opts.seed, s.seed));
    }
    if opts.lr != s.lr {
        diffs.push(format!("--lr {} vs stored {}", opts.lr, s.lr));
    }
    // an absent limit is every image
    let limit = |l: Option<usize>| l.map_or_else(|| "not given (all images)".to_string(), |n| n.to_string());
    if opts.limit != s.limit {
        diffs.push(format!("--limit {} vs stored {}", limit(opts.limit), limit(s.limit)));
    }
    if opts.val_limit != s.val_limit {
        diffs.push(format!(
            "--val-limit {} vs stored {}",
            limit(opts.val_limit),
            limit(s.val_limit)
        ));
    }
    if opts.dataset != s.dataset {
        diffs.push(format!(
            "--dataset {} vs stored {}",
            opts.dataset.name(),
            s.dataset.name()
        ));
    }
    if opts.shift != s.shift {
        diffs.push(format!("--shift {} vs stored {}", opts.shift, s.shift));
    }
    if (opts.lr_decay, opts.lr_decay_steps) != (s.lr_decay, s.lr_decay_steps) {
        diffs.push(format!(
            "--lr-decay {} --lr-decay-steps {} vs stored {} every {} steps",
            opts.lr_decay, opts.lr_decay_steps, s.lr_decay, s.lr_decay_steps
        ));
    }
    if opts.patience != s.patience {
        diffs.push(format!("--patience {} vs stored {}", opts.patience, s.patience));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "--resume: {} was written with other settings; pass the same flags to continue it:\n  {}",
            opts.run_dir.join(LAST).display(),
            diffs.join("\n  ")
        )))
    }
}

/// A model runs only on images of its own side.
pub fn check_side(cfg: &Config, dataset: Dataset, source: &Path) -> Result<()> {
    if cfg.image_side != dataset.side() {
        return Err(Error::file(
            source,
            format!(
                "the model takes {0}x{0} images, {1}'s are {2}x{2}",
                cfg.image_side,
                dataset.name(),
                dataset.side()
            ),
        ));
    }
    Ok(())
}

/// Test-set evaluation of a checkpoint.
pub fn eval_checkpoint<B: Backend>(
    backend: B,
    ckpt: &Path,
    data_dir: &Path,
    limit: Option<usize>,
    batch_size: usize,
) -> Result<EvalReport> {
    let opts = EvalOptions {
        limit,
        batch_size,
        ..EvalOptions::default()
    };
    Ok(eval_with_figures(backend, ckpt, data_dir, &opts)?.0)
}

/// What `eval` and `figures` evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions<'a> {
    /// The first this-many test digits only.
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// The dataset (None: the one the checkpoint was trained on).
    pub dataset: Option<Dataset>,
    /// MultiMNIST: examples per test digit (the paper's 1,000 make 10M).
    pub pairs: usize,
    /// Also write the figures into this directory.
    pub figures: Option<(&'a Path, &'a figures::FigureOptions)>,
}

impl Default for EvalOptions<'_> {
    fn default() -> Self {
        EvalOptions {
            limit: None,
            batch_size: 100,
            dataset: None,
            pairs: 1,
            figures: None,
        }
    }
}

/// The epochs of the run that wrote `ckpt`: its directory's metrics.jsonl when there is one (the
/// whole run, also past a best checkpoint's epoch), else the history the checkpoint carries.
pub fn run_history(ckpt: &Path, ck: &Checkpoint) -> Result<Vec<figures::EpochPoint>> {
    let beside = ckpt.parent().map(|d| d.join(METRICS)).filter(|p| p.is_file());
    if let Some(path) = beside {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::file(&path, format!("line {}: {e}", i + 1))))
            .collect::<Result<_>>()?;
        return figures::epoch_points(&lines, &path);
    }
    figures::epoch_points(&ck.history, ckpt)
}

/// Test-set evaluation of a checkpoint, and its figures when asked ([`figures::write_all`], or
/// [`figures::write_multi`] on MultiMNIST). Returns the report and the files written.
pub fn eval_with_figures<B: Backend>(
    backend: B,
    ckpt: &Path,
    data_dir: &Path,
    opts: &EvalOptions,
) -> Result<(EvalReport, Vec<PathBuf>)> {
    if opts.batch_size == 0 || opts.limit == Some(0) {
        return Err(Error::msg("--batch-size and --limit must be at least 1"));
    }
    if !(1..=multimnist::PAIRS_PER_DIGIT).contains(&opts.pairs) {
        return Err(Error::msg(format!(
            "--pairs-per-digit must be between 1 and {}, got {}",
            multimnist::PAIRS_PER_DIGIT,
            opts.pairs
        )));
    }
    if let Some((_, f)) = opts.figures {
        f.validate()?;
    }
    let ck = checkpoint::load(ckpt)?;
    let dataset = opts.dataset.unwrap_or(ck.state.dataset);
    check_side(&ck.config, dataset, ckpt)?;
    let history = match opts.figures {
        Some(_) => run_history(ckpt, &ck)?,
        None => vec![],
    };
    let mut test = data::load(data_dir, Which::Test)?;
    if let Some(n) = opts.limit {
        if n > test.len() {
            return Err(Error::msg(format!(
                "--limit {n} exceeds the {} test images",
                test.len()
            )));
        }
        test = test.slice(0..n);
    }
    let src = Source::new(dataset, &test, multimnist::TEST_SEED)?;
    let examples = src.eval_examples(opts.pairs);
    let mut tape = Tape::new(backend);
    let model = CapsNet::from_checkpoint(&mut tape, &ck)?;
    let report = evaluate(&mut tape, &model, &src, &examples, opts.batch_size, "test")?;
    let written = match (opts.figures, &src) {
        (None, _) => vec![],
        (Some((out, f)), Source::Mnist(test)) => {
            figures::write_all(&mut tape, &model, test, &report, &history, out, f)?
        }
        (Some((out, f)), Source::Multi(m)) => {
            figures::write_multi(&mut tape, &model, m, &examples, &report, &history, out, f)?
        }
    };
    Ok((report, written))
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub batch_size: usize,
    pub steps: usize,
    pub median_ms: f64,
    pub images_per_s: f64,
    pub gflops: f64,
    /// Device memory held after the steps (None on the CPU).
    pub device_mib: Option<f64>,
    /// Whether the batch was gathered on the device from a resident set.
    pub resident: bool,
    /// Whether steps were replayed from a captured graph.
    pub graph: bool,
}

/// Times full training steps (forward, backward, Adam) on seeded random images, as training runs
/// them: on a backend that keeps data resident, the batch gathered there from a step plan and (unless
/// `eager`) the step replayed as a captured graph from the second step on, with its one read of the
/// summary; else uploaded from the host each step, reading the loss.
pub fn bench<B: Backend>(
    backend: B,
    cfg: Config,
    batch_size: usize,
    steps: usize,
    warmup: usize,
    eager: bool,
) -> Result<BenchReport> {
    if batch_size == 0 || steps == 0 {
        return Err(Error::msg("bench: --batch-size and --steps must be at least 1"));
    }
    let mut rng = StdRng::seed_from_u64(7);
    let split = Split {
        images: (0..batch_size * MNIST_PIXELS)
            .map(|_| rand::RngExt::random::<u8>(&mut rng))
            .collect(),
        labels: (0..batch_size).map(|i| (i % cfg.classes) as u8).collect(),
    };
    let flops = cfg.train_flops_per_image() * batch_size as f64;
    let mut tape = Tape::new(backend);
    let model = CapsNet::new(cfg.clone(), &mut tape, &init_params(&cfg, 1))?;
    let mut adam = Adam::new(&tape, 1e-3)?;
    let idx: Vec<usize> = (0..batch_size).collect();
    let (x, y) = split.batch::<B::E>(&idx);
    let src = Source::Mnist(&split);
    let mut resident = Resident::new(tape.backend(), &src, 0)?;
    if let Some(res) = resident.as_mut() {
        // every step the same batch, at lr 1e-3
        let rows: Vec<StepRow> = (0..warmup + steps)
            .map(|k| StepRow {
                start: 0,
                adam: adam.hyper_at(adam.lr, k as u64 + 1),
            })
            .collect();
        res.set_order(tape.backend(), 0, &idx)?;
        res.set_plan(tape.backend(), 0, 0, &rows)?;
    }
    let mut graphs = StepGraphs::new(tape.backend(), eager);
    // where steps are captured, the first runs eagerly and the second captures: neither is timed
    let warmup = if resident.is_some() && graphs.capture {
        warmup.max(2)
    } else {
        warmup
    };
    let mut times = vec![];
    for s in 0..warmup + steps {
        let t0 = Instant::now();
        match resident.as_mut() {
            // reads the summary: waits for the step
            Some(res) => drop(graphs.step(&mut tape, &model, &mut adam, res, batch_size)?),
            None => {
                tape.reset();
                let f = model.forward(&mut tape, &x, &y, true)?;
                tape.backward(f.loss)?;
                adam.update(&mut tape)?;
                scalar(&tape, f.loss)?; // waits for the step on an asynchronous backend
            }
        }
        if s >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median_ms = times[times.len() / 2];
    Ok(BenchReport {
        batch_size,
        steps,
        resident: resident.is_some(),
        graph: graphs.captured() > 0,
        median_ms,
        images_per_s: batch_size as f64 / (median_ms / 1e3),
        gflops: flops / (median_ms / 1e3) / 1e9,
        device_mib: tape.backend().device_bytes().map(|b| b as f64 / (1 << 20) as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_decays_continuously_as_the_official_code_does() {
        assert_eq!(lr_at(1e-3, 1.0, 2000, 123_456), 1e-3);
        assert_eq!(lr_at(1e-3, 0.96, 2000, 0), 1e-3);
        assert!((lr_at(1e-3, 0.96, 2000, 2000) - 0.96e-3).abs() < 1e-15);
        assert!((lr_at(1e-3, 0.96, 2000, 1000) - 1e-3 * 0.96f64.sqrt()).abs() < 1e-15);
        assert!((lr_at(1e-3, 0.96, 2000, 20_000) - 1e-3 * 0.96f64.powi(10)).abs() < 1e-15);
    }
}
