//! `capsnet info`: the GPU, driver, NVRTC and kernels; `info --kernels`, the static kernel report.

use capsnet::cuda::{self, CudaBackend};
use capsnet::{Error, Result};

use super::args::*;

fn kernel_report(arch: &str) -> Result<()> {
    let c = capsnet::config::Config::default();
    let report = cuda::report::kernel_report(arch, &c.caps_shape(1).dims(), c.routing_rounds)
        .map_err(|e| Error::msg(format!("info --kernels: {e}")))?;
    let (major, minor) = cuda::nvrtc_version()?;
    println!(
        "kernels compiled for {arch} by NVRTC {major}.{minor}; ptxas's figures, occupancy at the launch block size"
    );
    println!(
        "{:<22} {:<15} {:>7} {:>5} {:>12} {:>6} {:>7} {:>8}  occupancy",
        "kernel", "file", "threads", "regs", "spill st/ld", "stack", "smem", "dyn smem"
    );
    for k in &report {
        let occ = match k.occupancy {
            Some(o) => format!(
                "{:>3.0}% ({} blocks, by {})",
                100.0 * o.fraction,
                o.blocks,
                o.limited_by
            ),
            None => "- (limits of this architecture not known)".into(),
        };
        println!(
            "{:<22} {:<15} {:>7} {:>5} {:>12} {:>6} {:>7} {:>8}  {occ}",
            k.kernel.name,
            k.kernel.file,
            k.kernel.threads,
            k.registers,
            format!("{}/{}", k.spill_stores, k.spill_loads),
            k.stack,
            k.static_smem,
            k.dynamic_smem
        );
    }
    println!("dyn smem: at the default model's shapes (routing); spills in bytes");
    println!();
    println!("op versions (* the default; --precision tf32/bf16 picks those versions, --kernels OP=VERSION any):");
    for op in cuda::registry::OPS {
        for v in op.versions {
            let kernels: Vec<&str> = v.kernels.iter().map(|k| k.name).collect();
            println!(
                "  {:<18} {}{:<5} {:<5} {:<44} {}",
                op.name,
                if v.label == op.default { "*" } else { " " },
                v.label,
                v.precision.name(),
                kernels.join(" + "),
                v.about
            );
        }
    }
    Ok(())
}

/// `--arch`: sm_XY (an optional letter after), compute capability 8.0 or newer.
fn check_arch(arch: &str) -> Result<()> {
    let cc = arch
        .strip_prefix("sm_")
        .map(|n| n.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
        .and_then(|n| n.parse::<u32>().ok());
    match cc {
        None => Err(Error::msg(format!(
            "--arch {arch}: an architecture is sm_ and its compute capability, such as sm_80 or sm_90"
        ))),
        Some(cc) if cc < 80 => Err(Error::msg(format!(
            "--arch {arch}: capsnet's kernels need sm_80 (Ampere) or newer: their tensor-core and asynchronous-copy instructions do not exist before it"
        ))),
        Some(_) => Ok(()),
    }
}

pub fn run(a: InfoArgs) -> Result<()> {
    if a.kernels {
        let arch = a.arch.as_deref().unwrap_or("sm_90");
        check_arch(arch)?;
        return kernel_report(arch);
    }
    if let Some(arch) = &a.arch {
        return Err(Error::msg(format!(
            "--arch {arch}: the architecture of the static report; add --kernels"
        )));
    }
    println!("capsnet {}", env!("CARGO_PKG_VERSION"));
    if a.emulated {
        cuda::emulator::load(cuda::emulator::Variant::Plain)?;
        println!("device 0 is EMULATED: the kernels run on this CPU; its figures are an H100's, not this machine's");
    }
    match cuda::driver_version() {
        Ok((a, b)) => println!("CUDA driver: {a}.{b}"),
        Err(e) => println!("CUDA driver: {e}"),
    }
    match cuda::nvrtc_version() {
        Ok((a, b)) => println!("NVRTC: {a}.{b}"),
        Err(e) => println!("NVRTC: {e}"),
    }
    // the device's own architecture when there is one, else the GPUs this project targets
    let device = cuda::open_device(0).and_then(|ctx| cuda::device_info(&ctx));
    let target = match &device {
        Ok(d) => {
            let (a, b) = d.compute_capability;
            println!(
                "device 0: {}, compute capability {a}.{b}, {} SMs, {:.1} GiB, {} KiB shared memory per block (opt-in)",
                d.name,
                d.sms,
                d.total_mem as f64 / (1u64 << 30) as f64,
                d.max_smem_optin / 1024
            );
            cuda::kernel_target(d.compute_capability)?
        }
        Err(e) => {
            println!("device: none ({e})");
            cuda::Target::Cubin(90)
        }
    };
    if !cuda::nvrtc_available() {
        println!("kernels: not compiled (no NVRTC)");
        return Ok(());
    }
    let images = cuda::compile_all(target)?;
    let (compiled, cached) = cuda::compile::compilations();
    let cache = match cuda::compile::cache_dir() {
        Some(d) => format!("{cached} read from the cache in {}", d.display()),
        None => "no cache".into(),
    };
    println!(
        "kernels: all {} in {} files compile to {target} ({compiled} compiled by NVRTC, {cache})",
        cuda::registry::ALL.len(),
        images.len()
    );
    if device.is_ok() {
        let be = CudaBackend::new(0)?;
        println!(
            "kernels: all load on {}; as the driver loaded them:",
            capsnet::backend::Core::name(&be)
        );
        println!(
            "  {:<24} {:>5} {:>12} {:>12}",
            "kernel", "regs", "static smem", "max threads"
        );
        for k in be.loaded_kernels()? {
            println!(
                "  {:<24} {:>5} {:>12} {:>12}",
                k.kernel.name, k.registers, k.static_smem, k.max_threads
            );
        }
    }
    Ok(())
}
