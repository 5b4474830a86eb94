//! What both CPU backends share: a strided GEMM over `matrixmultiply` (f64 for the reference, f32 for
//! the fast path; both pick their SIMD kernel at run time), and the im2col / col2im moves that turn a
//! convolution into GEMMs.

use super::ConvShape;
use crate::par::par_rows;

/// An element type `matrixmultiply` multiplies.
pub(crate) trait GemmScalar: Copy + Send + Sync {
    /// # Safety
    /// As `matrixmultiply::{s,d}gemm`: every element addressed by the sizes and strides is in bounds,
    /// and C aliases neither A nor B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        sa: (isize, isize),
        b: *const Self,
        sb: (isize, isize),
        beta: Self,
        c: *mut Self,
        rsc: isize,
    );
}

impl GemmScalar for f64 {
    unsafe fn raw(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        sa: (isize, isize),
        b: *const f64,
        sb: (isize, isize),
        beta: f64,
        c: *mut f64,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract
        unsafe { matrixmultiply::dgemm(m, k, n, 1.0, a, sa.0, sa.1, b, sb.0, sb.1, beta, c, rsc, 1) }
    }
}

impl GemmScalar for f32 {
    unsafe fn raw(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        sa: (isize, isize),
        b: *const f32,
        sb: (isize, isize),
        beta: f32,
        c: *mut f32,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract
        unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a, sa.0, sa.1, b, sb.0, sb.1, beta, c, rsc, 1) }
    }
}

/// C (m×n, row-major) = A (m×k) · B (k×n) + beta·C, A and B given by (row stride, column stride).
/// With beta = 0, C's old contents are not read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: GemmScalar>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    (rsa, csa): (usize, usize),
    b: &[T],
    (rsb, csb): (usize, usize),
    c: &mut [T],
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(k == 0 || (a.len() > last(m, k, rsa, csa) && b.len() > last(k, n, rsb, csb)));
    assert!(c.len() >= m * n);
    // SAFETY: the asserts above keep every element the GEMM reads (A: m×k, B: k×n with the given
    // strides) and writes (C: m×n, row-major) inside the slices; C is a &mut, so aliases neither.
    unsafe {
        T::raw(
            m,
            k,
            n,
            a.as_ptr(),
            (rsa as isize, csa as isize),
            b.as_ptr(),
            (rsb as isize, csb as isize),
            beta,
            c.as_mut_ptr(),
            n as isize,
        )
    }
}

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
