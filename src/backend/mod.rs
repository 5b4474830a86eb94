//! What a backend is ([`Core`]: buffers, transfers, the elementwise basics) and the backends'
//! shared machinery: the CPU reference ([`cpu`]), the spec every other backend is tested against, and
//! the fast CPU backend ([`fast`]). Each op family's interface and its implementations live in its
//! folder under `crate::ops`; the CUDA backend's device is in `crate::cuda`.
//!
//! Conventions shared by every backend:
//! - Layouts are row-major and channels-last: images [B, H, W, C], conv kernels [K, K, Cin, Cout]
//!   (TensorFlow's HWIO), dense kernels [in, out], capsule weights W [I, J, Dout, Din].
//! - Accumulation rule: a function that writes the gradient of a tape variable (every `d*`
//!   argument of a `*_bwd_*` function) ADDS to it; the tape hands a gradient out as zeros the first
//!   time in a backward pass. The exceptions: `DenseOps::act_bwd` (and `act_bias_bwd`'s dz), which
//!   writes a temporary and overwrites it, and a method with an `overwrite` flag, which writes the
//!   gradient instead where the tape says it holds no value yet.
//! - Scalars such as losses live in one-element buffers, so that a device backend never needs a
//!   host round trip inside a step; the incoming gradient of a loss (`dloss`) is such a buffer too.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub mod bf16;
pub mod cpu;
pub mod fast;
pub(crate) mod linalg;

pub use linalg::{CpuGemm, cpu_gemm, cpu_gemm_named, set_cpu_gemm};

use crate::float::Float;
use crate::{Error, Result};

/// Words before a step plan's first row: the cursor (see kernels/common.cuh).
pub const PLAN_HEADER: usize = 1;
/// Words per row of a step plan: the batch's first position, Adam's lr, bc1 and bc2 (f32 bits).
pub const PLAN_ROW: usize = 4;

/// Every backend checks buffer lengths against the shapes it was given: `op: what has N elements, expected M`.
pub(crate) fn check(op: &str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::msg(format!(
            "{op}: {what} has {len} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// A tape op's error for inputs whose shapes do not fit it: `op: why`.
pub(crate) fn shape_err<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::msg(format!("{op}: {msg}")))
}

/// A zeroed vector of `n` values; a failed allocation is an error that says so, not an abort.
pub(crate) fn alloc_zeros<T: Default + Clone>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::msg(format!(
            "out of memory: cannot allocate {} MiB for a tensor of {n} values",
            (n as u128 * std::mem::size_of::<T>() as u128) >> 20
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// A class index (label or prediction) checked against the number of classes.
pub(crate) fn class_index(op: &str, k: u32, n: usize) -> Result<usize> {
    if (k as usize) < n {
        Ok(k as usize)
    } else {
        Err(Error::msg(format!("{op}: class index {k} out of range 0..{n}")))
    }
}

/// `per` labels for each of `batch` images: at least one each, `labels` of them in all.
pub(crate) fn check_labels(op: &str, batch: usize, per: usize, labels: usize) -> Result<()> {
    if per == 0 {
        return Err(Error::msg(format!("{op}: at least one label per image is needed")));
    }
    check(op, "labels", labels, batch * per)
}

/// What every backend is: its buffers, moving values to and from them, and the elementwise basics the
/// tape needs (zeros, fill, +=). Each op family adds its trait (crate::ops), the training step its
/// runtime (crate::runtime).
pub trait Core: 'static {
    /// Element type of host transfers.
    type E: Float;
    /// A flat buffer of `E` values in this backend's memory.
    type Buf: 'static;
    /// A flat buffer of class indices (labels or predictions).
    type Idx: 'static;
    fn name(&self) -> String;
    /// Bytes of device memory this backend holds, where it has a device (the peak: the CUDA pool
    /// never returns memory to the driver).
    fn device_bytes(&self) -> Option<usize> {
        None
    }
    /// Waits until every op issued so far has finished (for timing; a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[Self::E]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<Self::E>>;
    fn upload_idx(&self, host: &[u32]) -> Result<Self::Idx>;
    /// A buffer of `n` values for an op that overwrites every one of them: its contents are
    /// unspecified. The default zeroes it; a device backend hands out memory as it is, so no memset
    /// runs before a kernel that writes its whole output.
    fn alloc_out(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// [`Core::alloc_out`] for class indices.
    fn alloc_idx(&self, n: usize) -> Result<Self::Idx> {
        self.upload_idx(&vec![0; n])
    }
    fn download_idx(&self, idx: &Self::Idx) -> Result<Vec<u32>>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn idx_len(&self, idx: &Self::Idx) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f64) -> Result<()>;
    /// dst += src.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// out = a + b (elementwise; all three the same length).
    fn add_fwd(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
}
