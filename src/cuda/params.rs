//! Launch contracts: `#[repr(C)]` mirrors of the parameter structs in kernels/common.cuh, field by
//! field, so a kernel receives exactly what the Rust side means.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use crate::backend::{CapsShape, ConvShape, DenseShape};

/// `n` as a kernel's 32-bit index or count, or an error saying what does not fit.
pub(crate) fn i32_of(what: &str, n: usize) -> crate::Result<i32> {
    i32::try_from(n).map_err(|_| crate::Error::msg(format!("{what} = {n} does not fit the kernels' 32-bit indices")))
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConvParams {
    pub batch: i32,
    pub in_h: i32,
    pub in_w: i32,
    pub in_c: i32,
    pub out_c: i32,
    pub k: i32,
    pub stride: i32,
    pub out_h: i32,
    pub out_w: i32,
}
// SAFETY: plain old data of i32 fields, laid out as the C struct ConvParams.
unsafe impl DeviceRepr for ConvParams {}

impl ConvParams {
    pub fn new(s: &ConvShape) -> crate::Result<Self> {
        // every flat index the kernels form in 32 bits stays below these products
        i32_of("conv input elements", s.x_len())?;
        i32_of("conv output elements", s.y_len())?;
        i32_of("conv GEMM K", s.patch_len().max(s.k * s.k * s.out_c))?;
        Ok(ConvParams {
            batch: i32_of("batch", s.batch)?,
            in_h: s.in_h as i32,
            in_w: s.in_w as i32,
            in_c: s.in_c as i32,
            out_c: s.out_c as i32,
            k: s.k as i32,
            stride: s.stride as i32,
            out_h: s.out_h() as i32,
            out_w: s.out_w() as i32,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DenseParams {
    pub rows: i32,
    pub inp: i32,
    pub out: i32,
}
// SAFETY: three i32 fields, as the C struct DenseParams.
unsafe impl DeviceRepr for DenseParams {}

impl DenseParams {
    pub fn new(s: &DenseShape) -> crate::Result<Self> {
        i32_of("dense elements", s.rows * s.inp.max(s.out))?;
        Ok(DenseParams {
            rows: s.rows as i32,
            inp: s.inp as i32,
            out: s.out as i32,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CapsParams {
    pub batch: i32,
    pub in_caps: i32,
    pub in_dim: i32,
    pub out_caps: i32,
    pub out_dim: i32,
}
// SAFETY: five i32 fields, as the C struct CapsParams.
unsafe impl DeviceRepr for CapsParams {}

impl CapsParams {
    pub fn new(s: &CapsShape) -> crate::Result<Self> {
        i32_of("capsule pairs", s.in_caps * s.out_caps * s.out_dim.max(s.in_dim))?;
        // the capsule kernels index û, u and W with 32-bit element indices
        i32_of("elements of û", s.uhat_len().max(s.u_len()).max(s.w_len()))?;
        Ok(CapsParams {
            batch: i32_of("batch", s.batch)?,
            in_caps: s.in_caps as i32,
            in_dim: s.in_dim as i32,
            out_caps: s.out_caps as i32,
            out_dim: s.out_dim as i32,
        })
    }
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
