//! The convolution through the discrete Fourier transform, for the fast CPU backend in bf16 on the
//! AVX512_BF16 kernel: fewer multiplies than the implicit GEMM where the kernel is large against the
//! image (the primary capsules' 9×9 kernel on a 20×20 image: 3.3 times fewer).
//!
//! On the H×W grid of the input, a valid convolution is a product of spectra with nothing wrapped
//! around: an output at (oy·s, ox·s) reads pixels up to (oy·s + k - 1) < H; the input gradient
//! reaches pixel (oy·s + k - 1) too; a weight gradient tap (ky, kx) pairs output (oy, ox) with pixel
//! (oy·s + ky) < H. With X, W and dZ the 2-D DFTs of an image, a kernel and an output gradient
//! (placed at its stride's pixels), at each frequency f the channels mix as complex matrix products:
//!
//! - forward:        Y(f)[n, o] = Σ_c X(f)[n, c] · conj(W(f)[o, c])
//! - input gradient: dX(f)[n, c] = Σ_o dZ(f)[n, o] · W(f)[o, c]
//! - weight gradient: dW(f)[o, c] = Σ_n conj(dZ(f)[n, o]) · X(f)[n, c]
//!
//! and the inverse DFT gives the outputs, the input gradient and the weight gradient's taps. Real
//! signals need only the half spectrum (k2 ≤ W/2), and in its columns that are their own mirror
//! (k2 = 0, and W/2 where W is even: F[H - k1] = conj F[k1]) only k1 ≤ H/2: 202 frequencies of the
//! 20×20 grid's 220, where the implicit GEMM takes 36 outputs × 81 taps; the products then multiply
//! 3.6 times fewer (3.2 at batch 50, whose 100 image rows pad to 112).
//!
//! Each product runs on the bf16 GEMM's AVX512_BF16 kernel as a real product
//! ([`bf16::tiles_product`]). `VDPBF16PS` sums the products of bf16 pairs, so a complex value is a
//! pair (re, im): one operand (B) holds each once, the other (A) has two rows per complex row, whose
//! dot products with a B pair give the real and the imaginary part (for Y: (Xr, Xi) and (Xi, -Xr)
//! against (Wr, Wi)). Spectra are rounded to bf16 (to nearest, ties to even), sums and transforms
//! are f32: the rounding of a bf16 GEMM in another basis. tests/cpu_fast.rs holds each output to
//! the f64 reference next to the direct bf16 path's error on the same inputs.
//!
//! The transforms run 16 channels at once, one per AVX-512 lane, as products of small real matrices
//! with vectors ([`matvec`]): along the rows, then down the columns (split by radix 2 where H is
//! even: even and odd rows apart), and back. Operands are packed frequency after frequency as the
//! bf16 GEMM packs them; a transform task writes one row of a tile in each frequency's block, past
//! the caches (the rows lie tens of KiB apart). Products are stored with each row's 16 columns of
//! all frequencies side by side, for the inverse to read in one run. Each frequency's product is one
//! thread's, and each transform task writes its own rows, so the results do not depend on the
//! thread count.

use std::arch::x86_64::*;

use super::ConvShape;
use crate::backend::bf16::{self, Shared, TILE, TK};
use crate::ops::dense::Act;

/// Lanes of a vector: channels transformed at once.
const L: usize = 16;

/// The least batch the Fourier path takes: the kernels' transform is paid once a call (9–10 ms at
/// the primary capsules' shape on a 2-core Zen 4) and must be spread over enough images.
pub(crate) const MIN_BATCH: usize = 16;

/// Whether the Fourier path computes this convolution: channels in whole runs of 32, a batch of
/// at least [`MIN_BATCH`], and at least twice fewer multiplies than the implicit GEMM (the
/// activation, ReLU or none, is the forward's to check).
pub(crate) fn fits(s: &ConvShape) -> bool {
    let direct = s.out_h() * s.out_w() * s.k * s.k;
    let fourier = 4 * s.in_h * (s.in_w / 2 + 1);
    s.in_c.is_multiple_of(32)
        && s.out_c.is_multiple_of(32)
        && s.in_c > 0
        && s.out_c > 0
        && s.batch >= MIN_BATCH
        && direct >= 2 * fourier
}

/// The plan of `s`, made once and kept (its matrices take about 0.2 ms to make, and a training step
/// asks three times): the last few shapes' plans.
pub(crate) fn plan(s: &ConvShape) -> std::sync::Arc<Plan> {
    use std::sync::{Arc, Mutex};
    const KEPT: usize = 8;
    static PLANS: Mutex<Vec<Arc<Plan>>> = Mutex::new(Vec::new());
    let mut plans = PLANS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = plans.iter().find(|p| p.s == *s) {
        return p.clone();
    }
    if plans.len() == KEPT {
        plans.remove(0);
    }
    let p = Arc::new(Plan::new(s));
    plans.push(p.clone());
    p
}

/// Runs `f` on contiguous ranges of 0..n, one per thread.
fn par_tasks(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let parts = crate::par::threads().min(n).max(1);
    let ranges: Vec<_> = (0..parts).map(|p| p * n / parts..(p + 1) * n / parts).collect();
    crate::par::scatter(ranges, |_, r| f(r));
}

/// What the inverse does with each output vector.
#[derive(Clone, Copy)]
enum Put {
    /// out = v
    Store,
    /// out += v
    Add,
    /// out = act(v + bias), 16 biases at the pointer
    Bias(*const f32, bool),
}

/// The sizes and tables of the Fourier convolution of one shape, and its packed operands' layouts:
/// every operand holds one block per frequency, `*_len()` u16 (or f32 for products) each.
pub(crate) struct Plan {
    s: ConvShape,
    /// Half-spectrum columns: W/2 + 1.
    w2: usize,
    /// Frequencies kept: H·w2 but for the mirror halves of the columns that are their own mirror.
    bins: usize,
    /// Each column's (first frequency, frequencies).
    cols: Vec<(usize, usize)>,
    /// The transforms' matrices, by stage, pixels and stride.
    mats: std::collections::HashMap<(Stage, usize, usize), Mat>,
}

impl Plan {
    /// The plan of `s`; panics where the CPU does not run AVX512_BF16 (the Fourier path is on only
    /// where it does: `FastCpu::with_fourier`).
    pub(crate) fn new(s: &ConvShape) -> Plan {
        assert!(
            bf16::Bf16Gemm::Avx512Bf16.supported(),
            "the Fourier convolutions need AVX512_BF16"
        );
        let (h, w, w2) = (s.in_h, s.in_w, s.in_w / 2 + 1);
        // cos and sin of 2π·a/n, a reduced first (exact in f64 for these sizes)
        let cs = |a: usize, n: usize| {
            let t = 2.0 * std::f64::consts::PI * (a % n) as f64 / n as f64;
            (t.cos(), t.sin())
        };
        let scale = 1.0 / (h * w) as f64;
        let mut mats = std::collections::HashMap::new();
        // the images (and the input gradient), the kernels (and the weight gradient), the output
        // gradient (and the output): pixels and stride
        for (nh, nw, st) in [(h, w, 1), (s.k, s.k, 1), (s.out_h(), s.out_w(), s.stride)] {
            // along a row: R[k2] = Σ_j x[j] e^(-2πi k2 j·st / W), as (re, im) rows
            let fwd_rows = Mat::new(2 * w2, nw, |r, j| {
                let (c, sn) = cs(r / 2 * j * st, w);
                if r % 2 == 0 { c } else { -sn }
            });
            // down a column: F[k1] = Σ_i R[i] e^(-2πi k1 i·st / H), pairs to pairs (all of k1, or
            // k1 ≤ H/2 for the columns that are their own mirror)
            let fwd_cols = |k1s: usize| {
                Mat::new(2 * k1s, 2 * nh, |r, t| {
                    let (c, sn) = cs(r / 2 * (t / 2) * st, h);
                    match (r % 2, t % 2) {
                        (0, 0) | (1, 1) => c,
                        (0, _) => sn,
                        _ => -sn,
                    }
                })
            };
            // up a column: T[i] = Σ_k1 F[k1] e^(2πi k1 i·st / H)
            let inv_cols = Mat::new(2 * nh, 2 * h, |r, t| {
                let (c, sn) = cs(r / 2 * st * (t / 2), h);
                match (r % 2, t % 2) {
                    (0, 0) | (1, 1) => c,
                    (0, _) => -sn,
                    _ => sn,
                }
            });
            // along a row: x[j] = Σ_k2 α Re(T[k2] e^(2πi k2 j·st / W)) / (H·W), α = 2 but for the
            // columns that are their own mirror (k2 = 0, and W/2 where W is even)
            let inv_rows = Mat::new(nw, 2 * w2, |j, t| {
                let k2 = t / 2;
                let alpha = if k2 == 0 || 2 * k2 == w { scale } else { 2.0 * scale };
                let (c, sn) = cs(k2 * j * st, w);
                alpha * if t % 2 == 0 { c } else { -sn }
            });
            mats.insert((Stage::FwdRows, nw, st), fwd_rows);
            // up a column that is its own mirror, from k1 ≤ H/2 (F[H - k1] = conj F[k1]): T real,
            // twice the real part of each term but for k1 = 0 and H/2, which are their own mirror
            let inv_mirror = Mat::new(2 * nh, 2 * (h / 2 + 1), |r, t| {
                let k1 = t / 2;
                let beta = if k1 == 0 || 2 * k1 == h { 1.0 } else { 2.0 };
                let (c, sn) = cs(r / 2 * st * k1, h);
                match (r % 2, t % 2) {
                    (0, 0) => beta * c,
                    (0, _) => -beta * sn,
                    _ => 0.0,
                }
            });
            // the same, split by radix 2 where H is even: the even rows' sums E and the odd rows'
            // O over k1 < H/2 (F[k1] = E + O, F[k1 + H/2] = E - O); up a column, the rows at even
            // pixels from S = F[k1] + F[k1 + H/2], at odd pixels from D = F[k1] - F[k1 + H/2]
            if h.is_multiple_of(2) {
                let half = h / 2;
                for odd in [false, true] {
                    let ys: Vec<usize> = (0..nh).map(|i| i * st).filter(|y| y % 2 == usize::from(odd)).collect();
                    if ys.is_empty() {
                        continue;
                    }
                    let fwd = Mat::new(2 * half, 2 * ys.len(), |r, t| {
                        let (c, sn) = cs(r / 2 * ys[t / 2], h);
                        match (r % 2, t % 2) {
                            (0, 0) | (1, 1) => c,
                            (0, _) => sn,
                            _ => -sn,
                        }
                    });
                    let inv = Mat::new(2 * ys.len(), 2 * half, |r, t| {
                        let (c, sn) = cs(ys[r / 2] * (t / 2), h);
                        match (r % 2, t % 2) {
                            (0, 0) | (1, 1) => c,
                            (0, _) => -sn,
                            _ => sn,
                        }
                    });
                    mats.insert((if odd { Stage::FwdOdd } else { Stage::FwdEven }, nh, st), fwd);
                    mats.insert((if odd { Stage::InvOdd } else { Stage::InvEven }, nh, st), inv);
                }
            }
            mats.insert((Stage::FwdCols, nh, st), fwd_cols(h));
            mats.insert((Stage::FwdMirror, nh, st), fwd_cols(h / 2 + 1));
            mats.insert((Stage::InvCols, nh, st), inv_cols);
            mats.insert((Stage::InvMirror, nh, st), inv_mirror);
            mats.insert((Stage::InvRows, nw, st), inv_rows);
        }
        // frequencies column by column; a column that is its own mirror (k2 = 0, and W/2 where W
        // is even: F[H - k1] = conj F[k1]) only for k1 ≤ H/2
        let mut cols = Vec::with_capacity(w2);
        let mut bins = 0;
        for k2 in 0..w2 {
            let len = if k2 == 0 || 2 * k2 == w { h / 2 + 1 } else { h };
            cols.push((bins, len));
            bins += len;
        }
        Plan {
            s: *s,
            w2,
            bins,
            cols,
            mats,
        }
    }

    /// The matrix of `stage` over `n` pixels `st` apart.
    fn mat(&self, stage: Stage, n: usize, st: usize) -> &Mat {
        &self.mats[&(stage, n, st)]
    }

    /// The matrix of `stage` over `n` pixels `st` apart, where there is one.
    fn mat_if(&self, stage: Stage, n: usize, st: usize) -> Option<&Mat> {
        self.mats.get(&(stage, n, st))
    }

    /// Where tile `t` of an operand of `tiles` tiles a frequency lies for frequency `bin`: the
    /// frequencies one after another, each operand's tiles as the bf16 GEMM packs them.
    fn at(&self, t: usize, bin: usize, tiles: usize) -> usize {
        (bin * tiles + t) * TILE
    }

    /// Frequency `bin`'s operand of `tiles` tiles in `p`, as [`bf16::tiles_product`] takes it.
    fn operand(&self, p: *const u16, bin: usize, tiles: usize) -> (*const u16, usize) {
        (p.wrapping_add(bin * tiles * TILE), TILE)
    }

    /// Row tiles of a product with two rows per image.
    fn image_tiles(&self) -> usize {
        (2 * self.s.batch).div_ceil(L)
    }
    /// K tiles over the images (16 pairs each).
    fn batch_kts(&self) -> usize {
        self.s.batch.div_ceil(L)
    }
    /// The images' spectra as the forward's A: rows (2n, 2n + 1) = (Xr, Xi), (Xi, -Xr) over Cin.
    pub(crate) fn xa_len(&self) -> usize {
        self.bins * self.image_tiles() * (self.s.in_c / L) * TILE
    }
    /// The images' spectra as the weight gradient's B: K the images, N Cin, pairs (Xr, Xi).
    pub(crate) fn xb_len(&self) -> usize {
        self.bins * (self.s.in_c / L) * self.batch_kts() * TILE
    }
    /// The kernels' spectra as the forward's B: K Cin, N Cout, pairs (Wr, Wi).
    pub(crate) fn wb_len(&self) -> usize {
        self.bins * (self.s.out_c / L) * (self.s.in_c / L) * TILE
    }
    /// The output gradient's spectra as the input gradient's A: rows (dZr, -dZi), (dZi, dZr) over Cout.
    fn dza_len(&self) -> usize {
        self.bins * self.image_tiles() * (self.s.out_c / L) * TILE
    }
    /// The output gradient's spectra as the weight gradient's A: rows (2o, 2o + 1) = (dZr, dZi),
    /// (-dZi, dZr) over the images.
    fn dzw_len(&self) -> usize {
        self.bins * (2 * self.s.out_c / L) * self.batch_kts() * TILE
    }
    /// Each frequency's product, one thread's, into `c` ([`Plan::product_c`], `n` columns): A's
    /// `a.1` row tiles and B's `b.1` column tiles of that frequency (operands packed frequency after
    /// frequency), `kts` K tiles deep, summed over `pairs` pairs; where `transposed`, B's tiles are
    /// the transposes of `b`'s (which holds `kts` column tiles, `b.1` K tiles deep), made in the
    /// thread's scratch first (the input gradient's W(f), from the forward's).
    ///
    /// # Safety
    /// A and B hold `bins` frequencies of operands of these sizes; `c` holds the products.
    unsafe fn products(
        &self,
        (a, m_tiles): (*const u16, usize),
        (b, n_tiles): (*const u16, usize),
        (kts, pairs): (usize, usize),
        transposed: bool,
        c: &mut [f32],
        n: usize,
    ) {
        assert_eq!(c.len(), self.bins * m_tiles * L * n, "the products of every frequency");
        let (a, b, cp) = (Shared(a as *mut u16), Shared(b as *mut u16), Shared(c.as_mut_ptr()));
        let b_tiles = n_tiles * kts;
        par_tasks(self.bins, |bins| {
            let (a, b, cp) = (a, b, cp);
            with_scratch(
                self,
                if transposed { b_tiles * TILE / (2 * L) } else { 0 },
                |_, room| {
                    let room = room.as_mut_ptr() as *mut u16;
                    for bin in bins {
                        // SAFETY: one frequency's tiles, inside the operands (the caller's contract),
                        // and its own elements of C; the kernel runs (the Fourier path is taken only
                        // with it); the scratch holds B's tiles
                        unsafe {
                            let b = if transposed {
                                for k in 0..kts {
                                    for nt in 0..n_tiles {
                                        let from = b.0.add(self.at(k * n_tiles + nt, bin, b_tiles));
                                        bf16::transpose_tile(from, room.add((nt * kts + k) * TILE));
                                    }
                                }
                                (room as *const u16, TILE)
                            } else {
                                self.operand(b.0, bin, b_tiles)
                            };
                            let a = self.operand(a.0, bin, m_tiles * kts);
                            bf16::tiles_product(a, m_tiles, b, n_tiles, (kts, pairs), self.product_c(cp.0, bin, n));
                        }
                    }
                },
            )
        });
    }

    /// A product's C for frequency `bin` as [`bf16::tiles_product`] takes it: element (row, col) of
    /// frequency f at `((row·n/16 + col/16)·bins + f)·16 + col % 16` (n columns), so that a row's 16
    /// columns of every frequency lie together for the inverse transform.
    fn product_c(&self, c: *mut f32, bin: usize, n: usize) -> (*mut f32, usize, usize) {
        (c.wrapping_add(bin * L), (n / L) * self.bins * L, self.bins * L)
    }

    /// Where [`Plan::product_c`]'s rows `row` (real parts) and `row + 1` (imaginary) start for
    /// columns 16·g.., frequency 0: the frequencies follow 16 f32 apart.
    fn product_row(&self, c: *mut f32, row: usize, g: usize, n: usize) -> (*const f32, *const f32) {
        let re = c.wrapping_add((row * (n / L) + g) * self.bins * L);
        (re, re.wrapping_add((n / L) * self.bins * L))
    }

    /// f32 of a product with two rows per image and `n` columns, all frequencies.
    fn image_product_len(&self, n: usize) -> usize {
        self.bins * self.image_tiles() * L * n
    }

    /// The kernels' spectra (w [K, K, Cin, Cout]) packed as the forward's B into `wb` (`wb_len`).
    pub(crate) fn transform_weights(&self, w: &[f32], wb: &mut [u16]) {
        // SAFETY: a plan is made only where the CPU runs AVX512_BF16 (`Plan::new`)
        unsafe { self.transform_weights_avx512(w, wb) }
    }

    /// [`Plan::transform_weights`], compiled for AVX-512F.
    #[target_feature(enable = "avx512f")]
    fn transform_weights_avx512(&self, w: &[f32], wb: &mut [u16]) {
        let s = &self.s;
        assert!(w.len() == s.w_len() && wb.len() == self.wb_len());
        let (ci, co, k) = (s.in_c, s.out_c, s.k);
        let cts = ci / L;
        let (w, wb) = (Shared(w.as_ptr() as *mut f32), Shared(wb.as_mut_ptr()));
        // a task: one input channel's kernels to 16 output channels
        par_tasks(ci * (co / L), |tasks| {
            let (w, wb) = (w, wb);
            with_scratch(self, 0, |scratch, _| {
                for t in tasks {
                    let (c, og) = (t / (co / L), t % (co / L));
                    // SAFETY: the task reads inside w and writes the rows of (c, og) in every frequency's
                    // block, which no other task writes; AVX-512F is there (the bf16 kernel runs)
                    unsafe {
                        let src = w.0.add(c * co + og * L);
                        let spec = scratch.forward(self, src, (k * ci * co, ci * co), (k, k), 1);
                        for bin in 0..self.bins {
                            let (re, im) = (spec[2 * bin], spec[2 * bin + 1]);
                            let tile = wb.0.add(self.at(og * cts + c / L, bin, (co / L) * cts) + (c % L) * TK);
                            stream_pairs(tile, re, im);
                        }
                    }
                }
                // the streamed rows ordered before the threads' join publishes them
                _mm_sfence();
            })
        });
    }

    /// The images' spectra (x [B, H, W, Cin]) packed as the forward's A into `xa` and as the weight
    /// gradient's B into `xb`, where given.
    pub(crate) fn transform_images(&self, x: &[f32], xa: Option<&mut [u16]>, xb: Option<&mut [u16]>) {
        // SAFETY: a plan is made only where the CPU runs AVX512_BF16 (`Plan::new`)
        unsafe { self.transform_images_avx512(x, xa, xb) }
    }

    /// [`Plan::transform_images`], compiled for AVX-512F.
    #[target_feature(enable = "avx512f")]
    fn transform_images_avx512(&self, x: &[f32], xa: Option<&mut [u16]>, xb: Option<&mut [u16]>) {
        let s = &self.s;
        assert!(x.len() == s.x_len());
        assert!(xa.as_ref().is_none_or(|d| d.len() == self.xa_len()));
        assert!(xb.as_ref().is_none_or(|d| d.len() == self.xb_len()));
        let (ci, h, w) = (s.in_c, s.in_h, s.in_w);
        let (cts, bkts) = (ci / L, self.batch_kts());
        let x = Shared(x.as_ptr() as *mut f32);
        let (xa, xb) = (xa.map(|d| Shared(d.as_mut_ptr())), xb.map(|d| Shared(d.as_mut_ptr())));
        // a task: 16 channels of one image
        par_tasks(s.batch * cts, |tasks| {
            let (x, xa, xb) = (x, xa, xb);
            with_scratch(self, 0, |scratch, _| {
                for t in tasks {
                    let (n, cg) = (t / cts, t % cts);
                    // SAFETY: the task reads inside x and writes image n's rows of channel group cg in
                    // every frequency's blocks, which no other task writes; AVX-512F is there
                    unsafe {
                        let src = x.0.add(n * h * w * ci + cg * L);
                        let spec = scratch.forward(self, src, (w * ci, ci), (h, w), 1);
                        for bin in 0..self.bins {
                            let (re, im) = (spec[2 * bin], spec[2 * bin + 1]);
                            if let Some(xa) = xa {
                                let row = (2 * n / L) * cts + cg;
                                let a = xa.0.add(self.at(row, bin, self.image_tiles() * cts) + (2 * n % L) * TK);
                                stream_pairs(a, re, im);
                                stream_pairs(a.add(TK), im, neg(re));
                            }
                            if let Some(xb) = xb {
                                let b = xb.0.add(self.at(cg * bkts + n / L, bin, cts * bkts) + (n % L) * TK);
                                stream_pairs(b, re, im);
                            }
                        }
                    }
                }
                // the streamed rows ordered before the threads' join publishes them
                _mm_sfence();
            })
        });
    }

    /// The output gradient's spectra (dz [B, OH, OW, Cout], at the stride's pixels) packed as the
    /// input gradient's A into `dza` and, where given, as the weight gradient's A into `dzw`.
    #[target_feature(enable = "avx512f")]
    fn transform_grads_avx512(&self, dz: &[f32], dza: Option<&mut [u16]>, dzw: Option<&mut [u16]>) {
        let s = &self.s;
        assert!(dz.len() == s.y_len());
        assert!(dza.as_ref().is_none_or(|d| d.len() == self.dza_len()));
        assert!(dzw.as_ref().is_none_or(|d| d.len() == self.dzw_len()));
        let (co, oh, ow, b) = (s.out_c, s.out_h(), s.out_w(), s.batch);
        let (ots, bkts) = (co / L, self.batch_kts());
        let dz = Shared(dz.as_ptr() as *mut f32);
        let dza = dza.map(|d| Shared(d.as_mut_ptr()));
        let dzw = dzw.map(|d| Shared(d.as_mut_ptr()));
        // a task: 16 output channels of 16 images (the weight gradient's rows take the images as K,
        // transposed 16 at a time)
        par_tasks(bkts * ots, |tasks| {
            let (dz, dza, dzw) = (dz, dza, dzw);
            with_scratch(self, L * 2 * self.bins, |scratch, specs| {
                for t in tasks {
                    let (nt, og) = (t / ots, t % ots);
                    let images = nt * L..((nt + 1) * L).min(b);
                    // SAFETY: the task reads inside dz and writes the rows of its images and channels in
                    // every frequency's blocks, which no other task writes; AVX-512F is there
                    unsafe {
                        for n in images.clone() {
                            let src = dz.0.add(n * oh * ow * co + og * L);
                            let spec = scratch.forward(self, src, (ow * co, co), (oh, ow), s.stride);
                            specs[(n - nt * L) * 2 * self.bins..][..2 * self.bins].copy_from_slice(spec);
                            if let Some(dza) = dza {
                                for bin in 0..self.bins {
                                    let (re, im) = (spec[2 * bin], spec[2 * bin + 1]);
                                    let row = (2 * n / L) * ots + og;
                                    let a = dza
                                        .0
                                        .add(self.at(row, bin, self.image_tiles() * ots) + (2 * n % L) * TK);
                                    stream_pairs(a, re, neg(im));
                                    stream_pairs(a.add(TK), im, re);
                                }
                            }
                        }
                        let Some(dzw) = dzw else { continue };
                        for bin in 0..self.bins {
                            let part = |p: usize| -> [__m512i; L] {
                                std::array::from_fn(|i| {
                                    let v = if nt * L + i < b {
                                        specs[(i * self.bins + bin) * 2 + p]
                                    } else {
                                        zero()
                                    };
                                    _mm512_castps_si512(v)
                                })
                            };
                            // lane i of row o: image nt·16 + i's value at output channel og·16 + o
                            let (re, im) = (bf16::transpose16(part(0)), bf16::transpose16(part(1)));
                            for o in 0..L {
                                let (r, i) = (_mm512_castsi512_ps(re[o]), _mm512_castsi512_ps(im[o]));
                                let row = 2 * (og * L + o);
                                let tile = dzw
                                    .0
                                    .add(self.at((row / L) * bkts + nt, bin, 2 * ots * bkts) + (row % L) * TK);
                                stream_pairs(tile, r, i);
                                stream_pairs(tile.add(TK), neg(i), r);
                            }
                        }
                    }
                }
                // the streamed rows ordered before the threads' join publishes them
                _mm_sfence();
            })
        });
    }

    /// y = act(conv(x, w) + b), from the images' spectra (`xa`) and the kernels' (`wb`).
    pub(crate) fn forward(&self, xa: &[u16], wb: &[u16], bias: &[f32], y: &mut [f32], act: Act, c: &mut [f32]) {
        // SAFETY: a plan is made only where the CPU runs AVX512_BF16 (`Plan::new`)
        unsafe { self.forward_avx512(xa, wb, bias, y, act, c) }
    }

    /// [`Plan::forward`], compiled for AVX-512F.
    #[target_feature(enable = "avx512f")]
    fn forward_avx512(&self, xa: &[u16], wb: &[u16], bias: &[f32], y: &mut [f32], act: Act, c: &mut [f32]) {
        let s = &self.s;
        assert!(xa.len() == self.xa_len() && wb.len() == self.wb_len() && bias.len() == s.out_c);
        assert!(y.len() == s.y_len() && c.len() == self.image_product_len(s.out_c));
        let (ci, co, mts) = (s.in_c, s.out_c, self.image_tiles());
        // SAFETY: the operands' lengths are asserted above
        unsafe { self.products((xa.as_ptr(), mts), (wb.as_ptr(), co / L), (ci / L, ci), false, c, co) };
        let (oh, ow) = (s.out_h(), s.out_w());
        let relu = act == Act::Relu;
        let (c, y, bias) = (
            Shared(c.as_mut_ptr()),
            Shared(y.as_mut_ptr()),
            Shared(bias.as_ptr() as *mut f32),
        );
        par_tasks(s.batch * (co / L), |tasks| {
            let (c, y, bias) = (c, y, bias);
            with_scratch(self, 0, |scratch, _| {
                for t in tasks {
                    let (n, og) = (t / (co / L), t % (co / L));
                    // SAFETY: reads image n's rows of C (written above), writes image n's outputs of
                    // channel group og, no other task's
                    unsafe {
                        let (re, im) = self.product_row(c.0, 2 * n, og, co);
                        let out = y.0.add(n * oh * ow * co + og * L);
                        let put = Put::Bias(bias.0.add(og * L), relu);
                        scratch.inverse(self, (re, im, L), (oh, ow), s.stride, out, (ow * co, co), put);
                    }
                }
            })
        });
    }

    /// dx += conv_transpose(dz, w), from the kernels' spectra (`wb`).
    pub(crate) fn input_grad(&self, dz: &[f32], wb: &[u16], dx: &mut [f32], bufs: (&mut [u16], &mut [f32])) {
        // SAFETY: a plan is made only where the CPU runs AVX512_BF16 (`Plan::new`)
        unsafe { self.input_grad_avx512(dz, wb, dx, bufs) }
    }

    /// [`Plan::input_grad`], compiled for AVX-512F.
    #[target_feature(enable = "avx512f")]
    fn input_grad_avx512(&self, dz: &[f32], wb: &[u16], dx: &mut [f32], bufs: (&mut [u16], &mut [f32])) {
        let s = &self.s;
        let (dza, c) = bufs;
        assert!(wb.len() == self.wb_len() && dx.len() == s.x_len());
        assert!(dza.len() == self.dza_len() && c.len() == self.image_product_len(s.in_c));
        self.transform_grads_avx512(dz, Some(&mut *dza), None);
        let (ci, co) = (s.in_c, s.out_c);
        let (cts, ots) = (ci / L, co / L);
        // W(f) as a B over Cout (K) and Cin (N): the forward's tiles, each transposed
        // SAFETY: the operands' lengths are asserted above
        unsafe {
            self.products(
                (dza.as_ptr(), self.image_tiles()),
                (wb.as_ptr(), cts),
                (ots, co),
                true,
                c,
                ci,
            )
        };
        let (h, w) = (s.in_h, s.in_w);
        let (c, dx) = (Shared(c.as_mut_ptr()), Shared(dx.as_mut_ptr()));
        par_tasks(s.batch * cts, |tasks| {
            let (c, dx) = (c, dx);
            with_scratch(self, 0, |scratch, _| {
                for t in tasks {
                    let (n, cg) = (t / cts, t % cts);
                    // SAFETY: reads image n's rows of C, adds to image n's pixels of channel group cg,
                    // no other task's
                    unsafe {
                        let (re, im) = self.product_row(c.0, 2 * n, cg, ci);
                        let out = dx.0.add(n * h * w * ci + cg * L);
                        scratch.inverse(self, (re, im, L), (h, w), 1, out, (w * ci, ci), Put::Add);
                    }
                }
            })
        });
    }

    /// dw += (= where `overwrite`) the weight gradient, from the images' spectra (`xb`).
    pub(crate) fn weight_grad(
        &self,
        dz: &[f32],
        xb: &[u16],
        dw: &mut [f32],
        overwrite: bool,
        bufs: (&mut [u16], &mut [f32]),
    ) {
        // SAFETY: a plan is made only where the CPU runs AVX512_BF16 (`Plan::new`)
        unsafe { self.weight_grad_avx512(dz, xb, dw, overwrite, bufs) }
    }

    /// [`Plan::weight_grad`], compiled for AVX-512F.
    #[target_feature(enable = "avx512f")]
    fn weight_grad_avx512(
        &self,
        dz: &[f32],
        xb: &[u16],
        dw: &mut [f32],
        overwrite: bool,
        bufs: (&mut [u16], &mut [f32]),
    ) {
        let s = &self.s;
        let (dzw, c) = bufs;
        assert!(xb.len() == self.xb_len() && dw.len() == s.w_len());
        assert!(dzw.len() == self.dzw_len() && c.len() == self.bins * 2 * s.out_c * s.in_c);
        self.transform_grads_avx512(dz, None, Some(&mut *dzw));
        let (ci, co, k) = (s.in_c, s.out_c, s.k);
        let (cts, ots, bkts) = (ci / L, co / L, self.batch_kts());
        // SAFETY: the operands' lengths are asserted above
        unsafe {
            self.products(
                (dzw.as_ptr(), 2 * ots),
                (xb.as_ptr(), cts),
                (bkts, s.batch),
                false,
                c,
                ci,
            )
        };
        let (c, dw) = (Shared(c.as_mut_ptr()), Shared(dw.as_mut_ptr()));
        // a task: the kernels of 16 output by 16 input channels, each output channel's taps over the
        // inputs, transposed to dw's rows of outputs
        par_tasks(ots * cts, |tasks| {
            let (c, dw) = (c, dw);
            with_scratch(self, L * k * k, |scratch, taps| {
                for t in tasks {
                    let (og, cg) = (t / cts, t % cts);
                    // SAFETY: reads rows of C, writes the taps of output group og and input group cg, no
                    // other task's; AVX-512F is there
                    unsafe {
                        for o in 0..L {
                            let (re, im) = self.product_row(c.0, 2 * (og * L + o), cg, ci);
                            let out = taps.as_mut_ptr().add(o * k * k) as *mut f32;
                            scratch.inverse(self, (re, im, L), (k, k), 1, out, (k * L, L), Put::Store);
                        }
                        for tap in 0..k * k {
                            let rows: [__m512i; L] =
                                std::array::from_fn(|o| _mm512_castps_si512(taps[o * k * k + tap]));
                            // row i: input channel cg·16 + i's tap over the 16 output channels
                            for (i, r) in bf16::transpose16(rows).iter().enumerate() {
                                let at = dw.0.add((tap * ci + cg * L + i) * co + og * L);
                                let v = _mm512_castsi512_ps(*r);
                                let v = if overwrite {
                                    v
                                } else {
                                    _mm512_add_ps(v, _mm512_loadu_ps(at))
                                };
                                _mm512_storeu_ps(at, v);
                            }
                        }
                    }
                }
            })
        });
    }

    /// The u16 of the input gradient's and the weight gradient's packed A, and the f32 of the three
    /// products' C: the working buffers the passes above are handed.
    pub(crate) fn buffer_lens(&self) -> Lens {
        let s = &self.s;
        Lens {
            xa: self.xa_len(),
            xb: self.xb_len(),
            wb: self.wb_len(),
            dza: self.dza_len(),
            dzw: self.dzw_len(),
            y_c: self.image_product_len(s.out_c),
            dx_c: self.image_product_len(s.in_c),
            dw_c: self.bins * 2 * s.out_c * s.in_c,
        }
    }
}

/// Lengths of [`Plan`]'s buffers: packed operands in u16, products in f32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lens {
    pub(crate) xa: usize,
    pub(crate) xb: usize,
    pub(crate) wb: usize,
    pub(crate) dza: usize,
    pub(crate) dzw: usize,
    pub(crate) y_c: usize,
    pub(crate) dx_c: usize,
    pub(crate) dw_c: usize,
}

#[inline(always)]
fn zero() -> __m512 {
    // SAFETY: AVX-512F is there wherever a vector is made (the Fourier path's precondition)
    unsafe { _mm512_setzero_ps() }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn neg(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN)))
}

/// One row of a packed tile, the pairs (lo[j], hi[j]) rounded to bf16, stored past the caches (a
/// non-temporal store: the line is not read first): rows written far apart into operands larger
/// than the caches. The writing thread ends with [`_mm_sfence`] before others read them.
///
/// # Safety
/// AVX-512F; 32 writable u16 at `dst`, on a cache line.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn stream_pairs(dst: *mut u16, lo: __m512, hi: __m512) {
    // SAFETY: the caller's contract
    unsafe { _mm512_stream_si512(dst as *mut __m512i, bf16::bf16_pairs(lo, hi)) }
}

/// A thread's room for transforms: the half-transformed rows and one spectrum.
#[derive(Default)]
struct Scratch {
    rows: Vec<__m512>,
    spec: Vec<__m512>,
    /// A column's two halves: even and odd rows' sums, or the sums and differences of its
    /// frequencies k1 and k1 + H/2.
    halves: Vec<__m512>,
}

thread_local! {
    /// Each thread's [`Scratch`] and more room, kept (allocated afresh at each call, they cost page
    /// faults of their own).
    static ROOM: std::cell::RefCell<(Scratch, Vec<__m512>)> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's scratch for `p`'s transforms and `more` more vectors.
fn with_scratch<R>(p: &Plan, more: usize, f: impl FnOnce(&mut Scratch, &mut [__m512]) -> R) -> R {
    ROOM.with_borrow_mut(|(scratch, extra)| {
        let grow = |v: &mut Vec<__m512>, n: usize| {
            if v.len() < n {
                v.resize(n, zero());
            }
        };
        grow(&mut scratch.rows, p.s.in_h.max(p.s.k) * p.w2 * 2);
        grow(&mut scratch.spec, 2 * p.bins);
        grow(&mut scratch.halves, 4 * (p.s.in_h / 2));
        grow(extra, more);
        f(scratch, &mut extra[..more])
    })
}

impl Scratch {
    /// The half spectrum (column by column, [`Plan::cols`]: re, im) of 16 real H×W images, one per lane, zero
    /// but for the `nh`×`nw` vectors at pixels (i·st, j·st), read at `src + i·ri + j·rj`: along the
    /// rows, then down the columns, each a matrix product ([`Plan::new`] says which).
    ///
    /// # Safety
    /// AVX-512F; 16 readable f32 at each of those addresses; the plan has matrices for (nh, nw, st).
    #[target_feature(enable = "avx512f")]
    unsafe fn forward(
        &mut self,
        p: &Plan,
        src: *const f32,
        (ri, rj): (usize, usize),
        (nh, nw): (usize, usize),
        st: usize,
    ) -> &[__m512] {
        let w2 = p.w2 as isize;
        let (along, down) = (p.mat(Stage::FwdRows, nw, st), p.mat(Stage::FwdCols, nh, st));
        let mirror = p.mat(Stage::FwdMirror, nh, st);
        let (rows, spec) = (self.rows.as_mut_ptr() as *mut f32, self.spec.as_mut_ptr() as *mut f32);
        let (ri, rj) = (ri as isize, rj as isize);
        // SAFETY: the caller's contract; the scratch holds nh rows of w2 pairs and every frequency
        unsafe {
            for i in 0..nh as isize {
                matvec(
                    along,
                    (src.offset(i * ri), rj, 2 * rj),
                    (rows.offset(i * 2 * w2 * V), V, 2 * V),
                    Put::Store,
                );
            }
            let (even, odd) = (p.mat_if(Stage::FwdEven, nh, st), p.mat_if(Stage::FwdOdd, nh, st));
            // the rows at even pixels: every other one where the stride is odd, else all
            let row_step = if st % 2 == 1 { 2 } else { 1 };
            let half = p.s.in_h / 2;
            let (e, o) = (
                self.halves.as_mut_ptr() as *mut f32,
                (self.halves.as_mut_ptr() as *mut f32).offset(2 * half as isize * V),
            );
            for (k2, &(start, len)) in p.cols.iter().enumerate() {
                let (from, to) = (rows.offset(2 * k2 as isize * V), spec.offset(2 * start as isize * V));
                let Some(even) = even else {
                    let down = if len == p.s.in_h { down } else { mirror };
                    matvec(down, (from, V, 2 * w2 * V), (to, V, 2 * V), Put::Store);
                    continue;
                };
                matvec(even, (from, V, row_step * 2 * w2 * V), (e, V, 2 * V), Put::Store);
                if let Some(odd) = odd {
                    matvec(odd, (from.offset(2 * w2 * V), V, 4 * w2 * V), (o, V, 2 * V), Put::Store);
                }
                // F[k1] = E + O, F[k1 + H/2] = E - O (k1 ≤ H/2 only, in a column its own mirror)
                let e = std::slice::from_raw_parts(e as *const __m512, 2 * half);
                let o = std::slice::from_raw_parts(o as *const __m512, 2 * half);
                let spec = std::slice::from_raw_parts_mut(to as *mut __m512, 2 * len);
                for q in 0..2 * half {
                    let (ev, ov) = (e[q], if odd.is_some() { o[q] } else { zero() });
                    spec[q] = _mm512_add_ps(ev, ov);
                    if q + 2 * half < 2 * len {
                        spec[q + 2 * half] = _mm512_sub_ps(ev, ov);
                    }
                }
            }
        }
        &self.spec[..2 * p.bins]
    }

    /// The inverse of a half spectrum (frequency f's 16 real parts at `re + f·fs`, imaginary at
    /// `im + f·fs`) at the `onh`×`onw` pixels (i·st, j·st), each put to `dst + i·ri + j·rj` as `put`
    /// says: up the columns, then along the rows.
    ///
    /// # Safety
    /// AVX-512F; 16 readable f32 at each spectrum address, 16 writable (and readable) at each output;
    /// the plan has matrices for (onh, onw, st).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn inverse(
        &mut self,
        p: &Plan,
        (re, im, fs): (*const f32, *const f32, usize),
        (onh, onw): (usize, usize),
        st: usize,
        dst: *mut f32,
        (ri, rj): (usize, usize),
        put: Put,
    ) {
        let (w2, fs) = (p.w2 as isize, fs as isize);
        let (up, along) = (p.mat(Stage::InvCols, onh, st), p.mat(Stage::InvRows, onw, st));
        let mirror = p.mat(Stage::InvMirror, onh, st);
        let rows = self.rows.as_mut_ptr() as *mut f32;
        let (ri, rj) = (ri as isize, rj as isize);
        // SAFETY: the caller's contract; the scratch holds onh rows of w2 pairs
        unsafe {
            let parts = im.offset_from(re);
            let (even, odd) = (p.mat_if(Stage::InvEven, onh, st), p.mat_if(Stage::InvOdd, onh, st));
            let row_step = if st % 2 == 1 { 2 } else { 1 };
            let half = p.s.in_h / 2;
            let halves = std::slice::from_raw_parts_mut(self.halves.as_mut_ptr(), 4 * half);
            for (k2, &(start, len)) in p.cols.iter().enumerate() {
                let to = rows.offset(2 * k2 as isize * V);
                let from = re.offset(start as isize * fs);
                let (Some(even), true) = (even, len == p.s.in_h) else {
                    let up = if len == p.s.in_h { up } else { mirror };
                    matvec(up, (from, parts, fs), (to, V, 2 * w2 * V), Put::Store);
                    continue;
                };
                // S = F[k1] + F[k1 + H/2], D = F[k1] - F[k1 + H/2], as (re, im) pairs
                for k1 in 0..half as isize {
                    for (c, part) in [(0, 0), (1, parts)] {
                        let (f, g) = (
                            from.offset(k1 * fs + part),
                            from.offset((k1 + half as isize) * fs + part),
                        );
                        let (f, g) = (_mm512_loadu_ps(f), _mm512_loadu_ps(g));
                        halves[2 * k1 as usize + c] = _mm512_add_ps(f, g);
                        halves[2 * (half + k1 as usize) + c] = _mm512_sub_ps(f, g);
                    }
                }
                let (s_, d_) = (
                    halves.as_ptr() as *const f32,
                    halves.as_ptr().add(2 * half) as *const f32,
                );
                matvec(even, (s_, V, 2 * V), (to, V, row_step * 2 * w2 * V), Put::Store);
                if let Some(odd) = odd {
                    matvec(odd, (d_, V, 2 * V), (to.offset(2 * w2 * V), V, 4 * w2 * V), Put::Store);
                }
            }
            for i in 0..onh as isize {
                matvec(
                    along,
                    (rows.offset(i * 2 * w2 * V), V, 2 * V),
                    (dst.offset(i * ri), rj, 2 * rj),
                    put,
                );
            }
        }
    }
}

/// f32 in a vector.
const V: isize = L as isize;

/// The four matrices of a 2-D transform: forward along rows (real pixels to half-spectrum pairs)
/// and down columns (pairs to pairs), inverse up columns and along rows (pairs to real pixels).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Stage {
    FwdRows,
    FwdCols,
    /// [`Stage::FwdCols`] split by radix 2: from the rows at even pixels, to k1 < H/2.
    FwdEven,
    /// From the rows at odd pixels.
    FwdOdd,
    /// [`Stage::InvCols`] split by radix 2: to the rows at even pixels, from k1 < H/2.
    InvEven,
    /// To the rows at odd pixels.
    InvOdd,
    /// [`Stage::FwdCols`] to k1 ≤ H/2 only.
    FwdMirror,
    InvCols,
    /// [`Stage::InvCols`] from k1 ≤ H/2 of a column that is its own mirror.
    InvMirror,
    InvRows,
}

/// A small real matrix the transforms apply to vectors of 16 lanes, column-major (a column's rows
/// side by side: the eight factors of one input vector in one line).
struct Mat {
    m: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Mat {
    fn new(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64) -> Mat {
        let m = (0..rows * cols).map(|i| f(i % rows, i / rows) as f32).collect();
        Mat { m, rows, cols }
    }
}

/// out[r] = Σ_t m[r][t] · in[t] over vectors, put as `put` says; vector t of `inp` (and r of `out`)
/// at `base + (t/2)·s2 + (t%2)·s1` f32: pairs of a spectrum or plain strided vectors (s2 = 2·s1).
/// Up to 16 rows at a time, so that many sums are in flight at once and each input is loaded once
/// for them all.
///
/// # Safety
/// AVX-512F; 16 f32 readable at every input address, writable (readable for [`Put::Add`]) at every
/// output address.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn matvec(m: &Mat, inp: (*const f32, isize, isize), out: (*mut f32, isize, isize), put: Put) {
    let mut r0 = 0;
    // SAFETY (each block): the caller's contract
    while r0 < m.rows {
        // blocks of up to 16 rows, as even as they come (22 rows: 11 and 11)
        let left = m.rows - r0;
        let n = left.div_ceil(left.div_ceil(16));
        unsafe {
            match n {
                16 => block::<16>(m, r0, inp, out, put),
                15 => block::<15>(m, r0, inp, out, put),
                14 => block::<14>(m, r0, inp, out, put),
                13 => block::<13>(m, r0, inp, out, put),
                12 => block::<12>(m, r0, inp, out, put),
                11 => block::<11>(m, r0, inp, out, put),
                10 => block::<10>(m, r0, inp, out, put),
                9 => block::<9>(m, r0, inp, out, put),
                8 => block::<8>(m, r0, inp, out, put),
                7 => block::<7>(m, r0, inp, out, put),
                6 => block::<6>(m, r0, inp, out, put),
                5 => block::<5>(m, r0, inp, out, put),
                4 => block::<4>(m, r0, inp, out, put),
                3 => block::<3>(m, r0, inp, out, put),
                2 => block::<2>(m, r0, inp, out, put),
                _ => block::<1>(m, r0, inp, out, put),
            }
        }
        r0 += n;
    }
}

/// Rows r0..r0 + N of [`matvec`].
///
/// # Safety
/// As [`matvec`]'s; r0 + N ≤ m.rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const N: usize>(
    m: &Mat,
    r0: usize,
    inp: (*const f32, isize, isize),
    out: (*mut f32, isize, isize),
    put: Put,
) {
    let at = |(b, s1, s2): (*const f32, isize, isize), t: usize| {
        b.wrapping_offset((t / 2) as isize * s2 + (t % 2) as isize * s1)
    };
    assert!(r0 + N <= m.rows && m.m.len() == m.rows * m.cols);
    let mut acc = [zero(); N];
    let mut col = m.m.as_ptr().wrapping_add(r0);
    for t in 0..m.cols {
        // SAFETY: the caller's contract; rows r0..r0 + N of column t lie in the matrix (asserted)
        unsafe {
            let x = _mm512_loadu_ps(at(inp, t));
            for (q, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(x, _mm512_set1_ps(*col.add(q)), *a);
            }
        }
        col = col.wrapping_add(m.rows);
    }
    for (q, v) in acc.into_iter().enumerate() {
        let o = at((out.0, out.1, out.2), r0 + q) as *mut f32;
        // SAFETY: the caller's contract
        unsafe {
            match put {
                Put::Store => _mm512_storeu_ps(o, v),
                Put::Add => _mm512_storeu_ps(o, _mm512_add_ps(v, _mm512_loadu_ps(o))),
                Put::Bias(b, relu) => {
                    let v = _mm512_add_ps(v, _mm512_loadu_ps(b));
                    _mm512_storeu_ps(o, if relu { _mm512_max_ps(v, zero()) } else { v });
                }
            }
        }
    }
}
