//! The GPU as a device: NVRTC compilation of the embedded kernels, device detection, the kernel
//! registry, the emulated device, and [`CudaBackend`] (context, stream, memory pool, captured graphs).
//! Each op family's launches are in its folder (crate::ops::<family>/cuda.rs), the training step's
//! runtime in crate::runtime.
//!
//! cudarc loads libcuda and libnvrtc dynamically on first use and panics when they are missing, so
//! every entry point here probes the libraries first: on a machine without CUDA the crate builds,
//! runs on the CPU, and these functions return errors or `None`, never panic.

mod backend;
pub mod compile;
pub mod emulator;
mod graphs;
pub(crate) mod launch;
pub mod params;
mod pool;
pub mod registry;
pub mod report;

use std::sync::Arc;

use cudarc::driver::CudaContext;

pub use backend::{CudaBackend, LoadedKernel};
pub use compile::{Target, compile_all, nvrtc_available, nvrtc_version};
pub use pool::{CudaBuf, CudaIdx, PooledBuf};

use crate::{Error, Result};

pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The driver's CUDA version, e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    if !driver_available() {
        return Err(Error::msg("the CUDA driver library (libcuda) is not installed"));
    }
    let mut v = 0;
    // SAFETY: the library is present; the call writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| Error::msg(format!("cuDriverGetVersion: {}", describe(&e))))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// A driver error as `CUDA_ERROR_NAME: what the driver says` (the emulated device's message for
/// the call that failed, where the device is emulated).
pub fn describe(e: &cudarc::driver::DriverError) -> String {
    match (e.error_name(), e.error_string()) {
        (Ok(n), Ok(s)) => format!("{}: {}", n.to_string_lossy(), s.to_string_lossy()),
        _ => format!("CUDA error {}", e.0 as i32),
    }
}

/// What the kernels are compiled to for a GPU of compute capability `cc`: its own architecture's
/// cubin where NVRTC knows it, else PTX; an error, naming the versions, when the GPU is too old or
/// NVRTC and the driver cannot work together.
pub fn kernel_target(cc: (i32, i32)) -> Result<Target> {
    let target = compile::target_for(cc, &compile::supported_archs()?)?;
    compile::check_versions(nvrtc_version()?, driver_version()?, target)?;
    Ok(target)
}

/// The context of GPU `ordinal`, or why there is none (no driver, no device, a driver error).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_available() {
        return Err(Error::msg("no CUDA driver (libcuda not found)"));
    }
    let n = CudaContext::device_count().map_err(|e| Error::msg(format!("no CUDA device ({})", describe(&e))))?;
    if ordinal as i32 >= n {
        return Err(Error::msg(format!("no CUDA device {ordinal} ({n} found)")));
    }
    CudaContext::new(ordinal).map_err(|e| Error::msg(format!("cannot open CUDA device {ordinal}: {}", describe(&e))))
}

/// What `capsnet info` reports about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sms: i32,
    pub total_mem: usize,
    pub max_smem_optin: i32,
}

pub fn device_info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    use cudarc::driver::sys::CUdevice_attribute::*;
    let e = |e: cudarc::driver::DriverError| Error::msg(format!("device query: {}", describe(&e)));
    Ok(DeviceInfo {
        name: ctx.name().map_err(e)?,
        compute_capability: ctx.compute_capability().map_err(e)?,
        sms: ctx.attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(e)?,
        total_mem: ctx.total_mem().map_err(e)?,
        max_smem_optin: ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(e)?,
    })
}
