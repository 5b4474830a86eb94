//! The run directory: its files (last.safetensors, best.safetensors, metrics.jsonl), what a fresh run
//! and a resumed one require of it, the leftovers of killed writes, and when a step checkpoint is due.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use super::TrainOptions;
use super::evaluate::check_side;
use crate::checkpoint::{self, Checkpoint, TrainState};
pub use crate::checkpoint::{BEST, LAST};
use crate::float::Float;
use crate::model::CapsNet;
use crate::ops::Adam;
use crate::runtime::StepRuntime;
use crate::tape::Tape;
use crate::{Error, Result};

pub const METRICS: &str = "metrics.jsonl";
/// One JSON object per training step (epoch, step, losses, batch accuracy, learning rate), for
/// pandas or a plotting tool; kept in step with the checkpoints.
pub const STEPS: &str = "steps.jsonl";
/// The lock file: held (flock) by the run writing into the directory, for its whole life.
pub const LOCK: &str = ".lock";

pub(crate) fn snapshot<B: StepRuntime>(
    tape: &Tape<B>,
    adam: &Adam<B>,
    model: &CapsNet,
    state: TrainState,
    history: &[serde_json::Value],
    last_saved: u64,
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
                "training diverged by step {}: {}[{i}] is {} (a non-finite gradient); the run's {LAST} (step {last_saved}) is the last good state: lower --lr, or resume it with --resume",
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

/// Whether process `pid` is alive; None where that cannot be told (no /proc).
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    proc.join("self").exists().then(|| proc.join(pid.to_string()).exists())
}

/// Removes the temporary files of writes that a kill interrupted (`.last.safetensors.tmpPID`, written by
/// [`crate::error::write_atomic`]): the file they were to replace is intact, so they are only waste.
/// Only those whose writer is gone: a live process's are left alone (the caller holds the run's lock,
/// so no other training writes here; where liveness cannot be told, nothing is removed).
pub(crate) fn remove_leftover_temporaries(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let writer = [LAST, BEST, METRICS, STEPS]
            .iter()
            .find_map(|f| name.strip_prefix(&format!(".{f}.tmp"))?.parse::<u32>().ok());
        let gone = writer.is_some_and(|pid| pid != std::process::id() && process_alive(pid) == Some(false));
        if gone && std::fs::remove_file(e.path()).is_ok() {
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

/// steps.jsonl, open for appending: the steps up to the run's checkpoint, one line each.
pub(crate) struct StepLog {
    path: std::path::PathBuf,
    out: std::io::BufWriter<File>,
}

impl StepLog {
    /// The run's step log holding the lines of steps up to `step` (those after it belong to no
    /// checkpoint, as do a killed write's last partial line), ready for the next.
    pub(crate) fn open(run_dir: &Path, step: u64) -> Result<StepLog> {
        let path = run_dir.join(STEPS);
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::error::write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, format!("cannot open: {}", crate::error::io_words(&e))))?;
        Ok(StepLog {
            path,
            out: std::io::BufWriter::new(file),
        })
    }

    pub(crate) fn record(&mut self, epoch: usize, step: u64, f: &super::step::StepFigures) -> Result<()> {
        use std::io::Write;
        let line = serde_json::json!({
            "epoch": epoch, "step": step, "loss": f.loss, "margin": f.margin, "recon": f.recon,
            "acc": f.accuracy, "lr": f.lr,
        });
        writeln!(self.out, "{line}").map_err(|e| self.failed(e))
    }

    /// Onto the disk, as a checkpoint is written.
    pub(crate) fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.out.flush().map_err(|e| self.failed(e))
    }

    fn failed(&self, e: std::io::Error) -> Error {
        Error::file(&self.path, format!("cannot write: {}", crate::error::io_words(&e)))
    }
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
    /// The step of the last write.
    pub(crate) fn last_step(&self) -> u64 {
        self.last_step
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

/// The run directory's lock, held while the value lives (and released by the OS if the process dies).
pub(crate) struct RunLock {
    _file: File,
}

/// Takes the lock of `dir` (which exists), or says which process holds it.
fn lock(dir: &Path) -> Result<RunLock> {
    use std::io::Write;
    let path = dir.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            Error::file(
                dir,
                format!("cannot write in the run directory: {}", crate::error::io_words(&e)),
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("process {holder}")
            };
            return Err(Error::file(
                dir,
                format!(
                    "a training run ({who}) is using this run directory; wait for it to end, or choose another --checkpoint-dir"
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::file(
                &path,
                format!("cannot lock the run directory: {}", crate::error::io_words(&e)),
            ));
        }
    }
    // the holder's PID, for the message of a run that is refused
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(RunLock { _file: file })
}

/// Bytes a checkpoint of `cfg` takes: its parameters and both Adam moments in f32, and a header.
fn checkpoint_bytes(cfg: &crate::config::Config) -> u64 {
    cfg.param_count() as u64 * 4 * 3 + (1 << 20)
}

/// Bytes free for an unprivileged writer on the file system of `dir`; None where it cannot be told.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// The run's files at their largest (best and last, and one of them again while it is replaced)
/// must fit beside what the directory holds already; `free`: the bytes the disk has.
pub(crate) fn check_space(dir: &Path, cfg: &crate::config::Config, free: Option<u64>) -> Result<()> {
    let one = checkpoint_bytes(cfg);
    let held: u64 = [LAST, BEST]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let need = (3 * one).saturating_sub(held);
    match free {
        Some(free) if free < need => Err(Error::file(
            dir,
            format!(
                "not enough free space for the run's checkpoints: they need {:.1} MB (last and best, {:.1} MB each, and one more while one is replaced) and the disk has {:.1} MB free",
                need as f64 / 1e6,
                one as f64 / 1e6,
                free as f64 / 1e6
            ),
        )),
        _ => Ok(()),
    }
}

/// The run directory for a fresh run: created, locked, empty of a run (nothing saved is ever
/// overwritten), with room for the run's checkpoints, cleared of the temporaries of killed writes.
pub(crate) fn open_fresh(opts: &TrainOptions) -> Result<RunLock> {
    let dir = &opts.run_dir;
    opts.config.validate()?;
    check_side(&opts.config, opts.run.dataset, &dir.join(LAST))?;
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::file(
            dir,
            format!("cannot create the run directory: {}", crate::error::io_words(&e)),
        )
    })?;
    let held = lock(dir)?;
    let run_files: Vec<&str> = [LAST, BEST, METRICS]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    if !run_files.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "already holds a run ({}); pass --resume to continue it, or choose another --checkpoint-dir",
                run_files.join(", ")
            ),
        ));
    }
    check_space(dir, &opts.config, free_bytes(dir))?;
    remove_leftover_temporaries(dir);
    Ok(held)
}

/// The run directory for `--resume`: locked, its last checkpoint loaded, the flags given checked
/// against it; the options of the stored run (its model and settings, `opts`' way of running).
pub(crate) fn open_resume(opts: &TrainOptions) -> Result<(RunLock, Checkpoint, TrainOptions)> {
    let dir = &opts.run_dir;
    let last = dir.join(LAST);
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            "there is no run to resume here (no such directory); leave out --resume to start one",
        ));
    }
    let held = lock(dir)?;
    if !last.exists() {
        let best = if dir.join(BEST).exists() {
            format!(" ({BEST} is here: copy it to {LAST} to continue from it)")
        } else {
            String::new()
        };
        return Err(Error::file(
            dir,
            format!("there is no run to resume here (no {LAST}){best}; leave out --resume to start one"),
        ));
    }
    let ck = checkpoint::load(&last)?;
    if !ck.has_optimizer() {
        return Err(Error::file(
            &last,
            "holds weights only (written by capsnet export): a run resumes from a training checkpoint",
        ));
    }
    check_resume(&ck, opts)?;
    let mut resumed = opts.clone();
    resumed.config = ck.config.clone();
    resumed.run = ck.state.run.clone();
    let epochs_given = opts
        .given
        .as_ref()
        .is_none_or(|g| g.iter().any(|f| f.flag == "--epochs"));
    if !epochs_given {
        resumed.epochs = ck.state.target_epochs.unwrap_or(opts.epochs);
    }
    resumed.config.validate()?;
    check_side(&resumed.config, resumed.run.dataset, &last)?;
    check_space(dir, &resumed.config, free_bytes(dir))?;
    remove_leftover_temporaries(dir);
    Ok((held, ck, resumed))
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

/// A resumed run continues the stored one: the flags given that would change it must agree with it
/// (with `opts.given` None, every setting of `opts` is meant and checked).
fn check_resume(ck: &Checkpoint, opts: &TrainOptions) -> Result<()> {
    let mut diffs = opts.config.differences(&ck.config);
    diffs.extend(opts.run.differences(&ck.state.run));
    let lines: Vec<String> = diffs
        .iter()
        .filter_map(|d| {
            let via = match &opts.given {
                None => String::new(),
                Some(given) => match given.iter().find(|g| g.flag == d.flag) {
                    None => return None,
                    Some(g) => g.via.as_ref().map_or(String::new(), |v| format!(" (set by {v})")),
                },
            };
            Some(format!("{} {}{via}, stored {}", d.flag, d.given, d.stored))
        })
        .collect();
    if lines.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "--resume: {} continues the run it stores; leave out the flags that would change it (or start a new run in another --checkpoint-dir):\n  {}",
            opts.run_dir.join(LAST).display(),
            lines.join("\n  ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_without_room_for_three_checkpoints_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("capsnet-space-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = crate::config::Config::default();
        let one = checkpoint_bytes(&cfg);
        let e = check_space(&dir, &cfg, Some(3 * one - 1)).unwrap_err().to_string();
        assert!(
            e.starts_with(&dir.display().to_string()) && e.contains("not enough free space"),
            "{e}"
        );
        assert!(e.contains(&format!("{:.1} MB each", one as f64 / 1e6)), "{e}");
        check_space(&dir, &cfg, Some(3 * one)).unwrap();
        check_space(&dir, &cfg, None).unwrap();
        // the checkpoints already there count: replacing them needs one more
        std::fs::write(dir.join(LAST), vec![0u8; 1000]).unwrap();
        check_space(&dir, &cfg, Some(3 * one - 1000)).unwrap();
        assert!(check_space(&dir, &cfg, Some(3 * one - 1001)).is_err());
        // the real file system answers
        assert!(free_bytes(&dir).is_some_and(|b| b > 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
