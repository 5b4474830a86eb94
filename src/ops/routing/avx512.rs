//! One image's routing of 16-D capsules on AVX-512: one capsule vector is one register.
//!
//! The weighted sums (s_j = Σ_i c_ij û_ij, and their backward twin) read û once, front to back, with
//! the sums of a few j at a time held in registers. The agreements û_ij · v_j (and dc_ij = û_ij · ds_j)
//! are taken sixteen (i, j) pairs at a time, in the order û lies: sixteen products reduced together,
//! one lane each, by a transpose-and-add tree (45 instructions for 16 sums, against 8 for each
//! horizontal sum alone).

use std::arch::x86_64::*;

use super::softmax::{softmax_row, softmax_rows_bwd_add};
use crate::backend::avx512::{lanes, reduce16, slot, softmax16};
use crate::backend::fast::{Fused, Lined};
use crate::ops::capsules::CapsShape;
use crate::ops::capsules::avx512::input_grad_sums;
use crate::ops::capsules::fast::{squash_row, squash_row_bwd};

/// Whether these kernels run `s` here: 16-D output capsules on a CPU with AVX-512F and FMA.
pub(super) fn usable(s: &CapsShape) -> bool {
    s.out_dim == 16 && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// `acc[q] = Σ_i w[i·nj + j0 + q] · û[i, j0 + q, :]` for q < N: N of the j's sums in registers,
/// û read front to back.
///
/// # Safety
/// AVX-512F; `uh` holds ni·nj·16 values and `w` ni·nj, j0 + N ≤ nj, `out` (N·16).
#[target_feature(enable = "avx512f,fma")]
unsafe fn weighted_sums<const N: usize>(ni: usize, nj: usize, j0: usize, w: &[f32], uh: &[f32], out: &mut [f32]) {
    debug_assert!(j0 + N <= nj && w.len() >= ni * nj && uh.len() >= ni * nj * 16 && out.len() >= N * 16);
    let mut acc = [_mm512_setzero_ps(); N];
    let (w, u) = (w.as_ptr(), uh.as_ptr());
    for i in 0..ni {
        let k = i * nj + j0;
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: k + q < ni·nj (the caller's contract)
            unsafe {
                let c = _mm512_set1_ps(*w.add(k + q));
                *a = _mm512_fmadd_ps(c, _mm512_loadu_ps(u.add((k + q) * 16)), *a);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: out holds N·16 values
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(q * 16), *a) };
    }
}

/// `out[j·16..][..16] = Σ_i w[i·nj + j] · û[i, j, :]` for every j: [`weighted_sums`] over the j's in
/// runs of 8, 4, 2 and 1.
///
/// # Safety
/// AVX-512F; `uh` holds ni·nj·16 values, `w` ni·nj and `out` nj·16.
#[target_feature(enable = "avx512f,fma")]
unsafe fn all_weighted_sums(ni: usize, nj: usize, w: &[f32], uh: &[f32], out: &mut [f32]) {
    let mut j0 = 0;
    while j0 < nj {
        let o = &mut out[j0 * 16..];
        // SAFETY: j0 + the run's length ≤ nj; the rest is the caller's contract
        unsafe {
            match nj - j0 {
                8.. => weighted_sums::<8>(ni, nj, j0, w, uh, o),
                4..=7 => weighted_sums::<4>(ni, nj, j0, w, uh, o),
                2..=3 => weighted_sums::<2>(ni, nj, j0, w, uh, o),
                _ => weighted_sums::<1>(ni, nj, j0, w, uh, o),
            }
        }
        j0 += match nj - j0 {
            8.. => 8,
            4..=7 => 4,
            2..=3 => 2,
            _ => 1,
        };
    }
}

/// `out[k] += û_k · x[k % nj]` for every pair k = i·nj + j (û_k the 16 values at k·16), sixteen pairs
/// a time through [`reduce16`], the last few likewise with the rest of their group zero.
///
/// # Safety
/// AVX-512F; `uh` holds n·16 values, `out` n, `x` nj·16.
#[target_feature(enable = "avx512f,fma")]
unsafe fn add_agreements(nj: usize, uh: &[f32], x: &[f32], out: &mut [f32]) {
    let n = out.len();
    debug_assert!(uh.len() >= n * 16 && x.len() >= nj * 16);
    let (u, xp) = (uh.as_ptr(), x.as_ptr());
    let mut j = 0;
    for k0 in (0..n).step_by(16) {
        let m = 16.min(n - k0);
        let mut p = [_mm512_setzero_ps(); 16];
        for q in 0..m {
            // SAFETY: k0 + q < n and j < nj (the caller's contract)
            unsafe {
                p[slot(q)] = _mm512_mul_ps(_mm512_loadu_ps(u.add((k0 + q) * 16)), _mm512_loadu_ps(xp.add(j * 16)));
            }
            j = if j + 1 == nj { 0 } else { j + 1 };
        }
        let o = &mut out[k0..k0 + m];
        // SAFETY: o holds m values, the mask's lanes (all 16 but in the last group, whose stores
        // alone are masked: a masked store holds up the loads that follow it)
        unsafe {
            if m == 16 {
                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(_mm512_loadu_ps(o.as_ptr()), reduce16(p)));
            } else {
                let mk = lanes(m);
                let sums = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o.as_ptr()), reduce16(p));
                _mm512_mask_storeu_ps(o.as_mut_ptr(), mk, sums);
            }
        }
    }
}

/// out = softmax(x) over one row of couplings, in one register by [`softmax16`] up to 16 classes
/// (its e^x within 2 ulp of the exact value), else by [`softmax_row`].
///
/// # Safety
/// AVX-512F and FMA; `x` and `out` of the same length.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(super) unsafe fn softmax_wide(x: &[f32], out: &mut [f32]) {
    if x.len() <= 16 {
        // SAFETY: AVX-512F and FMA (the caller's contract); at most 16 values each
        unsafe { softmax16(x, out) }
    } else {
        softmax_row(x, out)
    }
}

/// The gradient through the softmax of one row of couplings c = softmax(b), in registers (the row in
/// the lanes of `m`): `db + c ⊙ (dc − Σ c·dc)`, the sum by `_mm512_reduce_add_ps`.
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(super) fn softmax16_bwd_add(m: __mmask16, c: __m512, dc: __m512, db: __m512) -> __m512 {
    let dot = _mm512_reduce_add_ps(_mm512_maskz_mul_ps(m, c, dc));
    _mm512_add_ps(db, _mm512_mul_ps(c, _mm512_sub_ps(dc, _mm512_set1_ps(dot))))
}

/// [`softmax_rows_bwd_add`] for rows of up to 16 couplings by [`softmax16_bwd_add`], longer ones as
/// it does.
///
/// # Safety
/// AVX-512F and FMA; `c`, `dc` and `db` of the same length, a multiple of nj.
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_rows_bwd_add_wide(nj: usize, c: &[f32], dc: &[f32], db: &mut [f32]) {
    if nj > 16 || nj == 0 {
        return softmax_rows_bwd_add(nj, c, dc, db);
    }
    let m = lanes(nj);
    for ((ci, dci), dbi) in c.chunks_exact(nj).zip(dc.chunks_exact(nj)).zip(db.chunks_exact_mut(nj)) {
        // SAFETY: nj values in each row, the mask's lanes
        unsafe {
            let ld = |x: &[f32]| _mm512_maskz_loadu_ps(m, x.as_ptr());
            let g = softmax16_bwd_add(m, ld(ci), ld(dci), ld(dbi));
            _mm512_mask_storeu_ps(dbi.as_mut_ptr(), m, g);
        }
    }
}

/// One image's routing forward, as [`super::fast`]'s for any shape: every round's c, s and v into
/// `cs`, `ss`, `vs`, the last v into `v`.
///
/// # Safety
/// AVX-512F ([`usable`]); the slices as `routing_fwd` hands them out for one image of `s`.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn fwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    assert!(d == 16 && uh.len() == ni * nj * d && cs.len() == rounds * ni * nj && ss.len() == rounds * nj * d);
    let mut logits = vec![0f32; ni * nj];
    for r in 0..rounds {
        let c = &mut cs[r * ni * nj..(r + 1) * ni * nj];
        if r == 0 {
            // the softmax of equal logits, exactly as softmax_row computes it: e⁰ / nj
            c.fill(1.0 / nj as f32);
        } else {
            for (cr, lr) in c.chunks_mut(nj).zip(logits.chunks(nj)) {
                // SAFETY: AVX-512F and FMA (the caller's contract)
                unsafe { softmax_wide(lr, cr) };
            }
        }
        let sr = &mut ss[r * nj * d..(r + 1) * nj * d];
        // SAFETY: AVX-512F (the caller's contract); the lengths asserted above
        unsafe { all_weighted_sums(ni, nj, c, uh, sr) };
        let vr = &mut vs[r * nj * d..(r + 1) * nj * d];
        for (vj, sj) in vr.chunks_mut(d).zip(sr.chunks(d)) {
            squash_row::<Fused>(sj, vj);
        }
        if r + 1 < rounds {
            // SAFETY: as above
            unsafe { add_agreements(nj, uh, vr, &mut logits) };
        }
    }
    v.copy_from_slice(&vs[(rounds - 1) * nj * d..]);
}

/// One image's routing backward, as [`super::fast`]'s: dû += (with `fresh`, =) the gradient of the
/// last round's v through every round: [`bwd_coeffs_image`]'s coefficients, then each dû_ij made
/// from them by [`duhat_ij`] in one pass.
///
/// # Safety
/// AVX-512F ([`usable`]); the slices as `routing_bwd` hands them out for one image of `s`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn bwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    vs: &[f32],
    dv: &[f32],
    duh: &mut [f32],
    fresh: bool,
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    let n = ni * nj;
    assert!(d == 16 && duh.len() == n * d && vs.len() == rounds * nj * d);
    let mut ds_all = vec![0f32; rounds * nj * d];
    let mut g_all = vec![0f32; (rounds - 1) * n];
    // SAFETY: AVX-512F (the caller's contract); bwd_coeffs_image asserts the rest
    unsafe { bwd_coeffs_image(s, rounds, uh, cs, ss, dv, &mut ds_all, &mut g_all) };
    for k in 0..n {
        // SAFETY: k < n and the lengths asserted here and in bwd_coeffs_image
        unsafe {
            let out = duh.as_mut_ptr().add(k * 16);
            let x0 = if fresh {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(out)
            };
            _mm512_storeu_ps(out, duhat_ij(rounds, n, nj * d, cs, &g_all, &ds_all, vs, k, k % nj, x0));
        }
    }
}

/// dû_ij of one image, added to `x0`, from the image's couplings `c` (rounds × ni·nj), the logits'
/// gradients `g` ((rounds − 1) × ni·nj), `ds` and `v` (rounds × nj·16 each), k = i·nj + j: the last
/// round's c·ds, then for each earlier round (back to the first) its g·v and c·ds, each an FMA.
///
/// # Safety
/// AVX-512F and FMA; the slices hold what those lengths say, k < ni·nj, j < nj, njd = nj·16.
#[target_feature(enable = "avx512f,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn duhat_ij(
    rounds: usize,
    n: usize,
    njd: usize,
    c: &[f32],
    g: &[f32],
    ds: &[f32],
    v: &[f32],
    k: usize,
    j: usize,
    x0: __m512,
) -> __m512 {
    let last = rounds - 1;
    // SAFETY: the caller's contract
    unsafe {
        let at = |x: &[f32], e: usize| _mm512_set1_ps(*x.get_unchecked(e));
        let vec = |x: &[f32], e: usize| _mm512_loadu_ps(x.as_ptr().add(e));
        let mut x = _mm512_fmadd_ps(at(c, last * n + k), vec(ds, last * njd + j * 16), x0);
        for r in (0..last).rev() {
            x = _mm512_fmadd_ps(at(g, r * n + k), vec(v, r * njd + j * 16), x);
            x = _mm512_fmadd_ps(at(c, r * n + k), vec(ds, r * njd + j * 16), x);
        }
        x
    }
}

/// One image's routing backward as [`bwd_image`] runs it, without dû: what dû is made of, kept for
/// [`predict_grads`]: each round's ds (`ds_all`, rounds × nj × 16) and, for every round but the
/// last, the gradient of the logits entering the round after it (`g_all`, (rounds − 1) × ni·nj).
///
/// # Safety
/// AVX-512F ([`usable`]); the slices as `routing_bwd` hands them out for one image of `s`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn bwd_coeffs_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    dv: &[f32],
    ds_all: &mut [f32],
    g_all: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    let n = ni * nj;
    assert!(d == 16 && uh.len() == n * d && cs.len() == rounds * n && ss.len() == rounds * nj * d);
    assert!(dv.len() == nj * d && ds_all.len() == rounds * nj * d && g_all.len() == (rounds - 1) * n);
    let mut db_next = vec![0f32; n];
    let mut dc = vec![0f32; n];
    let mut dvr = vec![0f32; nj * d];
    for r in (0..rounds).rev() {
        let c = &cs[r * n..(r + 1) * n];
        let sr = &ss[r * nj * d..(r + 1) * nj * d];
        if r + 1 == rounds {
            dvr.copy_from_slice(dv);
        } else {
            // SAFETY: AVX-512F (the caller's contract); the lengths asserted above
            unsafe { all_weighted_sums(ni, nj, &db_next, uh, &mut dvr) };
            g_all[r * n..(r + 1) * n].copy_from_slice(&db_next);
        }
        let ds = &mut ds_all[r * nj * d..(r + 1) * nj * d];
        ds.fill(0.0);
        for ((sj, dvj), dsj) in sr.chunks(d).zip(dvr.chunks(d)).zip(ds.chunks_mut(d)) {
            squash_row_bwd::<Fused>(sj, dvj, dsj);
        }
        if r == 0 {
            break;
        }
        dc.fill(0.0);
        // SAFETY: as above
        unsafe {
            add_agreements(nj, uh, ds, &mut dc);
            softmax_rows_bwd_add_wide(nj, c, &dc, &mut db_next);
        }
    }
}

/// `wacc[t·njd + (q0 + q)·16..][..16] = Σ_b dub[b·njd + (q0 + q)·16..][..16] · u(b)[t]` for q < Q and
/// t < 8: one capsule's weight gradient for Q output capsules, the 8·Q sums in registers over the
/// images in order, each from zero by FMAs (as `predict_bwd_weight` sums it).
///
/// # Safety
/// AVX-512F and FMA; `dub` holds nb·njd values, `u(b)` 8, `wacc` 8·njd; (q0 + Q)·16 ≤ njd.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn weight_sums<'a, const Q: usize>(
    nb: usize,
    njd: usize,
    q0: usize,
    dub: &[f32],
    u: &impl Fn(usize) -> &'a [f32],
    wacc: &mut [f32],
) {
    assert!(dub.len() >= nb * njd && wacc.len() >= 8 * njd && (q0 + Q) * 16 <= njd);
    let mut acc = [[_mm512_setzero_ps(); Q]; 8];
    for b in 0..nb {
        let ub = u(b);
        let mut g = [_mm512_setzero_ps(); Q];
        for (q, gq) in g.iter_mut().enumerate() {
            // SAFETY: b·njd + (q0 + q)·16 + 16 ≤ nb·njd (asserted)
            *gq = unsafe { _mm512_loadu_ps(dub.as_ptr().add(b * njd + (q0 + q) * 16)) };
        }
        for (t, at) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(ub[t]);
            for (a, gq) in at.iter_mut().zip(&g) {
                *a = _mm512_fmadd_ps(*gq, x, *a);
            }
        }
    }
    for (t, at) in acc.iter().enumerate() {
        for (q, a) in at.iter().enumerate() {
            // SAFETY: t·njd + (q0 + q)·16 + 16 ≤ 8·njd (asserted)
            unsafe { _mm512_storeu_ps(wacc.as_mut_ptr().add(t * njd + (q0 + q) * 16), *a) };
        }
    }
}

/// Images ahead whose values [`predict_grads`] fetches.
const AHEAD: usize = 8;

/// Where [`predict_grads`] writes: du [B, I, 8] and dW [I, 16·J, 8], each where wanted, with whether
/// to write it whole (as if added to zeros) rather than add to it.
#[derive(Clone, Copy)]
pub(super) struct GradsOut {
    pub du: Option<(*mut f32, bool)>,
    pub dw: Option<(*mut f32, bool)>,
}

/// `*o + x`, or where `write`, `0 + x` (what adding to zeros gives: −0 becomes +0).
#[inline(always)]
fn add_or_write(write: bool, o: f32, x: f32) -> f32 {
    if write { 0.0 + x } else { o + x }
}

// SAFETY: the pointers are written only by `predict_grads`, whose callers give each thread its own
// capsules (their elements of du and rows of dW)
unsafe impl Sync for GradsOut {}
unsafe impl Send for GradsOut {}

/// The prediction's gradients for capsules `caps` of 8-D capsules into 16-D ones, from the routing's
/// backward coefficients ([`bwd_coeffs_image`] for every image) and no dû: for each image, dû[b,i] is
/// made in L1 exactly as [`bwd_image`] makes it, then du[b,i,:] += Σ_jd dû[jd] · W[i,jd,:] (as
/// the capsules' `predict_bwd_input_block` sums it) and dW[i,jd,:] += Σ_b dû[b,i,jd] · u[b,i,:]
/// (summed over the batch in order from zero, then added, as `predict_bwd_weight` sums it); each
/// written instead where `out` says so.
///
/// # Safety
/// AVX-512F and FMA; `s` has 8-D inputs and 16-D outputs; cs and vs are the saved c and v, ds_all
/// and g_all every image's coefficients, u [B, I, 8], wt the transposed weights [I, 8, 16·J]; `out`
/// points into du and dW of the whole shape, and no one else touches their parts for `caps` during
/// the call.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn predict_grads(
    s: &CapsShape,
    rounds: usize,
    caps: std::ops::Range<usize>,
    cs: &[f32],
    vs: &[f32],
    ds_all: &[f32],
    g_all: &[f32],
    u: &[f32],
    wt: &[f32],
    out: GradsOut,
) {
    let (nb, ni, nj) = (s.batch, s.in_caps, s.out_caps);
    let (n, njd) = (ni * nj, nj * 16);
    assert!(s.in_dim == 8 && s.out_dim == 16 && caps.end <= ni);
    assert!(cs.len() == nb * rounds * n && vs.len() == nb * rounds * njd && ds_all.len() == nb * rounds * njd);
    assert!(g_all.len() == nb * (rounds - 1) * n && u.len() == nb * ni * 8 && wt.len() == ni * 8 * njd);
    // dû of every image (32 KB at batch 50), and dWᵀ[i] (8 × 16·J) summed over the batch
    let (mut dub_lines, mut wacc_lines) = (Lined::scratch(nb * njd), Lined::scratch(8 * njd));
    let (dub, wacc) = (dub_lines.get_mut(), wacc_lines.get_mut());
    for i in caps {
        let wti = &wt[i * 8 * njd..(i + 1) * 8 * njd];
        for b0 in (0..nb).step_by(2) {
            let imgs = 2.min(nb - b0);
            // this capsule's values of images a few on lie 36-92 KB apart (strides the hardware
            // does not follow across pages): fetched ahead
            for b in (b0 + AHEAD..b0 + AHEAD + imgs).filter(|&b| b < nb) {
                // u[b, i] (8 values), and each round's c[b, r, i, :] and g[b, r, i, :] (nj values)
                let u_at = [(u.as_ptr(), (b * ni + i) * 8, 8)];
                let c_at = (0..rounds).map(|r| (cs.as_ptr(), (b * rounds + r) * n + i * nj, nj));
                let g_at = (0..rounds - 1).map(|r| (g_all.as_ptr(), (b * (rounds - 1) + r) * n + i * nj, nj));
                for (base, at, len) in u_at.into_iter().chain(c_at).chain(g_at).filter(|l| l.2 > 0) {
                    for e in [at, at + len - 1] {
                        // SAFETY: a prefetch of an address inside the slice (e < len: asserted
                        // lengths) does not fault
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(e) as *const i8) };
                    }
                }
                if let Some((du, _)) = out.du {
                    // SAFETY: as above, inside du
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(du.add((b * ni + i) * 8) as *const i8) };
                }
            }
            for img in 0..imgs {
                let b = b0 + img;
                let (c, g) = (&cs[b * rounds * n..], &g_all[b * (rounds - 1) * n..]);
                let (ds, v) = (&ds_all[b * rounds * njd..], &vs[b * rounds * njd..]);
                for j in 0..nj {
                    // SAFETY: i·nj + j < n, j < nj: inside the asserted lengths
                    unsafe {
                        let x = duhat_ij(rounds, n, njd, c, g, ds, v, i * nj + j, j, _mm512_setzero_ps());
                        _mm512_storeu_ps(dub.as_mut_ptr().add(b * njd + j * 16), x);
                    }
                }
            }
            if let Some((du, write)) = out.du {
                let mut p = [_mm512_setzero_ps(); 16];
                for img in 0..imgs {
                    // SAFETY: dub holds the image's dû (16·J values), wti Wᵀ[i]
                    let acc = unsafe { input_grad_sums(dub.as_ptr().add((b0 + img) * njd), wti.as_ptr(), nj) };
                    for (t, a) in acc.into_iter().enumerate() {
                        p[slot(img * 8 + t)] = a;
                    }
                }
                let mut sums = [0f32; 16];
                // SAFETY: 16 values; du[b, i, :] of these images lies in du (the caller's contract),
                // capsule i is this call's alone
                unsafe {
                    _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(p));
                    for img in 0..imgs {
                        let d = std::slice::from_raw_parts_mut(du.add(((b0 + img) * ni + i) * 8), 8);
                        d.iter_mut()
                            .zip(&sums[img * 8..])
                            .for_each(|(d, v)| *d = add_or_write(write, *d, *v));
                    }
                }
            }
        }
        if let Some((dw, write)) = out.dw {
            // dWᵀ[i][t, jd] = Σ_b dû[b, jd] · u[b, i, t], the images in order from zero, in registers:
            // three output capsules (24 sums) at a time
            let ui = |b: usize| &u[(b * ni + i) * 8..][..8];
            let mut q0 = 0;
            while q0 < nj {
                // SAFETY: AVX-512F and FMA (the caller's contract); q0 + the run ≤ nj, dub holds
                // every image's dû, wacc 8·16·nj values
                q0 += unsafe {
                    match nj - q0 {
                        3.. => (weight_sums::<3>(nb, njd, q0, dub, &ui, wacc), 3).1,
                        2 => (weight_sums::<2>(nb, njd, q0, dub, &ui, wacc), 2).1,
                        _ => (weight_sums::<1>(nb, njd, q0, dub, &ui, wacc), 1).1,
                    }
                };
            }
            // SAFETY: row i of dW (16·J × 8) lies in dW, and is this call's alone (the caller's contract)
            let dwi = unsafe { std::slice::from_raw_parts_mut(dw.add(i * njd * 8), njd * 8) };
            for (jd, row) in dwi.chunks_exact_mut(8).enumerate() {
                for (t, o) in row.iter_mut().enumerate() {
                    *o = add_or_write(write, *o, wacc[t * njd + jd]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::avx512::{exp16, reduce16, slot};

    fn model() -> CapsShape {
        CapsShape {
            batch: 1,
            in_caps: 1152,
            in_dim: 8,
            out_caps: 10,
            out_dim: 16,
        }
    }

    #[test]
    fn sixteen_sums_land_in_their_lanes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            // the routing's portable path is the one in use there, even at the model's shape
            assert!(!usable(&model()));
            return;
        }
        // vector q holds q·1000 + its lane: its sum 16000·q + 120, unique per q
        let vals: Vec<f32> = (0..256).map(|e| ((e / 16) * 1000 + e % 16) as f32).collect();
        let mut out = [0f32; 16];
        // SAFETY: AVX-512F (checked); 16 vectors of 16
        unsafe {
            let mut p = [_mm512_setzero_ps(); 16];
            for q in 0..16 {
                p[slot(q)] = _mm512_loadu_ps(vals.as_ptr().add(q * 16));
            }
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16(p));
        }
        let want: Vec<f32> = (0..16).map(|q| (16000 * q + 120) as f32).collect();
        assert_eq!(out.to_vec(), want);
    }

    /// exp16 against f64's exp: within 2 ulp over the normal range of results (x from −87 to 88, every
    /// 2⁻⁷, and values near 0), exactly 1 at 0, subnormal or 0 below the range, +∞ above it, NaN kept.
    #[test]
    fn exp16_is_within_two_ulp_of_exp() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")) {
            // the kernels that call it do not run here
            assert!(!usable(&model()));
            return;
        }
        let exp = |xs: &[f32]| -> Vec<f32> {
            let mut out = vec![0f32; xs.len()];
            for (o, x) in out.chunks_mut(16).zip(xs.chunks(16)) {
                let mut buf = [0f32; 16];
                buf[..x.len()].copy_from_slice(x);
                // SAFETY: AVX-512F and FMA (checked); 16 values
                unsafe { _mm512_storeu_ps(buf.as_mut_ptr(), exp16(_mm512_loadu_ps(buf.as_ptr()))) };
                o.copy_from_slice(&buf[..x.len()]);
            }
            out
        };
        let mut xs: Vec<f32> = (-87 * 128..88 * 128).map(|k| k as f32 / 128.0).collect();
        xs.extend((1..200).flat_map(|k| [k as f32 * 1e-6, -(k as f32) * 1e-6]));
        let got = exp(&xs);
        let mut worst = 0f64;
        for (&x, &y) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            let ulp = (want as f32).abs().to_bits().saturating_sub(1);
            let ulp = (want as f32) as f64 - f32::from_bits(ulp) as f64;
            worst = worst.max((y as f64 - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "exp16 is {worst:.2} ulp off");
        let edge = exp(&[0.0, -0.0, -100.0, -104.0, -200.0, 89.0, f32::NEG_INFINITY, f32::NAN]);
        assert_eq!(&edge[..2], &[1.0, 1.0]);
        let sub = edge[2];
        assert!(
            sub > 0.0 && !sub.is_normal() && ((sub as f64) / (-100f64).exp() - 1.0).abs() < 0.05,
            "e^-100 = {sub:e}"
        );
        assert_eq!(&edge[3..7], &[0.0, 0.0, f32::INFINITY, 0.0]);
        assert!(edge[7].is_nan());
    }
}
