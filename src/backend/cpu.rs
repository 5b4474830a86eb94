//! The CPU reference backend: the spec every other backend is tested against.
//!
//! Storage is `T` (f32 for training, f64 for finite-difference gradient checks); every sum is
//! accumulated in f64, the GEMMs included (`matrixmultiply::dgemm` on f64 copies). Convolutions
//! are im2col + GEMM over chunks of images. Loops are split over threads by output rows (see
//! [`crate::par`]), so results are deterministic. This file holds the backend itself; each op family's
//! reference is its `cpu.rs` under `crate::ops`.

use std::borrow::Cow;
use std::marker::PhantomData;

use super::{Core, alloc_zeros, check};
use crate::Result;
use crate::float::{Float, Precision};

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T: Float = f32> {
    _t: PhantomData<T>,
    /// Rounds every GEMM input (the convolutions' and dense layers') as the tensor cores do, then
    /// computes in f64 as always: the specification of the GPU's tf32 and bf16 kernel versions.
    gemm_inputs: Option<Precision>,
}

impl<T: Float> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            _t: PhantomData,
            gemm_inputs: None,
        }
    }

    /// The reference with every GEMM input rounded to `p` (through f32, as the GPU holds it).
    pub fn with_gemm_inputs(p: Precision) -> Self {
        CpuBackend {
            _t: PhantomData,
            gemm_inputs: (p != Precision::Fp32).then_some(p),
        }
    }

    /// A GEMM operand as f64, rounded when this backend rounds GEMM inputs.
    pub(crate) fn operand<'a>(&self, x: &'a [T]) -> Cow<'a, [f64]> {
        match self.gemm_inputs {
            None => f64s(x),
            Some(p) => Cow::Owned(x.iter().map(|v| p.round(v.to_f64() as f32) as f64).collect()),
        }
    }

    /// An im2col patch matrix rounded in place when this backend rounds GEMM inputs.
    pub(crate) fn round_patch(&self, mut col: Vec<f64>) -> Vec<f64> {
        if let Some(p) = self.gemm_inputs {
            col.iter_mut().for_each(|v| *v = p.round(*v as f32) as f64);
        }
        col
    }
}

pub(crate) fn f64s<T: Float>(x: &[T]) -> Cow<'_, [f64]> {
    match T::as_f64_slice(x) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(x.iter().map(|v| v.to_f64()).collect()),
    }
}

pub(crate) fn add_into<T: Float>(dst: &mut [T], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = T::from_f64(d.to_f64() + s);
    }
}

impl<T: Float> Core for CpuBackend<T> {
    type E = T;

    type Buf = Vec<T>;

    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu ({} thread{}, {} storage, f64 sums)",
            crate::par::threads(),
            if crate::par::threads() == 1 { "" } else { "s" },
            T::DTYPE
        )
    }

    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        alloc_zeros(n)
    }

    fn upload(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    fn upload_idx(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn download_idx(&self, idx: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(idx.clone())
    }

    fn buf_len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }

    fn idx_len(&self, idx: &Vec<u32>) -> usize {
        idx.len()
    }

    fn fill(&self, buf: &mut Vec<T>, value: f64) -> Result<()> {
        buf.fill(T::from_f64(value));
        Ok(())
    }

    fn add_assign(&self, dst: &mut Vec<T>, src: &Vec<T>) -> Result<()> {
        check("add_assign", "src", src.len(), dst.len())?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = T::from_f64(d.to_f64() + s.to_f64());
        }
        Ok(())
    }

    fn add_fwd(&self, a: &Vec<T>, b: &Vec<T>, out: &mut Vec<T>) -> Result<()> {
        check("add_fwd", "b", b.len(), a.len())?;
        check("add_fwd", "out", out.len(), a.len())?;
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = T::from_f64(x.to_f64() + y.to_f64());
        }
        Ok(())
    }
}
