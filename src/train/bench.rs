//! The step benchmark: full training steps timed as training runs them.

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::resident::Resident;
use super::step::{StepGraphs, scalar};
use crate::config::Config;
use crate::data::{MNIST_PIXELS, Split};
use crate::dataset::Source;
use crate::model::{CapsNet, init_params};
use crate::ops::Adam;
use crate::runtime::StepRow;
use crate::runtime::StepRuntime;
use crate::tape::{OpTime, Tape};
use crate::{Error, Result};

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
pub fn bench<B: StepRuntime>(
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
    let split = random_batch(&cfg, batch_size);
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

/// Where a training step's time goes on a backend that computes as it is called (the CPU backends):
/// `steps` steps after `warmup`, as [`bench`] runs them without a resident batch, each op's forward and
/// backward, the gradients' zeroing and Adam timed (`Tape::set_profiling`); each row is the
/// median over the steps of that op in that place. Returns the rows in the order they ran and the
/// median step time (ms).
pub fn profile<B: StepRuntime>(
    backend: B,
    cfg: Config,
    batch_size: usize,
    steps: usize,
    warmup: usize,
) -> Result<(Vec<OpTime>, f64)> {
    if batch_size == 0 || steps == 0 {
        return Err(Error::msg("bench: --batch-size and --steps must be at least 1"));
    }
    let split = random_batch(&cfg, batch_size);
    let mut tape = Tape::new(backend);
    let model = CapsNet::new(cfg.clone(), &mut tape, &init_params(&cfg, 1))?;
    let mut adam = Adam::new(&tape, 1e-3)?;
    let idx: Vec<usize> = (0..batch_size).collect();
    let (x, y) = split.batch::<B::E>(&idx);
    let (mut runs, mut totals): (Vec<Vec<OpTime>>, Vec<f64>) = (vec![], vec![]);
    tape.set_profiling(true);
    for s in 0..warmup + steps {
        let t0 = Instant::now();
        tape.reset();
        let f = model.forward(&mut tape, &x, &y, true)?;
        tape.backward(f.loss)?;
        let t_adam = Instant::now();
        adam.update(&mut tape)?;
        scalar(&tape, f.loss)?;
        let mut times = tape.take_profile();
        times.push(OpTime {
            backward: true,
            label: "Adam".to_string(),
            ms: t_adam.elapsed().as_secs_f64() * 1e3,
        });
        if s >= warmup {
            runs.push(times);
            totals.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let rows = runs[0]
        .iter()
        .enumerate()
        .map(|(i, first)| OpTime {
            ms: median(runs.iter().map(|r| r.get(i).map_or(0.0, |t| t.ms)).collect()),
            ..first.clone()
        })
        .collect();
    Ok((rows, median(totals)))
}

/// `batch_size` seeded random images with labels cycling through the classes.
fn random_batch(cfg: &Config, batch_size: usize) -> Split {
    let mut rng = StdRng::seed_from_u64(7);
    Split {
        images: (0..batch_size * MNIST_PIXELS)
            .map(|_| rand::RngExt::random::<u8>(&mut rng))
            .collect(),
        labels: (0..batch_size).map(|i| (i % cfg.classes) as u8).collect(),
    }
}
