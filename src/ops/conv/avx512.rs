//! The weight and bias gradients of a convolution of one input channel (conv1 on grey images) on
//! AVX-512, straight from the activation's output y and gradient dy: dz = dy · act'(y) is made 64
//! rows at a time in L1 and never stored, and its patches are read from the image, not im2col'd.
//!
//! With one input channel a patch is k² values (81 for conv1), too short a K for a GEMM's packing to
//! pay for itself: the GEMM path wrote dz (20 MB at batch 50), copied the patches, and packed both.
//! Here each 64-row chunk's patch values are gathered once (k² × 64, in L1), and the products run as
//! FMAs into 6 taps × 64 output channels of dW held in 24 registers.

use std::arch::x86_64::*;

use super::ConvShape;
use crate::float::Precision;
use crate::ops::dense::Act;

/// Output channels a register block covers: four registers.
const CB: usize = 64;
/// Rows per chunk: `bias_bwd`'s block of rows (its f32 partial sums are made the same way here).
const RB: usize = 64;
/// Chunks per part of the work (1,024 rows): parts are fixed by the shape, not the thread count, so
/// the sums' order is too.
const PART_CHUNKS: usize = 16;
/// Taps per register block: 6 × 4 accumulators, 4 registers of dz and a broadcast.
const TB: usize = 6;

/// Whether this kernel runs a conv of shape `s` and activation `act` here: one input channel, a
/// kernel of at least one tap, output channels in whole blocks of 64, ReLU or none, a CPU with
/// AVX-512F and FMA.
pub(super) fn usable(s: &ConvShape, act: Act) -> bool {
    s.in_c == 1
        && s.k > 0
        && s.out_c.is_multiple_of(CB)
        && matches!(act, Act::Relu | Act::None)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
}

/// dw += Σ patches(x)ᵀ · dz and db += Σ dz (where given), dz = dy · act'(y) over `s.rows()` rows of
/// `s.out_c` values; x and dz rounded as `precision` rounds a GEMM's inputs. db is summed as
/// `DenseOps::bias_bwd` sums it (f32 over blocks of 64 rows, the blocks in f64), so it is the same
/// to the bit; each element of dw is summed in one order whatever the thread count.
///
/// # Safety
/// [`usable`]`(s, act)`; x holds `s.x_len()` values, y and dy `s.y_len()`, dw `s.w_len()`, db
/// `s.out_c`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn params_bwd(
    s: &ConvShape,
    act: Act,
    precision: Precision,
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    let (rows, co, kk) = (s.rows(), s.out_c, s.k * s.k);
    assert!(x.len() >= s.x_len() && y.len() >= s.y_len() && dy.len() >= s.y_len() && dw.len() >= s.w_len());
    if rows == 0 {
        return;
    }
    let chunks = rows.div_ceil(RB);
    let parts = chunks.div_ceil(PART_CHUNKS);
    // each part: its dW (kk × co) and its chunks' bias sums (co each)
    let done = crate::par::par_map(parts, PART_CHUNKS * RB * kk * co, |p| {
        let c_range = p * PART_CHUNKS..((p + 1) * PART_CHUNKS).min(chunks);
        let mut dwp = vec![0f32; kk * co];
        let mut sums = vec![0f32; c_range.len() * co];
        let mut xs = vec![0f32; kk * RB];
        let mut dz = vec![0f32; RB * CB];
        for (n, c) in c_range.enumerate() {
            let r0 = c * RB;
            let nr = RB.min(rows - r0);
            patch_values(s, precision, x, r0, nr, &mut xs);
            for cb in (0..co).step_by(CB) {
                // SAFETY: AVX-512F and FMA (`usable`); every slice holds what the kernels read
                unsafe {
                    dz_chunk(
                        act,
                        precision,
                        y,
                        dy,
                        co,
                        r0,
                        nr,
                        cb,
                        &mut dz,
                        &mut sums[n * co + cb..][..CB],
                    );
                    for t0 in (0..kk).step_by(TB) {
                        match kk - t0 {
                            1 => taps::<1>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                            2 => taps::<2>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                            3 => taps::<3>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                            4 => taps::<4>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                            5 => taps::<5>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                            _ => taps::<TB>(&xs, kk, t0, &dz, &mut dwp, co, cb),
                        }
                    }
                }
            }
        }
        (dwp, sums)
    });
    // the parts' dW added in part order, each element of dw by one thread
    crate::par::par_blocks(dw, 1, parts, |e0, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let total = done[1..].iter().fold(done[0].0[e0 + i], |t, (d, _)| t + d[e0 + i]);
            *o += total;
        }
    });
    if let Some(db) = db {
        for (c, o) in db.iter_mut().enumerate().take(co) {
            let total = done
                .iter()
                .flat_map(|(_, sums)| sums.chunks(co))
                .fold(0f64, |t, block| t + block[c] as f64);
            *o = (*o as f64 + total) as f32;
        }
    }
}

/// `xs[r·k² + t]` = the value of tap t (ky·k + kx) of row r0 + r's patch, rounded as `precision`
/// rounds (each patch line copied whole); rows from `nr` on zero.
fn patch_values(s: &ConvShape, precision: Precision, x: &[f32], r0: usize, nr: usize, xs: &mut [f32]) {
    let (npix, ow, k) = (s.out_h() * s.out_w(), s.out_w(), s.k);
    let kk = k * k;
    for (r, patch) in xs.chunks_exact_mut(kk).take(RB).enumerate() {
        if r >= nr {
            patch.fill(0.0);
            continue;
        }
        let (b, p) = ((r0 + r) / npix, (r0 + r) % npix);
        let base = (b * s.in_h + p / ow * s.stride) * s.in_w + p % ow * s.stride;
        for (ky, line) in patch.chunks_exact_mut(k).enumerate() {
            line.copy_from_slice(&x[base + ky * s.in_w..][..k]);
        }
        if precision != Precision::Fp32 {
            patch.iter_mut().for_each(|v| *v = precision.round(*v));
        }
    }
}

/// `v` rounded as `precision` rounds a GEMM input (16 lanes of [`Precision::round`]).
#[target_feature(enable = "avx512f")]
#[inline]
fn round16(precision: Precision, v: __m512) -> __m512 {
    let (keep, add_lsb): (u32, bool) = match precision {
        Precision::Fp32 => return v,
        Precision::Tf32 => (!0x1fff, false),
        Precision::Bf16 => (0xffff_0000, true),
    };
    let b = _mm512_castps_si512(v);
    let half = _mm512_set1_epi32(if add_lsb { 0x7fff } else { 0x1000 });
    let lsb = if add_lsb {
        _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1))
    } else {
        _mm512_setzero_si512()
    };
    let r = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(b, half), lsb),
        _mm512_set1_epi32(keep as i32),
    );
    // infinities and NaNs as they are
    let special = _mm512_cmpeq_epi32_mask(
        _mm512_and_si512(b, _mm512_set1_epi32(0x7f80_0000)),
        _mm512_set1_epi32(0x7f80_0000),
    );
    _mm512_castsi512_ps(_mm512_mask_blend_epi32(special, r, b))
}

/// dz for rows r0..r0+nr and columns cb..cb+64 into `dz` (64 × 64, rows from `nr` on zero), rounded
/// as `precision` rounds; `sums` = its unrounded column sums, row by row in order from 0 (as
/// `bias_bwd` sums a block).
///
/// # Safety
/// AVX-512F; y and dy hold rows r0..r0+nr of `co` values, cb + 64 ≤ co.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn dz_chunk(
    act: Act,
    precision: Precision,
    y: &[f32],
    dy: &[f32],
    co: usize,
    r0: usize,
    nr: usize,
    cb: usize,
    dz: &mut [f32],
    sums: &mut [f32],
) {
    assert!(dz.len() >= RB * CB && sums.len() >= CB && cb + CB <= co && (r0 + nr) * co <= y.len().min(dy.len()));
    let mut acc = [_mm512_setzero_ps(); CB / 16];
    for r in 0..RB {
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: inside y, dy and dz (asserted)
            unsafe {
                let out = dz.as_mut_ptr().add(r * CB + q * 16);
                if r >= nr {
                    _mm512_storeu_ps(out, _mm512_setzero_ps());
                    continue;
                }
                let at = (r0 + r) * co + cb + q * 16;
                // the same columns of the next chunk's row, a chunk ahead (the rows are co apart)
                if let Some(ahead) = at.checked_add(RB * co).filter(|a| a + 16 <= y.len().min(dy.len())) {
                    _mm_prefetch::<_MM_HINT_T0>(y.as_ptr().add(ahead) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(dy.as_ptr().add(ahead) as *const i8);
                }
                let g = _mm512_loadu_ps(dy.as_ptr().add(at));
                let v = match act {
                    // dy where y > 0, else +0: the portable loop's values
                    Act::Relu => {
                        let pos =
                            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_loadu_ps(y.as_ptr().add(at)), _mm512_setzero_ps());
                        _mm512_maskz_mov_ps(pos, g)
                    }
                    _ => g,
                };
                *a = _mm512_add_ps(*a, v);
                _mm512_storeu_ps(out, round16(precision, v));
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: sums holds 64 values (asserted)
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(q * 16), *a) };
    }
}

/// dw[(t0 + i)·co + cb..][..64] += Σ_r xs[r·kk + t0 + i] · dz[r·64..][..64] for i < N, the sum over
/// the chunk's 64 rows in order from 0 in registers, then added.
///
/// # Safety
/// AVX-512F and FMA; xs holds RB·kk values, dz RB·64, dw (t0 + N)·co; t0 + N ≤ kk, cb + 64 ≤ co.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn taps<const N: usize>(xs: &[f32], kk: usize, t0: usize, dz: &[f32], dw: &mut [f32], co: usize, cb: usize) {
    assert!(t0 + N <= kk && xs.len() >= RB * kk && dz.len() >= RB * CB && dw.len() >= (t0 + N) * co && cb + CB <= co);
    let mut acc = [[_mm512_setzero_ps(); CB / 16]; N];
    for r in 0..RB {
        // SAFETY: inside dz and xs (asserted)
        unsafe {
            let d: [__m512; CB / 16] = std::array::from_fn(|q| _mm512_loadu_ps(dz.as_ptr().add(r * CB + q * 16)));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xs.get_unchecked(r * kk + t0 + i));
                for (q, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, d[q], *a);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (q, a) in a.iter().enumerate() {
            // SAFETY: inside dw (asserted)
            unsafe {
                let p = dw.as_mut_ptr().add((t0 + i) * co + cb + q * 16);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *a));
            }
        }
    }
}
