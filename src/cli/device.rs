//! Which backend a command runs on.

use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::fast::FastCpu;
use capsnet::cuda::{self, CudaBackend};
use capsnet::{Error, Result};

use super::args::*;

/// The backend a command runs on.
pub enum Selected {
    Cpu(FastCpu),
    CpuReference(CpuBackend<f32>),
    Cuda(Box<CudaBackend>),
}

/// `--device cpu` is the CPU, `cuda:N` GPU N or an error saying why not, `emulated` the emulated
/// device, `auto` GPU 0 when there is one that can run the kernels, else the CPU with a note saying
/// why (no driver, no GPU, a GPU older than the kernels need, a driver older than CUDA 13.0, no
/// NVRTC). A GPU
/// that `cuda` names and that cannot run them is an error, never a quiet fallback.
pub fn select(device: Device, kernels: &KernelArgs) -> Result<Selected> {
    let cuda = |ordinal: usize, flag: &str| {
        let ks = kernels.kernel_set()?;
        CudaBackend::with_kernels(ordinal, ks)
            .map(|b| Selected::Cuda(Box::new(b)))
            .map_err(|e| Error::msg(format!("--device {flag}: {e}")))
    };
    let cpu = |why: String| -> Result<Selected> {
        let be = kernels.fast_cpu("--device auto (running on the CPU)")?;
        eprintln!("note: {why}; running on the CPU");
        Ok(Selected::Cpu(be))
    };
    match device {
        Device::Cpu => Ok(Selected::Cpu(kernels.fast_cpu("--device cpu")?)),
        Device::CpuReference => {
            kernels.cpu_only("--device cpu-reference")?;
            Ok(Selected::CpuReference(CpuBackend::new()))
        }
        Device::Cuda(n) => cuda(
            n,
            &if n == 0 {
                "cuda".to_string()
            } else {
                format!("cuda:{n}")
            },
        ),
        Device::Emulated => {
            cuda::emulator::load(cuda::emulator::Variant::Plain)
                .map_err(|e| Error::msg(format!("--device emulated: {e}")))?;
            cuda(0, "emulated")
        }
        Device::Auto => {
            let ctx = match cuda::open_device(0) {
                Ok(ctx) => ctx,
                Err(e) => return cpu(format!("no GPU ({e})")),
            };
            // a GPU or a driver that cannot run the kernels is not a GPU to run on
            let usable = cuda::device_info(&ctx).and_then(|d| cuda::kernel_target(d.compute_capability).map(|_| ()));
            match usable {
                Ok(()) => cuda(0, "auto (GPU 0 is there)"),
                Err(e) => cpu(format!("GPU 0 cannot run capsnet's kernels ({e})")),
            }
        }
    }
}
