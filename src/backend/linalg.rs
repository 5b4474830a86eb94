//! What both CPU backends share: a strided GEMM. The f64 reference multiplies with `matrixmultiply`;
//! the fast path's f32 GEMMs run on the library [`CpuGemm`] chooses at run time by what the CPU has:
//! the `gemm` crate's AVX-512 kernels where the CPU has AVX-512F (measured at the model's own shapes:
//! 1.1 to 1.5 times matrixmultiply's on an AVX-512 Xeon, docs/BENCHMARKS.md), else `matrixmultiply`
//! (its AVX2+FMA kernel, or its SSE2 one on older CPUs).

use std::sync::OnceLock;

/// Whether the CPU has AVX2 and FMA.
pub fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The library and kernel the fast CPU backend's f32 GEMMs run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuGemm {
    /// The `gemm` crate's AVX-512F kernels (16 f32 lanes; CPUs with two 512-bit FMA units want them).
    Avx512,
    /// `matrixmultiply`'s sgemm: its AVX2+FMA kernel where the CPU has both, else its SSE2 one.
    Avx2,
}

impl CpuGemm {
    /// Every choice, best first.
    pub const ALL: [CpuGemm; 2] = [CpuGemm::Avx512, CpuGemm::Avx2];

    /// The name `--cpu-gemm` and `CAPSNET_CPU_GEMM` take.
    pub fn flag(self) -> &'static str {
        match self {
            CpuGemm::Avx512 => "avx512",
            CpuGemm::Avx2 => "avx2",
        }
    }

    /// Whether this CPU can run it (`avx2` always can: matrixmultiply falls back to SSE2).
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            CpuGemm::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            CpuGemm::Avx512 => false,
            CpuGemm::Avx2 => true,
        }
    }

    /// What multiplies, as the backend's name says it.
    pub fn describe(self) -> String {
        match self {
            CpuGemm::Avx512 => "gemm AVX-512 sgemm".into(),
            CpuGemm::Avx2 => format!("matrixmultiply {} sgemm", if wide_simd() { "AVX2+FMA" } else { "SSE2" }),
        }
    }

    /// `auto` (None: the best this CPU supports) or one of [`CpuGemm::ALL`] by its flag name; an
    /// error says what was given and what may be.
    pub fn parse(s: &str) -> std::result::Result<Option<CpuGemm>, String> {
        let s = s.trim();
        if s == "auto" {
            return Ok(None);
        }
        let names: Vec<&str> = Self::ALL.iter().map(|g| g.flag()).collect();
        let g = Self::ALL
            .into_iter()
            .find(|g| g.flag() == s)
            .ok_or_else(|| format!("'{s}' is not a CPU GEMM: give auto, {}", names.join(" or ")))?;
        if !g.supported() {
            return Err(format!(
                "this CPU cannot run the {s} GEMM (it lacks AVX-512F): give auto or avx2"
            ));
        }
        Ok(Some(g))
    }

    /// The best this CPU supports.
    pub fn best() -> CpuGemm {
        Self::ALL.into_iter().find(|g| g.supported()).unwrap_or(CpuGemm::Avx2)
    }
}

static CHOSEN: OnceLock<CpuGemm> = OnceLock::new();

/// Whether an f32 GEMM was named ([`set_cpu_gemm`]).
static NAMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Fixes the f32 GEMM before the first one runs (`--cpu-gemm`); false if it was fixed already to
/// another. Refuses (false) a GEMM this CPU cannot run.
pub fn set_cpu_gemm(g: CpuGemm) -> bool {
    let ok = g.supported() && *CHOSEN.get_or_init(|| g) == g;
    if ok {
        NAMED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    ok
}

/// Whether [`set_cpu_gemm`] named the f32 GEMM (an f32 GEMM asked for: the CPU's default precision
/// is then fp32).
pub fn cpu_gemm_named() -> bool {
    NAMED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The f32 GEMM in use: [`set_cpu_gemm`]'s, else `CAPSNET_CPU_GEMM`'s where valid, else the best this
/// CPU supports.
pub fn cpu_gemm() -> CpuGemm {
    *CHOSEN.get_or_init(|| {
        std::env::var("CAPSNET_CPU_GEMM")
            .ok()
            .and_then(|v| CpuGemm::parse(&v).ok().flatten())
            .unwrap_or_else(CpuGemm::best)
    })
}

/// C (m×n, row-major) = A·B + beta·C on the given f32 GEMM, whatever [`cpu_gemm`] says: for tests
/// and benchmarks that compare the GEMMs in one process.
///
/// # Safety
/// As [`GemmScalar::raw`]; `g` is supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_on(
    g: CpuGemm,
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
    match g {
        // SAFETY: forwarded from the caller's contract
        CpuGemm::Avx2 => unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a, sa.0, sa.1, b, sb.0, sb.1, beta, c, rsc, 1) },
        CpuGemm::Avx512 => {
            let threads = crate::par::threads();
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // gemm's dst = alpha·dst + beta·lhs·rhs, dst read only when asked
            // SAFETY: forwarded from the caller's contract; `g` is supported, so its kernels run
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c,
                    1,
                    rsc,
                    beta != 0.0,
                    a,
                    sa.1,
                    sa.0,
                    b,
                    sb.1,
                    sb.0,
                    beta,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            }
        }
    }
}

/// An element type the CPU backends multiply: f64 with `matrixmultiply`, f32 on [`cpu_gemm`]'s GEMM.
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
        // SAFETY: forwarded from the caller's contract; cpu_gemm() is supported by this CPU
        unsafe { sgemm_on(cpu_gemm(), m, k, n, a, sa, b, sb, beta, c, rsc) }
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
    // the last element each operand reads, None where that overflows (then it is out of bounds)
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?)
    };
    let inside = |len: usize, last: Option<usize>| last.is_some_and(|l| l < len && l <= isize::MAX as usize);
    assert!(k == 0 || (inside(a.len(), last(m, k, rsa, csa)) && inside(b.len(), last(k, n, rsb, csb))));
    assert!(m.checked_mul(n).is_some_and(|mn| c.len() >= mn));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 GEMM this CPU runs, against f64 sums of the same f32 inputs, at shapes and strides
    /// the model uses (row-major, transposed A, transposed B; beta 0 and 1; sizes off the kernels'
    /// tiles): within the worst-case bound of f32 sums, k·u·Σ|a||b| (u = 2⁻²⁴), each element.
    /// A GEMM this CPU cannot run is refused by name instead.
    #[test]
    fn every_f32_gemm_this_cpu_runs_matches_f64_sums() {
        let mut seed = 12345u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // (m, k, n, A transposed, B transposed)
        let shapes = [
            (37, 300, 19, false, false),
            (200, 81, 256, false, false),
            (81, 500, 64, true, false),
            (72, 256, 333, false, true),
            (1, 1, 1, false, false),
            (17, 2048, 33, true, true),
        ];
        let mut ran = 0;
        for g in CpuGemm::ALL {
            if !g.supported() {
                let e = CpuGemm::parse(g.flag()).unwrap_err();
                assert!(e.contains(g.flag()) && e.contains("cannot run"), "{e}");
                continue;
            }
            assert_eq!(CpuGemm::parse(g.flag()), Ok(Some(g)));
            for &(m, k, n, ta, tb) in &shapes {
                for beta in [0.0f32, 1.0] {
                    let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
                    let c0: Vec<f32> = (0..m * n).map(|_| rand()).collect();
                    let sa = if ta { (1, m) } else { (k, 1) };
                    let sb = if tb { (1, k) } else { (n, 1) };
                    // beta 0 must not read C: NaNs there stay out of the result
                    let mut c: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
                    // SAFETY: the strides address m×k and k×n elements inside a and b; c is m×n
                    unsafe {
                        sgemm_on(
                            g,
                            m,
                            k,
                            n,
                            a.as_ptr(),
                            (sa.0 as isize, sa.1 as isize),
                            b.as_ptr(),
                            (sb.0 as isize, sb.1 as isize),
                            beta,
                            c.as_mut_ptr(),
                            n as isize,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut mag) = (beta as f64 * c0[i * n + j] as f64, 0.0f64);
                            for p in 0..k {
                                let x = a[i * sa.0 + p * sa.1] as f64 * b[p * sb.0 + j * sb.1] as f64;
                                exact += x;
                                mag += x.abs();
                            }
                            let bound = (k + 2) as f64 * 2f64.powi(-24) * (mag + (beta * c0[i * n + j]).abs() as f64);
                            let err = (c[i * n + j] as f64 - exact).abs();
                            assert!(
                                err <= bound,
                                "{} m{m} k{k} n{n} ta{ta} tb{tb} beta{beta} at ({i},{j}): {} vs {exact} (bound {bound:e})",
                                g.flag(),
                                c[i * n + j]
                            );
                        }
                    }
                }
            }
            ran += 1;
        }
        assert!(ran >= 1, "no f32 GEMM runs on this CPU");
        assert_eq!(CpuGemm::parse("auto"), Ok(None));
        assert!(CpuGemm::parse("avx1024").unwrap_err().contains("auto, avx512 or avx2"));
    }
}
