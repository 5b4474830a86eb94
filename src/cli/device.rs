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

/// `--device cpu` is the CPU, `cuda` GPU 0 or an error saying why not, `emulated` the emulated
/// device, `auto` GPU 0 when there is one, else the CPU. A GPU whose kernels do not compile or load
/// is an error, never a quiet fallback.
pub fn select(device: Device, kernels: &KernelArgs) -> Result<Selected> {
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
