//! What both CPU backends share: a strided GEMM over `matrixmultiply` (f64 for the reference, f32 for
//! the fast path; both pick their SIMD kernel at run time).

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
