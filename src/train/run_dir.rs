//! The run directory: its files (last.safetensors, best.safetensors, metrics.jsonl), what a fresh run
//! and a resumed one require of it, the leftovers of killed writes, and when a step checkpoint is due.

use std::path::Path;
use std::time::{Duration, Instant};

use super::TrainOptions;
use super::evaluate::check_side;
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::float::Float;
use crate::model::CapsNet;
use crate::ops::Adam;
use crate::runtime::StepRuntime;
use crate::tape::Tape;
use crate::{Error, Result};

pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const METRICS: &str = "metrics.jsonl";

pub(crate) fn snapshot<B: StepRuntime>(
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

pub(crate) fn upload_all<B: StepRuntime>(be: &B, host: &[Vec<f32>]) -> Result<Vec<B::Buf>> {
    host.iter()
        .map(|v| be.upload(&v.iter().map(|&x| B::E::from_f64(x as f64)).collect::<Vec<_>>()))
        .collect()
}

/// Removes the temporary files of writes that a kill interrupted (`.last.safetensors.tmpPID`, written by
/// [`crate::error::write_atomic`]): the file they were to replace is intact, so they are only waste.
pub(crate) fn remove_leftover_temporaries(run_dir: &Path) {
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
pub(crate) fn read_metrics(path: &Path, epoch: usize) -> Vec<serde_json::Value> {
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
pub(crate) fn write_metrics(path: &Path, history: &[serde_json::Value]) -> Result<()> {
    let text: String = history.iter().map(|m| format!("{m}\n")).collect();
    crate::error::write_atomic(path, text.as_bytes())
}

/// When to write a step checkpoint: after `every` of time or `steps` steps since the last write.
pub(crate) struct StepSaver {
    every: Option<Duration>,
    steps: Option<u64>,
    last_time: Instant,
    last_step: u64,
}

impl StepSaver {
    /// `step`: the step the run starts from (that of the checkpoint it resumed, or 0).
    pub(crate) fn new(opts: &TrainOptions, step: u64) -> Self {
        StepSaver {
            every: opts.checkpoint_every,
            steps: opts.checkpoint_steps,
            last_time: Instant::now(),
            last_step: step,
        }
    }
    pub(crate) fn due(&self, step: u64) -> bool {
        self.every.is_some_and(|d| self.last_time.elapsed() >= d)
            || self.steps.is_some_and(|n| step >= self.last_step + n)
    }
    pub(crate) fn saved(&mut self, step: u64) {
        self.last_time = Instant::now();
        self.last_step = step;
    }
}

/// The command that continues this run: the one that started it, with --resume.
pub(crate) fn resume_command() -> String {
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

/// The run directory as `opts` needs it: empty of a run for a fresh one (nothing saved is ever
/// overwritten), holding one to resume (its last checkpoint, loaded and checked against the flags);
/// created, and cleared of the temporaries of killed writes. The resumed checkpoint, if any.
pub(crate) fn open(opts: &TrainOptions) -> Result<Option<Checkpoint>> {
    let last = opts.run_dir.join(LAST);
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
    if opts.resume && !last.exists() {
        return Err(Error::file(
            &opts.run_dir,
            "there is no run to resume here (no last.safetensors); leave out --resume to start one",
        ));
    }
    let resumed = if opts.resume {
        Some(checkpoint::load(&last)?)
    } else {
        None
    };
    if let Some(ck) = &resumed {
        check_resume(ck, opts)?;
    }
    let cfg = resumed.as_ref().map_or(&opts.config, |c| &c.config);
    cfg.validate()?;
    check_side(cfg, opts.run.dataset, &last)?;
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|e| Error::file(&opts.run_dir, format!("cannot create run directory: {e}")))?;
    remove_leftover_temporaries(&opts.run_dir);
    Ok(resumed)
}

/// Continues checkpoint `ck`: Adam's moments and step onto the backend; the state and the history,
/// metrics.jsonl rewritten as the checkpoint has it (whatever a kill left in between).
pub(crate) fn resume<B: StepRuntime>(
    opts: &TrainOptions,
    ck: Checkpoint,
    tape: &Tape<B>,
    adam: &mut Adam<B>,
) -> Result<(TrainState, Vec<serde_json::Value>)> {
    let metrics = opts.run_dir.join(METRICS);
    adam.m = upload_all(tape.backend(), &ck.adam_m)?;
    adam.v = upload_all(tape.backend(), &ck.adam_v)?;
    adam.step = ck.state.step;
    let state = ck.state;
    let mut history = ck.history;
    if history.is_empty() && state.epoch > 0 {
        // a checkpoint from before checkpoints carried the history: the file's lines up to it
        history = read_metrics(&metrics, state.epoch);
    }
    write_metrics(&metrics, &history)?;
    let at = match &state.partial {
        Some(p) => format!("epoch {} batch {}", state.epoch + 1, p.batches),
        None => format!("the end of epoch {}", state.epoch),
    };
    eprintln!(
        "resumed from {} at {at} (step {})",
        opts.run_dir.join(LAST).display(),
        state.step
    );
    Ok((state, history))
}

/// The end of an epoch on disk: `ck` as last.safetensors (and best.safetensors when it `improved`),
/// then metrics.jsonl from its history.
pub(crate) fn save_epoch(opts: &TrainOptions, ck: &Checkpoint, improved: bool) -> Result<()> {
    if improved {
        checkpoint::save(&opts.run_dir.join(BEST), ck)?;
    }
    checkpoint::save(&opts.run_dir.join(LAST), ck)?;
    write_metrics(&opts.run_dir.join(METRICS), &ck.history)
}

/// A resumed run continues the stored one: flags that would change it must agree with it.
fn check_resume(ck: &Checkpoint, opts: &TrainOptions) -> Result<()> {
    let mut diffs = vec![];
    if opts.config != ck.config {
        diffs.push(format!(
            "model config {} vs stored {}",
            opts.config.to_json(),
            ck.config.to_json()
        ));
    }
    diffs.extend(opts.run.differences(&ck.state.run));
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
