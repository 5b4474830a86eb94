//! The element types a backend stores. The CPU reference keeps its storage in `T` (f32 for training,
//! f64 for finite-difference gradient checks) and does every sum in f64, so the trait only converts.

use std::fmt::Debug;

pub trait Float: Copy + Default + Debug + PartialEq + Send + Sync + 'static {
    /// The safetensors dtype name of this type.
    const DTYPE: &'static str;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// The slice itself when `Self` is f64 (no copy needed before an f64 GEMM).
    fn as_f64_slice(s: &[Self]) -> Option<&[f64]>;
}

impl Float for f32 {
    const DTYPE: &'static str = "F32";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn as_f64_slice(_: &[Self]) -> Option<&[f64]> {
        None
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "F64";
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    fn as_f64_slice(s: &[Self]) -> Option<&[f64]> {
        Some(s)
    }
}
