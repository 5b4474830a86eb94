//! The `capsnet` binary: train, evaluate, benchmark, fetch MNIST.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::fast::FastCpu;
use capsnet::config::{Config, Preset, RunSettings};
use capsnet::cuda::registry::{KernelSet, Precision};
use capsnet::cuda::{self, CudaBackend};
use capsnet::train::{self, TrainOptions};
use capsnet::{Error, Result, data, predict};

#[derive(Parser)]
#[command(
    name = "capsnet",
    version,
    about = "CapsNet (dynamic routing between capsules) training engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train on MNIST (the last 5,000 training images validate), checkpointing every epoch.
    // `--lr -0.001` is a value (which train refuses), not an unknown flag `-0`
    #[command(allow_negative_numbers = true)]
    Train(TrainArgs),
    /// Test accuracy and confusion matrix of a checkpoint.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// The notebook's pictures of a checkpoint as PNGs: test digits over their reconstructions, what
    /// each capsule dimension encodes, training curves, misclassified digits, the confusion matrix.
    /// The curves come from metrics.jsonl beside the checkpoint, else from the history it carries.
    #[command(allow_negative_numbers = true)]
    Figures(FiguresArgs),
    /// Classify your own images (PNG, JPEG, GIF, BMP, WebP, PNM; any size and colour), each prepared
    /// as MNIST's digits were: grey, inverted when dark on light, cropped to the digit, scaled to fit
    /// 20x20 and centred by its centre of mass in 28x28 (a 28x28 image is taken as it is).
    Predict(PredictArgs),
    /// Time full training steps (forward, backward, Adam) on random images.
    #[command(allow_negative_numbers = true)]
    Bench(BenchArgs),
    /// Write MultiMNIST examples (two overlapping digits, 36x36) as IDX files and a sample grid PNG.
    Multimnist(MultiMnistArgs),
    /// Fetch the four MNIST files, checked by SHA-256, into the data directory.
    Download(DataArg),
    /// The GPU, the CUDA driver and NVRTC versions, and whether every kernel compiles.
    Info(InfoArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// The fast CPU backend: f32, SIMD GEMMs, every core.
    Cpu,
    /// The CPU reference: f32 storage, every sum in f64 (the spec the others are tested against; slow).
    CpuReference,
    Cuda,
    Auto,
    /// The CUDA backend on the emulated device: every kernel runs on the CPU, one fiber per CUDA
    /// thread (slow; for checking kernels without a GPU). Needs g++ and NVRTC.
    Emulated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    /// fp32 multiplies on CUDA cores: exact single precision.
    Fp32,
    /// tf32 tensor cores: GEMM inputs rounded to 10 mantissa bits, fp32 sums.
    Tf32,
    /// bf16 tensor cores: GEMM inputs rounded to 7 mantissa bits, fp32 sums.
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Precision {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Tf32 => Precision::Tf32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// Which kernel versions the CUDA backend launches.
#[derive(Args, Clone, Default)]
struct KernelArgs {
    /// What the convolutions and the decoder multiply in on the GPU: bf16 or tf32 on tensor cores,
    /// fp32 exactly on CUDA cores (master weights, the capsule layers, the losses and Adam stay fp32)
    /// [default: bf16 on a GPU, chosen by accuracy; the CPU backends compute in fp32].
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Kernel versions, OP=VERSION,... over --precision's (`capsnet info --kernels` lists them; the
    /// CAPSNET_KERNELS environment variable sets them too, and this flag wins).
    #[arg(long, value_name = "OP=VERSION,...")]
    kernels: Option<String>,
}

impl KernelArgs {
    /// The set the CUDA backend launches: --precision's versions, then CAPSNET_KERNELS, then --kernels.
    fn kernel_set(&self) -> Result<KernelSet> {
        let p = self.precision.map_or(cuda::registry::DEFAULT_PRECISION, Into::into);
        let mut ks = KernelSet::for_precision(p).with_env()?;
        if let Some(spec) = &self.kernels {
            ks.apply(spec, "--kernels")?;
        }
        Ok(ks)
    }

    /// Refuses flags that only the CUDA backend has, for a CPU backend.
    fn cpu_only(&self, device: &str) -> Result<()> {
        if let Some(p) = self.precision.filter(|&p| p != PrecisionArg::Fp32) {
            return Err(Error::msg(format!(
                "--precision {}: only the CUDA backend has tensor-core kernels, and {device} runs on the CPU (use --device cuda or emulated)",
                Precision::from(p).name()
            )));
        }
        if self.kernels.is_some() {
            return Err(Error::msg(format!(
                "--kernels: kernel versions are the CUDA backend's, and {device} runs on the CPU"
            )));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DatasetArg {
    /// 28x28 digits, one each.
    Mnist,
    /// 36x36 overlays of two digits of different classes (Sabour et al. 2017, section 6), generated
    /// from MNIST on the fly.
    Multimnist,
}

impl DatasetArg {
    fn dataset(self) -> capsnet::dataset::Dataset {
        match self {
            DatasetArg::Mnist => capsnet::dataset::Dataset::Mnist,
            DatasetArg::Multimnist => capsnet::dataset::Dataset::MultiMnist,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SplitArg {
    /// Pairs of the first 55,000 training digits (what `train --dataset multimnist` trains on).
    Train,
    /// Pairs of the last 5,000 training digits (its validation examples).
    Validation,
    /// Pairs of the 10,000 test digits (what `eval` tests).
    Test,
}

#[derive(Args)]
struct MultiMnistArgs {
    /// Output directory: multimnist-SPLIT-images-idx3-ubyte ([N, 36, 36] bytes),
    /// multimnist-SPLIT-labels-idx2-ubyte ([N, 2]: both digits) and multimnist-SPLIT-sample.png.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Examples to write: every digit's first pairing, then every digit's second, and so on.
    #[arg(long, default_value_t = 100)]
    count: usize,
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// The generator's seed [default: 2017 for the test split, as eval uses; 42, train's default, for
    /// the others].
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    data: DataArg,
}

#[derive(Args)]
struct InfoArgs {
    /// Report on the emulated device instead of GPU 0.
    #[arg(long)]
    emulated: bool,
    /// The static kernel report instead, no GPU needed: every kernel's registers, spills, stack,
    /// shared memory and theoretical occupancy, from ptxas's own report through NVRTC.
    #[arg(long)]
    kernels: bool,
    /// The architecture of --kernels (occupancy is computed for sm_80 and sm_90).
    #[arg(long, default_value = "sm_90")]
    arch: String,
}

#[derive(Args)]
struct DataArg {
    /// Directory of the MNIST IDX files (raw or .gz).
    #[arg(long, env = "CAPSNET_DATA", default_value = "data/mnist")]
    data: PathBuf,
}

#[derive(Args)]
struct ModelArgs {
    /// Routing-by-agreement rounds (the notebook: 2, the paper: 3) [default: 2, or the preset's].
    #[arg(long)]
    routing: Option<usize>,
    /// conv1 filters.
    #[arg(long, default_value_t = 256)]
    conv1_channels: usize,
    /// Primary capsule types (each an 8-D capsule per 6x6 position).
    #[arg(long, default_value_t = 32)]
    primary_maps: usize,
    /// Standard deviation of the N(0, σ) initialisation of W.
    #[arg(long, default_value_t = 0.01)]
    w_std: f64,
}

impl ModelArgs {
    /// The model for `side` x `side` images, with `routing` rounds unless --routing says otherwise.
    fn config_with(&self, routing: usize, side: usize) -> Config {
        Config {
            image_side: side,
            routing_rounds: self.routing.unwrap_or(routing),
            conv1_channels: self.conv1_channels,
            primary_maps: self.primary_maps,
            w_std: self.w_std,
            ..Config::default()
        }
    }

    fn config(&self) -> Config {
        self.config_with(Preset::Notebook.values().routing, data::MNIST_SIDE)
    }
}

/// A named training configuration ([`capsnet::config::Preset`]); single flags override what it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PresetArg {
    /// Géron's notebook: 2 routing rounds, batch 50, no shifts, a constant learning rate.
    Notebook,
    /// Sabour et al.'s setup (their official code): 3 routing rounds, batch 128, random shifts of up
    /// to 2 px (MNIST only: MultiMNIST is shifted already), learning rate × 0.96 every 2,000 steps.
    Paper,
}

impl PresetArg {
    fn values(self) -> capsnet::config::PresetValues {
        match self {
            PresetArg::Notebook => Preset::Notebook.values(),
            PresetArg::Paper => Preset::Paper.values(),
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArg,
    #[command(flatten)]
    model: ModelArgs,
    /// MNIST, or MultiMNIST pairs generated from its digits (36x36, two labels; the model's sizes
    /// follow).
    #[arg(long, value_enum, default_value_t = DatasetArg::Mnist)]
    dataset: DatasetArg,
    /// notebook: --routing 2 --batch-size 50 --shift 0 --lr-decay 1.
    /// paper: --routing 3 --batch-size 128 --shift 2 --lr-decay 0.96 --lr-decay-steps 2000.
    /// A flag given beside the preset overrides it.
    #[arg(long, value_enum, default_value_t = PresetArg::Notebook, verbatim_doc_comment)]
    preset: PresetArg,
    /// Epochs to reach in total (a resumed run continues up to this count).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per step [default: the preset's].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Shift each training image by a random whole number of pixels, up to this many in each
    /// direction (zero padding), drawn per image per epoch from the seed [default: the preset's].
    #[arg(long)]
    shift: Option<usize>,
    /// Multiply the learning rate by this every --lr-decay-steps steps, continuously (1: constant)
    /// [default: the preset's].
    #[arg(long)]
    lr_decay: Option<f64>,
    /// The interval of --lr-decay, in steps [default: 2000].
    #[arg(long)]
    lr_decay_steps: Option<u64>,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(flatten)]
    kernels: KernelArgs,
    /// On a GPU, launch every kernel of every step from the host instead of replaying the step
    /// captured as a CUDA graph (the same results, bit for bit; for comparison).
    #[arg(long)]
    eager: bool,
    /// Run directory: checkpoints (last.safetensors, best.safetensors) and metrics.jsonl.
    #[arg(long, default_value = "runs/capsnet")]
    checkpoint_dir: PathBuf,
    /// Continue from CHECKPOINT_DIR/last.safetensors with the same settings.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs without a lower validation loss (0: never).
    #[arg(long, default_value_t = 0)]
    patience: usize,
    /// Train on the first N training images only.
    #[arg(long)]
    limit: Option<usize>,
    /// Validate on the first N validation images only.
    #[arg(long)]
    val_limit: Option<usize>,
    /// Download MNIST into --data first if files are missing.
    #[arg(long)]
    download: bool,
    /// Also write last.safetensors mid-epoch once this many minutes have passed since the last write
    /// (0: only at the end of each epoch). Ctrl-C or SIGTERM always saves the last completed step.
    #[arg(long, default_value_t = 2.0)]
    checkpoint_minutes: f64,
    /// Also write last.safetensors every N steps.
    #[arg(long)]
    checkpoint_steps: Option<u64>,
}

/// A checkpoint and the test set it is evaluated on.
#[derive(Args)]
struct TestSetArgs {
    /// A checkpoint written by `capsnet train`.
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArg,
    /// Evaluate the first N test images only (MultiMNIST: pairs built on the first N test digits).
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(flatten)]
    kernels: KernelArgs,
    /// The test set [default: the dataset the checkpoint was trained on].
    #[arg(long, value_enum)]
    dataset: Option<DatasetArg>,
    /// MultiMNIST: test examples per test digit (the paper's 1,000 make 10M).
    #[arg(long, default_value_t = 1)]
    pairs_per_digit: usize,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    test: TestSetArgs,
    /// Also write the figures (as `capsnet figures`) into this directory.
    #[arg(long, value_name = "DIR")]
    figures: Option<PathBuf>,
    #[command(flatten)]
    figure: FigureArgs,
}

#[derive(Args)]
struct FigureArgs {
    /// Test digits shown over their reconstructions.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Digits per capsule dimension in tweaks.png (each dimension shifted from -0.25 to +0.25 in 11 steps).
    #[arg(long, default_value_t = 3)]
    tweak_digits: usize,
    /// Screen pixels per image pixel.
    #[arg(long, default_value_t = 2)]
    scale: u32,
    /// Misclassified test digits shown in errors.png at most.
    #[arg(long, default_value_t = 50)]
    max_errors: usize,
}

impl FigureArgs {
    fn options(&self) -> capsnet::figures::FigureOptions {
        capsnet::figures::FigureOptions {
            count: self.count,
            tweak_digits: self.tweak_digits,
            scale: self.scale,
            max_errors: self.max_errors,
        }
    }
}

/// `figures`: curves come from metrics.jsonl beside the checkpoint, else from the history the
/// checkpoint carries; errors.png and confusion.png cover the evaluated test images.
#[derive(Args)]
struct FiguresArgs {
    #[command(flatten)]
    test: TestSetArgs,
    /// Directory for the PNGs (created if missing; files of the same names are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    figure: FigureArgs,
}

#[derive(Args)]
struct PredictArgs {
    /// A checkpoint written by `capsnet train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The image files.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Also report every other digit whose capsule is longer than this (lengths are probabilities
    /// that need not sum to 1, so one image can hold two digits).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// One JSON object per image on stdout.
    #[arg(long)]
    json: bool,
    /// Write the 28x28 input the model saw (NAME.input.png) and its reconstruction (NAME.recon.png)
    /// into this directory.
    #[arg(long, value_name = "DIR")]
    save_input: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (at least 2 where steps are replayed as a CUDA graph: the first runs
    /// eagerly, the second captures the graph).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(flatten)]
    kernels: KernelArgs,
    /// Time each op at the model's shapes instead of whole steps.
    #[arg(long)]
    ops: bool,
    /// On a GPU, launch every kernel of every step from the host instead of replaying the step
    /// captured as a CUDA graph.
    #[arg(long)]
    eager: bool,
    /// Also print the figures as JSON: one object per line (steps: one; --ops: one per version).
    #[arg(long)]
    json: bool,
    /// Also run the PyTorch peer (needs python3 with torch) on the same device, batch and threads, and
    /// print both figures and their ratio. FILE defaults to benches/capsnet_torch_bench.py.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "benches/capsnet_torch_bench.py")]
    peer: Option<PathBuf>,
}

/// The backend a command runs on.
enum Selected {
    Cpu(FastCpu),
    CpuReference(CpuBackend<f32>),
    Cuda(Box<CudaBackend>),
}

/// `--device cpu` is the CPU, `cuda` GPU 0 or an error saying why not, `emulated` the emulated
/// device, `auto` GPU 0 when there is one, else the CPU. A GPU whose kernels do not compile or load
/// is an error, never a quiet fallback.
fn select(device: Device, kernels: &KernelArgs) -> Result<Selected> {
    let cuda = |flag: &str| {
        let ks = kernels.kernel_set()?;
        CudaBackend::with_kernels(0, ks)
            .map(|b| Selected::Cuda(Box::new(b)))
            .map_err(|e| Error::msg(format!("--device {flag}: {e}")))
    };
    match device {
        Device::Cpu => {
            kernels.cpu_only("--device cpu")?;
            Ok(Selected::Cpu(FastCpu::new()))
        }
        Device::CpuReference => {
            kernels.cpu_only("--device cpu-reference")?;
            Ok(Selected::CpuReference(CpuBackend::new()))
        }
        Device::Cuda => cuda("cuda"),
        Device::Emulated => {
            cuda::emulator::load(cuda::emulator::Variant::Plain)
                .map_err(|e| Error::msg(format!("--device emulated: {e}")))?;
            cuda("emulated")
        }
        Device::Auto => match cuda::open_device(0) {
            Ok(_) => cuda("auto (GPU 0 is there)"),
            Err(e) => {
                kernels.cpu_only("--device auto (no GPU here)")?;
                eprintln!("note: no GPU ({e}); running on the CPU");
                Ok(Selected::Cpu(FastCpu::new()))
            }
        },
    }
}

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

/// Runs `$body` with `$be` bound to whichever backend `$sel` holds.
macro_rules! with_backend {
    ($sel:expr, |$be:ident| $body:expr) => {
        match $sel {
            Selected::Cpu($be) => $body,
            Selected::CpuReference($be) => $body,
            Selected::Cuda($be) => {
                let $be = *$be;
                $body
            }
        }
    };
}

impl TestSetArgs {
    /// Evaluates, and writes the figures into `out` when given.
    fn run(&self, out: Option<&std::path::Path>, figure: &FigureArgs) -> Result<(train::EvalReport, Vec<PathBuf>)> {
        let sel = select(self.device, &self.kernels)?;
        let fig = figure.options();
        let opts = train::EvalOptions {
            limit: self.limit,
            batch_size: self.batch_size,
            dataset: self.dataset.map(DatasetArg::dataset),
            pairs: self.pairs_per_digit,
        };
        with_backend!(sel, |be| capsnet::figures::eval_with_figures(
            be,
            &self.checkpoint,
            &self.data.data,
            &opts,
            out.map(|d| (d, &fig))
        ))
    }
}

fn kernel_report(arch: &str) -> Result<()> {
    let report = cuda::report::kernel_report(arch).map_err(|e| Error::msg(format!("info --kernels: {e}")))?;
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

fn info(a: InfoArgs) -> Result<()> {
    if a.kernels {
        return kernel_report(&a.arch);
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
            capsnet::backend::Backend::name(&be)
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

fn predict(a: PredictArgs) -> Result<()> {
    if !(a.threshold.is_finite() && (0.0..=1.0).contains(&a.threshold)) {
        return Err(Error::msg(format!(
            "--threshold must be between 0 and 1 (a capsule length), got {}",
            a.threshold
        )));
    }
    if a.batch_size == 0 || a.batch_size > Config::MAX_BATCH {
        return Err(Error::msg(format!(
            "--batch-size must be between 1 and {}, got {}",
            Config::MAX_BATCH,
            a.batch_size
        )));
    }
    let ck = capsnet::checkpoint::load(&a.checkpoint)?;
    if let Some(dir) = &a.save_input {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("--save-input: cannot create the directory: {e}")))?;
    }
    let sel = select(a.device, &KernelArgs::default())?;
    let results = with_backend!(sel, |be| {
        let mut tape = capsnet::tape::Tape::new(be);
        let model = capsnet::model::CapsNet::from_checkpoint(&mut tape, &ck)?;
        predict::predict_files(&mut tape, &model, &a.images, a.threshold, a.batch_size)
    })?;
    let side = ck.config.image_side;
    let mut used = std::collections::HashSet::<String>::new();
    let mut failed = 0;
    for (file, r) in &results {
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({ "file": file.display().to_string(), "error": e.to_string() })
                    );
                }
                continue;
            }
        };
        if let Some(dir) = &a.save_input {
            // NAME.input.png, NAME-2.input.png for a second file of the same name (or the next
            // number no file of this run has taken)
            let stem = file
                .file_stem()
                .map_or("image".into(), |s| s.to_string_lossy().into_owned());
            let mut name = stem.clone();
            let mut n = 1;
            while !used.insert(name.clone()) {
                n += 1;
                name = format!("{stem}-{n}");
            }
            for (what, px) in [("input", &p.prepared.pixels), ("recon", &p.recon)] {
                let path = dir.join(format!("{name}.{what}.png"));
                capsnet::error::write_atomic(&path, &predict::gray_png(px, side)?)?;
            }
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "file": file.display().to_string(),
                    "digit": p.digit,
                    "present": p.present,
                    "lengths": p.lengths,
                    "inverted": p.prepared.inverted,
                    "resized": !p.prepared.as_is,
                })
            );
        } else {
            let also: Vec<String> = p
                .present
                .iter()
                .filter(|&&d| d != p.digit)
                .map(|&d| format!("{d} ({:.3})", p.lengths[d]))
                .collect();
            let also = if also.is_empty() {
                String::new()
            } else {
                format!(", also {}", also.join(", "))
            };
            println!("{}: {} ({:.3}){also}", file.display(), p.digit, p.lengths[p.digit]);
            let lengths: Vec<String> = p
                .lengths
                .iter()
                .enumerate()
                .map(|(k, l)| format!("{k}:{l:.3}"))
                .collect();
            println!("  lengths {}", lengths.join(" "));
        }
    }
    if failed > 0 {
        return Err(Error::msg(format!(
            "{failed} of {} images could not be predicted (each is named above)",
            results.len()
        )));
    }
    Ok(())
}

fn write_multimnist(a: MultiMnistArgs) -> Result<()> {
    use capsnet::multimnist::{self, MultiMnist};
    const MAX: usize = 10_000_000;
    if a.count == 0 || a.count > MAX {
        return Err(Error::msg(format!(
            "--count must be between 1 and {MAX}, got {}",
            a.count
        )));
    }
    let (digits, name) = match a.split {
        SplitArg::Test => (data::load(&a.data.data, data::Which::Test)?, "test"),
        SplitArg::Train | SplitArg::Validation => {
            let (t, v) = data::train_val(data::load(&a.data.data, data::Which::Train)?, None, None)?;
            if a.split == SplitArg::Train {
                (t, "train")
            } else {
                (v, "validation")
            }
        }
    };
    let seed = a.seed.unwrap_or(if a.split == SplitArg::Test {
        multimnist::TEST_SEED
    } else {
        42
    });
    let m = MultiMnist::new(&digits, seed)?;
    if a.count > m.len() {
        return Err(Error::msg(format!(
            "--count {} exceeds the {} examples of the {name} split",
            a.count,
            m.len()
        )));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::file(&a.out, format!("cannot create the directory: {e}")))?;
    let (mut images, mut labels) = (Vec::with_capacity(a.count * multimnist::PIXELS), vec![]);
    for j in 0..a.count {
        let e = m.example(m.nth(j));
        images.extend(&e.image);
        labels.extend(e.labels);
    }
    let files = [
        (
            format!("multimnist-{name}-images-idx3-ubyte"),
            multimnist::idx_images(&images, a.count, multimnist::SIDE),
        ),
        (
            format!("multimnist-{name}-labels-idx2-ubyte"),
            multimnist::idx_label_pairs(&labels, a.count),
        ),
    ];
    for (f, bytes) in files {
        let p = a.out.join(f);
        capsnet::error::write_atomic(&p, &bytes)?;
        println!("wrote {} ({} bytes)", p.display(), bytes.len());
    }
    let shown = a.count.min(100);
    let sheet = capsnet::figures::multimnist_sheet(&images[..shown * multimnist::PIXELS], &labels[..2 * shown], 2)?;
    let p = a.out.join(format!("multimnist-{name}-sample.png"));
    sheet.save(&p)?;
    println!(
        "wrote {} (the first {shown} examples; seed {seed}; pixels combined by clipped sum)",
        p.display()
    );
    Ok(())
}

fn print_eval(r: &train::EvalReport) {
    println!("test images: {}", r.images);
    if r.per > 1 {
        println!(
            "test accuracy: {:.4}% (the {} longest capsules are exactly the labels), error rate {:.4}%",
            100.0 * r.accuracy,
            r.per,
            100.0 * (1.0 - r.accuracy)
        );
        println!(
            "per-digit accuracy: {:.4}% (labels among the longest capsules)",
            100.0 * r.digit_accuracy
        );
        println!(
            "test loss: {:.6} (margin {:.6}, reconstruction {:.6}; each decoder pass masked by its label)",
            r.loss, r.margin, r.recon
        );
        return;
    }
    println!("test accuracy: {:.4}%", 100.0 * r.accuracy);
    println!(
        "test loss: {:.6} (margin {:.6}, reconstruction {:.6})",
        r.loss, r.margin, r.recon
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    print!("     ");
    (0..r.confusion.len()).for_each(|c| print!("{c:>6}"));
    println!();
    for (t, row) in r.confusion.iter().enumerate() {
        print!("{t:>4} ");
        row.iter().for_each(|n| print!("{n:>6}"));
        println!();
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => {
            let sel = select(a.device, &a.kernels)?;
            // only what is missing: train() reads and checks every file anyway
            if a.download
                && data::FILES
                    .iter()
                    .any(|(name, _)| data::find(&a.data.data, name).is_none())
            {
                for line in data::download(&a.data.data, &data::mirrors())? {
                    eprintln!("{line}");
                }
            }
            let preset = a.preset.values();
            let opts = TrainOptions {
                data_dir: a.data.data,
                run_dir: a.checkpoint_dir,
                config: a.model.config_with(preset.routing, a.dataset.dataset().side()),
                run: RunSettings {
                    dataset: a.dataset.dataset(),
                    batch_size: a.batch_size.unwrap_or(preset.batch_size),
                    // MultiMNIST examples are shifted already: a preset's shift is for MNIST only
                    shift: a.shift.unwrap_or(match a.dataset {
                        DatasetArg::Mnist => preset.shift,
                        DatasetArg::Multimnist => 0,
                    }),
                    lr_decay: a.lr_decay.unwrap_or(preset.lr_decay),
                    lr_decay_steps: a.lr_decay_steps.unwrap_or(preset.lr_decay_steps),
                    lr: a.lr,
                    seed: a.seed,
                    patience: a.patience,
                    limit: a.limit,
                    val_limit: a.val_limit,
                },
                epochs: a.epochs,
                eager: a.eager,
                resume: a.resume,
                checkpoint_every: match a.checkpoint_minutes {
                    m if !(m.is_finite() && m >= 0.0) => {
                        return Err(Error::msg(format!(
                            "--checkpoint-minutes must be a number ≥ 0, got {m}"
                        )));
                    }
                    0.0 => None,
                    m => Some(std::time::Duration::from_secs_f64(m * 60.0)),
                },
                checkpoint_steps: match a.checkpoint_steps {
                    Some(0) => return Err(Error::msg("--checkpoint-steps must be at least 1")),
                    n => n,
                },
            };
            // Ctrl-C or SIGTERM: save the last completed step and stop; a second one exits at once
            let _ = ctrlc::set_handler(|| {
                if train::INTERRUPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    eprintln!("\nsecond interrupt: exiting now");
                    std::process::exit(130);
                }
                eprintln!("\ninterrupt: saving the last completed step (interrupt again to exit at once)");
            });
            with_backend!(sel, |be| train::train(be, &opts))?;
            Ok(())
        }
        Cmd::Eval(a) => {
            let (r, written) = a.test.run(a.figures.as_deref(), &a.figure)?;
            print_eval(&r);
            written.iter().for_each(|f| println!("wrote {}", f.display()));
            Ok(())
        }
        Cmd::Figures(a) => {
            let (r, written) = a.test.run(Some(&a.out), &a.figure)?;
            println!("test images: {}, accuracy {:.4}%", r.images, 100.0 * r.accuracy);
            written.iter().for_each(|f| println!("wrote {}", f.display()));
            Ok(())
        }
        Cmd::Bench(a) => {
            Config::check_batch_size(a.batch_size)?;
            if a.steps == 0 {
                return Err(Error::msg("bench: --steps must be at least 1"));
            }
            a.model.config().validate()?;
            let sel = select(a.device, &a.kernels)?;
            if a.ops {
                if let Selected::Cuda(be) = &sel {
                    return print_version_bench(be, &a.model.config(), a.batch_size, a.steps, a.json);
                }
                return with_backend!(sel, |be| {
                    println!("ops, batch {}, {}", a.batch_size, capsnet::backend::Backend::name(&be));
                    for t in capsnet::bench::op_bench(&be, &a.model.config(), a.batch_size, a.steps)? {
                        println!("{:<34} {:>9.3} ms {:>9.1} GFLOP/s", t.name, t.ms, t.gflops);
                    }
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
                _ => Precision::Fp32,
            };
            let (backend_name, r) = with_backend!(sel, |be| {
                let name = capsnet::backend::Backend::name(&be);
                println!("backend: {name}");
                train::bench(be, cfg.clone(), a.batch_size, a.steps, a.warmup, a.eager).map(|r| (name, r))
            })?;
            let how = match (r.resident, r.graph) {
                (true, true) => " (batches gathered on the device, steps replayed as a CUDA graph)",
                (true, false) => " (batches gathered on the device, kernels launched one by one)",
                _ => "",
            };
            println!(
                "batch {}: median {:.3} ms/step over {} steps, {:.1} images/s, {:.1} GFLOP/s{how}",
                r.batch_size, r.median_ms, r.steps, r.images_per_s, r.gflops
            );
            if let Some(mib) = r.device_mib {
                println!("device memory held: {mib:.0} MiB");
            }
            let mut peer_json = None;
            if let (Some(script), Some(device)) = (&a.peer, peer_device) {
                let threads = capsnet::par::threads();
                let run = capsnet::bench::PeerRun {
                    device,
                    routing: cfg.routing_rounds,
                    w_std: cfg.w_std,
                    batch: a.batch_size,
                    steps: a.steps,
                    warmup: a.warmup,
                    threads,
                };
                let p = capsnet::bench::torch_peer(script, &run)?;
                println!(
                    "peer: PyTorch {} on {device} ({threads} threads), batch {}: median {:.1} ms/step, {:.1} images/s",
                    p.torch, a.batch_size, p.median_ms, p.images_per_s
                );
                println!("ratio: {:.2}x the peer's images/s", r.images_per_s / p.images_per_s);
                peer_json = Some(serde_json::json!({
                    "torch": p.torch, "median_ms": p.median_ms, "images_per_s": p.images_per_s,
                }));
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "kind": "steps", "backend": backend_name, "precision": precision.name(),
                        "batch": r.batch_size, "steps": r.steps, "graph": r.graph, "resident": r.resident,
                        "median_ms": r.median_ms, "images_per_s": r.images_per_s, "gflops": r.gflops,
                        "device_mib": r.device_mib, "peer": peer_json,
                    })
                );
            }
            Ok(())
        }
        Cmd::Predict(a) => predict(a),
        Cmd::Multimnist(a) => write_multimnist(a),
        Cmd::Info(a) => info(a),
        Cmd::Download(a) => {
            for line in data::download(&a.data, &data::mirrors())? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// `capsnet eval | head` closes stdout early: println! then panics on the broken pipe. End quietly
/// instead, with the status a shell gives a command killed by SIGPIPE (128 + 13), as Unix tools do.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    match run(Cli::parse()) {
        // an interrupted training run saved its state and said how to continue
        Ok(()) if train::interrupted() => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
