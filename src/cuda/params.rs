//! Launch contracts shared by the op families: `#[repr(C)]` mirrors of parameter structs in
//! kernels/common.cuh, field by field, so a kernel receives exactly what the Rust side means (each
//! family's shape parameters are in its cuda.rs), and the 32-bit index check.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use super::CudaIdx;
use crate::backend::{PLAN_HEADER, PLAN_ROW};
use crate::{Error, Result};

/// `n` as a kernel's 32-bit index or count, or an error saying what does not fit.
pub(crate) fn i32_of(what: &str, n: usize) -> crate::Result<i32> {
    i32::try_from(n).map_err(|_| crate::Error::msg(format!("{what} = {n} does not fit the kernels' 32-bit indices")))
}

/// One row of the fused Adam step's tensor table (device pointers and length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdamTensor {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub n: u64,
}
// SAFETY: five u64 fields, as the C struct AdamTensor (pointers are 64-bit on every CUDA target).
unsafe impl DeviceRepr for AdamTensor {}
// SAFETY: all-zero bits are a valid AdamTensor (null pointers, n = 0), never dereferenced as such.
unsafe impl ValidAsZeroBits for AdamTensor {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub bc1: f32,
    pub bc2: f32,
}
// SAFETY: six f32 fields, as the C struct AdamParams.
unsafe impl DeviceRepr for AdamParams {}

/// A step plan holds its cursor and at least one row, or `op` says it does not.
pub(crate) fn check_plan(op: &str, plan: &CudaIdx) -> Result<()> {
    if plan.len() < PLAN_HEADER + PLAN_ROW {
        return Err(Error::msg(format!(
            "{op}: a step plan of {} words has no row",
            plan.len()
        )));
    }
    Ok(())
}
