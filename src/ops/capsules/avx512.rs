//! Prediction vectors û = W·u of 8-D capsules into 16-D ones on AVX-512: one output capsule per
//! register, from the transposed weights Wᵀ[i, t, (j, d)] (each input dimension's 16·J weights of a
//! capsule contiguous).

use std::arch::x86_64::*;

use super::CapsShape;
use crate::backend::avx512::{reduce16, slot};

/// Whether these kernels run `s` here: 8-D capsules into 16-D ones, on a CPU with AVX-512F and FMA.
pub(super) fn usable(s: &CapsShape) -> bool {
    s.in_dim == 8
        && s.out_dim == 16
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Wᵀ[t, jd] = W[jd, t] for one capsule's weights W [16·J, 8]: sixteen jd at a time, by gathers.
///
/// # Safety
/// AVX-512F; `wi` and `wti` hold 8·njd values, njd a multiple of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_capsule(njd: usize, wi: &[f32], wti: &mut [f32]) {
    assert!(njd.is_multiple_of(16) && wi.len() >= 8 * njd && wti.len() >= 8 * njd);
    let rows = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    for jd0 in (0..njd).step_by(16) {
        for t in 0..8 {
            // SAFETY: the 16 reads W[jd0 + r, t] and the 16 writes lie inside the asserted lengths
            unsafe {
                let v = _mm512_i32gather_ps::<4>(rows, wi.as_ptr().add(jd0 * 8 + t));
                _mm512_storeu_ps(wti.as_mut_ptr().add(t * njd + jd0), v);
            }
        }
    }
}

/// `out[q·16..][..16] = Σ_t u[t] · wt[t·njd + (j0 + q)·16..][..16]` for q < N, the sum over t in
/// order (as the portable loop sums it).
///
/// # Safety
/// AVX-512F; `u` holds 8 values, `wt` 8·njd, `out` N·16; (j0 + N)·16 ≤ njd.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn predict_run<const N: usize>(u: &[f32], wt: &[f32], njd: usize, j0: usize, out: &mut [f32]) {
    debug_assert!(u.len() >= 8 && wt.len() >= 8 * njd && out.len() >= N * 16 && (j0 + N) * 16 <= njd);
    let mut acc = [_mm512_setzero_ps(); N];
    for (t, &x) in u.iter().take(8).enumerate() {
        let x = _mm512_set1_ps(x);
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: t·njd + (j0 + q)·16 + 16 ≤ 8·njd (the caller's contract)
            *a = _mm512_fmadd_ps(
                x,
                unsafe { _mm512_loadu_ps(wt.as_ptr().add(t * njd + (j0 + q) * 16)) },
                *a,
            );
        }
    }
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: out holds N·16 values
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(q * 16), *a) };
    }
}

/// û for a block of images (as the portable `predict_fwd_block`): capsule i outer, so that its 5 KiB
/// of Wᵀ stay in L1 across the images (64 capsules at a time over each image, their Wᵀ in L2, was
/// slower); the output capsules in runs of 8, 4, 2 and 1 held in registers.
///
/// # Safety
/// AVX-512F ([`usable`] for `s`); `block` holds whole images' û from image b0 on, `u` and `wt` all of
/// theirs.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn predict_fwd_block(s: &CapsShape, b0: usize, block: &mut [f32], u: &[f32], wt: &[f32]) {
    let (ni, nj) = (s.in_caps, s.out_caps);
    let njd = nj * 16;
    let nb = block.len() / (ni * njd);
    assert!(s.in_dim == 8 && s.out_dim == 16 && wt.len() >= ni * 8 * njd && u.len() >= (b0 + nb) * ni * 8);
    for i in 0..ni {
        let wti = &wt[i * 8 * njd..(i + 1) * 8 * njd];
        for bl in 0..nb {
            let ui = &u[((b0 + bl) * ni + i) * 8..][..8];
            let out = &mut block[(bl * ni + i) * njd..(bl * ni + i + 1) * njd];
            // SAFETY: AVX-512F (the caller's contract); the lengths asserted above
            unsafe { predict_capsule(nj, ui, wti, out) };
        }
    }
}

/// One capsule's û of one image, `out[(j, d)] = Σ_t u[t] · wt[t, (j, d)]`: the output capsules in
/// runs of 8, 4, 2 and 1 held in registers (what [`predict_fwd_block`] stores for each image and
/// capsule, bit for bit).
///
/// # Safety
/// AVX-512F and FMA; `u` holds 8 values, `wt` 8·16·nj (the capsule's Wᵀ), `out` 16·nj.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn predict_capsule(nj: usize, u: &[f32], wt: &[f32], out: &mut [f32]) {
    let njd = nj * 16;
    assert!(u.len() >= 8 && wt.len() >= 8 * njd && out.len() >= njd);
    let mut j0 = 0;
    while j0 < nj {
        let o = &mut out[j0 * 16..];
        // SAFETY: each run ends by nj; the lengths asserted above
        j0 += unsafe {
            match nj - j0 {
                8.. => (predict_run::<8>(u, wt, njd, j0, o), 8).1,
                4..=7 => (predict_run::<4>(u, wt, njd, j0, o), 4).1,
                2..=3 => (predict_run::<2>(u, wt, njd, j0, o), 2).1,
                _ => (predict_run::<1>(u, wt, njd, j0, o), 1).1,
            }
        };
    }
}

/// [`predict_run`] for two images at once (inputs `u0` and `u1`, outputs `o0` and `o1`): each weight
/// vector loaded once for both, 2·N independent chains of FMAs. Each output is summed as
/// [`predict_run`] sums it, bit for bit.
///
/// # Safety
/// AVX-512F and FMA; as [`predict_run`] for each image.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn predict_run_pair<const N: usize>(
    u0: &[f32],
    u1: &[f32],
    wt: &[f32],
    njd: usize,
    j0: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    debug_assert!(u0.len() >= 8 && u1.len() >= 8 && wt.len() >= 8 * njd && (j0 + N) * 16 <= njd);
    debug_assert!(o0.len() >= N * 16 && o1.len() >= N * 16);
    let mut a0 = [_mm512_setzero_ps(); N];
    let mut a1 = [_mm512_setzero_ps(); N];
    for t in 0..8 {
        let (x0, x1) = (_mm512_set1_ps(u0[t]), _mm512_set1_ps(u1[t]));
        for q in 0..N {
            // SAFETY: t·njd + (j0 + q)·16 + 16 ≤ 8·njd (the caller's contract)
            let w = unsafe { _mm512_loadu_ps(wt.as_ptr().add(t * njd + (j0 + q) * 16)) };
            a0[q] = _mm512_fmadd_ps(x0, w, a0[q]);
            a1[q] = _mm512_fmadd_ps(x1, w, a1[q]);
        }
    }
    for q in 0..N {
        // SAFETY: o0 and o1 hold N·16 values
        unsafe {
            _mm512_storeu_ps(o0.as_mut_ptr().add(q * 16), a0[q]);
            _mm512_storeu_ps(o1.as_mut_ptr().add(q * 16), a1[q]);
        }
    }
}

/// [`predict_capsule`] for two images of the same capsule (inputs `u0` and `u1`), each weight loaded
/// once for both: the output capsules in runs of 10, 8, 4, 2 and 1 (20 chains of FMAs in flight at
/// the model's 10). The same values as [`predict_capsule`] for each image, bit for bit.
///
/// # Safety
/// AVX-512F and FMA; `u0` and `u1` hold 8 values, `wt` 8·16·nj (the capsule's Wᵀ), `o0` and `o1` 16·nj.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn predict_capsule_pair(
    nj: usize,
    u0: &[f32],
    u1: &[f32],
    wt: &[f32],
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let njd = nj * 16;
    assert!(u0.len() >= 8 && u1.len() >= 8 && wt.len() >= 8 * njd && o0.len() >= njd && o1.len() >= njd);
    let mut j0 = 0;
    while j0 < nj {
        let (p, q) = (&mut o0[j0 * 16..], &mut o1[j0 * 16..]);
        // SAFETY: each run ends by nj; the lengths asserted above
        j0 += unsafe {
            match nj - j0 {
                10.. => (predict_run_pair::<10>(u0, u1, wt, njd, j0, p, q), 10).1,
                8..=9 => (predict_run_pair::<8>(u0, u1, wt, njd, j0, p, q), 8).1,
                4..=7 => (predict_run_pair::<4>(u0, u1, wt, njd, j0, p, q), 4).1,
                2..=3 => (predict_run_pair::<2>(u0, u1, wt, njd, j0, p, q), 2).1,
                _ => (predict_run_pair::<1>(u0, u1, wt, njd, j0, p, q), 1).1,
            }
        };
    }
}

/// For one capsule and image, the eight vectors whose lanes sum to du[t] = Σ_jd dû[jd] · Wᵀ[t, jd]
/// (t < 8): side by side, eight independent chains of FMAs, each over the output capsules in order.
///
/// # Safety
/// AVX-512F and FMA; 16·nj readable f32 at `g` (dû of the capsule) and 8 rows of 16·nj at `wt` (its
/// Wᵀ).
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn input_grad_sums(g: *const f32, wt: *const f32, nj: usize) -> [__m512; 8] {
    let njd = nj * 16;
    let mut acc = [_mm512_setzero_ps(); 8];
    for q in 0..nj {
        // SAFETY: q·16 + 16 ≤ njd and t·njd + q·16 + 16 ≤ 8·njd (the caller's contract)
        unsafe {
            let gq = _mm512_loadu_ps(g.add(q * 16));
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(gq, _mm512_loadu_ps(wt.add(t * njd + q * 16)), *a);
            }
        }
    }
    acc
}

/// du[b,i,:] += Σ_jd dû[b,i,jd] · W[i,jd,:] for a block of images (as the portable
/// `predict_bwd_input_block`): for each capsule i and two images at a time, the 16 dot products of
/// length 16·J (8 input dimensions × 2 images) summed in registers and reduced together.
///
/// # Safety
/// AVX-512F ([`usable`] for `s`); `block` holds whole images' du from image b0 on, `duhat` and `wt`
/// all of theirs.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn predict_bwd_input_block(s: &CapsShape, b0: usize, block: &mut [f32], duhat: &[f32], wt: &[f32]) {
    let (ni, nj) = (s.in_caps, s.out_caps);
    let njd = nj * 16;
    let nb = block.len() / (ni * 8);
    assert!(s.in_dim == 8 && s.out_dim == 16 && wt.len() >= ni * 8 * njd && duhat.len() >= (b0 + nb) * ni * njd);
    for i in 0..ni {
        let wt = wt[i * 8 * njd..(i + 1) * 8 * njd].as_ptr();
        for bl in (0..nb).step_by(2) {
            let mut p = [_mm512_setzero_ps(); 16];
            for img in 0..2.min(nb - bl) {
                let g = duhat[((b0 + bl + img) * ni + i) * njd..][..njd].as_ptr();
                // SAFETY: g holds dû[b, i] (16·J values), wt Wᵀ[i] (8 rows of 16·J)
                let acc = unsafe { input_grad_sums(g, wt, nj) };
                for (t, a) in acc.into_iter().enumerate() {
                    p[slot(img * 8 + t)] = a;
                }
            }
            let mut sums = [0f32; 16];
            // SAFETY: 16 values
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(p)) };
            for img in 0..2.min(nb - bl) {
                let du = &mut block[((bl + img) * ni + i) * 8..][..8];
                du.iter_mut().zip(&sums[img * 8..]).for_each(|(d, v)| *d += v);
            }
        }
    }
}
