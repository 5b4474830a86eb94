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

/// What a GEMM multiplies in: fp32 is exact single precision on CUDA cores; tf32 and bf16 round the
/// GEMM's inputs (to 10 and 7 mantissa bits) and sum in fp32 on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    Tf32,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Tf32, Precision::Bf16];
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
    pub fn parse(s: &str) -> Option<Precision> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
    /// Mantissa bits kept of each GEMM input.
    pub fn mantissa_bits(self) -> u32 {
        match self {
            Precision::Fp32 => 23,
            Precision::Tf32 => 10,
            Precision::Bf16 => 7,
        }
    }
    /// `x` as the tensor cores see it: tf32 rounds to nearest with ties away from zero (PTX's
    /// cvt.rna.tf32.f32), bf16 to nearest with ties to even (cvt.rn.bf16x2.f32); infinities and NaN
    /// stay as they are.
    pub fn round(self, x: f32) -> f32 {
        let b = x.to_bits();
        if b & 0x7f80_0000 == 0x7f80_0000 {
            return x;
        }
        f32::from_bits(match self {
            Precision::Fp32 => b,
            Precision::Tf32 => (b + 0x1000) & !0x1fff,
            Precision::Bf16 => (b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000,
        })
    }
}

/// The bound on the error of the f32 sum of K products, as a fraction of Σ_k |a_k|·|b_k|, for GEMMs
/// of precision `p` (what is left when the reference rounds the same inputs the same way).
///
/// - fp32, on CUDA cores: FMAs that round to nearest. About √K·2^-24 of Σ|terms| (the probabilistic
///   bound of Higham and Mary, with λ = 4), and 2·2^-23 for the products' rounding that an f64
///   reference does not make.
/// - tf32 and bf16, on tensor cores: the ISA does not say how an `mma` rounds its sum, and published
///   measurements report truncation, in the alignment of the terms to the largest and in the
///   normalisation of the result (Fasi, Higham, Mikaitis and Pranesh, 2021). Truncation errors do not
///   cancel, so the bound is the worst case. An `mma` adds k products to its accumulator c (k = 8 for
///   tf32, 16 for bf16); the products are exact, and with every term cut to the 24-bit significand of
///   the largest, M, each of the k + 1 terms loses less than ulp(M) = 2^-23·M and the truncated sum
///   less than one more, so an `mma` errs by less than (k + 2)·2^-23·M, M ≤ S = Σ|terms| (+ |c₀|) at
///   every step. K/k steps: below K·(1 + 2/k)·2^-23·S ≤ K·2^-22·S. Fp32 FMAs rounding to nearest stay
///   within it (their worst case is K·2^-24·S), and so does the emulated device in both its modes (to
///   nearest, and truncating as above: `emulator::set_mma_truncation`). The split-K slices' fp32 sums
///   (a few additions, each within 2^-24·S) fit in the margin between 1 + 2/k ≤ 1.25 and 2.
pub fn sum_error_bound(p: Precision, k: usize) -> f64 {
    match p {
        Precision::Fp32 => 2.0 * 2f64.powi(-23) + 4.0 * (k as f64).sqrt() * 2f64.powi(-24),
        Precision::Tf32 | Precision::Bf16 => k as f64 * 2f64.powi(-22),
    }
}

/// The bound on the error of one output of a GEMM whose inputs are rounded to `mantissa_bits` bits
/// (23: fp32, 10: tf32, 7: bf16) and whose K products are summed in f32, as a fraction of
/// Σ_k |a_k|·|b_k|: [`sum_error_bound`] of its precision, and for tf32 and bf16 the inputs' rounding
/// to nearest (cvt.rna.tf32.f32, cvt.rn.bf16x2.f32), at most 2^-(p+1) of each input, so
/// 2·2^-(p+1) + 2^-(2p+2) of each product.
pub fn gemm_error_bound(mantissa_bits: u32, k: usize) -> f64 {
    let p = mantissa_bits as f64;
    match mantissa_bits {
        23.. => sum_error_bound(Precision::Fp32, k),
        _ => 2f64.powf(-p) + 2f64.powf(-2.0 * p - 2.0) + sum_error_bound(Precision::Bf16, k),
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn rounding_keeps_the_precisions_bits_and_breaks_ties_as_ptx_does() {
        let one_plus = |bits: u32| f32::from_bits(0x3f80_0000 | bits);
        // tf32: 1 + 2^-11 is halfway between 1 and 1 + 2^-10: away from zero
        assert_eq!(Precision::Tf32.round(one_plus(1 << 12)), one_plus(1 << 13));
        assert_eq!(Precision::Tf32.round(-one_plus(1 << 12)), -one_plus(1 << 13));
        assert_eq!(Precision::Tf32.round(one_plus((1 << 12) - 1)), 1.0);
        // bf16: 1 + 2^-8 is halfway between 1 (even) and 1 + 2^-7: to even; 1 + 3·2^-8 up to 1 + 2^-6
        assert_eq!(Precision::Bf16.round(one_plus(1 << 15)), 1.0);
        assert_eq!(Precision::Bf16.round(one_plus(3 << 15)), one_plus(1 << 17));
        assert_eq!(Precision::Fp32.round(0.1), 0.1);
        assert!(Precision::Bf16.round(f32::NAN).is_nan());
        for x in [0.1f32, -3.7, 1234.5678, 1e-20] {
            assert_eq!(Precision::Tf32.round(x).to_bits() & 0x1fff, 0);
            assert_eq!(Precision::Bf16.round(x).to_bits() & 0xffff, 0);
            assert!(((Precision::Bf16.round(x) - x) / x).abs() <= 2f32.powi(-8));
            assert!(((Precision::Tf32.round(x) - x) / x).abs() <= 2f32.powi(-11));
        }
    }
}
