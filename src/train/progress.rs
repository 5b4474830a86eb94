//! What a training run says while it runs: a progress bar per epoch and validation pass, and a line
//! per epoch.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use super::{EpochMetrics, TrainOptions};
use crate::checkpoint::EpochProgress;
use crate::config::{Config, Dataset};

/// Sums of batch figures weighted by batch size.
/// An epoch's running sums (saved in step checkpoints as they are).
pub(crate) type Running = EpochProgress;

pub(crate) fn mean(r: &Running, x: f64) -> f64 {
    x / r.images.max(1) as f64
}

/// A one-line progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise.
pub(crate) struct Progress {
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
    pub(crate) fn new(label: String, total: usize, base: usize) -> Self {
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
    pub(crate) fn update(&mut self, done: usize, r: &Running) {
        let now = Instant::now();
        let finished = done == self.total;
        let line = || {
            let frac = done as f64 / self.total.max(1) as f64;
            let secs = self.start.elapsed().as_secs_f64();
            let rate = (done - self.base.min(done)) as f64 / secs.max(1e-9);
            let left = if finished {
                String::new()
            } else if rate > 0.0 {
                format!(", {} left", clock((self.total - done) as f64 / rate))
            } else {
                ", ? left".into()
            };
            let figures = format!(
                "{done}/{} loss {:.4} acc {:.2}%",
                self.total,
                mean(r, r.loss),
                100.0 * mean(r, r.correct as f64)
            );
            let full = format!("{figures} {rate:.0} img/s {}{left}", clock(secs));
            let short = format!("{figures}{left}");
            let width = if self.tty { terminal_width() } else { usize::MAX };
            fit_line(&self.label, frac, &[&full, &short], width)
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

/// The columns of the terminal on stderr (its window size, else COLUMNS, else 80).
fn terminal_width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize
    if unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
        return ws.ws_col as usize;
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(80)
}

/// A progress line in fewer than `width` columns (so the terminal never wraps it): the first of
/// `tails` (fullest first) that fits beside a bar of 8 to 24 cells, else the last one, cut.
pub(crate) fn fit_line(label: &str, frac: f64, tails: &[&str], width: usize) -> String {
    let room = width.saturating_sub(1);
    let fixed = |t: &str| label.chars().count() + t.chars().count() + 4; // " [" "] "
    let tail = tails
        .iter()
        .find(|t| fixed(t) + 8 <= room)
        .or(tails.last())
        .copied()
        .unwrap_or("");
    let cells = room.saturating_sub(fixed(tail)).clamp(8, 24);
    let filled = ((frac.clamp(0.0, 1.0) * cells as f64) as usize).min(cells);
    let line = format!("{label} [{}{}] {tail}", "#".repeat(filled), ".".repeat(cells - filled));
    line.chars().take(room).collect()
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

/// The line that ends an epoch: its losses and accuracies, whether it is the best so far, its speed,
/// the device memory held and how many captured graphs replayed its steps.
pub(crate) fn epoch_done(m: &EpochMetrics, improved: bool, graphs: usize) {
    let mem = m
        .device_mib
        .map(|mib| format!(", {mib:.0} MiB on the device"))
        .unwrap_or_default();
    let replayed = match graphs {
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
}

/// The lines a run starts with: the backend, the model, the data.
pub(crate) fn announce(
    backend: &str,
    cfg: &Config,
    opts: &TrainOptions,
    train: usize,
    val: usize,
    val_examples: usize,
) {
    eprintln!("backend: {backend}");
    eprintln!(
        "model: {} parameters ({} primary capsules, {} routing rounds)",
        cfg.param_count(),
        cfg.primary_caps(),
        cfg.routing_rounds
    );
    match opts.run.dataset {
        Dataset::Mnist => eprintln!(
            "data: {train} training, {val} validation images from {}",
            opts.data_dir.display()
        ),
        Dataset::MultiMnist => eprintln!(
            "data: MultiMNIST pairs of {train} training digits (a new pairing each epoch), {val_examples} validation pairs of the {val} held-out digits, from {}",
            opts.data_dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_fits_the_terminal() {
        let full = "52000/55000 loss 0.0123 acc 99.12% 71 img/s 12:03, 0:42 left";
        let short = "52000/55000 loss 0.0123 acc 99.12%, 0:42 left";
        let tails = [full, short];
        let wide = fit_line("epoch 10/10", 0.5, &tails, usize::MAX);
        assert!(
            wide.contains(&format!("[{}{}]", "#".repeat(12), ".".repeat(12))),
            "{wide}"
        );
        assert!(wide.ends_with(full));
        for width in [40, 60, 80, 100] {
            let l = fit_line("epoch 10/10", 0.5, &tails, width);
            assert!(l.chars().count() < width, "{width}: {} columns: {l}", l.chars().count());
            assert!(l.starts_with("epoch 10/10 ["), "{l}");
        }
        // at 100 all of it with a narrower bar; at 80 the speed and time go, the time left stays
        assert!(fit_line("epoch 10/10", 0.5, &tails, 100).ends_with(full));
        assert!(fit_line("epoch 10/10", 0.5, &tails, 80).ends_with(short));
    }
}
