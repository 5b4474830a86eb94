//! AVX-512 pieces that the fast CPU backend's ops share.

use std::arch::x86_64::*;

/// Lane q of the result = the sum of the 16 lanes of `p[4·(q % 4) + q / 4]`: sixteen horizontal sums
/// at once. Load the product for lane q into that slot ([`slot`]) and lane q holds its sum.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn reduce16(p: [__m512; 16]) -> __m512 {
    // halves of each vector added: vectors 2a and 2a+1 share one register, 8 partial sums each
    let mut l1 = [_mm512_setzero_ps(); 8];
    for (a, o) in l1.iter_mut().enumerate() {
        let (x, y) = (p[2 * a], p[2 * a + 1]);
        *o = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y));
    }
    // 4 partial sums each: block m of l2[b] holds vector 4b + m's
    let mut l2 = [_mm512_setzero_ps(); 4];
    for (b, o) in l2.iter_mut().enumerate() {
        let (x, y) = (l1[2 * b], l1[2 * b + 1]);
        *o = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y));
    }
    // 2 partial sums each, interleaved within each 128-bit block
    let mut l3 = [_mm512_setzero_ps(); 2];
    for (c, o) in l3.iter_mut().enumerate() {
        let (x, y) = (l2[2 * c], l2[2 * c + 1]);
        *o = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    // lane 4m + t: vector m + 4t's sum
    let (x, y) = (_mm512_castps_pd(l3[0]), _mm512_castps_pd(l3[1]));
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    )
}

/// The slot of [`reduce16`]'s input whose sum lands in lane q.
pub(crate) const fn slot(q: usize) -> usize {
    4 * (q % 4) + q / 4
}

/// e^x in each lane, within about 2 ulp of the exact value where the result is a normal float: x =
/// k·ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 in two parts, so that r is exact to a few ulp), e^r by the
/// degree-7 Taylor-like polynomial of Cephes' expf, and 2^k applied by `vscalefps`, which gives
/// subnormal results and zero below the range, +∞ above it, and keeps NaN.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) fn exp16(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let s = |v: f32| _mm512_set1_ps(v);
    // below −110 the result is 0 and above 100 +∞ as they are at the ends: ±∞ brought within reach
    // (NaN is the second operand, which min and max return as it is)
    let x = _mm512_min_ps(s(100.0), _mm512_max_ps(s(-110.0), x));
    // k = x·log2(e) rounded to the nearest integer
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, s(LOG2E)));
    let r = _mm512_fnmadd_ps(k, s(LN2_LO), _mm512_fnmadd_ps(k, s(LN2_HI), x));
    let mut p = s(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, s(*c));
    }
    // 1 + r + r²·p(r)
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), s(1.0));
    _mm512_scalef_ps(y, k)
}

/// out = softmax(x) over one row of at most 16 values, in one register: [`softmax16_in`].
///
/// # Safety
/// AVX-512F and FMA; `x` and `out` hold the same number of values, at most 16.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn softmax16(x: &[f32], out: &mut [f32]) {
    let n = x.len();
    assert!(n <= 16 && out.len() == n);
    let m = lanes(n);
    // SAFETY: the masked lanes lie inside x and out (n values each)
    unsafe {
        let c = softmax16_in(m, _mm512_maskz_loadu_ps(m, x.as_ptr()));
        _mm512_mask_storeu_ps(out.as_mut_ptr(), m, c);
    }
}

/// The mask of the first `n` ≤ 16 lanes.
#[inline]
pub(crate) fn lanes(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as u16
}

/// The softmax of the lanes of `x` in `m` (the first few), in those lanes: e^(x − max) by [`exp16`],
/// each then times the reciprocal of their sum.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) fn softmax16_in(m: __mmask16, x: __m512) -> __m512 {
    let top = _mm512_reduce_max_ps(_mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, x));
    // the lanes past the row at 0, not −∞: e^x of one far below the range would come out subnormal,
    // which costs a microcode assist of about a hundred cycles
    let e = exp16(_mm512_maskz_sub_ps(m, x, _mm512_set1_ps(top)));
    let z = _mm512_reduce_add_ps(_mm512_maskz_mov_ps(m, e));
    _mm512_mul_ps(e, _mm512_set1_ps(1.0 / z))
}
