//! The fast CPU backend: f32 storage and f32 arithmetic on every core, for training.
//!
//! - Convolutions and dense layers are GEMMs ([`super::linalg::CpuGemm`]: the `gemm` crate's AVX-512
//!   kernels or `matrixmultiply`'s, chosen at run time by what the CPU has, or by `--cpu-gemm`; in
//!   bf16, [`super::bf16`]'s on AMX tiles or AVX512_BF16, the primary conv's patches packed straight
//!   from its input). A
//!   convolution is im2col over chunks of images into one reused scratch buffer, with the bias
//!   loaded into the GEMM's output (beta = 1) and the activation applied while the chunk is hot. The
//!   input gradient is dz·Wᵀ followed by col2im, so the stride-2 conv never multiplies by the zeros a
//!   transposed convolution would stuff between its inputs. Weight gradients accumulate straight
//!   into dW (on the AVX-512 GEMM and in bf16, into dWᵀ, added to dW transposed: those GEMMs write
//!   or read it faster).
//! - Capsule ops (prediction vectors, routing, squash) and Adam are loops over 8-lane blocks, compiled
//!   twice: with AVX2+FMA, used when the CPU has them (checked at run time), and for the baseline.
//! - Work is split over threads by output rows ([`crate::par`]; the bf16 GEMMs by blocks of rows or
//!   of columns), each sum inside one thread, so results are bit-identical run to run on one machine.
//!
//! This file holds the backend itself (its pool, scratch buffer, SIMD dispatch and shared loops); each
//! op family's fast implementation is its `fast.rs` under `crate::ops`. Tested against the f64
//! reference ([`super::cpu`]) per op and for whole training steps (tests/cpu_fast.rs), at tolerances
//! stated there.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use super::{Core, alloc_zeros, check};
use crate::float::Precision;
use crate::{Error, Result};

/// Largest im2col chunk, in f32 elements (128 MiB).
pub(crate) const CHUNK_ELEMS: usize = 1 << 25;

/// The fast CPU backend. Tensors come from a pool of freed buffers keyed by length, so once the first
/// step has run, later steps of the same shapes allocate no tensor ([`FastCpu::fresh_allocations`]
/// counts the allocations made). One scratch buffer (im2col patches, transposed capsule weights) is
/// allocated at the largest size asked for and reused.
#[derive(Debug, Default)]
pub struct FastCpu {
    scratch: Mutex<Vec<f32>>,
    pool: Arc<Mutex<Shelves>>,
    /// The kernel the convolutions' and dense layers' GEMMs run on in bf16 (`--precision bf16`);
    /// None: f32.
    bf16: Option<super::bf16::Bf16Gemm>,
    /// In bf16: the large convolutions through the Fourier transform (`crate::ops::conv::fft`).
    fourier: bool,
}

/// Freed buffers by length.
#[derive(Debug, Default)]
pub(crate) struct Shelves {
    free: HashMap<usize, Vec<Lined>>,
    /// Bytes held in `free`, at most [`POOL_BYTES`].
    bytes: usize,
    /// Buffers allocated (not taken from the pool) so far.
    fresh: usize,
}

/// The most freed memory the pool keeps; a buffer freed beyond it goes back to the allocator.
pub(crate) const POOL_BYTES: usize = 1 << 30;

/// `len` f32 values that start on a cache line: the AMX kernel loads and stores 64-byte rows of its
/// outputs (and the conv gradients add 32-value runs), each of which would straddle two lines
/// otherwise (the allocator's large blocks start 16 bytes past a page).
/// The kernels' own scratch rows, whose whole registers they load and store, are such values too.
#[derive(Debug, Default)]
pub(crate) struct Lined {
    v: Vec<f32>,
    start: usize,
    len: usize,
}

impl Lined {
    /// `n` zeros on a cache line.
    fn zeros(n: usize) -> Result<Lined> {
        Ok(Lined::on_line(alloc_zeros(n + LINE_F32 - 1)?, n))
    }
    /// `n` zeros on a cache line, for a kernel's scratch (a few KB: allocated as a `Vec` is).
    pub(crate) fn scratch(n: usize) -> Lined {
        Lined::on_line(vec![0.0; n + LINE_F32 - 1], n)
    }
    /// The `n` values of `v` (n + 15 long) from its first cache line on.
    fn on_line(v: Vec<f32>, n: usize) -> Lined {
        let start = v.as_ptr().align_offset(LINE_F32 * 4);
        assert!(start < LINE_F32, "f32 storage is 4-byte aligned");
        Lined { v, start, len: n }
    }
    fn get(&self) -> &[f32] {
        &self.v[self.start..self.start + self.len]
    }
    pub(crate) fn get_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// f32 values in a cache line.
const LINE_F32: usize = 16;

/// A tensor of the fast CPU backend: f32 values, starting on a cache line, that go back to the
/// backend's pool when dropped.
#[derive(Debug)]
pub struct PoolBuf {
    data: Lined,
    pool: Arc<Mutex<Shelves>>,
}

impl Deref for PoolBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.data.get()
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.data.get_mut()
    }
}

impl<'a> IntoIterator for &'a PoolBuf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.data.get().iter()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let bytes = data.len * 4;
        if let Ok(mut p) = self.pool.lock()
            && bytes > 0
            && p.bytes + bytes <= POOL_BYTES
        {
            p.bytes += bytes;
            p.free.entry(data.len).or_default().push(data);
        }
    }
}

/// The convolution algorithm `CAPSNET_CONV` names: Some(true) for `fourier`, Some(false) for
/// `direct`, None where unset; an error for any other value.
pub fn conv_named() -> std::result::Result<Option<bool>, String> {
    match std::env::var("CAPSNET_CONV")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
    {
        None => Ok(None),
        Some(v) if v == "fourier" => Ok(Some(true)),
        Some(v) if v == "direct" => Ok(Some(false)),
        Some(v) => Err(format!(
            "CAPSNET_CONV: '{v}' is not a convolution algorithm: give fourier or direct"
        )),
    }
}

impl FastCpu {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend whose convolutions and dense layers multiply in `p`: fp32 (the default), or bf16
    /// (inputs rounded to bf16 as the reference's rounded-input mode rounds them, f32 sums, as the
    /// GPU's bf16 kernels) on AMX tiles or with AVX512_BF16, the best the CPU has
    /// (`CAPSNET_BF16_GEMM=amx|avx512-bf16` picks one), the large convolutions through the Fourier
    /// transform as [`FastCpu::with_bf16_gemm`] says (`CAPSNET_CONV=fourier|direct` picks); an error
    /// says why not.
    pub fn with_precision(p: Precision) -> Result<Self> {
        let named = conv_named().map_err(Error::msg)?;
        match p {
            Precision::Fp32 => Self::new().with_fourier(named == Some(true)),
            Precision::Bf16 => {
                let fast = super::bf16::Bf16Gemm::choose()
                    .map(Self::with_bf16_gemm)
                    .map_err(Error::msg)?;
                match named {
                    Some(fourier) => fast.with_fourier(fourier),
                    None => Ok(fast),
                }
            }
            Precision::Tf32 => Err(Error::msg(
                "--precision tf32: the CPU has no tf32 arithmetic: give fp32, or bf16 where the CPU has AMX or AVX512_BF16",
            )),
        }
    }

    /// The precision `--device cpu` runs in unless told: bf16 where the CPU has AMX tiles, or has
    /// AVX512_BF16 and is an AMD one, else fp32; and fp32 where an f32 GEMM was named (`--cpu-gemm`).
    /// bf16 was as accurate as fp32 over the notebook's 10 epochs on both kernels (docs/TRAINING.md)
    /// and faster on both machines measured: 1.45 times fp32 on a Xeon's AMX tiles, 1.93 times with
    /// AVX512_BF16 on an AMD Zen 4, whose `VDPBF16PS` issues as often as its f32 FMA and does twice
    /// its multiplies (docs/BENCHMARKS.md). An Intel CPU with AVX512_BF16 and no AMX (Cooper Lake)
    /// stays on fp32: none has been measured, and with two 512-bit FMA units its f32 GEMM may keep up.
    pub fn default_precision() -> Precision {
        let bf16 = super::bf16::Bf16Gemm::Amx.supported()
            || super::bf16::Bf16Gemm::Avx512Bf16.supported() && super::bf16::amd_cpu();
        if bf16 && !super::linalg::cpu_gemm_named() {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }

    /// The backend in bf16 on `kernel`, which must be supported (tests compare the kernels), the
    /// large convolutions through the Fourier transform on the AVX512_BF16 kernel (there 1.63 times as
    /// fast a step on a Zen 4, docs/BENCHMARKS.md; not measured beside AMX).
    pub fn with_bf16_gemm(kernel: super::bf16::Bf16Gemm) -> Self {
        assert!(
            kernel.supported(),
            "the {} GEMM on a CPU that cannot run it",
            kernel.flag()
        );
        FastCpu {
            bf16: Some(kernel),
            fourier: kernel == super::bf16::Bf16Gemm::Avx512Bf16,
            ..Self::default()
        }
    }

    /// This backend with its large convolutions through the Fourier transform or not; an error where
    /// asked in fp32 or without AVX512_BF16, which its products run on.
    pub fn with_fourier(self, fourier: bool) -> Result<Self> {
        if fourier && self.bf16.is_none() {
            return Err(Error::msg(
                "CAPSNET_CONV=fourier: the Fourier convolutions run in bf16 only: give --precision bf16",
            ));
        }
        if fourier && !super::bf16::Bf16Gemm::Avx512Bf16.supported() {
            return Err(Error::msg(
                "CAPSNET_CONV=fourier: the Fourier convolutions need AVX512_BF16, which this CPU lacks",
            ));
        }
        Ok(FastCpu { fourier, ..self })
    }

    /// Whether the large convolutions go through the Fourier transform.
    pub fn fourier(&self) -> bool {
        self.fourier
    }

    /// What the convolutions and dense layers multiply in.
    pub fn precision(&self) -> Precision {
        if self.bf16.is_some() {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }

    /// The bf16 kernel, in bf16 mode.
    pub(crate) fn bf16_gemm(&self) -> Option<super::bf16::Bf16Gemm> {
        self.bf16
    }

    /// C (m×n, row-major) = A (m×k) · B (k×n) + beta·C in this backend's precision, A and B given by
    /// (row stride, column stride): the f32 GEMM [`super::linalg::cpu_gemm`] picked, or the bf16 one
    /// (which can fail to allocate its packed operands: an error that says so).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
        c: &mut [f32],
        beta: f32,
    ) -> Result<()> {
        if let Some(kernel) = self.bf16 {
            super::bf16::gemm(kernel, m, k, n, a, sa, b, sb, c, beta)
        } else {
            super::linalg::gemm(m, k, n, a, sa, b, sb, c, beta);
            Ok(())
        }
    }

    /// A backend of its own (buffers, pool) with this one's GEMM kernel: for measuring that GEMM
    /// while this one is elsewhere.
    pub fn gemm_twin(&self) -> FastCpu {
        FastCpu {
            bf16: self.bf16,
            ..FastCpu::default()
        }
    }

    /// GFLOP/s of this backend's GEMM (its precision, every thread) at 2048 cubed: the fastest of the
    /// runs after an untimed one, repeated for at least `secs` seconds and at least three times (the
    /// GEMM peak a training step's rate is measured against, `capsnet bench`: at 4096 cubed within 2%
    /// of it on the 2-core Xeon, in bf16 and in fp32; three runs alone left it 10-30% low when the
    /// machine was busy).
    pub fn gemm_peak(&self, secs: f64) -> Result<f64> {
        const N: usize = 2048;
        // values of either sign, exact in bf16: the product is the same in both precisions
        let a: Vec<f32> = (0..N * N).map(|i| ((i * 7 + 3) % 17) as f32 / 8.0 - 1.0).collect();
        let b: Vec<f32> = (0..N * N).map(|i| ((i * 5 + 1) % 13) as f32 / 8.0 - 0.75).collect();
        let mut c = alloc_zeros::<f32>(N * N)?;
        self.gemm(N, N, N, &a, (N, 1), &b, (N, 1), &mut c, 0.0)?;
        let (start, mut best, mut runs) = (std::time::Instant::now(), f64::INFINITY, 0);
        while runs < 3 || start.elapsed().as_secs_f64() < secs {
            let t0 = std::time::Instant::now();
            self.gemm(N, N, N, &a, (N, 1), &b, (N, 1), &mut c, 0.0)?;
            best = best.min(t0.elapsed().as_secs_f64());
            runs += 1;
        }
        Ok(2.0 * (N as f64).powi(3) / best / 1e9)
    }

    /// Tensors allocated so far (buffers reused from the pool are not counted).
    pub fn fresh_allocations(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).fresh
    }

    /// A buffer of `n` values from the pool (else newly allocated), its contents set by `init`.
    pub(crate) fn take(&self, n: usize, init: impl FnOnce(&mut [f32])) -> Result<PoolBuf> {
        let reused = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let got = p.free.get_mut(&n).and_then(|shelf| shelf.pop());
            match &got {
                Some(_) => p.bytes -= n * 4,
                None => p.fresh += 1,
            }
            got
        };
        let data = match reused {
            Some(v) => v,
            None => Lined::zeros(n)?,
        };
        let mut b = PoolBuf {
            data,
            pool: self.pool.clone(),
        };
        init(&mut b);
        Ok(b)
    }

    /// Runs `f` on `n` values of the scratch buffer from its first cache line on (old contents, not
    /// zeros).
    pub(crate) fn with_scratch<R>(&self, n: usize, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // from a cache line on (the bf16 patches are copied from it in 64-byte runs)
        let room = n + LINE_F32 - 1;
        if s.len() < room {
            let more = room - s.len();
            s.try_reserve_exact(more).map_err(|_| {
                Error::msg(format!(
                    "out of memory: cannot allocate {} MiB of scratch",
                    (n * 4) >> 20
                ))
            })?;
            s.resize(room, 0.0);
        }
        let start = s.as_ptr().align_offset(LINE_F32 * 4);
        assert!(start < LINE_F32, "f32 storage is 4-byte aligned");
        Ok(f(&mut s[start..start + n]))
    }
}

/// `buf.fill(v)` over the threads (a gradient's zeroing is a pass over memory); a buffer of 1 MiB or
/// more with non-temporal stores where the CPU has AVX-512F: they write whole lines without reading
/// them first and leave the caches to the data in use (zeroing a bf16 step's gradients, 55 MB at
/// batch 50, took 2.3 ms with plain stores and 1.3 ms so, and the step gained about 3 ms on the Xeon).
fn par_fill(buf: &mut [f32], v: f32) {
    const PART: usize = 1 << 14;
    #[cfg(target_arch = "x86_64")]
    let stream = buf.len() >= 1 << 18 && std::arch::is_x86_feature_detected!("avx512f");
    crate::par::par_blocks(buf, PART, PART, |_, b| {
        #[cfg(target_arch = "x86_64")]
        if stream {
            // SAFETY: AVX-512F (checked)
            return unsafe { stream_fill(b, v) };
        }
        b.fill(v)
    });
}

/// `b.fill(v)` with non-temporal stores for its whole cache lines.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_fill(b: &mut [f32], v: f32) {
    use std::arch::x86_64::*;
    let head = b.as_ptr().align_offset(64).min(b.len());
    let (h, rest) = b.split_at_mut(head);
    h.fill(v);
    let whole = rest.len() / 16 * 16;
    let x = _mm512_set1_ps(v);
    for i in (0..whole).step_by(16) {
        // SAFETY: 16 values from i < whole ≤ rest.len(), on a 64-byte boundary (rest starts on one)
        unsafe { _mm512_stream_ps(rest.as_mut_ptr().add(i), x) };
    }
    rest[whole..].fill(v);
    // the streamed stores ordered before anything this thread does next (the parallel loop's end
    // publishes them to the others)
    _mm_sfence();
}

/// Images per im2col chunk for `batch` images of `elems` patch values each: as few chunks as
/// [`CHUNK_ELEMS`] allows, of equal size (a small last chunk would make an inefficient GEMM).
pub(crate) fn images_per_chunk(batch: usize, elems: usize) -> usize {
    let most = (CHUNK_ELEMS / elems.max(1)).max(1);
    batch.div_ceil(batch.div_ceil(most).max(1)).max(1)
}

/// Whether the AVX2+FMA versions of the loops below can run here (the GEMMs' choice asks it too).
pub use super::linalg::wide_simd;

/// How a loop body multiplies and adds: fused where the CPU has FMA, else separately.
pub(crate) trait Arith {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}
pub(crate) struct Fused;
pub(crate) struct Plain;
impl Arith for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl Arith for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `fn name(args)` that runs `body::<Fused>(args)` compiled for AVX2+FMA when the CPU has them, else
/// `body::<Plain>(args)` compiled for the baseline.
macro_rules! simd_fn {
    (fn $name:ident($($a:ident: $t:ty),* $(,)?) => $body:ident;) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($a: $t),*) {
                    $body::<Fused>($($a),*)
                }
                if wide_simd() {
                    // SAFETY: the CPU has AVX2 and FMA, checked at run time just above
                    return unsafe { wide($($a),*) };
                }
            }
            $body::<Plain>($($a),*)
        }
    };
}
pub(crate) use simd_fn;

#[inline(always)]
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Σ a·b, in eight lanes.
#[inline(always)]
pub(crate) fn dot<A: Arith>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    let mut acc = [0f32; 8];
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] = A::fma(x[l], y[l], acc[l]);
        }
    }
    let mut s = hsum8(acc);
    for (x, y) in ra.iter().zip(rb) {
        s = A::fma(*x, *y, s);
    }
    s
}

/// y += alpha·x.
#[inline(always)]
pub(crate) fn axpy<A: Arith>(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    let (cx, rx) = x.as_chunks::<8>();
    let (cy, ry) = y.as_chunks_mut::<8>();
    for (xv, yv) in cx.iter().zip(cy.iter_mut()) {
        for l in 0..8 {
            yv[l] = A::fma(alpha, xv[l], yv[l]);
        }
    }
    for (xv, yv) in rx.iter().zip(ry.iter_mut()) {
        *yv = A::fma(alpha, *xv, *yv);
    }
}

impl Core for FastCpu {
    type E = f32;

    type Buf = PoolBuf;

    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu ({} thread{}, f32, {} loops, {}{})",
            crate::par::threads(),
            if crate::par::threads() == 1 { "" } else { "s" },
            if wide_simd() { "AVX2+FMA" } else { "baseline" },
            self.bf16
                .map_or_else(|| super::linalg::cpu_gemm().describe(), |k| k.describe().to_string()),
            if self.fourier { ", Fourier convolutions" } else { "" }
        )
    }

    fn zeros(&self, n: usize) -> Result<PoolBuf> {
        self.take(n, |b| par_fill(b, 0.0))
    }

    /// A pooled buffer as it was left (zeros where newly allocated): no memset before an op that
    /// overwrites it.
    fn alloc_out(&self, n: usize) -> Result<PoolBuf> {
        self.take(n, |_| {})
    }

    fn upload(&self, host: &[f32]) -> Result<PoolBuf> {
        self.take(host.len(), |b| b.copy_from_slice(host))
    }

    fn download(&self, buf: &PoolBuf) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }

    fn upload_idx(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn download_idx(&self, idx: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(idx.clone())
    }

    fn buf_len(&self, buf: &PoolBuf) -> usize {
        buf.len()
    }

    fn idx_len(&self, idx: &Vec<u32>) -> usize {
        idx.len()
    }

    fn fill(&self, buf: &mut PoolBuf, value: f64) -> Result<()> {
        par_fill(buf, value as f32);
        Ok(())
    }

    fn add_assign(&self, dst: &mut PoolBuf, src: &PoolBuf) -> Result<()> {
        check("add_assign", "src", src.len(), dst.len())?;
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        Ok(())
    }

    fn add_fwd(&self, a: &PoolBuf, b: &PoolBuf, out: &mut PoolBuf) -> Result<()> {
        check("add_fwd", "b", b.len(), a.len())?;
        check("add_fwd", "out", out.len(), a.len())?;
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fill large enough for the streaming stores, off a cache line at both ends, sets every value
    /// and nothing beside them.
    #[test]
    fn a_large_fill_sets_every_value_and_no_other() {
        let n = (1 << 18) + 37;
        let mut v = vec![f32::NAN; n + 8];
        par_fill(&mut v[3..3 + n], 7.5);
        assert!(
            v[..3].iter().chain(&v[3 + n..]).all(|x| x.is_nan()),
            "a value beside the fill changed"
        );
        let wrong = v[3..3 + n].iter().filter(|&&x| x != 7.5).count();
        assert_eq!(wrong, 0, "{wrong} of {n} values not filled");
    }

    #[test]
    fn tensors_and_scratch_start_on_a_cache_line() {
        let be = FastCpu::new();
        for n in [1, 3, 17, 1000, 1 << 20] {
            let a = be.take(n, |_| {}).unwrap();
            assert_eq!(a.as_ptr() as usize % 64, 0, "a new tensor of {n} values");
            assert_eq!(a.len(), n);
            assert!(a.iter().all(|&v| v == 0.0), "a new tensor of {n} values is zeros");
            drop(a);
            let b = be.take(n, |_| {}).unwrap();
            assert_eq!(b.as_ptr() as usize % 64, 0, "a pooled tensor of {n} values");
            be.with_scratch(n, |s| {
                assert_eq!(s.as_ptr() as usize % 64, 0, "scratch of {n} values");
                assert_eq!(s.len(), n);
            })
            .unwrap();
        }
    }
}
