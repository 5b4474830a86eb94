//! The command line: every command and its flags, as clap parses them (docs/CLI.md says what they mean).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use capsnet::config::{Config, Preset};
use capsnet::cuda;
use capsnet::cuda::registry::{KernelSet, Precision};
use capsnet::{Error, Result, data};

#[derive(Parser)]
#[command(
    name = "capsnet",
    version,
    about = "CapsNet (dynamic routing between capsules) training engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// CPU threads for the CPU backends' loops and GEMMs (matrixmultiply's use at most 4) [default: every
    /// core; also CAPSNET_THREADS].
    #[arg(long, global = true, value_parser = whole::<usize>, env = "CAPSNET_THREADS")]
    pub threads: Option<usize>,
    /// The fast CPU backend's f32 GEMMs: avx512 (the gemm crate's AVX-512 kernels), avx2
    /// (matrixmultiply's AVX2+FMA kernel, SSE2 on older CPUs) or auto (the first this CPU runs)
    /// [default: auto; also CAPSNET_CPU_GEMM].
    #[arg(long, global = true, value_name = "auto|avx512|avx2", value_parser = cpu_gemm, env = "CAPSNET_CPU_GEMM")]
    pub cpu_gemm: Option<CpuGemmChoice>,
}

/// `--cpu-gemm`'s value: None for auto.
#[derive(Clone, Copy, Debug)]
pub struct CpuGemmChoice(pub Option<capsnet::backend::CpuGemm>);

fn cpu_gemm(s: &str) -> std::result::Result<CpuGemmChoice, String> {
    capsnet::backend::CpuGemm::parse(s).map(CpuGemmChoice)
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Train on MNIST or MultiMNIST (the last 5,000 training images validate), checkpointing every
    /// epoch; --resume continues a run with its stored settings.
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
    /// 20x20 and centred by its centre of mass in 28x28 (a 28x28 image too, unless --raw).
    Predict(PredictArgs),
    /// Time full training steps (forward, backward, Adam) on random images.
    #[command(allow_negative_numbers = true)]
    Bench(BenchArgs),
    /// Write a checkpoint's weights alone (no optimiser state: a third of the size), for eval,
    /// predict and figures, or in the PyTorch CapsNet's names and layouts (--layout pytorch).
    Export(ExportArgs),
    /// Write MultiMNIST examples (two overlapping digits, 36x36) as IDX files and a sample grid PNG.
    Multimnist(MultiMnistArgs),
    /// The capsule explorer: a local web page where you draw a digit (or drop an image) and watch
    /// the capsules, the routing and the reconstruction answer, with a JSON API for scripts.
    #[command(allow_negative_numbers = true)]
    Serve(ServeArgs),
    /// Fetch the four MNIST files, checked by SHA-256, into the data directory.
    Download(DataArg),
    /// The GPU, the CUDA driver and NVRTC versions, and whether every kernel compiles.
    Info(InfoArgs),
}

/// A whole number of 0 or more, for every count flag: "'-1' is not a whole number ≥ 0" rather than
/// Rust's "invalid digit found in string".
pub fn whole<T: std::str::FromStr>(s: &str) -> std::result::Result<T, String> {
    s.trim().parse::<T>().map_err(|_| {
        let what = if s.trim().starts_with('-') {
            "negative"
        } else {
            "not a whole number"
        };
        format!("'{s}' is {what}: give a whole number of 0 or more")
    })
}

/// Where a command runs: `--device auto|cpu|cpu-reference|cuda|cuda:N|emulated` (`gpu` is `cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The fast CPU backend: f32, SIMD GEMMs, every core.
    Cpu,
    /// The CPU reference: f32 storage, every sum in f64 (the spec the others are tested against; slow).
    CpuReference,
    /// GPU N (0 for plain `cuda`).
    Cuda(usize),
    /// GPU 0 when there is one that can run the kernels, else the CPU (saying why).
    Auto,
    /// The CUDA backend on the emulated device: every kernel runs on the CPU, one fiber per CUDA
    /// thread (slow; for checking kernels without a GPU). Needs g++ and NVRTC.
    Emulated,
}

/// The help text of every --device flag.
pub const DEVICE_HELP: &str = "Where to run: auto (GPU 0 when it can run the kernels, else the CPU), cpu (SIMD, every core), cpu-reference (f64 sums; slow), cuda or cuda:N (GPU N; also gpu, gpu:N), emulated (the CUDA backend on an emulated device; needs g++ and NVRTC)";

/// Parses --device's value.
pub fn parse_device(s: &str) -> std::result::Result<Device, String> {
    let gpu = |rest: &str| -> std::result::Result<Device, String> {
        match rest {
            "" => Ok(Device::Cuda(0)),
            n => n
                .strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("'{s}': a GPU is cuda or cuda:N, N its number from 0 (capsnet info lists GPU 0)")
                }),
        }
    };
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cpu-reference" => Ok(Device::CpuReference),
        "emulated" => Ok(Device::Emulated),
        _ if s.starts_with("cuda") => gpu(&s[4..]),
        _ if s.starts_with("gpu") => gpu(&s[3..]),
        _ => Err(format!(
            "'{s}' is not a device: auto, cpu, cpu-reference, cuda, cuda:N or emulated"
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// fp32 multiplies on CUDA cores: exact single precision.
    Fp32,
    /// tf32 tensor cores: GEMM inputs rounded to 10 mantissa bits, fp32 sums.
    Tf32,
    /// bf16 tensor cores (on the CPU: AMX tiles or AVX512_BF16): GEMM inputs rounded to 7 mantissa bits, fp32 sums.
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
pub struct KernelArgs {
    /// What the convolutions and the decoder multiply in: bf16 or tf32 on a GPU's tensor cores (bf16
    /// on a CPU's AMX tiles or AVX512_BF16), fp32 exactly (master weights, the capsule layers, the
    /// losses and Adam stay fp32)
    /// [default: bf16 on a GPU and on a CPU with AMX tiles, chosen by accuracy and speed; else fp32].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Kernel versions, OP=VERSION,... over --precision's (`capsnet info --kernels` lists them; the
    /// CAPSNET_KERNELS environment variable sets them too, and this flag wins).
    #[arg(long, value_name = "OP=VERSION,...")]
    pub kernels: Option<String>,
}

impl KernelArgs {
    /// The set the CUDA backend launches: --precision's versions, then CAPSNET_KERNELS, then --kernels.
    pub fn kernel_set(&self) -> Result<KernelSet> {
        let p = self.precision.map_or(cuda::registry::DEFAULT_PRECISION, Into::into);
        let mut ks = KernelSet::for_precision(p).with_env()?;
        if let Some(spec) = &self.kernels {
            ks.apply(spec, "--kernels")?;
        }
        Ok(ks)
    }

    /// The fast CPU backend for --precision (by default [`capsnet::backend::fast::FastCpu::default_precision`]),
    /// refusing --kernels, which only the CUDA backend has.
    pub fn fast_cpu(&self, device: &str) -> Result<capsnet::backend::fast::FastCpu> {
        if self.kernels.is_some() {
            return Err(Error::msg(format!(
                "--kernels: kernel versions are the CUDA backend's, and {device} runs on the CPU"
            )));
        }
        if self.precision == Some(PrecisionArg::Bf16) && capsnet::backend::cpu_gemm_named() {
            return Err(Error::msg(
                "--cpu-gemm names the fp32 GEMM, and --precision bf16 runs none: give one or the other",
            ));
        }
        let p = self
            .precision
            .map_or_else(capsnet::backend::fast::FastCpu::default_precision, Into::into);
        capsnet::backend::fast::FastCpu::with_precision(p).map_err(|e| Error::msg(format!("{device}: {e}")))
    }

    /// Refuses flags that only the CUDA backend has, for the CPU reference.
    pub fn cpu_only(&self, device: &str) -> Result<()> {
        if let Some(p) = self.precision.filter(|&p| p != PrecisionArg::Fp32) {
            return Err(Error::msg(format!(
                "--precision {}: {device} computes in fp32 with f64 sums (bf16 runs on --device cpu where the CPU has AMX or AVX512_BF16, and on the GPU)",
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
pub enum DatasetArg {
    /// 28x28 digits, one each.
    Mnist,
    /// 36x36 overlays of two digits of different classes (Sabour et al. 2017, section 6), generated
    /// from MNIST on the fly.
    Multimnist,
}

impl DatasetArg {
    pub fn dataset(self) -> capsnet::dataset::Dataset {
        match self {
            DatasetArg::Mnist => capsnet::dataset::Dataset::Mnist,
            DatasetArg::Multimnist => capsnet::dataset::Dataset::MultiMnist,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    /// Pairs of the first 55,000 training digits (what `train --dataset multimnist` trains on).
    Train,
    /// Pairs of the last 5,000 training digits (its validation examples).
    Validation,
    /// Pairs of the 10,000 test digits (what `eval` tests).
    Test,
}

#[derive(Args)]
pub struct MultiMnistArgs {
    /// Output directory: multimnist-SPLIT-images-idx3-ubyte ([N, 36, 36] bytes),
    /// multimnist-SPLIT-labels-idx2-ubyte ([N, 2]: both digits) and multimnist-SPLIT-sample.png.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Examples to write: every digit's first pairing, then every digit's second, and so on.
    #[arg(long, value_parser = whole::<usize>, default_value_t = 100)]
    pub count: usize,
    /// Which MNIST digits the pairs are made of.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    pub split: SplitArg,
    /// The generator's seed [default: 2017 for the test split, as eval uses; 42, train's default, for
    /// the others].
    #[arg(long, value_parser = whole::<u64>)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub data: DataArg,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Report on the emulated device instead of GPU 0.
    #[arg(long)]
    pub emulated: bool,
    /// The static kernel report instead, no GPU needed: every kernel's registers, spills, stack,
    /// shared memory and theoretical occupancy, from ptxas's own report through NVRTC.
    #[arg(long)]
    pub kernels: bool,
    /// The architecture of --kernels, sm_80 or newer (occupancy is computed for sm_80 and sm_90)
    /// [default: sm_90].
    #[arg(long)]
    pub arch: Option<String>,
}

#[derive(Args)]
pub struct DataArg {
    /// Directory of the MNIST IDX files (raw or .gz).
    #[arg(long, env = "CAPSNET_DATA", default_value = "data/mnist")]
    pub data: PathBuf,
}

#[derive(Args)]
pub struct ModelArgs {
    /// Routing-by-agreement rounds, 1 to 16 (the notebook: 2, the paper: 3) [default: 2, or the
    /// preset's].
    #[arg(long, value_parser = whole::<usize>)]
    pub routing: Option<usize>,
    /// conv1 filters (1 to 4096).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 256)]
    pub conv1_channels: usize,
    /// Primary capsule types, 1 to 4096 (each an 8-D capsule per 6x6 position).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 32)]
    pub primary_maps: usize,
    /// Standard deviation of the N(0, σ) initialisation of W.
    #[arg(long, default_value_t = 0.01)]
    pub w_std: f64,
}

impl ModelArgs {
    /// The model for `side` x `side` images, with `routing` rounds unless --routing says otherwise.
    pub fn config_with(&self, routing: usize, side: usize) -> Config {
        Config {
            image_side: side,
            routing_rounds: self.routing.unwrap_or(routing),
            conv1_channels: self.conv1_channels,
            primary_maps: self.primary_maps,
            w_std: self.w_std,
            ..Config::default()
        }
    }

    pub fn config(&self) -> Config {
        self.config_with(Preset::Notebook.values().routing, data::MNIST_SIDE)
    }
}

/// A named training configuration ([`capsnet::config::Preset`]); single flags override what it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// Géron's notebook: 2 routing rounds, batch 50, no shifts, a constant learning rate.
    Notebook,
    /// Sabour et al.'s setup (their official code): 3 routing rounds, batch 128, random shifts of up
    /// to 2 px (MNIST only: MultiMNIST is shifted already), learning rate × 0.96 every 2,000 steps.
    Paper,
}

impl PresetArg {
    pub fn values(self) -> capsnet::config::PresetValues {
        match self {
            PresetArg::Notebook => Preset::Notebook.values(),
            PresetArg::Paper => Preset::Paper.values(),
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArg,
    #[command(flatten)]
    pub model: ModelArgs,
    /// MNIST, or MultiMNIST pairs generated from its digits (36x36, two labels; the model's sizes
    /// follow).
    #[arg(long, value_enum, default_value_t = DatasetArg::Mnist)]
    pub dataset: DatasetArg,
    /// notebook: --routing 2 --batch-size 50 --shift 0 --lr-decay 1.
    /// paper: --routing 3 --batch-size 128 --shift 2 --lr-decay 0.96 --lr-decay-steps 2000.
    /// A flag given beside the preset overrides it.
    #[arg(long, value_enum, default_value_t = PresetArg::Notebook, verbatim_doc_comment)]
    pub preset: PresetArg,
    /// Epochs to reach in total (a resumed run continues up to this count).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 10)]
    pub epochs: usize,
    /// Images per step, 1 to 4096 [default: the preset's].
    #[arg(long, value_parser = whole::<usize>)]
    pub batch_size: Option<usize>,
    /// Shift each training image by a random whole number of pixels, up to this many in each
    /// direction (zero padding), drawn per image per epoch from the seed [default: the preset's].
    #[arg(long, value_parser = whole::<usize>)]
    pub shift: Option<usize>,
    /// Multiply the learning rate by this every --lr-decay-steps steps, continuously (1: constant)
    /// [default: the preset's].
    #[arg(long)]
    pub lr_decay: Option<f64>,
    /// The interval of --lr-decay, in steps [default: 2000].
    #[arg(long, value_parser = whole::<u64>)]
    pub lr_decay_steps: Option<u64>,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The seed of the initial weights, the shuffles and the shifts: the same seed, the same run.
    #[arg(long, value_parser = whole::<u64>, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value = "auto", value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Device,
    #[command(flatten)]
    pub kernels: KernelArgs,
    /// On a GPU, launch every kernel of every step from the host instead of replaying the step
    /// captured as a CUDA graph (the same results, bit for bit; for comparison).
    #[arg(long)]
    pub eager: bool,
    /// Run directory: checkpoints (last.safetensors, best.safetensors) and metrics.jsonl.
    #[arg(long, default_value = "runs/capsnet")]
    pub checkpoint_dir: PathBuf,
    /// Continue from CHECKPOINT_DIR/last.safetensors with the same settings.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs without a lower validation loss (0: never).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 0)]
    pub patience: usize,
    /// Train on the first N training images only.
    #[arg(long, value_parser = whole::<usize>)]
    pub limit: Option<usize>,
    /// Validate on the first N validation images only.
    #[arg(long, value_parser = whole::<usize>)]
    pub val_limit: Option<usize>,
    /// Download MNIST into --data first if files are missing.
    #[arg(long)]
    pub download: bool,
    /// Also write last.safetensors mid-epoch once this many minutes have passed since the last write
    /// (0: only at the end of each epoch). Ctrl-C or SIGTERM always saves the last completed step.
    #[arg(long, default_value_t = 2.0)]
    pub checkpoint_minutes: f64,
    /// Also write last.safetensors every N steps.
    #[arg(long, value_parser = whole::<u64>)]
    pub checkpoint_steps: Option<u64>,
}

/// A checkpoint and the test set it is evaluated on.
#[derive(Args)]
pub struct TestSetArgs {
    /// A checkpoint written by `capsnet train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArg,
    /// Evaluate the first N test images only (MultiMNIST: pairs built on the first N test digits).
    #[arg(long, value_parser = whole::<usize>)]
    pub limit: Option<usize>,
    /// Images per forward pass (1 to 4096).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 100)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto", value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Device,
    #[command(flatten)]
    pub kernels: KernelArgs,
    /// The test set [default: the dataset the checkpoint was trained on].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// MultiMNIST: test examples per test digit, 1 to 1000 (the paper's 1,000 make 10M).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 1)]
    pub pairs_per_digit: usize,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub test: TestSetArgs,
    /// The report as one JSON object on stdout (accuracy, losses, confusion matrix, files written).
    #[arg(long)]
    pub json: bool,
    /// Also write the figures (as `capsnet figures`) into this directory.
    #[arg(long, value_name = "DIR")]
    pub figures: Option<PathBuf>,
    #[command(flatten)]
    pub figure: FigureArgs,
}

#[derive(Args)]
pub struct FigureArgs {
    /// Test digits shown over their reconstructions, 1 to 100 [default: 10].
    #[arg(long, value_parser = whole::<usize>)]
    pub count: Option<usize>,
    /// Digits per capsule dimension in tweaks.png, 1 to 10 (each dimension shifted from -0.25 to
    /// +0.25 in 11 steps) [default: 3].
    #[arg(long, value_parser = whole::<usize>)]
    pub tweak_digits: Option<usize>,
    /// Screen pixels per image pixel, 1 to 8 [default: 2].
    #[arg(long, value_parser = whole::<u32>)]
    pub scale: Option<u32>,
    /// Misclassified test digits shown in errors.png at most, 0 to 1000 [default: 50].
    #[arg(long, value_parser = whole::<usize>)]
    pub max_errors: Option<usize>,
}

impl FigureArgs {
    pub fn options(&self) -> capsnet::figures::FigureOptions {
        capsnet::figures::FigureOptions {
            count: self.count.unwrap_or(10),
            tweak_digits: self.tweak_digits.unwrap_or(3),
            scale: self.scale.unwrap_or(2),
            max_errors: self.max_errors.unwrap_or(50),
        }
    }

    /// The flags given, for a command that draws no figures.
    pub fn given(&self) -> Vec<&'static str> {
        [
            (self.count.is_some(), "--count"),
            (self.tweak_digits.is_some(), "--tweak-digits"),
            (self.scale.is_some(), "--scale"),
            (self.max_errors.is_some(), "--max-errors"),
        ]
        .into_iter()
        .filter_map(|(g, f)| g.then_some(f))
        .collect()
    }
}

/// `figures`: curves come from metrics.jsonl beside the checkpoint, else from the history the
/// checkpoint carries; errors.png and confusion.png cover the evaluated test images.
#[derive(Args)]
pub struct FiguresArgs {
    #[command(flatten)]
    pub test: TestSetArgs,
    /// Directory for the PNGs (created if missing; files of the same names are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub figure: FigureArgs,
}

#[derive(Args)]
pub struct ServeArgs {
    /// A checkpoint written by `capsnet train`, or a weights-only file (`capsnet export`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The port to listen on, 0 to 65535 (0: any free port; the address is printed).
    #[arg(long, value_parser = whole::<u16>, default_value_t = 8080)]
    pub port: u16,
    /// The address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 every network it is on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A capsule longer than this counts as a digit present, between 0 and 1 (as predict's).
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    #[command(flatten)]
    pub data: DataArg,
    /// Test images searched for the gallery of errors, 1 to 10000 [default: all].
    #[arg(long, value_parser = whole::<usize>)]
    pub gallery_limit: Option<usize>,
    #[arg(long, default_value = "auto", value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Device,
    #[command(flatten)]
    pub kernels: KernelArgs,
}

#[derive(Args)]
pub struct PredictArgs {
    /// A checkpoint written by `capsnet train`, or a weights-only file (`capsnet export`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The image files, or directories of them (their PNG, JPEG, GIF, BMP, WebP and PNM files).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Also report every other digit whose capsule is longer than this (lengths are probabilities
    /// that need not sum to 1, so one image can hold two digits); when no capsule is, the image is
    /// flagged as not confidently a digit. Between 0 and 1.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub threshold: f32,
    /// One JSON object per image on stdout.
    #[arg(long)]
    pub json: bool,
    /// Take an image of the model's size (28x28; 36x36 for MultiMNIST) as it is, only inverted when
    /// dark on light: the pixels eval reads. Other sizes are prepared anyway.
    #[arg(long)]
    pub raw: bool,
    /// Write the input the model saw (NAME.input.png, 28x28; 36x36 for MultiMNIST) and its
    /// reconstruction (NAME.recon.png) into this directory.
    #[arg(long, value_name = "DIR")]
    pub save_input: Option<PathBuf>,
    /// Images per forward pass (1 to 4096).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 100)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto", value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Device,
    #[command(flatten)]
    pub kernels: KernelArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// capsnet's own (HWIO convolutions, [in, out] linear layers): eval, predict and figures read it.
    Capsnet,
    /// The PyTorch CapsNet's of benches/capsnet_torch_bench.py: conv1, conv2 (the primary capsules),
    /// W, fc1-fc3; OIHW convolutions, [out, in] linear layers (capsnet reads it back too).
    Pytorch,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The checkpoint to export (a training checkpoint or a weights-only file).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The file to write (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The tensors' names and layouts.
    #[arg(long, value_enum, default_value_t = LayoutArg::Capsnet)]
    pub layout: LayoutArg,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per step (1 to 4096).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 50)]
    pub batch_size: usize,
    /// Timed steps (the median is reported).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first (at least 2 where steps are replayed as a CUDA graph: the first runs
    /// eagerly, the second captures the graph).
    #[arg(long, value_parser = whole::<usize>, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value = "auto", value_parser = parse_device, help = DEVICE_HELP)]
    pub device: Device,
    #[command(flatten)]
    pub kernels: KernelArgs,
    /// Time each op at the model's shapes instead of whole steps (on the CPU, then profile whole
    /// steps: each op's forward and backward, the gradients' zeroing and Adam, with their shares).
    #[arg(long)]
    pub ops: bool,
    /// On a GPU, launch every kernel of every step from the host instead of replaying the step
    /// captured as a CUDA graph.
    #[arg(long)]
    pub eager: bool,
    /// Also print the figures as JSON: one object per line (steps: one; --ops: one per version).
    #[arg(long)]
    pub json: bool,
    /// Also run the PyTorch peer (needs python3 with torch) on the same device, batch and threads, and
    /// print both figures and their ratio; on the CPU in each of its fastest configurations in turn
    /// (fp32, channels_last, bf16 autocast, both, and both under torch.compile), the ratio against the
    /// fastest. FILE defaults to benches/capsnet_torch_bench.py.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "benches/capsnet_torch_bench.py")]
    pub peer: Option<PathBuf>,
}
