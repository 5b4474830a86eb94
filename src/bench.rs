//! Op microbenchmarks at the model's real shapes, on any backend: `capsnet bench --ops` and
//! `cargo bench --bench ops` both run [`op_bench`]. Each op runs once untimed, then `reps` times
//! between two synchronisations; the median is reported with the achieved GFLOP/s.

use std::time::Instant;

use crate::Result;
use crate::backend::{Act, Backend};
use crate::float::Float;
use crate::model::Config;

pub struct OpTiming {
    pub name: String,
    pub ms: f64,
    pub gflops: f64,
}

fn filled<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    let host: Vec<B::E> = (0..n)
        .map(|i| B::E::from_f64(((i * 7919 % 1000) as f64 / 1000.0) - 0.5))
        .collect();
    be.upload(&host)
}

fn time<B: Backend>(
    be: &B,
    reps: usize,
    out: &mut Vec<OpTiming>,
    name: String,
    flops: f64,
    mut f: impl FnMut() -> Result<()>,
) -> Result<()> {
    f()?;
    be.synchronize()?;
    let mut ms = vec![];
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        be.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let m = ms[ms.len() / 2];
    out.push(OpTiming {
        name,
        ms: m,
        gflops: flops / (m / 1e3) / 1e9,
    });
    Ok(())
}

/// Times every op of a training step of the model `cfg` at batch `batch`.
pub fn op_bench<B: Backend>(be: &B, cfg: &Config, batch: usize, reps: usize) -> Result<Vec<OpTiming>> {
    let mut out = vec![];
    for (name, s) in [("conv1", cfg.conv1_shape(batch)), ("primary", cfg.primary_shape(batch))] {
        let name = format!("{name} {}->{} {}x{}/{}", s.in_c, s.out_c, s.k, s.k, s.stride);
        let (x, w, b, dz) = (
            filled(be, s.x_len())?,
            filled(be, s.w_len())?,
            filled(be, s.out_c)?,
            filled(be, s.y_len())?,
        );
        let mut y = be.zeros(s.y_len())?;
        let flops = 2.0 * s.macs() as f64;
        time(be, reps, &mut out, format!("{name} fwd"), flops, || {
            be.conv2d_fwd(&s, &x, &w, &b, &mut y, Act::Relu)
        })?;
        if s.in_c > 1 {
            let mut dx = be.zeros(s.x_len())?;
            time(be, reps, &mut out, format!("{name} bwd input"), flops, || {
                be.conv2d_bwd_input(&s, &dz, &w, &mut dx)
            })?;
        }
        let mut dw = be.zeros(s.w_len())?;
        time(be, reps, &mut out, format!("{name} bwd weight"), flops, || {
            be.conv2d_bwd_weight(&s, &x, &dz, &mut dw)
        })?;
    }

    let cs = cfg.caps_shape(batch);
    let (u, w, duhat) = (
        filled(be, cs.u_len())?,
        filled(be, cs.w_len())?,
        filled(be, cs.uhat_len())?,
    );
    let mut uhat = be.zeros(cs.uhat_len())?;
    let flops = 2.0 * cs.w_len() as f64 * batch as f64;
    time(be, reps, &mut out, "predict fwd".into(), flops, || {
        be.predict_fwd(&cs, &u, &w, &mut uhat)
    })?;
    let mut du = be.zeros(cs.u_len())?;
    time(be, reps, &mut out, "predict bwd input".into(), flops, || {
        be.predict_bwd_input(&cs, &duhat, &w, &mut du)
    })?;
    let mut dw = be.zeros(cs.w_len())?;
    time(be, reps, &mut out, "predict bwd weight".into(), flops, || {
        be.predict_bwd_weight(&cs, &u, &duhat, &mut dw)
    })?;
    for rounds in [2, 3] {
        let mut v = be.zeros(cs.v_len())?;
        let mut saved = be.routing_saved(&cs, rounds)?;
        let flops = 2.0 * (2 * rounds - 1) as f64 * cs.uhat_len() as f64;
        time(
            be,
            reps,
            &mut out,
            format!("routing fwd, {rounds} rounds"),
            flops,
            || be.routing_fwd(&cs, rounds, &uhat, &mut v, &mut saved),
        )?;
        let dv = filled(be, cs.v_len())?;
        let mut duh = be.zeros(cs.uhat_len())?;
        time(
            be,
            reps,
            &mut out,
            format!("routing bwd, {rounds} rounds"),
            2.0 * flops,
            || be.routing_bwd(&cs, rounds, &uhat, &saved, &dv, &mut duh),
        )?;
    }

    for (n, d) in cfg.decoder_shapes(batch).iter().enumerate() {
        let (x, w, b) = (
            filled(be, d.rows * d.inp)?,
            filled(be, d.inp * d.out)?,
            filled(be, d.out)?,
        );
        let mut y = be.zeros(d.rows * d.out)?;
        let flops = 2.0 * (d.rows * d.inp * d.out) as f64;
        time(
            be,
            reps,
            &mut out,
            format!("fc{} {}->{} fwd", n + 1, d.inp, d.out),
            flops,
            || be.dense_fwd(d, &x, &w, &b, &mut y, Act::Relu),
        )?;
    }
    Ok(out)
}

/// What the PyTorch peer (benches/capsnet_torch_bench.py) reported for the same model and batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReport {
    pub torch: String,
    pub median_ms: f64,
    pub images_per_s: f64,
}

/// What the peer is asked to run.
#[derive(Debug, Clone, Copy)]
pub struct PeerRun<'a> {
    /// "cpu" or "cuda".
    pub device: &'a str,
    pub routing: usize,
    pub w_std: f64,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
}

/// Runs the PyTorch peer `script` with `python3` (or `CAPSNET_PYTHON`): the notebook's model as `run`
/// describes it, with `run.threads` CPU threads; reads the JSON object its last line prints. Every way
/// this can fail (no python, no torch, a script that fails or prints something else) is an error that
/// says which.
pub fn torch_peer(script: &std::path::Path, run: &PeerRun<'_>) -> Result<PeerReport> {
    let PeerRun {
        device,
        routing,
        w_std,
        batch,
        steps,
        warmup,
        threads,
    } = *run;
    use crate::Error;
    if !script.is_file() {
        return Err(Error::msg(format!("--peer {}: no such file", script.display())));
    }
    let python = std::env::var("CAPSNET_PYTHON").unwrap_or_else(|_| "python3".into());
    let n = |x: usize| x.to_string();
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(["--device", device, "--batch-size", &n(batch), "--steps", &n(steps)])
        .args(["--warmup", &n(warmup), "--routing-iters", &n(routing)])
        .args(["--w-init-std", &w_std.to_string()])
        .env("OMP_NUM_THREADS", n(threads))
        .env("MKL_NUM_THREADS", n(threads))
        .output()
        .map_err(|e| Error::msg(format!("--peer: cannot run {python}: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let hint = if stderr.contains("No module named 'torch'") {
            " (torch is not installed: pip install torch)"
        } else {
            ""
        };
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(Error::msg(format!(
            "--peer {}: {python} exited with {}{hint}: {}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let bad = || {
        Error::msg(format!(
            "--peer {}: its last line is not the peer's JSON report: {last:?}",
            script.display()
        ))
    };
    let v: serde_json::Value = serde_json::from_str(last).map_err(|_| bad())?;
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(bad);
    Ok(PeerReport {
        torch: v.get("torch").and_then(|x| x.as_str()).unwrap_or("?").to_string(),
        median_ms: num("median_ms_per_step")?,
        images_per_s: num("images_per_s")?,
    })
}
