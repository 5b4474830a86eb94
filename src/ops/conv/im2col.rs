//! The im2col / col2im moves that turn a convolution into GEMMs, shared by both CPU backends.

use super::ConvShape;
use crate::par::par_rows;

/// Writes the patch matrix of images b0..b0+nb into `col`: row (b, oy, ox), column (ky, kx, c).
pub(crate) fn im2col<S: Copy + Sync, D: Copy + Send>(
    s: &ConvShape,
    x: &[S],
    b0: usize,
    nb: usize,
    col: &mut [D],
    convert: impl Fn(S) -> D + Sync,
) {
    let (ow, npix, kd, ci) = (s.out_w(), s.out_h() * s.out_w(), s.patch_len(), s.in_c);
    par_rows(&mut col[..nb * npix * kd], kd, kd, |r, row| {
        let (bi, p) = (b0 + r / npix, r % npix);
        let (oy, ox) = (p / ow, p % ow);
        for ky in 0..s.k {
            // for a fixed ky, the kx and c axes are one contiguous run of K·Cin values in x
            let src = ((bi * s.in_h + oy * s.stride + ky) * s.in_w + ox * s.stride) * ci;
            let dst = ky * s.k * ci;
            for (o, v) in row[dst..dst + s.k * ci].iter_mut().zip(&x[src..src + s.k * ci]) {
                *o = convert(*v);
            }
        }
    });
}

/// col2im: adds every patch row of `dcol` (nb images, as [`im2col`] lays them out) onto the pixels of
/// `dx` (the same nb images) it was read from. One image per task, so the sums are deterministic.
pub(crate) fn col2im_add<D: Copy + Send + Sync + std::ops::AddAssign>(s: &ConvShape, dcol: &[D], dx: &mut [D]) {
    let (ow, npix, kd, ci) = (s.out_w(), s.out_h() * s.out_w(), s.patch_len(), s.in_c);
    let img = s.in_h * s.in_w * ci;
    par_rows(dx, img, npix * kd, |bi, im| {
        for p in 0..npix {
            let (oy, ox) = (p / ow, p % ow);
            let row = &dcol[(bi * npix + p) * kd..(bi * npix + p + 1) * kd];
            for ky in 0..s.k {
                let dst = ((oy * s.stride + ky) * s.in_w + ox * s.stride) * ci;
                let src = ky * s.k * ci;
                for (o, v) in im[dst..dst + s.k * ci].iter_mut().zip(&row[src..src + s.k * ci]) {
                    *o += *v;
                }
            }
        }
    });
}
