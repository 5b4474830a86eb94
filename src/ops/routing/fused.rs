//! Prediction and routing of 8-D capsules into at most 16 classes of 16-D ones on AVX-512, without
//! û in memory (37 MB at batch 50, written by the prediction and read back by the routing): each pass
//! over a block of images takes the capsules outer (one capsule's 5 KiB of Wᵀ stay in L1 across the
//! images) and makes û[b, i] again in L1, two images at a time (160 products of 8 terms each).
//!
//! The forward ([`fwd_block`]) makes one such pass per round; the backward's coefficients
//! ([`bwd_coeffs_block`]) one per round after the first. A capsule's row of logits, couplings and
//! their gradients is one register (a class a lane), so its agreements, softmax and the softmax's
//! gradient never go through memory between them. Each value is summed in the order, and with the
//! instructions, of the kernels that read a stored û (`super::avx512`'s `fwd_image` and
//! `bwd_coeffs_image`), so the results are theirs to the bit.

use std::arch::x86_64::*;

use super::avx512::softmax16_bwd_add;
use crate::backend::avx512::{lanes, reduce16, slot, softmax16_in};
use crate::backend::fast::{Fused, Lined};
use crate::ops::capsules::CapsShape;
use crate::ops::capsules::avx512::{predict_capsule, predict_capsule_pair};
use crate::ops::capsules::fast::{squash_row, squash_row_bwd};

/// Images ahead whose inputs and couplings a pass fetches (one capsule's values of successive images
/// lie 36-92 KB apart, strides the hardware does not follow across pages).
const AHEAD: usize = 4;

/// The agreements û_j · x_j of one capsule's nj ≤ 16 pairs (û_j and x_j the 16 values at j·16), lane
/// j each, summed as `super::avx512::add_agreements` sums them (through [`reduce16`]); 0 in the lanes
/// from nj on.
///
/// # Safety
/// AVX-512F; `uh` and `x` hold nj·16 values, nj ≤ 16.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn agreements(nj: usize, uh: &[f32], x: &[f32]) -> __m512 {
    assert!(nj <= 16 && uh.len() >= nj * 16 && x.len() >= nj * 16);
    let mut p = [_mm512_setzero_ps(); 16];
    for j in 0..nj {
        // SAFETY: j·16 + 16 ≤ nj·16 (asserted)
        unsafe {
            let at = j * 16;
            p[slot(j)] = _mm512_mul_ps(
                _mm512_loadu_ps(uh.as_ptr().add(at)),
                _mm512_loadu_ps(x.as_ptr().add(at)),
            );
        }
    }
    reduce16(p)
}

/// `acc[j] = c_j · û_j + acc[j]` for one capsule's nj ≤ 16 output capsules (16 values each), c_j lane
/// j of `c` (`even`: every lane of `c` holds the same value).
///
/// # Safety
/// AVX-512F and FMA; `uh` and `acc` hold nj·16 values, nj ≤ 16.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn add_weighted_lanes(nj: usize, c: __m512, even: bool, uh: &[f32], acc: &mut [f32]) {
    assert!(nj <= 16 && uh.len() >= nj * 16 && acc.len() >= nj * 16);
    for j in 0..nj {
        // (couplings all equal, as in the first round: each lane is already every lane's value)
        let cj = if even {
            c
        } else {
            _mm512_permutexvar_ps(_mm512_set1_epi32(j as i32), c)
        };
        // SAFETY: j·16 + 16 ≤ nj·16 (asserted)
        unsafe {
            let a = acc.as_mut_ptr().add(j * 16);
            _mm512_storeu_ps(
                a,
                _mm512_fmadd_ps(cj, _mm512_loadu_ps(uh.as_ptr().add(j * 16)), _mm512_loadu_ps(a)),
            );
        }
    }
}

/// Capsule i's 8 inputs of image b in `u` [B, I, 8], and where `two`, of image b + 1.
fn capsule_inputs(u: &[f32], ni: usize, i: usize, b: usize, two: bool) -> (&[f32], Option<&[f32]>) {
    let at = |b: usize| &u[(b * ni + i) * 8..][..8];
    (at(b), two.then(|| at(b + 1)))
}

/// û[b, i] of one image, or of two (`u1`), into `uh` (nj·16 values each, one after the other), from
/// their 8 inputs of capsule i and its Wᵀ `wti`.
///
/// # Safety
/// AVX-512F and FMA; `u0` and `u1` hold 8 values, `wti` 8·16·nj, `uh` 2·16·nj.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn predict_images(nj: usize, (u0, u1): (&[f32], Option<&[f32]>), wti: &[f32], uh: &mut [f32]) {
    let (h0, h1) = uh.split_at_mut(nj * 16);
    // SAFETY: AVX-512F and FMA (the caller's contract); the lengths as stated
    unsafe {
        match u1 {
            Some(u1) => predict_capsule_pair(nj, u0, u1, wti, h0, h1),
            None => predict_capsule(nj, u0, wti, h0),
        }
    }
}

/// Fetches, for image b of the block, capsule i's input u[b0 + b, i] and its rows in `rows` (each a
/// slice with one row of `len` values per image, `stride` apart, the row of image b at b·stride + at).
fn prefetch(u: &[f32], ui: usize, rows: &[(&[f32], usize, usize, usize)], b: usize) {
    let at = |x: &[f32], e: usize| {
        if let Some(v) = x.get(e) {
            // SAFETY: a prefetch of an address inside a slice does not fault
            unsafe { _mm_prefetch::<_MM_HINT_T0>(v as *const f32 as *const i8) };
        }
    };
    at(u, ui);
    for &(x, stride, start, len) in rows {
        at(x, b * stride + start);
        at(x, b * stride + start + len.saturating_sub(1));
    }
}

/// The forward of prediction and routing for `nbl` images from image b0, as `caps_routing_fwd`
/// saves it: every round's couplings c, sums s and capsules v of the block's images into `cs`
/// ([nbl, R, I, J]), `ss` and `vs` ([nbl, R, J, 16]), the last v into `v` ([nbl, J, 16]); `logits`
/// ([nbl, I, J]) is scratch. One pass per round: û[b, i] made again and used at once.
///
/// # Safety
/// AVX-512F and FMA; `s` has 8-D inputs and 16-D outputs; `u` [B, I, 8] and `wt` [I, 8, 16·J] of the
/// whole batch, b0 + nbl ≤ B; the block's slices of the lengths above.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn fwd_block(
    s: &CapsShape,
    rounds: usize,
    b0: usize,
    u: &[f32],
    wt: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
    logits: &mut [f32],
) {
    let (ni, nj) = (s.in_caps, s.out_caps);
    let (n, njd) = (ni * nj, nj * 16);
    let nbl = v.len() / njd;
    assert!(s.in_dim == 8 && s.out_dim == 16 && nj <= 16 && rounds >= 1 && v.len() == nbl * njd);
    assert!(u.len() >= (b0 + nbl) * ni * 8 && wt.len() == ni * 8 * njd && logits.len() >= nbl * n);
    assert!(cs.len() == nbl * rounds * n && ss.len() == nbl * rounds * njd && vs.len() == ss.len());
    let m = lanes(nj);
    // scratch rows on cache lines of their own (a register that straddles two lines costs two
    // accesses, and a store more)
    let (mut uh_lines, mut sum_lines) = (Lined::scratch(2 * njd), Lined::scratch(nbl * njd));
    let (uh, sums) = (uh_lines.get_mut(), sum_lines.get_mut());
    logits[..nbl * n].fill(0.0);
    for r in 0..rounds {
        sums.fill(0.0);
        for i in 0..ni {
            let wti = &wt[i * 8 * njd..(i + 1) * 8 * njd];
            for bp in (0..nbl).step_by(2) {
                let two = bp + 1 < nbl;
                for bl in (bp + AHEAD..bp + AHEAD + 2).filter(|&bl| bl < nbl) {
                    let rows = [(&cs[..], rounds * n, r * n + i * nj, nj), (&logits[..], n, i * nj, nj)];
                    prefetch(u, ((b0 + bl) * ni + i) * 8, &rows, bl);
                }
                // SAFETY: AVX-512F and FMA (the caller's contract); the inputs of images b0 + bp on
                unsafe { predict_images(nj, capsule_inputs(u, ni, i, b0 + bp, two), wti, uh) };
                for bl in bp..bp + 1 + two as usize {
                    let uh = &uh[(bl - bp) * njd..(bl - bp + 1) * njd];
                    let c = &mut cs[(bl * rounds + r) * n + i * nj..][..nj];
                    // SAFETY (the block): AVX-512F and FMA (the caller's contract); nj ≤ 16 lanes in
                    // c and lg, nj·16 values in uh, prev and the sums
                    unsafe {
                        let c = if r == 0 {
                            // the softmax of equal logits, as `fwd_image` writes it
                            let even = _mm512_set1_ps(1.0 / nj as f32);
                            _mm512_mask_storeu_ps(c.as_mut_ptr(), m, even);
                            even
                        } else {
                            let lg = &mut logits[bl * n + i * nj..][..nj];
                            let prev = &vs[(bl * rounds + r - 1) * njd..][..njd];
                            let x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, lg.as_ptr()), agreements(nj, uh, prev));
                            _mm512_mask_storeu_ps(lg.as_mut_ptr(), m, x);
                            let cv = softmax16_in(m, x);
                            _mm512_mask_storeu_ps(c.as_mut_ptr(), m, cv);
                            cv
                        };
                        add_weighted_lanes(nj, c, r == 0, uh, &mut sums[bl * njd..(bl + 1) * njd]);
                    }
                }
            }
        }
        for bl in 0..nbl {
            let at = (bl * rounds + r) * njd;
            ss[at..at + njd].copy_from_slice(&sums[bl * njd..(bl + 1) * njd]);
            for (vj, sj) in vs[at..at + njd].chunks_mut(16).zip(ss[at..at + njd].chunks(16)) {
                squash_row::<Fused>(sj, vj);
            }
        }
    }
    for bl in 0..nbl {
        let at = (bl * rounds + rounds - 1) * njd;
        v[bl * njd..(bl + 1) * njd].copy_from_slice(&vs[at..at + njd]);
    }
}

/// The routing backward's coefficients for `nbl` images from image b0, as `bwd_coeffs_image` makes
/// them from a stored û: each round's ds into `ds_all` ([nbl, R, J, 16]) and, for every round but the
/// last, the gradient of the logits entering the round after it into `g_all` ([nbl, R − 1, I, J]).
/// One pass per round after the first, û[b, i] made again and used at once.
///
/// # Safety
/// AVX-512F and FMA; `s` has 8-D inputs and 16-D outputs; `u` [B, I, 8] and `wt` [I, 8, 16·J] of the
/// whole batch, b0 + nbl ≤ B; `cs` and `ss` the block's saved couplings and sums, `dv` [nbl, J, 16].
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn bwd_coeffs_block(
    s: &CapsShape,
    rounds: usize,
    b0: usize,
    u: &[f32],
    wt: &[f32],
    cs: &[f32],
    ss: &[f32],
    dv: &[f32],
    ds_all: &mut [f32],
    g_all: &mut [f32],
) {
    let (ni, nj) = (s.in_caps, s.out_caps);
    let (n, njd) = (ni * nj, nj * 16);
    let nbl = dv.len() / njd;
    let last = rounds - 1;
    assert!(s.in_dim == 8 && s.out_dim == 16 && nj <= 16 && rounds >= 1 && dv.len() == nbl * njd);
    assert!(u.len() >= (b0 + nbl) * ni * 8 && wt.len() == ni * 8 * njd);
    assert!(cs.len() == nbl * rounds * n && ss.len() == nbl * rounds * njd && ds_all.len() == ss.len());
    assert!(g_all.len() == nbl * last * n);
    let ds_of = |ds_all: &mut [f32], ss: &[f32], dvr: &[f32], bl: usize, r: usize| {
        let at = (bl * rounds + r) * njd;
        let ds = &mut ds_all[at..at + njd];
        ds.fill(0.0);
        for ((sj, dvj), dsj) in ss[at..at + njd].chunks(16).zip(dvr.chunks(16)).zip(ds.chunks_mut(16)) {
            squash_row_bwd::<Fused>(sj, dvj, dsj);
        }
    };
    for bl in 0..nbl {
        ds_of(ds_all, ss, &dv[bl * njd..(bl + 1) * njd], bl, last);
    }
    let m = lanes(nj);
    let (mut uh_lines, mut dv_lines) = (Lined::scratch(2 * njd), Lined::scratch(nbl * njd));
    let (uh, dvs) = (uh_lines.get_mut(), dv_lines.get_mut());
    for r in (1..rounds).rev() {
        dvs.fill(0.0);
        for i in 0..ni {
            let wti = &wt[i * 8 * njd..(i + 1) * 8 * njd];
            for bp in (0..nbl).step_by(2) {
                let two = bp + 1 < nbl;
                for bl in (bp + AHEAD..bp + AHEAD + 2).filter(|&bl| bl < nbl) {
                    let rows = [
                        (cs, rounds * n, r * n + i * nj, nj),
                        (&g_all[..], last * n, (r - 1) * n + i * nj, nj),
                    ];
                    prefetch(u, ((b0 + bl) * ni + i) * 8, &rows, bl);
                }
                // SAFETY: AVX-512F and FMA (the caller's contract); the inputs of images b0 + bp on
                unsafe { predict_images(nj, capsule_inputs(u, ni, i, b0 + bp, two), wti, uh) };
                for bl in bp..bp + 1 + two as usize {
                    let uh = &uh[(bl - bp) * njd..(bl - bp + 1) * njd];
                    let ds = &ds_all[(bl * rounds + r) * njd..][..njd];
                    let c = &cs[(bl * rounds + r) * n + i * nj..][..nj];
                    // the logits entering round r: those entering the round after it (none after the
                    // last), plus round r's softmax gradient
                    let g = &mut g_all[bl * last * n..(bl + 1) * last * n];
                    let (to, from) = ((r - 1) * n + i * nj, r * n + i * nj);
                    // SAFETY (the block): AVX-512F and FMA (the caller's contract); nj ≤ 16 lanes in
                    // the rows of c and g, nj·16 values in uh, ds and the sums
                    unsafe {
                        // dc = 0 + the agreements, as `bwd_coeffs_image` adds them onto zeros
                        let dc = _mm512_add_ps(_mm512_setzero_ps(), agreements(nj, uh, ds));
                        let after = if r < last {
                            _mm512_maskz_loadu_ps(m, g.as_ptr().add(from))
                        } else {
                            _mm512_setzero_ps()
                        };
                        let gv = softmax16_bwd_add(m, _mm512_maskz_loadu_ps(m, c.as_ptr()), dc, after);
                        _mm512_mask_storeu_ps(g.as_mut_ptr().add(to), m, gv);
                        add_weighted_lanes(nj, gv, false, uh, &mut dvs[bl * njd..(bl + 1) * njd]);
                    }
                }
            }
        }
        for bl in 0..nbl {
            ds_of(ds_all, ss, &dvs[bl * njd..(bl + 1) * njd], bl, r - 1);
        }
    }
}
