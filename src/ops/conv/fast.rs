//! Convolutions on the fast CPU backend.

use crate::Result;
use crate::backend::bf16::{self, Out, PackedB, Strided};
use crate::backend::fast::{FastCpu, PoolBuf, images_per_chunk};
use crate::backend::linalg::{CpuGemm, cpu_gemm};
use crate::float::Precision;

use super::im2col::{col2im_add, im2col};
use super::{ConvOps, ConvSaved, ConvShape, check_conv2d_bwd_input, check_conv2d_bwd_weight, check_conv2d_fwd};
use crate::backend::check;
use crate::ops::dense::Act;
use crate::ops::dense::fast::{act_bias_bwd_tiles, affine, affine_bf16};

impl ConvOps for FastCpu {
    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<()> {
        check_conv2d_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        if self.takes_fourier(s, act) {
            return self.fourier_fwd(s, x, w, b, y, act, false).map(|_| ());
        }
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        if let Some((kernel, p)) = self.patches(s, x) {
            // bf16: the patches packed straight from x (its bf16 copy)
            return self.with_bf16(x, |xb| {
                let p = Patches { xb: Some(xb), ..p };
                let w = Strided::new(w, (kd, co), (co, 1));
                affine_bf16(kernel, s.rows(), kd, co, &p, &w, b, y, act)
            })?;
        }
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                let ys = &mut y[b0 * npix * co..(b0 + nb) * npix * co];
                affine(self, nb * npix, kd, co, col, w, b, ys, act)?;
            }
            Ok(())
        })?
    }

    /// In bf16 with whole runs of 32 input and output channels: x rounded to bf16 once and kept for
    /// the weight gradient, and W packed in one pass both as the forward's B and, transposed, as the
    /// input gradient's (kept): each read and rounded once a step, not once per GEMM.
    fn conv2d_fwd_saving(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<ConvSaved<PoolBuf>> {
        check_conv2d_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        if self.takes_fourier(s, act) {
            return self.fourier_fwd(s, x, w, b, y, act, true);
        }
        let (kd, co) = (s.patch_len(), s.out_c);
        let Some((kernel, p)) = self.patches(s, x).filter(|_| co.is_multiple_of(32) && co > 0 && kd > 0) else {
            self.conv2d_fwd(s, x, w, b, y, act)?;
            return Ok(ConvSaved::none());
        };
        let mut xb = self.take(x.len().div_ceil(2), |_| {})?;
        bf16::to_bf16(x, &mut as_bf16_mut(&mut xb)[..x.len()]);
        let mut wt = self.take(bf16::packed_b_len(co, kd) / 2, |_| {})?;
        let order = ClassOrder::new(s);
        self.with_scratch(bf16::packed_b_len(kd, co) / 2, |wf| {
            let wf = as_bf16_mut(wf);
            bf16::pack_b_both(w, kd, co, |t| order.placed_tile(t), wf, as_bf16_mut(&mut wt));
            let p = Patches {
                xb: Some(&as_bf16(&xb)[..x.len()]),
                ..p
            };
            affine_bf16(kernel, s.rows(), kd, co, &p, &PackedB::new(wf, kd, co), b, y, act)
        })??;
        Ok(ConvSaved {
            x_bf16: Some(xb),
            wt_tiles: Some(wt),
            ..ConvSaved::none()
        })
    }

    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &PoolBuf, w: &PoolBuf, dx: &mut PoolBuf) -> Result<()> {
        self.conv2d_bwd_input_saved(s, dz, w, &ConvSaved::none(), dx)
    }

    /// In bf16, with Wᵀ's tiles from the forward where it kept them.
    fn conv2d_bwd_input_saved(
        &self,
        s: &ConvShape,
        dz: &PoolBuf,
        w: &PoolBuf,
        saved: &ConvSaved<PoolBuf>,
        dx: &mut PoolBuf,
    ) -> Result<()> {
        check_conv2d_bwd_input(s, dz.len(), w.len(), dx.len())?;
        if self.takes_fourier(s, Act::None) {
            return self.fourier_bwd_input(s, dz, w, saved, dx);
        }
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        if let Some(kernel) = self.bf16_gemm()
            && s.in_c.is_multiple_of(32)
        {
            // bf16: dx += dz · Wᵀ, each block of the patch gradient added onto dx as it is done (no
            // patch gradient in memory); Wᵀ's columns in class order, so the threads split by class
            let order = ClassOrder::new(s);
            let dz = Strided::new(dz, (s.rows(), co), (co, 1));
            let sink = Col2im {
                dx: dx.as_mut_ptr(),
                dx_len: dx.len(),
                at: PatchTable::new(s),
                order,
                npix,
            };
            let packed = saved
                .wt_tiles
                .as_ref()
                .filter(|t| t.len() * 2 == bf16::packed_b_len(co, kd));
            /// dx += dz · Wᵀ through the sink, Wᵀ read from `wt`.
            fn gemm(
                kernel: bf16::Bf16Gemm,
                (m, k, n): (usize, usize, usize),
                dz: &Strided,
                wt: &impl bf16::Source,
                sink: &Col2im,
            ) -> Result<()> {
                // SAFETY: the kernel is supported (bf16 mode); the sink's writes stay in dx, which
                // nothing else touches during the call
                unsafe { bf16::gemm_from(kernel, m, k, n, dz, wt, Out::Sink(sink), std::ptr::null_mut(), 0) }
            }
            let mkn = (s.rows(), co, kd);
            return match packed {
                Some(t) => gemm(kernel, mkn, &dz, &PackedB::new(as_bf16(t), co, kd), &sink),
                None => gemm(kernel, mkn, &dz, &WeightsByClass { w, co, order }, &sink),
            };
        }
        let img = s.in_h * s.in_w * s.in_c;
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |dcol| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                let dcol = &mut dcol[..nb * npix * kd];
                // dcol = dz · Wᵀ, with W [kd, co] read transposed through its strides
                let dzc = &dz[b0 * npix * co..(b0 + nb) * npix * co];
                self.gemm(nb * npix, co, kd, dzc, (co, 1), w, (1, co), dcol, 0.0)?;
                col2im_add(s, dcol, &mut dx[b0 * img..(b0 + nb) * img]);
            }
            Ok(())
        })?
    }

    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &PoolBuf, dz: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        self.conv2d_bwd_weight_saved(s, x, &ConvSaved::none(), dz, dw, false)
    }

    /// In bf16, the patches from x's bf16 copy the forward kept where it did, and dW written without
    /// being read where it is to be overwritten.
    fn conv2d_bwd_weight_saved(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        saved: &ConvSaved<PoolBuf>,
        dz: &PoolBuf,
        dw: &mut PoolBuf,
        overwrite: bool,
    ) -> Result<()> {
        check_conv2d_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        if self.takes_fourier(s, Act::None) {
            return self.fourier_bwd_weight(s, x, saved, dz, dw, overwrite);
        }
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        if let Some((kernel, p)) = self.patches(s, x) {
            // bf16: dW += (dzᵀ · patches)ᵀ (= where overwritten), the patches packed straight from x,
            // each block of the product added to dW as it is done
            let dzt = Strided::new(dz, (co, s.rows()), (1, co));
            let gemm = |xb: &[u16]| {
                let p = Patches { xb: Some(xb), ..p };
                // SAFETY: the kernel is supported (bf16 mode); dw holds kd×co values and aliases
                // neither operand
                unsafe {
                    bf16::gemm_from(
                        kernel,
                        co,
                        s.rows(),
                        kd,
                        &dzt,
                        &p,
                        Out::Transposed { add: !overwrite },
                        dw.as_mut_ptr(),
                        co as isize,
                    )
                }
            };
            return match saved.x_bf16.as_ref().filter(|xb| xb.len() == x.len().div_ceil(2)) {
                Some(xb) => gemm(&as_bf16(xb)[..x.len()]),
                None => self.with_bf16(x, gemm)?,
            };
        }
        if overwrite {
            crate::backend::Core::fill(self, dw, 0.0)?;
        }
        let chunk = images_per_chunk(s.batch, npix * kd);
        // gemm's AVX-512 kernels write a row-major [co, kd] result at 1.6x the rate they write dW's
        // [kd, co] (docs/BENCHMARKS.md): on them, dWᵀ = dzᵀ · col into a pooled buffer, added to dW
        // transposed once at the end; matrixmultiply and the bf16 GEMMs write dW directly (in bf16,
        // dz packs as B from its rows, faster than transposed as A: conv1's weight gradient at
        // batch 50, 3.9 -> 3.4 ms)
        let mut dwt = match (self.precision(), cpu_gemm()) {
            (Precision::Fp32, CpuGemm::Avx512) => Some(self.take(co * kd, |_| {})?),
            _ => None,
        };
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                let (col, dzc) = (&col[..nb * npix * kd], &dz[b0 * npix * co..(b0 + nb) * npix * co]);
                match dwt.as_mut() {
                    // dWᵀ (=, then +=) dzᵀ · col, with dz [rows, co] read transposed through its strides
                    Some(dwt) => {
                        let beta = if b0 == 0 { 0.0 } else { 1.0 };
                        self.gemm(co, nb * npix, kd, dzc, (1, co), col, (kd, 1), dwt, beta)?;
                    }
                    // dW += colᵀ · dz, with col [rows, kd] read transposed through its strides
                    None => self.gemm(kd, nb * npix, co, col, (1, kd), dzc, (co, 1), dw, 1.0)?,
                }
            }
            Ok(())
        })??;
        if let Some(dwt) = dwt {
            add_transposed(&dwt, co, kd, dw);
        }
        Ok(())
    }

    /// For one input channel (conv1): in bf16 on AMX, dz made and packed as the B of a GEMM over
    /// the rows 64 rows at a time (never stored) and the transposed patches (taps × rows) as its A;
    /// else on AVX-512, dz made 64 rows at a time and never stored, the patches read from the image
    /// ([`super::avx512`]); else the default's two steps.
    fn conv2d_bwd_params(
        &self,
        s: &ConvShape,
        act: Act,
        x: &PoolBuf,
        y: &PoolBuf,
        dy: &PoolBuf,
        dw: &mut PoolBuf,
        db: Option<&mut PoolBuf>,
    ) -> Result<()> {
        if let Some(kernel @ bf16::Bf16Gemm::Amx) = self.bf16_gemm()
            && s.in_c == 1
            && s.rows() > 0
            && s.out_c > 0
            && s.out_c.is_multiple_of(32)
            && matches!(act, Act::Relu | Act::None)
        {
            check_params_bwd(s, x, y, dy, dw, db.as_deref())?;
            let (rows, kd, co) = (s.rows(), s.patch_len(), s.out_c);
            let mut dz = self.take(bf16::packed_b_len(rows, co) / 2, |_| {})?;
            act_bias_bwd_tiles(act, rows, co, y, dy, as_bf16_mut(&mut dz), db.map(|d| &mut d[..]));
            return self.with_scratch((kd * rows).div_ceil(2), |sc| {
                let pt = &mut as_bf16_mut(sc)[..kd * rows];
                patches_transposed(s, x, pt);
                let (pt, dz) = (bf16::Bf16Rows::new(pt, kd, rows), PackedB::new(as_bf16(&dz), rows, co));
                // SAFETY: the kernel is supported (bf16 mode); dw holds kd rows of co values (checked)
                // and aliases neither operand
                unsafe {
                    bf16::gemm_from(
                        kernel,
                        kd,
                        rows,
                        co,
                        &pt,
                        &dz,
                        Out::Rows { beta: 1.0 },
                        dw.as_mut_ptr(),
                        co as isize,
                    )
                }
            })?;
        }
        #[cfg(target_arch = "x86_64")]
        if super::avx512::usable(s, act) {
            check_params_bwd(s, x, y, dy, dw, db.as_deref())?;
            let db = db.map(|d| &mut d[..]);
            // SAFETY: `usable`; the lengths are checked above
            unsafe { super::avx512::params_bwd(s, act, self.precision(), x, y, dy, dw, db) };
            return Ok(());
        }
        super::conv2d_bwd_params_in_two_steps(self, s, act, x, y, dy, dw, db)
    }
}

/// The buffers of `conv2d_bwd_params`' own kernels against its shape, an error naming the op and the
/// buffer before any kernel runs.
fn check_params_bwd(s: &ConvShape, x: &[f32], y: &[f32], dy: &[f32], dw: &[f32], db: Option<&PoolBuf>) -> Result<()> {
    const OP: &str = "conv2d_bwd_params";
    check(OP, "x", x.len(), s.x_len())?;
    check(OP, "y", y.len(), s.y_len())?;
    check(OP, "dy", dy.len(), s.y_len())?;
    check(OP, "dw", dw.len(), s.w_len())?;
    db.map_or(Ok(()), |db| check(OP, "db", db.len(), s.out_c))
}

/// The patch matrix of one-channel images transposed and rounded to bf16: `out[t·rows + r]` = tap t
/// (ky, kx) of row r (image b, output pixel (oy, ox)), each image's taps copied from its bf16 copy a
/// row of output pixels at a time.
fn patches_transposed(s: &ConvShape, x: &[f32], out: &mut [u16]) {
    assert!(s.in_c == 1 && x.len() == s.x_len() && out.len() == s.patch_len() * s.rows());
    let (rows, k, st) = (s.rows(), s.k, s.stride);
    let (oh, ow, iw) = (s.out_h(), s.out_w(), s.in_w);
    let mut xb = vec![0u16; x.len()];
    bf16::round_bf16(x, &mut xb);
    crate::par::par_rows(out, rows, rows * 2, |t, row| {
        let (ky, kx) = (t / k, t % k);
        for b in 0..s.batch {
            for oy in 0..oh {
                let from = (b * s.in_h + oy * st + ky) * iw + kx;
                let dst = &mut row[(b * oh + oy) * ow..][..ow];
                if st == 1 {
                    dst.copy_from_slice(&xb[from..from + ow]);
                } else {
                    dst.iter_mut().enumerate().for_each(|(ox, d)| *d = xb[from + ox * st]);
                }
            }
        }
    });
}

/// The bits of bf16 values held two to an f32 (a buffer of the backend's as bf16 storage).
fn as_bf16(b: &[f32]) -> &[u16] {
    // SAFETY: u16's alignment divides f32's, and len f32 hold 2·len u16; every bit pattern is a u16
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u16, 2 * b.len()) }
}

/// [`as_bf16`], to write.
fn as_bf16_mut(b: &mut [f32]) -> &mut [u16] {
    // SAFETY: as in `as_bf16`; and every bit pattern written through it is an f32
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut u16, 2 * b.len()) }
}

impl FastCpu {
    /// Whether this convolution goes through the Fourier transform ([`super::fft`]): in bf16 with
    /// the Fourier path on, where it fits.
    fn takes_fourier(&self, s: &ConvShape, act: Act) -> bool {
        self.fourier() && super::fft::fits(s) && matches!(act, Act::None | Act::Relu)
    }

    /// The forward through the Fourier transform, keeping the kernels' and the images' spectra for
    /// the backward where `keep`.
    #[allow(clippy::too_many_arguments)]
    fn fourier_fwd(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
        keep: bool,
    ) -> Result<ConvSaved<PoolBuf>> {
        let plan = super::fft::plan(s);
        let n = plan.buffer_lens();
        let mut wb = self.take(n.wb.div_ceil(2), |_| {})?;
        let mut xa = self.take(n.xa.div_ceil(2), |_| {})?;
        let mut xb = if keep {
            Some(self.take(n.xb.div_ceil(2), |_| {})?)
        } else {
            None
        };
        let mut c = self.take(n.y_c, |_| {})?;
        plan.transform_weights(w, &mut as_bf16_mut(&mut wb)[..n.wb]);
        let xbs = xb.as_mut().map(|xb| &mut as_bf16_mut(xb)[..n.xb]);
        plan.transform_images(x, Some(&mut as_bf16_mut(&mut xa)[..n.xa]), xbs);
        plan.forward(&as_bf16(&xa)[..n.xa], &as_bf16(&wb)[..n.wb], b, y, act, &mut c);
        Ok(ConvSaved {
            w_spectra: keep.then_some(wb),
            x_spectra: xb,
            ..ConvSaved::none()
        })
    }

    /// The `len` bf16 values the forward kept (`kept`, where it holds that many), else a buffer
    /// `make` fills, held in `room`.
    fn kept_or_made<'a>(
        &self,
        kept: Option<&'a PoolBuf>,
        len: usize,
        room: &'a mut Option<PoolBuf>,
        make: impl FnOnce(&mut [u16]),
    ) -> Result<&'a [u16]> {
        let buf = match kept.filter(|t| t.len() == len.div_ceil(2)) {
            Some(t) => t,
            None => {
                let mut t = self.take(len.div_ceil(2), |_| {})?;
                make(&mut as_bf16_mut(&mut t)[..len]);
                &*room.insert(t)
            }
        };
        Ok(&as_bf16(buf)[..len])
    }

    /// dx += conv_transpose(dz, w) through the Fourier transform, with the kernels' spectra the
    /// forward kept where it did.
    fn fourier_bwd_input(
        &self,
        s: &ConvShape,
        dz: &PoolBuf,
        w: &PoolBuf,
        saved: &ConvSaved<PoolBuf>,
        dx: &mut PoolBuf,
    ) -> Result<()> {
        let plan = super::fft::plan(s);
        let n = plan.buffer_lens();
        let mut room = None;
        let wb = self.kept_or_made(saved.w_spectra.as_ref(), n.wb, &mut room, |t| {
            plan.transform_weights(w, t)
        })?;
        let mut dza = self.take(n.dza.div_ceil(2), |_| {})?;
        let mut c = self.take(n.dx_c, |_| {})?;
        let bufs = (&mut as_bf16_mut(&mut dza)[..n.dza], &mut c[..]);
        plan.input_grad(dz, wb, dx, bufs);
        Ok(())
    }

    /// dw += (= where `overwrite`) the weight gradient through the Fourier transform, with the
    /// images' spectra the forward kept where it did.
    fn fourier_bwd_weight(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        saved: &ConvSaved<PoolBuf>,
        dz: &PoolBuf,
        dw: &mut PoolBuf,
        overwrite: bool,
    ) -> Result<()> {
        let plan = super::fft::plan(s);
        let n = plan.buffer_lens();
        let mut room = None;
        let xb = self.kept_or_made(saved.x_spectra.as_ref(), n.xb, &mut room, |t| {
            plan.transform_images(x, None, Some(t))
        })?;
        let mut dzw = self.take(n.dzw.div_ceil(2), |_| {})?;
        let mut c = self.take(n.dw_c, |_| {})?;
        let bufs = (&mut as_bf16_mut(&mut dzw)[..n.dzw], &mut c[..]);
        plan.weight_grad(dz, xb, dw, overwrite, bufs);
        Ok(())
    }

    /// Runs `f` on `x` rounded to bf16 (in the scratch buffer): a conv's input, which the patches
    /// read about k²/stride² times, converted once.
    fn with_bf16<R>(&self, x: &[f32], f: impl FnOnce(&[u16]) -> R) -> Result<R> {
        self.with_scratch(x.len().div_ceil(2), |sc| {
            let xb = &mut as_bf16_mut(sc)[..x.len()];
            bf16::to_bf16(x, xb);
            f(xb)
        })
    }

    /// In bf16 mode, the bf16 kernel and the patch matrix of `x` as it reads it, where whole 32-value
    /// runs of it lie contiguous in x (Cin a multiple of 32: the primary capsules' conv, not conv1).
    fn patches<'a>(&self, s: &ConvShape, x: &'a [f32]) -> Option<(bf16::Bf16Gemm, Patches<'a>)> {
        let kernel = self.bf16_gemm()?;
        (s.in_c.is_multiple_of(32) && x.len() == s.x_len()).then(|| (kernel, Patches::new(s, x)))
    }
}

/// Where the patch matrix's elements lie in a batch of NHWC images whose channels come in whole runs
/// of 32: element (r, c), row (b, oy, ox) and column (ky, kx, ci), at `row[r] + col[c / 32] + c % 32`
/// (no division per element).
struct PatchTable {
    /// Where each row's patch starts: its image's and its top-left pixel's offset.
    row: Vec<usize>,
    /// Each run of 32 columns' offset from its row's start (one pixel's 32 channels).
    col: Vec<usize>,
}

impl PatchTable {
    fn new(s: &ConvShape) -> PatchTable {
        let (npix, ow) = (s.out_h() * s.out_w(), s.out_w());
        let row = (0..s.rows())
            .map(|r| {
                let (b, p) = (r / npix, r % npix);
                ((b * s.in_h + p / ow * s.stride) * s.in_w + p % ow * s.stride) * s.in_c
            })
            .collect();
        let col = (0..s.patch_len() / 32)
            .map(|q| {
                let (kyx, ci) = (q * 32 / s.in_c, q * 32 % s.in_c);
                (kyx / s.k * s.in_w + kyx % s.k) * s.in_c + ci
            })
            .collect();
        PatchTable { row, col }
    }

    #[inline(always)]
    fn offset(&self, r: usize, c: usize) -> usize {
        self.row[r] + self.col[c / 32] + c % 32
    }
}

/// The im2col matrix of a batch, read from the images (Cin a multiple of 32), and from their bf16
/// copy where there is one.
struct Patches<'a> {
    x: &'a [f32],
    at: PatchTable,
    xb: Option<&'a [u16]>,
}

impl<'a> Patches<'a> {
    fn new(s: &ConvShape, x: &'a [f32]) -> Patches<'a> {
        Patches {
            x,
            at: PatchTable::new(s),
            xb: None,
        }
    }
}

// SAFETY: x holds the whole batch (checked in `patches`), every (r, c) inside the patch matrix
// (r < rows, c < patch_len; the tables' lengths) lies in it, and a run stays inside one run of 32
// columns, which lie contiguous (one pixel's channels)
unsafe impl bf16::Source for Patches<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        self.x[self.at.offset(r, c)]
    }
    #[inline(always)]
    fn run(&self, r: usize, c0: usize, len: usize) -> Option<*const f32> {
        let at = self.at.offset(r, c0);
        (c0 % 32 + len <= 32).then(|| self.x[at..at + len].as_ptr())
    }
    #[inline(always)]
    fn run_bf16(&self, r: usize, c0: usize, len: usize) -> Option<*const u16> {
        let xb = self.xb?;
        let at = self.at.offset(r, c0);
        (c0 % 32 + len <= 32).then(|| xb[at..at + len].as_ptr())
    }
}

/// The patch matrix's columns in class order: column c' = 32·(class·k² + slot) + e is column
/// 32·(pixel·Cin/32 + class) + e of the natural order (kernel pixel (ky, kx), channel 32·class + e),
/// where slot is the kernel pixel's place in parity order: the pixels with ky and kx even first, then
/// ky even and kx odd, ky odd and kx even, both odd, each set row by row.
/// Columns of different classes reach different channels of an image, so a col2im split by class
/// needs no locks. The parity order narrows what a col2im's additions reach in turn: a block row's
/// blocks are added in column order, and a stride-2 conv's kernel pixels of one parity reach a
/// quarter of the image's pixels (12.8 KB of a class at the primary conv's shape, against 51 KB for
/// the whole image, more than a 32 KiB L1).
#[derive(Clone, Copy)]
struct ClassOrder {
    k: usize,
    classes: usize,
}

/// The four parities (ky mod 2, kx mod 2) in the order [`ClassOrder`] takes them.
const PARITIES: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

impl ClassOrder {
    fn new(s: &ConvShape) -> ClassOrder {
        ClassOrder {
            k: s.k,
            classes: s.in_c / 32,
        }
    }

    /// Kernel pixels, k².
    #[inline(always)]
    fn pixels(self) -> usize {
        self.k * self.k
    }

    /// How many of 0..k have parity `p`.
    #[inline(always)]
    fn half(self, p: usize) -> usize {
        (self.k + 1 - p) / 2
    }

    /// The kernel pixel (ky·k + kx) at `slot` of the parity order.
    #[inline(always)]
    fn pixel(self, slot: usize) -> usize {
        let mut i = slot;
        for (py, px) in PARITIES {
            let (ny, nx) = (self.half(py), self.half(px));
            if i < ny * nx {
                return (2 * (i / nx) + py) * self.k + 2 * (i % nx) + px;
            }
            i -= ny * nx;
        }
        unreachable!("slot {slot} of {} kernel pixels", self.pixels())
    }

    /// The place of kernel pixel `pixel` in the parity order ([`ClassOrder::pixel`]'s inverse).
    #[inline(always)]
    fn slot(self, pixel: usize) -> usize {
        let (ky, kx) = (pixel / self.k, pixel % self.k);
        let mut before = 0;
        for (py, px) in PARITIES {
            if (py, px) == (ky % 2, kx % 2) {
                return before + (ky / 2) * self.half(px) + kx / 2;
            }
            before += self.half(py) * self.half(px);
        }
        unreachable!("every pixel has a parity")
    }

    /// The natural column of column `c` in class order.
    #[inline(always)]
    fn natural(self, c: usize) -> usize {
        let (q, e) = (c / 32, c % 32);
        (self.pixel(q % self.pixels()) * self.classes + q / self.pixels()) * 32 + e
    }

    /// Where the natural columns 16t..16t+16 lie in class order, in tiles of 16 columns.
    fn placed_tile(self, t: usize) -> usize {
        let (q, h) = (t / 2, t % 2);
        2 * ((q % self.classes) * self.pixels() + self.slot(q / self.classes)) + h
    }
}

/// Wᵀ (Cout × patch length) of a conv's weights W [patch length, Cout], its columns in class order.
struct WeightsByClass<'a> {
    w: &'a [f32],
    co: usize,
    order: ClassOrder,
}

// SAFETY: w holds patch_len × co values (checked by `check_conv2d_bwd_input`); r < co and c <
// patch_len keep every read and run inside it (a column of Wᵀ is a row of W, contiguous)
unsafe impl bf16::Source for WeightsByClass<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        self.w[self.order.natural(c) * self.co + r]
    }
    fn run(&self, _r: usize, _c0: usize, _len: usize) -> Option<*const f32> {
        None
    }
    #[inline(always)]
    fn col_run(&self, r0: usize, c: usize, len: usize) -> Option<*const f32> {
        let at = self.order.natural(c) * self.co + r0;
        Some(self.w[at..at + len].as_ptr())
    }
}

/// col2im as a GEMM's sink: each block of the patch gradient (columns in class order) added onto the
/// image gradient's pixels it came from, as soon as it is done.
struct Col2im {
    dx: *mut f32,
    dx_len: usize,
    at: PatchTable,
    order: ClassOrder,
    npix: usize,
}

// SAFETY: the threads share `dx` only through `add`, whose writes the groups keep apart (below)
unsafe impl Sync for Col2im {}

// SAFETY: dx is borrowed mutably for the GEMM (`conv2d_bwd_input`) and written only here; a block's
// row lies in one image, and its 32 columns in one class: one row group is one image (npix rows), one
// column group one class (k² blocks), and two writes to one element of dx come from the same image
// and the same class
unsafe impl bf16::BlockSink for Col2im {
    fn m_group(&self) -> usize {
        self.npix
    }
    fn n_group(&self) -> usize {
        self.order.pixels()
    }
    fn add(&self, i0: usize, rows: std::ops::Range<usize>, j0: usize, nj: usize, blk: &[f32; 1024]) {
        let base = self.at.col[self.order.natural(j0) / 32];
        assert!(nj <= 32 && rows.start >= i0 && rows.end <= i0 + 32 && rows.end <= self.at.row.len());
        if nj == 32 {
            // SAFETY: AVX-512F is there (a bf16 GEMM runs); the rows' offsets are checked inside
            unsafe { self.add_rows32(i0, rows, base, blk) };
            return;
        }
        for r in rows {
            let at = self.at.row[r] + base;
            assert!(at + nj <= self.dx_len);
            let src = &blk[(r - i0) * 32..][..nj];
            // SAFETY: nj values inside dx (asserted) that no other thread writes (the groups)
            let dst = unsafe { std::slice::from_raw_parts_mut(self.dx.add(at), nj) };
            dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
        }
    }
}

impl Col2im {
    /// The whole-width rows of a block added onto dx, in one AVX-512 function (one call a block, not
    /// one a row: a row's call and its return to non-AVX-512 code cost as much as its adds).
    ///
    /// # Safety
    /// AVX-512F; rows within i0..i0 + 32 and the patch table; no other thread writes these values
    /// of dx (the sink's groups).
    #[target_feature(enable = "avx512f")]
    unsafe fn add_rows32(&self, i0: usize, rows: std::ops::Range<usize>, base: usize, blk: &[f32; 1024]) {
        for r in rows {
            let at = self.at.row[r] + base;
            assert!(at + 32 <= self.dx_len);
            // SAFETY: 32 values inside dx (asserted), and the block's row r - i0 < 32; AVX-512F
            unsafe { add32(self.dx.add(at), blk.as_ptr().add((r - i0) * 32)) };
        }
    }
}

/// dst[..32] += src[..32].
///
/// # Safety
/// AVX-512F; 32 readable f32 at `src` and 32 writable at `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn add32(dst: *mut f32, src: *const f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        for h in [0, 16] {
            let v = _mm512_add_ps(_mm512_loadu_ps(dst.add(h)), _mm512_loadu_ps(src.add(h)));
            _mm512_storeu_ps(dst.add(h), v);
        }
    }
}

/// `out` [cols, rows] += `a` [rows, cols]ᵀ, in square tiles so that both sides stay in cache, the
/// rows of `out` split over the threads.
fn add_transposed(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    debug_assert_eq!(a.len(), rows * cols);
    debug_assert_eq!(out.len(), rows * cols);
    crate::par::par_blocks(out, rows, rows, |first, block| {
        let n = block.len() / rows.max(1);
        for c0 in (0..n).step_by(TILE) {
            let c1 = (c0 + TILE).min(n);
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for c in c0..c1 {
                    let o = &mut block[c * rows..(c + 1) * rows];
                    for r in r0..r1 {
                        o[r] += a[r * cols + first + c];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parity order is a permutation of the kernel pixels, parity by parity, and the class
    /// order's two mappings undo each other.
    #[test]
    fn class_order_takes_each_kernel_pixel_once_by_parity() {
        for (k, in_c) in [(1, 32), (2, 64), (3, 32), (8, 96), (9, 256)] {
            let o = ClassOrder::new(&ConvShape {
                batch: 1,
                in_h: k,
                in_w: k,
                in_c,
                out_c: 32,
                k,
                stride: 2,
            });
            let order: Vec<usize> = (0..k * k).map(|i| o.pixel(i)).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..k * k).collect::<Vec<_>>(), "k = {k}: a permutation");
            // parities in PARITIES' order, rows in order within each
            let parities: Vec<(usize, usize)> = order.iter().map(|p| (p / k % 2, p % k % 2)).collect();
            let mut expect = vec![];
            for (py, px) in PARITIES {
                expect.extend(std::iter::repeat_n((py, px), o.half(py) * o.half(px)));
            }
            assert_eq!(parities, expect, "k = {k}");
            let parity = |p: usize| (p / k % 2, p % k % 2);
            assert!(
                order.windows(2).all(|w| parity(w[0]) != parity(w[1]) || w[0] < w[1]),
                "k = {k}: row by row within a parity"
            );
            for (i, &p) in order.iter().enumerate() {
                assert_eq!(o.slot(p), i, "k = {k}, pixel {p}");
            }
            for c in (0..k * k * in_c).step_by(16) {
                assert_eq!(o.placed_tile(o.natural(c) / 16), c / 16, "k = {k}, column {c}");
            }
        }
    }
}
