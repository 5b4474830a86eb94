//! `capsnet bench`: training steps or ops timed, the PyTorch peer beside them.

use capsnet::config::Config;
use capsnet::cuda::registry::Precision;
use capsnet::cuda::{self, CudaBackend};
use capsnet::train;
use capsnet::{Error, Result};

use super::args::*;
use super::device::{Selected, select};

/// `bench --ops` on the GPU: every version of every versioned op, checked, then timed, side by side
/// with the roofline floor of the device (the time at its peak for the precision, or at its memory
/// bandwidth).
fn print_version_bench(be: &CudaBackend, cfg: &Config, batch: usize, reps: usize, json: bool) -> Result<()> {
    let info = be.info();
    let peak = capsnet::bench::peak_of(&info.name, info.sms);
    println!("ops by kernel version, batch {batch}, {} ({} SMs)", info.name, info.sms);
    match &peak {
        Some(p) => println!(
            "peaks ({}): fp32 {} TFLOP/s, tf32 {}, bf16 {}, memory {} GB/s; floor = max(FLOPs at peak, bytes at bandwidth)",
            p.name, p.fp32_tflops, p.tf32_tflops, p.bf16_tflops, p.hbm_gbs
        ),
        None => println!("peaks of this GPU unknown: no % of peak or floor"),
    }
    println!(
        "{:<40} {:<5} {:<5} {:>9} {:>8} {:>8} {:>7} {:>9}",
        "op and layer", "ver", "prec", "ms", "TFLOP/s", "GB/s", "% peak", "floor ms"
    );
    let timings = capsnet::bench::version_bench(be, cfg, batch, reps)?;
    let mut mismatched = vec![];
    for t in &timings {
        if t.ms.is_nan() {
            println!(
                "{:<40} {:<5} {:<5} MISMATCH: {:.1} times the difference allowed from the reference; not timed",
                t.op,
                t.version,
                t.precision.name(),
                t.worst
            );
            mismatched.push(format!("{} {}", t.op, t.version));
        } else {
            let tflops = t.flops / (t.ms / 1e3) / 1e12;
            let gbs = t.bytes / (t.ms / 1e3) / 1e9;
            let (pct, floor) = match &peak {
                Some(p) => (
                    format!("{:.1}", 100.0 * tflops / p.tflops(t.precision)),
                    format!("{:.4}", t.floor_ms(p)),
                ),
                None => ("?".into(), "?".into()),
            };
            println!(
                "{:<40} {:<5} {:<5} {:>9.4} {:>8.2} {:>8.0} {:>7} {:>9}",
                t.op,
                t.version,
                t.precision.name(),
                t.ms,
                tflops,
                gbs,
                pct,
                floor
            );
        }
        if json {
            let num = |x: f64| {
                if x.is_finite() {
                    serde_json::json!(x)
                } else {
                    serde_json::Value::Null
                }
            };
            println!(
                "{}",
                serde_json::json!({
                    "kind": "op", "op": t.op, "version": t.version, "precision": t.precision.name(),
                    "batch": batch, "device": info.name, "matched": !t.ms.is_nan(), "worst": num(t.worst),
                    "ms": num(t.ms), "tflops": num(t.flops / (t.ms / 1e3) / 1e12),
                    "floor_ms": peak.as_ref().map_or(serde_json::Value::Null, |p| num(t.floor_ms(p))),
                })
            );
        }
    }
    if !mismatched.is_empty() {
        return Err(Error::msg(format!(
            "bench --ops: {} of {} did not match the reference: {}",
            mismatched.len(),
            timings.len(),
            mismatched.join(", ")
        )));
    }
    Ok(())
}

/// `capsnet bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    Config::check_batch_size(a.batch_size)?;
    if a.steps == 0 {
        return Err(Error::msg("bench: --steps must be at least 1"));
    }
    a.model.config().validate()?;
    if let Some(script) = &a.peer {
        if a.ops {
            return Err(Error::msg("--peer compares whole steps: leave out --ops"));
        }
        capsnet::bench::check_peer(script)?;
    }
    let sel = select(a.device, &a.kernels)?;
    if a.eager && !matches!(sel, Selected::Cuda(_)) {
        return Err(Error::msg(
            "--eager: only the CUDA backend replays steps as graphs; on the CPU every op is launched one by one already",
        ));
    }
    if a.ops {
        if let Selected::Cuda(be) = &sel {
            return print_version_bench(be, &a.model.config(), a.batch_size, a.steps, a.json);
        }
        let cfg = a.model.config();
        return with_backend!(sel, |be| {
            println!("ops, batch {}, {}", a.batch_size, capsnet::backend::Core::name(&be));
            let ops = capsnet::bench::op_bench(&be, &cfg, a.batch_size, a.steps)?;
            // whole steps of the same model and batch, profiled: each op's share of a step
            let (profile, step_ms) = train::profile(be, cfg.clone(), a.batch_size, a.steps, a.warmup.max(1))?;
            let other_rounds = |name: &str| {
                name.starts_with("routing") && !name.ends_with(&format!(", {} rounds", cfg.routing_rounds))
            };
            for t in &ops {
                let share = if other_rounds(&t.name) {
                    "(not this model's rounds)".to_string()
                } else {
                    format!("{:>5.1}% of a step", 100.0 * t.ms / step_ms)
                };
                println!("{:<34} {:>9.3} ms {:>9.1} GFLOP/s  {share}", t.name, t.ms, t.gflops);
            }
            println!(
                "\ntraining step, {} rounds: {step_ms:.3} ms, {:.1} GFLOP/s (median of {} steps; each op's time is its median)",
                cfg.routing_rounds,
                cfg.train_flops_per_image() * a.batch_size as f64 / step_ms / 1e6,
                a.steps
            );
            let mut in_ops = 0.0;
            for t in &profile {
                in_ops += t.ms;
                let phase = if t.backward { "backward" } else { "forward" };
                println!(
                    "  {phase:<9}{:<32} {:>9.3} ms  {:>5.1}%",
                    t.label,
                    t.ms,
                    100.0 * t.ms / step_ms
                );
            }
            println!(
                "  {:<41} {:>9.3} ms  {:>5.1}%",
                "between ops (reading the loss, medians)",
                step_ms - in_ops,
                100.0 * (step_ms - in_ops) / step_ms
            );
            Ok(())
        });
    }
    let cfg = a.model.config();
    println!(
        "model: {} parameters, {:.4} GFLOP per training image",
        cfg.param_count(),
        cfg.train_flops_per_image() / 1e9
    );
    let peer_device = match (&a.peer, &sel) {
        (None, _) => None,
        (Some(_), _)
            if cfg
                != Config {
                    routing_rounds: cfg.routing_rounds,
                    w_std: cfg.w_std,
                    ..Config::default()
                } =>
        {
            return Err(Error::msg(
                "--peer: the PyTorch peer builds only the default model (--conv1-channels 256, --primary-maps 32)",
            ));
        }
        (Some(_), Selected::Cuda(_)) if cuda::emulator::loaded().is_some() => {
            return Err(Error::msg("--peer: there is no PyTorch peer for the emulated device"));
        }
        (Some(_), Selected::Cuda(_)) => Some("cuda"),
        (Some(_), _) => Some("cpu"),
    };
    let precision = match &sel {
        Selected::Cuda(_) => a
            .kernels
            .precision
            .map_or(cuda::registry::DEFAULT_PRECISION, Into::into),
        Selected::Cpu(be) => be.precision(),
        _ => Precision::Fp32,
    };
    // the GEMM peak of this machine in the step's precision, measured in the same run: before the
    // steps and again after them, the higher of the two
    const PEAK_SECS: f64 = 0.5;
    let fourier = matches!(&sel, Selected::Cpu(be) if be.fourier());
    let peak_before = match &sel {
        Selected::Cpu(be) => Some((be.gemm_peak(PEAK_SECS)?, be.gemm_twin())),
        _ => None,
    };
    let (backend_name, r) = with_backend!(sel, |be| {
        let name = capsnet::backend::Core::name(&be);
        println!("backend: {name}");
        train::bench(be, cfg.clone(), a.batch_size, a.steps, a.warmup, a.eager).map(|r| (name, r))
    })?;
    let how = match (r.resident, r.graph) {
        (true, true) => " (batches gathered on the device, steps replayed as a CUDA graph)",
        (true, false) => " (batches gathered on the device, kernels launched one by one)",
        _ => "",
    };
    println!(
        "batch {}: median {:.3} ms/step over {} step{}, {:.1} images/s, {:.1} GFLOP/s{how}",
        r.batch_size,
        r.median_ms,
        r.steps,
        if r.steps == 1 { "" } else { "s" },
        r.images_per_s,
        r.gflops
    );
    if let Some(mib) = r.device_mib {
        println!("device memory held: {mib:.0} MiB");
    }
    let peak = match peak_before {
        Some((before, twin)) => Some(before.max(twin.gemm_peak(PEAK_SECS)?)),
        None => None,
    };
    if let Some(gflops) = peak {
        println!(
            "GEMM peak here ({} GEMM, 2048x2048x2048, the same threads, the fastest run of {PEAK_SECS} s before the steps and of {PEAK_SECS} s after them): {gflops:.1} GFLOP/s; the step runs at {:.0}% of it",
            precision.name(),
            100.0 * r.gflops / gflops
        );
        if fourier {
            println!(
                "(FLOPs as the model counts them, and the PyTorch peer: the Fourier convolutions multiply fewer, docs/BENCHMARKS.md)"
            );
        }
    }
    let mut peer_json = None;
    if let (Some(script), Some(device)) = (&a.peer, peer_device) {
        peer_json = Some(run_peers(script, device, &cfg, &a, r.images_per_s)?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "kind": "steps", "backend": backend_name, "precision": precision.name(),
                "batch": r.batch_size, "steps": r.steps, "graph": r.graph, "resident": r.resident,
                "median_ms": r.median_ms, "images_per_s": r.images_per_s, "gflops": r.gflops,
                "device_mib": r.device_mib, "peer": peer_json,
                "gemm_peak_gflops": peak,
            })
        );
    }
    Ok(())
}

/// The PyTorch peer in each of its configurations for `device`, one after the other, beside our
/// `ours` images/s: a line per configuration and the ratio against the fastest (and, on the CPU,
/// against fp32). The first configuration failing is an error; a later one failing is reported.
fn run_peers(
    script: &std::path::Path,
    device: &str,
    cfg: &Config,
    a: &BenchArgs,
    ours: f64,
) -> Result<serde_json::Value> {
    let threads = capsnet::par::threads();
    let configs = if device == "cpu" {
        capsnet::bench::CPU_PEER_CONFIGS
    } else {
        capsnet::bench::CUDA_PEER_CONFIGS
    };
    let mut done: Vec<(&str, capsnet::bench::PeerReport)> = vec![];
    let mut json = vec![];
    for (i, c) in configs.iter().enumerate() {
        let run = capsnet::bench::PeerRun {
            device,
            routing: cfg.routing_rounds,
            w_std: cfg.w_std,
            batch: a.batch_size,
            steps: a.steps,
            warmup: a.warmup,
            threads,
            extra: c.args,
        };
        match capsnet::bench::torch_peer(script, &run) {
            Ok(p) => {
                if i == 0 {
                    println!(
                        "peer: PyTorch {} on {device} ({threads} threads), batch {}, {}:",
                        p.torch,
                        a.batch_size,
                        if configs.len() > 1 {
                            "each configuration in turn"
                        } else {
                            "its default configuration"
                        }
                    );
                }
                println!(
                    "  {:<46} median {:.1} ms/step, {:.1} images/s",
                    c.name, p.median_ms, p.images_per_s
                );
                json.push(serde_json::json!({
                    "config": c.name, "median_ms": p.median_ms, "images_per_s": p.images_per_s,
                }));
                done.push((c.name, p));
            }
            Err(e) if i == 0 => return Err(e),
            Err(e) => {
                let why = e.to_string();
                let prefix = format!("--peer {}: ", script.display());
                let why = why.strip_prefix(&prefix).unwrap_or(&why).trim().to_string();
                println!("  {:<46} failed: {why}", c.name);
                json.push(serde_json::json!({ "config": c.name, "error": why }));
            }
        }
    }
    let (fastest, best) = done
        .iter()
        .max_by(|x, y| x.1.images_per_s.total_cmp(&y.1.images_per_s))
        .map(|(n, p)| (*n, p.images_per_s))
        .expect("the first configuration ran");
    let first = done[0].1.images_per_s;
    if done.len() > 1 {
        println!(
            "ratio: {:.2}x the fastest peer's images/s ({fastest}), {:.2}x {}'s",
            ours / best,
            ours / first,
            done[0].0
        );
    } else {
        println!("ratio: {:.2}x the peer's images/s ({fastest})", ours / best);
    }
    Ok(serde_json::json!({
        "torch": done[0].1.torch, "configs": json, "fastest": fastest, "ratio_to_fastest": ours / best,
        "ratio_to_first": ours / first,
    }))
}
