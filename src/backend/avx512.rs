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
