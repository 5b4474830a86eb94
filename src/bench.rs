//! Op microbenchmarks at the model's real shapes, on any backend: `capsnet bench --ops` and
//! `cargo bench --bench ops` both run [`op_bench`]. Each op runs once untimed, then `reps` times
//! between two synchronisations; the median is reported with the achieved GFLOP/s.

use std::time::Instant;

use crate::Result;
use crate::config::Config;
use crate::float::{Float, Precision};
use crate::ops::{Act, Backend};

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
    /// The configuration's own arguments ([`PeerConfig::args`]).
    pub extra: &'a [&'a str],
}

/// One way of running the PyTorch peer: its name and the script's arguments for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerConfig {
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// The peer's configurations on the CPU, each run in turn by `bench --peer` so that the ratio is
/// against PyTorch at its fastest here: fp32 first (the like-for-like figure), then NHWC
/// convolutions, bf16 autocast (oneDNN's bf16 kernels, on AMX where the CPU has it), both, and
/// both under `torch.compile` (which needs a C++ compiler; a configuration that fails is reported
/// and the others stand).
pub const CPU_PEER_CONFIGS: &[PeerConfig] = &[
    PeerConfig {
        name: "fp32",
        args: &[],
    },
    PeerConfig {
        name: "fp32, channels_last",
        args: &["--channels-last"],
    },
    PeerConfig {
        name: "bf16 autocast",
        args: &["--precision", "bf16-autocast"],
    },
    PeerConfig {
        name: "bf16 autocast, channels_last",
        args: &["--precision", "bf16-autocast", "--channels-last"],
    },
    PeerConfig {
        name: "bf16 autocast, channels_last, torch.compile",
        args: &["--precision", "bf16-autocast", "--channels-last", "--compile"],
    },
];

/// The peer's configuration on a GPU: the script's defaults there.
pub const CUDA_PEER_CONFIGS: &[PeerConfig] = &[PeerConfig {
    name: "default",
    args: &[],
}];

/// What the PyTorch peer needs, checked before any benchmark runs: its script, and a python with
/// torch (`python3`, or `CAPSNET_PYTHON`), as the script answers `--check`.
pub fn check_peer(script: &std::path::Path) -> Result<()> {
    use crate::Error;
    if !script.is_file() {
        return Err(Error::msg(format!(
            "--peer {}: no such file (the default is relative to the repository's root: run there, or give the script's path, --peer PATH/benches/capsnet_torch_bench.py)",
            script.display()
        )));
    }
    let python = std::env::var("CAPSNET_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg("--check")
        .output()
        .map_err(|e| Error::msg(format!("--peer: cannot run {python}: {}", crate::error::io_words(&e))))?;
    if !out.status.success() {
        return Err(peer_failed(script, &python, &out));
    }
    Ok(())
}

/// Why the peer failed: no torch in words (not its traceback), else the status and the last lines
/// of what it printed.
fn peer_failed(script: &std::path::Path, python: &str, out: &std::process::Output) -> crate::Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'torch'") {
        return crate::Error::msg(format!(
            "--peer {}: {python} has no torch (pip install torch)",
            script.display()
        ));
    }
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    crate::Error::msg(format!(
        "--peer {}: {python} exited with {}: {}",
        script.display(),
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    ))
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
        extra,
    } = *run;
    // torch.compile compiles in the first step (forward) and the second (backward): both untimed
    let warmup = if extra.contains(&"--compile") {
        warmup.max(2)
    } else {
        warmup
    };
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
        .args(extra)
        .env("OMP_NUM_THREADS", n(threads))
        .env("MKL_NUM_THREADS", n(threads))
        .output()
        .map_err(|e| Error::msg(format!("--peer: cannot run {python}: {e}")))?;
    if !out.status.success() {
        return Err(peer_failed(script, &python, &out));
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

// ---- every kernel version of the CUDA backend -----------------------------------------------------

/// The peak rates of a GPU: fp32 on CUDA cores, dense tf32 and bf16 on tensor cores, and memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub name: &'static str,
    pub fp32_tflops: f64,
    pub tf32_tflops: f64,
    pub bf16_tflops: f64,
    pub hbm_gbs: f64,
}

impl Peak {
    pub fn tflops(&self, p: Precision) -> f64 {
        match p {
            Precision::Fp32 => self.fp32_tflops,
            Precision::Tf32 => self.tf32_tflops,
            Precision::Bf16 => self.bf16_tflops,
        }
    }
}

/// The datasheet peaks (dense, no sparsity) of the GPUs this project is measured on, by the device's
/// name and SM count; the emulated device reports an H100's limits, so it gets the H100 SXM's.
pub fn peak_of(name: &str, sms: i32) -> Option<Peak> {
    let sxm = |name| Peak {
        name,
        fp32_tflops: 67.0,
        tf32_tflops: 494.7,
        bf16_tflops: 989.4,
        hbm_gbs: 3350.0,
    };
    if name.contains("H200") {
        return Some(Peak {
            hbm_gbs: 4800.0,
            ..sxm("H200 SXM")
        });
    }
    if name.contains("H100") && sms <= 114 {
        return Some(Peak {
            name: "H100 PCIe",
            fp32_tflops: 51.2,
            tf32_tflops: 378.0,
            bf16_tflops: 756.0,
            hbm_gbs: 2000.0,
        });
    }
    if name.contains("H100") {
        return Some(sxm("H100 SXM"));
    }
    None
}

/// One version of one op at one of the model's shapes: timed after it matched the reference, or not
/// timed because it did not.
#[derive(Clone, Debug)]
pub struct VersionTiming {
    /// The op and the layer, e.g. "conv2d_fwd primary 256->256 9x9/2".
    pub op: String,
    pub version: &'static str,
    pub precision: Precision,
    /// The median time; NaN when the version did not match the reference.
    pub ms: f64,
    /// Its worst difference from the reference as a multiple of what is allowed (≤ 1: it matched).
    pub worst: f64,
    /// Useful FLOPs (2 per multiply-add of the op itself, whatever the version computes).
    pub flops: f64,
    /// Bytes the version must move at least: its inputs and outputs once, and its own buffers.
    pub bytes: f64,
}

impl VersionTiming {
    /// The roofline floor: the time at the device's peak rate for this precision or at its memory
    /// bandwidth, whichever is longer.
    pub fn floor_ms(&self, peak: &Peak) -> f64 {
        (self.flops / (peak.tflops(self.precision) * 1e12)).max(self.bytes / (peak.hbm_gbs * 1e9)) * 1e3
    }
}

/// One op of the model at one shape on one backend, its inputs on the device: `launch` runs it
/// (accumulating ops add into their output), `output` reads the output back.
struct Case<'a> {
    layer: String,
    flops: f64,
    bytes: f64,
    /// Products each output sums (None: not a GEMM).
    k: Option<usize>,
    launch: Box<dyn FnMut() -> Result<()> + 'a>,
    output: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
}

impl<'a> Case<'a> {
    /// A case whose `launch` writes (or adds to) its output, `len` zeros on `be` at first.
    fn new<B: Backend<E = f32>>(
        be: &'a B,
        layer: String,
        flops: f64,
        bytes: f64,
        k: Option<usize>,
        len: usize,
        mut launch: impl FnMut(&mut B::Buf) -> Result<()> + 'a,
    ) -> Result<Case<'a>>
    where
        B::Buf: 'a,
    {
        let out = std::rc::Rc::new(std::cell::RefCell::new(be.zeros(len)?));
        let read = out.clone();
        Ok(Case {
            layer,
            flops,
            bytes,
            k,
            launch: Box::new(move || launch(&mut out.borrow_mut())),
            output: Box::new(move || be.download(&read.borrow())),
        })
    }
}

/// Seeded inputs in [lo, hi), or their absolute values.
fn host_inputs(n: usize, seed: usize, lo: f64, hi: f64, abs: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u = crate::data::mix((seed as u64) << 40 ^ i as u64) as f64 / u64::MAX as f64;
            let x = (lo + (hi - lo) * u) as f32;
            if abs { x.abs() } else { x }
        })
        .collect()
}

/// The cases of the op named `op` (a name of the registry's OPS) at the model's shapes and `batch`;
/// `abs`: every input replaced by its absolute value and the biases by zero (the reference's
/// Σ|a|·|b|, which bounds the rounding error).
fn op_cases<'a, B: Backend<E = f32>>(
    be: &'a B,
    op: &str,
    cfg: &Config,
    batch: usize,
    abs: bool,
) -> Result<Vec<Case<'a>>>
where
    B::Buf: 'a,
{
    let up = |n: usize, seed: usize, lo: f64, hi: f64| be.upload(&host_inputs(n, seed, lo, hi, abs));
    let bias = |n: usize, seed: usize| {
        be.upload(
            &host_inputs(n, seed, -0.1, 0.1, false)
                .iter()
                .map(|&b| if abs { 0.0 } else { b })
                .collect::<Vec<_>>(),
        )
    };
    let mut cases = vec![];
    let f = 4.0; // bytes per float
    match op {
        "conv2d_fwd" | "conv2d_bwd_input" | "conv2d_bwd_weight" => {
            for (name, s) in [("conv1", cfg.conv1_shape(batch)), ("primary", cfg.primary_shape(batch))] {
                if op == "conv2d_bwd_input" && s.in_c == 1 {
                    continue; // the image needs no gradient
                }
                let layer = format!("{name} {}->{} {}x{}/{}", s.in_c, s.out_c, s.k, s.k, s.stride);
                let flops = 2.0 * s.macs() as f64;
                let (x, w, dz) = (
                    up(s.x_len(), 1, 0.0, 1.0)?,
                    up(s.w_len(), 2, -0.1, 0.1)?,
                    up(s.y_len(), 3, -1.0, 1.0)?,
                );
                let (xl, wl, yl) = (s.x_len() as f64, s.w_len() as f64, s.y_len() as f64);
                cases.push(match op {
                    "conv2d_fwd" => {
                        let b = bias(s.out_c, 4)?;
                        let bytes = f * (xl + wl + yl);
                        Case::new(be, layer, flops, bytes, Some(s.patch_len() + 1), s.y_len(), move |y| {
                            be.conv2d_fwd(&s, &x, &w, &b, y, Act::Relu)
                        })?
                    }
                    "conv2d_bwd_input" => {
                        // dz, W, dx read and written, and (v2 and after) cols written and read
                        let bytes = f * (yl + wl + 2.0 * xl + 2.0 * (s.rows() * s.patch_len()) as f64);
                        let k = Some(s.k * s.k * s.out_c + 1);
                        Case::new(be, layer, flops, bytes, k, s.x_len(), move |dx| {
                            be.conv2d_bwd_input(&s, &dz, &w, dx)
                        })?
                    }
                    _ => {
                        let bytes = f * (xl + yl + 2.0 * wl);
                        Case::new(be, layer, flops, bytes, Some(s.rows() + 1), s.w_len(), move |dw| {
                            be.conv2d_bwd_weight(&s, &x, &dz, dw)
                        })?
                    }
                });
            }
        }
        "dense_fwd" | "dense_bwd_input" | "dense_bwd_weight" => {
            for (n, d) in cfg.decoder_shapes(batch).into_iter().enumerate() {
                let layer = format!("fc{} {}->{}", n + 1, d.inp, d.out);
                let flops = 2.0 * (d.rows * d.inp * d.out) as f64;
                let (xl, wl, yl) = ((d.rows * d.inp) as f64, (d.inp * d.out) as f64, (d.rows * d.out) as f64);
                let (x, w, dz) = (
                    up(d.rows * d.inp, 5, -1.0, 1.0)?,
                    up(d.inp * d.out, 6, -0.1, 0.1)?,
                    up(d.rows * d.out, 7, -1.0, 1.0)?,
                );
                cases.push(match op {
                    "dense_fwd" => {
                        let b = bias(d.out, 8)?;
                        let bytes = f * (xl + wl + yl);
                        Case::new(be, layer, flops, bytes, Some(d.inp + 1), d.rows * d.out, move |y| {
                            be.dense_fwd(&d, &x, &w, &b, y, Act::Relu)
                        })?
                    }
                    "dense_bwd_input" => {
                        let bytes = f * (yl + wl + 2.0 * xl);
                        Case::new(be, layer, flops, bytes, Some(d.out + 1), d.rows * d.inp, move |dx| {
                            be.dense_bwd_input(&d, &dz, &w, dx)
                        })?
                    }
                    _ => {
                        let bytes = f * (xl + yl + 2.0 * wl);
                        Case::new(be, layer, flops, bytes, Some(d.rows + 1), d.inp * d.out, move |dw| {
                            be.dense_bwd_weight(&d, &x, &dz, dw)
                        })?
                    }
                });
            }
        }
        "routing" => {
            // the op the model runs: prediction vectors and routing, forward, then both gradients
            let cs = cfg.caps_shape(batch);
            let rounds = cfg.routing_rounds;
            let (u, w, dv) = (
                up(cs.u_len(), 9, -0.5, 0.5)?,
                up(cs.w_len(), 10, -0.1, 0.1)?,
                up(cs.v_len(), 11, -1.0, 1.0)?,
            );
            // the forward case writes its own saved buffers; the backward reads these
            let mut saved = be.routing_saved(&cs, rounds)?;
            let mut saved_bwd = be.routing_saved(&cs, rounds)?;
            be.caps_routing_fwd(&cs, rounds, &u, &w, &mut be.zeros(cs.v_len())?, &mut saved_bwd)?;
            let mut du = be.zeros(cs.u_len())?;
            let (u, w) = (std::rc::Rc::new(u), std::rc::Rc::new(w));
            let uhat = cs.uhat_len() as f64;
            let fwd_flops = 2.0 * uhat * (cs.in_dim + 2 * rounds - 1) as f64;
            // what must move at least: u, W, the couplings saved per round, v (û never has to)
            let couplings = (cs.batch * rounds * cs.in_caps * cs.out_caps) as f64;
            let fwd_bytes = f * (cs.u_len() + cs.w_len() + cs.v_len()) as f64 + f * couplings;
            let (u2, w2) = (u.clone(), w.clone());
            cases.push(Case::new(
                be,
                format!("fwd, {rounds} rounds"),
                fwd_flops,
                fwd_bytes,
                None,
                cs.v_len(),
                move |v| be.caps_routing_fwd(&cs, rounds, &u2, &w2, v, &mut saved),
            )?);
            cases.push(Case::new(
                be,
                format!("bwd, {rounds} rounds"),
                2.0 * fwd_flops,
                fwd_bytes + f * (cs.u_len() + 2 * cs.w_len()) as f64,
                None,
                cs.w_len(),
                move |dw| be.caps_routing_bwd(&cs, rounds, &u, &w, &saved_bwd, &dv, Some(&mut du), Some(dw)),
            )?);
        }
        other => return Err(crate::Error::msg(format!("no benchmark cases for op {other}"))),
    }
    Ok(cases)
}

/// The reference's outputs of one op's cases for one precision, and the same on absolute values.
type Reference = (Precision, Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Times every version of every GEMM-shaped op and of routing at the model's shapes and `batch` on the
/// CUDA backend. Each version runs once and is checked against the CPU reference that rounds the same
/// GEMM inputs the same way (so only the f32 sums differ: within [`crate::float::sum_error_bound`] of
/// Σ|a|·|b|); only then is it timed, `reps` runs after a warm-up, each between two CUDA events
/// (median). A version that does not match is reported untimed (`ms` NaN, its `worst` difference),
/// and the others still run. Leaves the backend's kernel set as it found it.
pub fn version_bench(
    be: &crate::cuda::CudaBackend,
    cfg: &Config,
    batch: usize,
    reps: usize,
) -> Result<Vec<VersionTiming>> {
    let saved = be.kernels();
    let r = version_bench_inner(be, cfg, batch, reps);
    be.set_kernels(saved);
    r
}

fn version_bench_inner(
    be: &crate::cuda::CudaBackend,
    cfg: &Config,
    batch: usize,
    reps: usize,
) -> Result<Vec<VersionTiming>> {
    use crate::backend::cpu::CpuBackend;
    use crate::cuda::registry::{KernelSet, OPS};
    use crate::float::sum_error_bound;
    let ev = |e: cudarc::driver::DriverError| crate::Error::msg(format!("CUDA event: {}", crate::cuda::describe(&e)));
    let mut out = vec![];
    for op in OPS {
        // the reference once per precision: the op's outputs, and on absolute values the scale
        let mut references: Vec<Reference> = vec![];
        for version in op.versions {
            let p = version.precision;
            if !references.iter().any(|r| r.0 == p) {
                let cpu = CpuBackend::<f32>::with_gemm_inputs(p);
                let mut want = vec![];
                for mut c in op_cases(&cpu, op.name, cfg, batch, false)? {
                    (c.launch)()?;
                    want.push((c.output)()?);
                }
                let mut scale = vec![];
                for mut c in op_cases(&cpu, op.name, cfg, batch, true)? {
                    (c.launch)()?;
                    scale.push((c.output)()?);
                }
                references.push((p, want, scale));
            }
            let (_, want, scale) = references.iter().find(|r| r.0 == p).expect("computed above");
            let mut ks = KernelSet::default();
            ks.set(op.name, version.label)?;
            be.set_kernels(ks);
            for (n, mut case) in op_cases(be, op.name, cfg, batch, false)?.into_iter().enumerate() {
                (case.launch)()?;
                let got = (case.output)()?;
                // GEMMs: the bound on f32 sums of K products in this precision; routing: 1e-4 of each value
                let bound = case.k.map_or(1e-4, |k| sum_error_bound(p, k));
                let mut worst: f64 = 0.0;
                for ((g, w), a) in got.iter().zip(&want[n]).zip(&scale[n]) {
                    let allowed = 1e-6 + bound * (*a as f64).abs().max((*w as f64).abs());
                    let e = (*g as f64 - *w as f64).abs() / allowed;
                    worst = if e.is_nan() { f64::INFINITY } else { worst.max(e) };
                }
                if got.len() != want[n].len() || worst > 1.0 {
                    out.push(VersionTiming {
                        op: format!("{} {}", op.name, case.layer),
                        version: version.label,
                        precision: p,
                        ms: f64::NAN,
                        worst: if got.len() != want[n].len() {
                            f64::INFINITY
                        } else {
                            worst
                        },
                        flops: case.flops,
                        bytes: case.bytes,
                    });
                    continue;
                }
                (case.launch)()?; // warm-up
                let mut ms = vec![];
                for _ in 0..reps.max(1) {
                    let t0 = be.record_timing_event()?;
                    (case.launch)()?;
                    let t1 = be.record_timing_event()?;
                    ms.push(t0.elapsed_ms(&t1).map_err(ev)? as f64);
                }
                ms.sort_by(|a, b| a.total_cmp(b));
                out.push(VersionTiming {
                    op: format!("{} {}", op.name, case.layer),
                    version: version.label,
                    precision: p,
                    ms: ms[ms.len() / 2],
                    worst,
                    flops: case.flops,
                    bytes: case.bytes,
                });
            }
        }
    }
    Ok(out)
}
