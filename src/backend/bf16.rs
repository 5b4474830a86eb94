//! bf16 GEMMs for the fast CPU backend's `--precision bf16`: on AMX tiles where the CPU has them
//! (Intel Xeon 4th generation and later), else with AVX512_BF16's `VDPBF16PS` (AMD Zen 4 and later,
//! Intel Xeon 3rd generation Cooper Lake and later). [`Bf16Gemm`] names the two.
//!
//! Intel's Advanced Matrix Extensions hold eight tile registers of up to 16 rows × 64 bytes;
//! `TDPBF16PS` adds the product of a 16×32 bf16 tile (A) and a 32×16 one (B, stored as 16 rows of
//! 16 bf16 pairs) to a 16×16 f32 tile (C). Inputs are rounded to bf16 to nearest, ties to even, as
//! [`crate::float::Precision::Bf16`] rounds them (the reference's rounded-input mode, and the GPU's bf16 kernels);
//! sums are f32. Both instructions treat bf16 denormals (below 2⁻¹²⁶ in magnitude) as zero and flush
//! denormal results to zero, whatever MXCSR says; the reference does not, a difference below every
//! tolerance that holds this code to it. The AMX instructions are inline assembly (Rust has no stable
//! AMX intrinsics); the tile registers keep their values from one `asm!` block to the next, which
//! holds because the compiler never allocates them (it cannot name them as clobbers either).
//!
//! The operands are packed into 1 KiB tiles, zero-padded to whole tiles, each just before it is used
//! where that can be done once: where B is at least four times wider than A is tall (a convolution's
//! input and weight gradients), A whole up front and the threads split N, each packing its B tiles
//! `NG_BLOCKS` blocks wide and using them for all of M while they are in cache; else the threads
//! split M, B is packed whole up front and A as it is reached: each block row's pass of K where N is
//! one group (a convolution's forward), `MG_BLOCKS` block rows at a time where K takes one pass, else
//! whole up front. Packed buffers are kept between calls. Each thread
//! runs 32×32 blocks of C (2×2 tiles: four accumulators, two A tiles and two B tiles, the eight
//! registers) over K in passes of `KC_TILES` tiles. Each element of C is summed by one thread in one
//! fixed order, so results do not depend on the thread count. A product can also go to a sink block
//! by block (a convolution's patch gradient added into its image gradient, [`Out::Sink`]).
//!
//! What bounds it: a tile load per two products (each product is issued as soon as its two tiles are
//! loaded). On one core of the Xeon this was tuned on (`cargo bench --bench ops`), the AMX kernel runs
//! at 1.06 TFLOP/s with its B tiles within 32 KiB, 0.73 from L2 and 0.57 from memory; the AVX512_BF16
//! kernel at 0.12, below the f32 GEMM's rate there (docs/BENCHMARKS.md).
//!
//! `VDPBF16PS` adds the products of 16 bf16 pairs to 16 f32 lanes; the AVX512_BF16 kernel reads the
//! same packed tiles (a B tile row is 16 pairs of K; an A tile row holds the pairs it broadcasts) and
//! keeps a 16×16 block of C in 16 registers.
//!
//! AMX needs AMX-TILE and AMX-BF16 (CPUID leaf 7), and Linux must grant the process the tile-data
//! state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16 and later): `amx_supported` asks both.
//! Figures: docs/BENCHMARKS.md.

use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// Rows of an A or C tile.
const TM: usize = 16;
/// bf16 values along K in a tile (one 64-byte row of A; 16 pairs in a row of B).
pub(crate) const TK: usize = 32;
/// f32 columns of a C tile, and bf16 pairs in a row of B.
const TN: usize = 16;
/// bf16 values in one packed tile (1 KiB).
pub(crate) const TILE: usize = TM * TK;
/// Rows and columns of the C block one kernel call computes: 2×2 tiles.
const BLOCK: usize = 32;
/// K tiles per pass (2,048 values of K): one A block row of 32 rows is 128 KiB; 8, 32 and 64 measured
/// within noise of each other at the primary conv's shapes.
const KC_TILES: usize = 64;
/// K tiles per pass of a transposed-add product kept between passes (256 values of K: a block's
/// A and B strips, 16 KiB each, stay in L1 across the group's blocks).
const KC_ADD: usize = 8;
/// The most bytes of C blocks a thread keeps between the passes of a transposed-add product.
const ADD_BLOCKS_MAX: usize = 1 << 19;
/// C blocks per group along N (256 columns).
const NG_BLOCKS: usize = 8;
/// C blocks per group along M (512 rows): the group's C, 512 KiB, stays in L2 across K passes.
const MG_BLOCKS: usize = 16;

/// The kernel a bf16 GEMM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// AMX tiles: `TDPBF16PS`, 16×16×32 products an instruction.
    Amx,
    /// AVX512_BF16: `VDPBF16PS`, 16 lanes of bf16 pairs an instruction.
    Avx512Bf16,
}

impl Bf16Gemm {
    /// Every kernel, best first.
    pub const ALL: [Bf16Gemm; 2] = [Bf16Gemm::Amx, Bf16Gemm::Avx512Bf16];

    /// The name `CAPSNET_BF16_GEMM` takes.
    pub fn flag(self) -> &'static str {
        match self {
            Bf16Gemm::Amx => "amx",
            Bf16Gemm::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// Whether this CPU (and OS) can run it.
    pub fn supported(self) -> bool {
        match self {
            Bf16Gemm::Amx => amx_supported(),
            Bf16Gemm::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512bf16")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512f")
            }
        }
    }

    /// How the backend's name says it.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Gemm::Amx => "AMX bf16 GEMMs",
            Bf16Gemm::Avx512Bf16 => "AVX512_BF16 GEMMs",
        }
    }

    /// The one `CAPSNET_BF16_GEMM` names, else the best this CPU runs; an error says what is wrong
    /// (a name that is none, a kernel this CPU cannot run, a CPU with neither).
    pub fn choose() -> std::result::Result<Bf16Gemm, String> {
        match std::env::var("CAPSNET_BF16_GEMM").ok().filter(|v| !v.trim().is_empty()) {
            Some(v) => {
                let g = Self::ALL.into_iter().find(|g| g.flag() == v.trim()).ok_or_else(|| {
                    format!("CAPSNET_BF16_GEMM: '{}' is not a bf16 GEMM: give amx or avx512-bf16", v.trim())
                })?;
                if g.supported() {
                    Ok(g)
                } else {
                    Err(format!("CAPSNET_BF16_GEMM: this CPU cannot run the {} GEMM", g.flag()))
                }
            }
            None => Self::ALL.into_iter().find(|g| g.supported()).ok_or_else(|| {
                "--precision bf16 on the CPU needs AMX-BF16 tiles or AVX512_BF16, which this machine lacks: give --precision fp32".to_string()
            }),
        }
    }
}

/// Whether the CPU is AMD's (CPUID's vendor string "AuthenticAMD").
pub fn amd_cpu() -> bool {
    // an unsafe function in older Rust
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .eq(*b"AuthenticAMD")
}

/// Whether this CPU and OS run AMX bf16 tiles (checked once; the OS permission is asked then).
pub fn amx_supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID.(EAX=7,ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE
            #[allow(unused_unsafe)]
            // SAFETY: CPUID leaf 7 exists on every x86_64 CPU that Rust targets
            let r = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
            // the packing's AVX-512 code needs F and BW (every CPU with AMX has both)
            if r.edx & (1 << 22) == 0
                || r.edx & (1 << 24) == 0
                || !std::arch::is_x86_feature_detected!("avx512f")
                || !std::arch::is_x86_feature_detected!("avx512bw")
            {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it only changes what the kernel
            // lets this process use
            let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
            rc == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// `x` rounded to bf16 as [`crate::float::Precision::Bf16`] rounds it, as its 16 bits.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0x7f80_0000 {
        // infinities keep their bits; a NaN stays a NaN (its payload may sit in the low half)
        return if b & 0x007f_ffff == 0 {
            (b >> 16) as u16
        } else {
            ((b >> 16) | 0x0040) as u16
        };
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A raw pointer that worker threads share; each writes a disjoint part of what it points to (and
/// reads what no one writes meanwhile).
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: used only to hand threads pointers to disjoint blocks of one buffer (see `gemm_from`,
// and the Fourier convolution's tasks)
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above
unsafe impl<T> Sync for Shared<T> {}

/// Where a GEMM operand's f32 values come from: a strided matrix ([`Strided`]), or a matrix computed
/// as it is read, such as a convolution's patch matrix (im2col without the f32 copy).
///
/// # Safety
/// For every r and c below the sizes the GEMM is given with it, `at` reads inside the operand, and a
/// pointer `run` (`col_run`, `run_bf16`) returns has `len` readable values from it, row r's from
/// column c0 on (column c's from row r0 on), alive while the source is; `run_bf16`'s are
/// [`bf16_bits`] of the values `at` reads there.
pub(crate) unsafe trait Source: Sync {
    /// Element (r, c).
    fn at(&self, r: usize, c: usize) -> f32;
    /// `len` values of row r from column c0 on, where they lie contiguous in memory.
    fn run(&self, r: usize, c0: usize, len: usize) -> Option<*const f32>;
    /// `len` values of column c from row r0 on, where they lie contiguous in memory (a transposed
    /// matrix).
    fn col_run(&self, _r0: usize, _c: usize, _len: usize) -> Option<*const f32> {
        None
    }
    /// `len` values of row r from column c0 on already rounded to bf16 (as [`bf16_bits`] rounds
    /// them), where they lie contiguous: what the packing copies without converting.
    fn run_bf16(&self, _r: usize, _c0: usize, _len: usize) -> Option<*const u16> {
        None
    }
    /// The whole operand already packed as the B of a k×n product, tile (nt, kt) at
    /// `(nt·kts + kt)·TILE` (kts = k/32 rounded up, 2·⌈n/32⌉ column tiles, zeros outside B), where it
    /// is: the GEMM then reads these tiles instead of packing its own.
    fn packed_b(&self, _k: usize, _n: usize) -> Option<*const u16> {
        None
    }
}

// SAFETY: forwards every method to a source that keeps the contract (tests that try several)
#[cfg(test)]
unsafe impl Source for &dyn Source {
    fn at(&self, r: usize, c: usize) -> f32 {
        (**self).at(r, c)
    }
    fn run(&self, r: usize, c0: usize, len: usize) -> Option<*const f32> {
        (**self).run(r, c0, len)
    }
    fn col_run(&self, r0: usize, c: usize, len: usize) -> Option<*const f32> {
        (**self).col_run(r0, c, len)
    }
    fn run_bf16(&self, r: usize, c0: usize, len: usize) -> Option<*const u16> {
        (**self).run_bf16(r, c0, len)
    }
    fn packed_b(&self, k: usize, n: usize) -> Option<*const u16> {
        (**self).packed_b(k, n)
    }
}

/// An operand packed once as the B of a k×n product (by [`pack_b_both`]), for GEMMs that would
/// otherwise each pack it again.
pub(crate) struct PackedB<'a> {
    tiles: &'a [u16],
    k: usize,
    n: usize,
}

impl<'a> PackedB<'a> {
    /// The tiles of a k×n B in `tiles`, laid out as [`Source::packed_b`] says; panics where they do
    /// not fill it.
    pub(crate) fn new(tiles: &'a [u16], k: usize, n: usize) -> PackedB<'a> {
        assert_eq!(tiles.len(), packed_b_len(k, n), "a packed {k}×{n} B");
        PackedB { tiles, k, n }
    }
}

/// The u16 a k×n B takes packed whole: ⌈n/32⌉ blocks of two column tiles, each ⌈k/32⌉ tiles deep.
pub(crate) fn packed_b_len(k: usize, n: usize) -> usize {
    n.div_ceil(BLOCK) * 2 * k.div_ceil(TK) * TILE
}

// SAFETY: `new` checks the tiles against k and n; `at` indexes the slice (checked), and `packed_b`
// hands out the whole slice only for the k and n it was packed for
unsafe impl Source for PackedB<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        assert!(
            r < self.k && c < self.n,
            "({r}, {c}) outside a {}×{} operand",
            self.k,
            self.n
        );
        let tile = (c / TN) * self.k.div_ceil(TK) + r / TK;
        let bits = self.tiles[tile * TILE + (r % TK) / 2 * TK + (c % TN) * 2 + r % 2];
        f32::from_bits((bits as u32) << 16)
    }
    fn run(&self, _r: usize, _c0: usize, _len: usize) -> Option<*const f32> {
        None
    }
    fn packed_b(&self, k: usize, n: usize) -> Option<*const u16> {
        (k == self.k && n == self.n).then_some(self.tiles.as_ptr())
    }
}

/// `dst[i]` = `src[i]` rounded to bf16 as the packing rounds it (to nearest, ties to even), over the
/// threads: an operand read many times, converted once.
pub(crate) fn to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    const PART: usize = 1 << 14;
    crate::par::par_blocks(dst, PART, PART, |first, part| {
        round_bf16(&src[first * PART..][..part.len()], part)
    });
}

/// [`to_bf16`] on this thread alone (short runs).
pub(crate) fn round_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    let whole = dst.len() / TK * TK;
    // SAFETY: AVX-512F is there (a bf16 GEMM's caller)
    unsafe { rows32_contiguous(&src[..whole], &mut dst[..whole]) };
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = bf16_bits(*s);
    }
}

/// A row-major matrix of bf16 values (their bits), as a GEMM operand.
pub(crate) struct Bf16Rows<'a> {
    m: &'a [u16],
    rows: usize,
    cols: usize,
}

impl<'a> Bf16Rows<'a> {
    /// A `rows`×`cols` matrix in `m`; panics where it does not fit.
    pub(crate) fn new(m: &'a [u16], rows: usize, cols: usize) -> Bf16Rows<'a> {
        assert!(
            rows.checked_mul(cols).is_some_and(|n| n <= m.len()),
            "a bf16 operand outside its slice"
        );
        Bf16Rows { m, rows, cols }
    }
}

// SAFETY: `new` checks the matrix against its slice; `at` indexes it (checked), and a run stays in
// its row (checked)
unsafe impl Source for Bf16Rows<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        assert!(
            r < self.rows && c < self.cols,
            "({r}, {c}) outside a {}×{} operand",
            self.rows,
            self.cols
        );
        f32::from_bits((self.m[r * self.cols + c] as u32) << 16)
    }
    fn run(&self, _r: usize, _c0: usize, _len: usize) -> Option<*const f32> {
        None
    }
    #[inline(always)]
    fn run_bf16(&self, r: usize, c0: usize, len: usize) -> Option<*const u16> {
        (r < self.rows && c0 + len <= self.cols).then(|| self.m[r * self.cols + c0..].as_ptr())
    }
}

/// Rows `r0..r0 + nr` of a k×n B made from rows of `dy` (nr × n, row-major; n a multiple of 32, r0
/// of 32): each row dy itself, or where `relu`, dy where the same row of `y` is above 0 and +0
/// elsewhere (a ReLU's gradient, as a mask on dy's bits). Each row is added to `sums` (n f32, row
/// after row) and packed into its K tile of `tiles`, laid out as [`Source::packed_b`] says (rows past
/// the last, up to the tile's end, as zeros): a layer's dz, made, summed for its bias gradient and
/// packed while in registers, never stored.
///
/// # Safety
/// AVX-512F; `tiles` points to the whole packed B of a k×n product (k ≥ r0 + nr), and no one else
/// reads or writes these rows' tiles meanwhile.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_b_act_rows(
    relu: bool,
    y: &[f32],
    dy: &[f32],
    n: usize,
    r0: usize,
    k: usize,
    sums: &mut [f32],
    tiles: *mut u16,
) {
    use std::arch::x86_64::*;
    assert!(n.is_multiple_of(BLOCK) && r0.is_multiple_of(TK) && dy.len().is_multiple_of(n) && sums.len() == n);
    let nr = dy.len() / n;
    assert!(r0 + nr <= k && (!relu || y.len() >= dy.len()));
    let kts = k.div_ceil(TK);
    // 10 MB of tiles at batch 50, read by the GEMM from memory anyway: written without reading
    // their lines first where they start on one
    let stream = (tiles as usize).is_multiple_of(LINE);
    // row p's dz in columns 16·nt.. (zeros past the last row)
    let dz = |p: usize, nt: usize| {
        if p >= nr {
            return _mm512_setzero_ps();
        }
        // SAFETY: 16 values of row p of dy (and of y, asserted as long), a bounds-checked slice
        let g = unsafe { _mm512_loadu_ps(dy[p * n + nt * TN..][..TN].as_ptr()) };
        if relu {
            // SAFETY: as above
            let yv = unsafe { _mm512_loadu_ps(y[p * n + nt * TN..][..TN].as_ptr()) };
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(yv, _mm512_setzero_ps()), g)
        } else {
            g
        }
    };
    for p in (0..nr.next_multiple_of(2)).step_by(2) {
        let (kt, row) = ((r0 + p) / TK, (p % TK) / 2);
        for nt in 0..n / TN {
            let (lo, hi) = (dz(p, nt), dz(p + 1, nt));
            let s = &mut sums[nt * TN..][..TN];
            // SAFETY: 16 values of a bounds-checked slice
            let mut acc = _mm512_add_ps(unsafe { _mm512_loadu_ps(s.as_ptr()) }, lo);
            if p + 1 < nr {
                acc = _mm512_add_ps(acc, hi);
            }
            // SAFETY: as above
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), acc) };
            let pair = _mm512_or_si512(bf16x16(lo), _mm512_slli_epi32::<16>(bf16x16(hi)));
            // SAFETY: row `row` of tile (nt, kt) of the packed B (the caller's contract)
            let at = unsafe { tiles.add((nt * kts + kt) * TILE + row * TK) } as *mut __m512i;
            if stream {
                // SAFETY: as above, on a cache line
                unsafe { _mm512_stream_si512(at, pair) };
            } else {
                // SAFETY: as above
                unsafe { _mm512_storeu_si512(at, pair) };
            }
        }
    }
    // the streamed stores ordered before anything this thread does next (the parallel loop's end
    // publishes them to the others)
    _mm_sfence();
    // the rest of the last tile's rows
    let end = (r0 + nr).next_multiple_of(2);
    if !end.is_multiple_of(TK) && end < kts * TK {
        let (kt, from) = (end / TK, (end % TK) / 2);
        for nt in 0..n / TN {
            // SAFETY: as above, rows from..16 of tile (nt, kt)
            unsafe { std::ptr::write_bytes(tiles.add((nt * kts + kt) * TILE + from * TK), 0, (TM - from) * TK) };
        }
    }
}

/// A matrix in a borrowed slice, element (r, c) at `[r*rs + c*cs]`.
pub(crate) struct Strided<'a> {
    m: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Strided<'a> {
    /// A `rows`×`cols` matrix in `m`, read with row stride `rs` and column stride `cs`; panics where
    /// it does not fit in `m` (checked without overflow). Given to a GEMM, its sizes there must not
    /// exceed `rows` and `cols`.
    pub(crate) fn new(m: &'a [f32], (rows, cols): (usize, usize), (rs, cs): (usize, usize)) -> Strided<'a> {
        let last = || (rows - 1).checked_mul(rs)?.checked_add((cols - 1).checked_mul(cs)?);
        assert!(
            rows == 0 || cols == 0 || last().is_some_and(|l| l < m.len() && l <= isize::MAX as usize),
            "a GEMM operand outside its slice"
        );
        Strided { m, rows, cols, rs, cs }
    }
}

// SAFETY: `Strided::new` checks the matrix against its slice, `at` checks (r, c) against the
// matrix, and the runs' bounds are the GEMM's sizes, which do not exceed the matrix's
unsafe impl Source for Strided<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        assert!(
            r < self.rows && c < self.cols,
            "({r}, {c}) outside a {}×{} operand",
            self.rows,
            self.cols
        );
        self.m[r * self.rs + c * self.cs]
    }
    fn run(&self, r: usize, c0: usize, len: usize) -> Option<*const f32> {
        (self.cs == 1 && r < self.rows && c0 + len <= self.cols).then(|| self.m[r * self.rs + c0..].as_ptr())
    }
    fn col_run(&self, r0: usize, c: usize, len: usize) -> Option<*const f32> {
        (self.rs == 1 && c < self.cols && r0 + len <= self.rows).then(|| self.m[r0 + c * self.cs..].as_ptr())
    }
}

/// 16 f32 rounded to bf16 as [`bf16_bits`] rounds them, each in the low half of a 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
fn bf16x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb));
    // NaNs: the top half with the quiet bit set (the sum above may carry out of a NaN's bits)
    let nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff)),
        _mm512_set1_epi32(0x7f80_0000),
    );
    let q = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, r, q)
}

/// One row of an A tile: 32 contiguous f32 at `src` as 32 bf16 at `dst`.
///
/// # Safety
/// AVX-512F; 32 readable f32 at `src`, 32 writable u16 at `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row32(src: *const f32, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let lo = _mm512_cvtepi32_epi16(bf16x16(_mm512_loadu_ps(src)));
        let hi = _mm512_cvtepi32_epi16(bf16x16(_mm512_loadu_ps(src.add(16))));
        _mm256_storeu_si256(dst as *mut __m256i, lo);
        _mm256_storeu_si256(dst.add(16) as *mut __m256i, hi);
    }
}

/// [`row32`] over whole runs of 32: `dst` = `src` rounded, both a multiple of 32 long. The loops
/// below are AVX-512 functions of their own so that the one-row helpers inline into them: a call per
/// row, and its return to code without AVX-512, cost as much as the row.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn rows32_contiguous(src: &[f32], dst: &mut [u16]) {
    assert!(src.len() == dst.len() && src.len().is_multiple_of(TK));
    for (d, s) in dst.chunks_exact_mut(TK).zip(src.chunks_exact(TK)) {
        // SAFETY: 32 values each side
        unsafe { row32(s.as_ptr(), d.as_mut_ptr()) };
    }
}

/// [`row32`] of each run into consecutive rows of a tile.
///
/// # Safety
/// AVX-512F; 32 readable f32 at each run; `runs.len()` rows of 32 writable u16 from `tile`.
#[target_feature(enable = "avx512f")]
unsafe fn rows32(runs: &[*const f32], tile: *mut u16) {
    for (i, &run) in runs.iter().enumerate() {
        // SAFETY: the caller's contract
        unsafe { row32(run, tile.add(i * TK)) };
    }
}

/// As [`rows32`] for runs of `np` < 32 values (the last K tile of a K that is not a multiple of 32,
/// such as conv1's 81): each row's values past np as zeros, none of them read.
///
/// # Safety
/// AVX-512F; np readable f32 at each run; `runs.len()` rows of 32 writable u16 from `tile`.
#[target_feature(enable = "avx512f")]
unsafe fn rows_short(runs: &[*const f32], np: usize, tile: *mut u16) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as u16;
    let (lo, hi) = (lanes(np), lanes(np.saturating_sub(16)));
    for (i, &run) in runs.iter().enumerate() {
        // SAFETY: masked loads read only the run's np values (the caller's contract); row i of the
        // tile holds 32
        unsafe {
            let a = _mm512_cvtepi32_epi16(bf16x16(_mm512_maskz_loadu_ps(lo, run)));
            let b = _mm512_cvtepi32_epi16(bf16x16(_mm512_maskz_loadu_ps(hi, run.wrapping_add(16))));
            _mm256_storeu_si256(tile.add(i * TK) as *mut __m256i, a);
            _mm256_storeu_si256(tile.add(i * TK + 16) as *mut __m256i, b);
        }
    }
}

/// [`pairs16`] of each pair of runs into consecutive rows of a B tile.
///
/// # Safety
/// AVX-512F; 16 readable f32 at each run; `runs.len() / 2` rows of 32 writable u16 from `tile`.
#[target_feature(enable = "avx512f")]
unsafe fn pairs16_rows(runs: &[*const f32], tile: *mut u16) {
    for r in 0..runs.len() / 2 {
        // SAFETY: the caller's contract
        unsafe { pairs16(runs[2 * r], runs[2 * r + 1], tile.add(r * TK)) };
    }
}

/// [`pairs16_bf16`] of each pair of the 32 runs into the 16 rows of a B tile.
///
/// # Safety
/// AVX-512F; 16 readable u16 at each run; a tile's 512 writable u16 at `tile`.
#[target_feature(enable = "avx512f")]
unsafe fn pairs16_bf16_rows(halves: &[*const u16; TK], tile: *mut u16) {
    for r in 0..TK / 2 {
        // SAFETY: the caller's contract
        unsafe { pairs16_bf16(halves[2 * r], halves[2 * r + 1], tile.add(r * TK)) };
    }
}

/// One row of a B tile: 16 contiguous f32 of each of two rows of B (`p0`, `p1`) as 16 bf16 pairs at
/// `dst`, the first row's value in each pair's low half.
///
/// # Safety
/// AVX-512F; 16 readable f32 at `p0` and at `p1`, 32 writable u16 at `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pairs16(p0: *const f32, p1: *const f32, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let lo = bf16x16(_mm512_loadu_ps(p0));
        let hi = bf16x16(_mm512_loadu_ps(p1));
        _mm512_storeu_si512(dst as *mut __m512i, _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
    }
}

/// As [`pairs16`], from values already in bf16.
///
/// # Safety
/// AVX-512F; 16 readable u16 at `p0` and at `p1`, 32 writable u16 at `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pairs16_bf16(p0: *const u16, p1: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p0 as *const __m256i));
        let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p1 as *const __m256i));
        _mm512_storeu_si512(dst as *mut __m512i, _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
    }
}

/// Two B tiles side by side from 32 rows of B already in bf16, each row's 32 values contiguous at
/// `rows[p]`: row r of `t0` gets the pairs of rows 2r and 2r+1 in columns 0..16, of `t1` in columns
/// 16..32 (as [`pairs16_bf16`] lays them out), each pair of rows loaded once and interleaved by two
/// word permutes.
///
/// # Safety
/// AVX-512F and AVX512BW; 32 readable u16 at each `rows[p]`; a tile's 512 writable u16 at `t0` and at
/// `t1`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pairs32_bf16(rows: &[*const u16; TK], t0: *mut u16, t1: *mut u16) {
    use std::arch::x86_64::*;
    // word 2j of a tile row: column j of the first row; word 2j+1: of the second (index 32 on: `b`)
    let lo: [u16; 32] = std::array::from_fn(|w| (w / 2 + 32 * (w % 2)) as u16);
    let hi: [u16; 32] = std::array::from_fn(|w| lo[w] + 16);
    // SAFETY: the caller's contract
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
            _mm512_loadu_si512(hi.as_ptr() as *const __m512i),
        );
        for r in 0..TK / 2 {
            let a = _mm512_loadu_si512(rows[2 * r] as *const __m512i);
            let b = _mm512_loadu_si512(rows[2 * r + 1] as *const __m512i);
            _mm512_storeu_si512(t0.add(r * TK) as *mut __m512i, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(t1.add(r * TK) as *mut __m512i, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/// 16 bf16 pairs, one per lane (the value at `lo` in the low half, at `hi` in the high), stored
/// `stride` u32 apart from `dst`: two columns of an A tile from a transposed A.
///
/// # Safety
/// AVX-512F; 16 readable f32 at `lo` and at `hi`; 16 writable u32 `stride` apart from `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pairs16_strided(lo: *const f32, hi: *const f32, dst: *mut u32, stride: i32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let v = _mm512_or_si512(
            bf16x16(_mm512_loadu_ps(lo)),
            _mm512_slli_epi32::<16>(bf16x16(_mm512_loadu_ps(hi))),
        );
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride),
        );
        _mm512_i32scatter_epi32::<4>(dst as _, idx, v);
    }
}

/// The 16×16 transpose of 32-bit lanes: lane j of row p out is lane p of `r[j]`. 32-bit, then
/// 64-bit interleaves within each 128-bit quarter, then the quarters gathered across registers.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // b[4i + c], quarter q holds lane 4q + c of registers 4i..4i+3
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // row 4q + c is quarter q of b[c], b[4+c], b[8+c], b[12+c]
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let t0 = _mm512_shuffle_i32x4::<0x88>(b[c], b[4 + c]);
        let t1 = _mm512_shuffle_i32x4::<0xdd>(b[c], b[4 + c]);
        let t2 = _mm512_shuffle_i32x4::<0x88>(b[8 + c], b[12 + c]);
        let t3 = _mm512_shuffle_i32x4::<0xdd>(b[8 + c], b[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(t0, t2);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(t1, t3);
        out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(t0, t2);
        out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(t1, t3);
    }
    out
}

/// `dst[j·ld + i] += blk[i·BLOCK + j]` (`=` where not `add`) for i, j < 32: a whole C block added to
/// (stored in) a transposed C, a 16×16 quarter at a time through [`transpose16`] (each row of the
/// transposed C then one contiguous add or store).
///
/// # Safety
/// AVX-512F; 32 rows of 32 writable f32 `ld` apart from `dst`.
#[target_feature(enable = "avx512f")]
unsafe fn add_block_transposed(blk: &[f32; BLOCK * BLOCK], dst: *mut f32, ld: usize, add: bool) {
    use std::arch::x86_64::*;
    for (i0, j0) in [(0, 0), (0, 16), (16, 0), (16, 16)] {
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, ri) in r.iter_mut().enumerate() {
            // SAFETY: inside the block
            *ri = unsafe { _mm512_loadu_si512(blk.as_ptr().add((i0 + i) * BLOCK + j0) as *const __m512i) };
        }
        for (j, col) in transpose16(r).iter().enumerate() {
            // SAFETY: row j0 + j of the transposed C, values i0..i0+16 (the caller's contract)
            unsafe {
                let d = dst.add((j0 + j) * ld + i0);
                let v = _mm512_castsi512_ps(*col);
                _mm512_storeu_ps(d, if add { _mm512_add_ps(_mm512_loadu_ps(d), v) } else { v });
            }
        }
    }
}

/// A whole B tile from 16 columns of a transposed B, each 32 contiguous f32 at `cols[j]`: each
/// column rounded to 16 bf16 pairs in one register, then the 16 registers transposed (as 32-bit
/// lanes) so that each is a row of the tile, stored whole (16 stores where one scatter a column
/// made 256).
///
/// # Safety
/// AVX-512F; 32 readable f32 at each `cols[j]`; a tile's 512 writable u16 at `tile`.
#[target_feature(enable = "avx512f")]
unsafe fn columns16(cols: &[*const f32; TN], tile: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let mut r = [_mm512_setzero_si512(); 16];
        for (rj, &col) in r.iter_mut().zip(cols) {
            let lo = _mm512_cvtepi32_epi16(bf16x16(_mm512_loadu_ps(col)));
            let hi = _mm512_cvtepi32_epi16(bf16x16(_mm512_loadu_ps(col.add(16))));
            // lane p: the pair (2p, 2p+1) of column j
            *rj = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        }
        let rows = transpose16(r);
        for (p, row) in rows.iter().enumerate() {
            _mm512_storeu_si512(tile.add(p * TK) as *mut __m512i, *row);
        }
    }
}

/// Packs tile (mt, kt) of A (m×k, from `src`): rows 16·mt.. and columns 32·kt.., row-major; zeros
/// outside A.
fn pack_a_tile(m: usize, k: usize, src: &impl Source, mt: usize, kt: usize, tile: &mut [u16]) {
    let (i0, p0) = (mt * TM, kt * TK);
    let (ni, np) = (m.saturating_sub(i0).min(TM), k.saturating_sub(p0).min(TK));
    if ni < TM || np < TK {
        tile.fill(0);
    }
    let (mut runs, mut cols) = ([std::ptr::null(); TM], [std::ptr::null(); TK]);
    let mut halves = [std::ptr::null(); TM];
    if np == TK && (0..ni).all(|i| src.run_bf16(i0 + i, p0, TK).map(|r| halves[i] = r).is_some()) {
        for (i, &run) in halves.iter().enumerate().take(ni) {
            // SAFETY: the source has these 32 bf16 values contiguous; row i of the tile holds 32
            unsafe { std::ptr::copy_nonoverlapping(run, tile.as_mut_ptr().add(i * TK), TK) };
        }
    } else if (0..ni).all(|i| src.run(i0 + i, p0, np).map(|r| runs[i] = r).is_some()) {
        assert!(tile.len() >= ni * TK);
        // SAFETY: the source has these np values contiguous; the tile holds ni rows (asserted);
        // AVX-512F is there (`supported`)
        unsafe {
            if np == TK {
                rows32(&runs[..ni], tile.as_mut_ptr())
            } else {
                rows_short(&runs[..ni], np, tile.as_mut_ptr())
            }
        };
    } else if ni == TM && np == TK && (0..TK).all(|p| src.col_run(i0, p0 + p, TM).map(|r| cols[p] = r).is_some()) {
        for p in (0..TK).step_by(2) {
            // SAFETY: the source has both columns' 16 values contiguous; the 16 pairs
            // land in the tile's 16 rows (u32 p/2 of each); AVX-512F is there
            unsafe {
                pairs16_strided(
                    cols[p],
                    cols[p + 1],
                    (tile.as_mut_ptr() as *mut u32).add(p / 2),
                    (TK / 2) as i32,
                )
            };
        }
    } else {
        for i in 0..ni {
            for p in 0..np {
                tile[i * TK + p] = bf16_bits(src.at(i0 + i, p0 + p));
            }
        }
    }
}

/// Packs tile (nt, kt) of B (k×n, from `src`): rows 32·kt.. and columns 16·nt.. as 16 rows of 16
/// pairs (row r: B[2r][j], B[2r+1][j] for each j); zeros outside B.
fn pack_b_tile(k: usize, n: usize, src: &impl Source, nt: usize, kt: usize, tile: &mut [u16]) {
    let (p0, j0) = (kt * TK, nt * TN);
    let (np, nj) = (k.saturating_sub(p0).min(TK), n.saturating_sub(j0).min(TN));
    if np < TK || nj < TN {
        tile.fill(0);
    }
    let (mut runs, mut cols) = ([std::ptr::null(); TK], [std::ptr::null(); TN]);
    let mut halves = [std::ptr::null(); TK];
    if nj == TN && np == TK && (0..np).all(|p| src.run_bf16(p0 + p, j0, TN).map(|r| halves[p] = r).is_some()) {
        assert!(tile.len() >= TILE);
        // SAFETY: the source has each row's 16 bf16 values contiguous; a whole tile (asserted);
        // AVX-512F is there
        unsafe { pairs16_bf16_rows(&halves, tile.as_mut_ptr()) };
    } else if nj == TN && (0..np).all(|p| src.run(p0 + p, j0, TN).map(|r| runs[p] = r).is_some()) {
        assert!(tile.len() >= np / 2 * TK);
        // SAFETY: the source has each row's 16 values contiguous; np/2 tile rows (asserted);
        // AVX-512F is there
        unsafe { pairs16_rows(&runs[..np / 2 * 2], tile.as_mut_ptr()) };
        if np % 2 == 1 {
            for j in 0..nj {
                tile[(np / 2) * TK + j * 2] = bf16_bits(src.at(p0 + np - 1, j0 + j));
            }
        }
    } else if np == TK && nj == TN && (0..TN).all(|j| src.col_run(p0, j0 + j, TK).map(|r| cols[j] = r).is_some()) {
        // SAFETY: the source has each column's 32 values contiguous; the tile holds TILE values;
        // AVX-512F is there
        unsafe { columns16(&cols, tile.as_mut_ptr()) };
    } else {
        for p in 0..np {
            for j in 0..nj {
                tile[(p / 2) * TK + j * 2 + p % 2] = bf16_bits(src.at(p0 + p, j0 + j));
            }
        }
    }
}

/// Packs tiles (nt, kt) and (nt + 1, kt) of B into `t0` and `t1`, as [`pack_b_tile`] packs each:
/// both at once where the source has each of the 32 rows' 32 values contiguous in bf16 (a
/// convolution's patches: one row lookup serves both tiles).
fn pack_b_tiles2(k: usize, n: usize, src: &impl Source, nt: usize, kt: usize, t0: &mut [u16], t1: &mut [u16]) {
    let (p0, j0) = (kt * TK, nt * TN);
    let mut rows = [std::ptr::null(); TK];
    if p0 + TK <= k
        && j0 + 2 * TN <= n
        && t0.len() >= TILE
        && t1.len() >= TILE
        && (0..TK).all(|p| src.run_bf16(p0 + p, j0, 2 * TN).map(|r| rows[p] = r).is_some())
    {
        // SAFETY: each row's 32 bf16 values are readable (the source's contract); both tiles hold
        // TILE values (checked); AVX-512F and BW are there (a bf16 GEMM runs)
        unsafe { pairs32_bf16(&rows, t0.as_mut_ptr(), t1.as_mut_ptr()) };
    } else {
        pack_b_tile(k, n, src, nt, kt, t0);
        pack_b_tile(k, n, src, nt + 1, kt, t1);
    }
}

/// W (k×n f32, row-major; k and n multiples of 32) packed as a B twice in one pass over it: into `b`
/// as the B of a k×n product, and into `bt` as Wᵀ, the B of an n×k product, whose column tile t
/// (rows 16t.. of W) goes to column tile `place(t)` (a permutation of 0..k/16). Both laid out as
/// [`Source::packed_b`] says and bit for bit what packing each from W gives; each value of W is read
/// and rounded once.
pub(crate) fn pack_b_both(
    w: &[f32],
    k: usize,
    n: usize,
    place: impl Fn(usize) -> usize,
    b: &mut [u16],
    bt: &mut [u16],
) {
    assert!(
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw"),
        "packing needs AVX-512F and BW (every CPU a bf16 GEMM runs on has them)"
    );
    assert!(
        k.is_multiple_of(BLOCK) && n.is_multiple_of(BLOCK),
        "a {k}×{n} W in whole blocks"
    );
    assert!(w.len() == k * n && b.len() == packed_b_len(k, n) && bt.len() == packed_b_len(n, k));
    // the threads write Wᵀ's tiles where `place` says: checked to be a permutation, so that no two
    // row blocks of W land on one tile
    let placed: Vec<usize> = (0..k / TN).map(&place).collect();
    let mut seen = vec![false; k / TN];
    for &t in &placed {
        assert!(
            t < k / TN && !std::mem::replace(&mut seen[t], true),
            "place is not a permutation"
        );
    }
    let (kts, bs, bts) = (k / TK, Shared(b.as_mut_ptr()), Shared(bt.as_mut_ptr()));
    let parts = split(kts, 1, crate::par::threads().clamp(1, kts));
    crate::par::scatter(parts, |_, kts_part| {
        let (bs, bts) = (bs, bts);
        for kt in kts_part {
            // SAFETY: AVX-512F and BW are there (a bf16 GEMM's caller); rows 32·kt.. of W lie in w
            // (k·n values, asserted); the tiles written, b's (·, kt) and bt's (placed[2kt + h], ·),
            // lie in b and bt (their lengths asserted) and belong to this kt alone (a permutation)
            unsafe {
                pack_rows32_both(
                    w.as_ptr().add(kt * TK * n),
                    n,
                    kts,
                    [placed[2 * kt], placed[2 * kt + 1]],
                    bs.0.add(kt * TILE),
                    bts.0,
                )
            };
        }
    });
}

/// [`pack_b_both`] for one run of 32 rows of W (`rows`, `n` values each): their tiles of b from `b0`
/// (tile nt at nt·kts tiles further), and Wᵀ's two column tiles of them, placed at `placed`.
///
/// # Safety
/// AVX-512F and AVX512BW; 32 rows of n readable f32 at `rows`; the tiles written inside `b0`'s and
/// `bt`'s buffers.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows32_both(rows: *const f32, n: usize, kts: usize, placed: [usize; 2], b0: *mut u16, bt: *mut u16) {
    use std::arch::x86_64::*;
    let bt_kts = n / TK;
    for u in 0..n / BLOCK {
        for (h, &nt) in placed.iter().enumerate() {
            // rows 16h.. of the run, columns 32u..: b's two tiles get rows 8h.. (a pair of W's rows
            // each), Wᵀ's tile its 16 rows (a row of W's 32 values as 16 pairs each, transposed)
            let mut g = [_mm512_setzero_si512(); 16];
            for r in 0..TM / 2 {
                let p0 = rows.wrapping_add((16 * h + 2 * r) * n + BLOCK * u);
                let p1 = p0.wrapping_add(n);
                // the next run's same two rows (32 rows further), so that they arrive in time:
                // the packing ran 15% faster (a prefetch computes no address it reads)
                for p in [p0, p1] {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(TK * n) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(TK * n + TN) as *const i8);
                }
                // SAFETY: 32 values of each row at column 32u (the caller's contract)
                let (a0, a1, c0, c1) = unsafe {
                    (
                        bf16x16(_mm512_loadu_ps(p0)),
                        bf16x16(_mm512_loadu_ps(p0.add(TN))),
                        bf16x16(_mm512_loadu_ps(p1)),
                        bf16x16(_mm512_loadu_ps(p1.add(TN))),
                    )
                };
                let row = (8 * h + r) * TK;
                // SAFETY: tiles 2u and 2u + 1 of this run, inside b (the caller's contract)
                unsafe {
                    let t0 = b0.add(2 * u * kts * TILE + row);
                    let t1 = b0.add((2 * u + 1) * kts * TILE + row);
                    _mm512_storeu_si512(t0 as *mut __m512i, _mm512_or_si512(a0, _mm512_slli_epi32::<16>(c0)));
                    _mm512_storeu_si512(t1 as *mut __m512i, _mm512_or_si512(a1, _mm512_slli_epi32::<16>(c1)));
                }
                let pairs = |lo, hi| {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)),
                        _mm512_cvtepi32_epi16(hi),
                    )
                };
                g[2 * r] = pairs(a0, a1);
                g[2 * r + 1] = pairs(c0, c1);
            }
            let tile = bt.wrapping_add((nt * bt_kts + u) * TILE);
            for (q, row) in transpose16(g).iter().enumerate() {
                // SAFETY: Wᵀ's tile (nt, u), inside bt (the caller's contract), its rows on cache
                // lines where bt starts on one (else stored plainly)
                unsafe {
                    let at = tile.add(q * TK) as *mut __m512i;
                    if (at as usize).is_multiple_of(LINE) {
                        // not read until the backward: written without reading its lines first
                        _mm512_stream_si512(at, *row);
                    } else {
                        _mm512_storeu_si512(at, *row);
                    }
                }
            }
        }
    }
    // the streamed stores ordered before anything this thread does next (the parallel loop's end
    // publishes them to the others)
    _mm_sfence();
}

/// Packs all of A into rows of tiles, tile (mt, kt) at `(mt*kts + kt)*TILE`.
fn pack_a(m: usize, k: usize, src: &impl Source, kts: usize, out: &mut [u16]) {
    crate::par::par_blocks(out, kts * TILE, kts * TILE, |mt0, rows| {
        for (dm, row) in rows.chunks_mut(kts * TILE).enumerate() {
            for (kt, tile) in row.chunks_mut(TILE).enumerate() {
                pack_a_tile(m, k, src, mt0 + dm, kt, tile);
            }
        }
    });
}

/// Packs all of B into columns of tiles, tile (nt, kt) at `(nt*kts + kt)*TILE`.
fn pack_b(k: usize, n: usize, src: &impl Source, kts: usize, out: &mut [u16]) {
    crate::par::par_blocks(out, kts * TILE, kts * TILE, |nt0, cols| {
        let nts = cols.len() / (kts * TILE);
        // K outermost: the rows of a row-major B are read in order
        for kt in 0..kts {
            for dn in 0..nts {
                pack_b_tile(k, n, src, nt0 + dn, kt, &mut cols[(dn * kts + kt) * TILE..][..TILE]);
            }
        }
    });
}

/// The palette-1 tile configuration: every tile register 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Configures this thread's eight tile registers (16 rows × 64 bytes each).
///
/// # Safety
/// [`supported`] returned true.
unsafe fn configure_tiles() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = TM as u8;
    }
    // SAFETY: the configuration is valid for palette 1; the CPU has AMX (the caller's contract)
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly)) };
}

/// Gives the tile registers back (their state is large: the OS saves it only while in use).
fn release_tiles() {
    // SAFETY: TILERELEASE is valid whether or not tiles are configured, on a CPU with AMX
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// This thread's tiles, configured while it lives and released when it drops (a panic included).
struct Tiles;

impl Tiles {
    /// # Safety
    /// AMX is supported ([`amx_supported`]).
    unsafe fn configure() -> Tiles {
        // SAFETY: the caller's contract
        unsafe { configure_tiles() };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        release_tiles();
    }
}

/// C block (32×32 f32 at `c`, rows `ldc` bytes apart) = (C if `load` else 0) + A·B over `kts` K tiles:
/// A's two row tiles start at `a` and `a + a_next`, B's two column tiles at `b` and `b + b_next`
/// (bf16 elements), each next K tile 1 KiB further.
///
/// # Safety
/// Tiles configured on this thread; every address inside the packed buffers and the C block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: *const u16,
    a_next: usize,
    b: *const u16,
    b_next: usize,
    kts: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    use std::arch::asm;
    let c2 = c.wrapping_byte_add(16 * ldc);
    // SAFETY (every asm block): the tiles are configured and the addresses lie inside the C block and
    // the packed tiles (the caller's contract)
    unsafe {
        if load {
            asm!(
                "tileloadd tmm0, [{c} + {s}*1]",
                "tileloadd tmm1, [{c} + {s}*1 + 64]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c2} + {s}*1 + 64]",
                c = in(reg) c, c2 = in(reg) c2, s = in(reg) ldc, options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let (mut a0, mut b0) = (a, b);
        for _ in 0..kts {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, b0 = in(reg) b0, a1 = in(reg) a0.add(a_next), b1 = in(reg) b0.add(b_next),
                s = in(reg) 64usize, options(nostack, readonly)
            );
            a0 = a0.add(TILE);
            b0 = b0.add(TILE);
        }
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c} + {s}*1 + 64], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c2} + {s}*1 + 64], tmm3",
            c = in(reg) c, c2 = in(reg) c2, s = in(reg) ldc, options(nostack)
        );
    }
}

/// As [`block`], with AVX512_BF16 instead of tiles: the C block as four 16×16 quarters
/// ([`quarter_avx512`]).
///
/// # Safety
/// The CPU has AVX512_BF16 and AVX512BW; every address inside the packed buffers and the C block.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512(
    a: *const u16,
    a_next: usize,
    b: *const u16,
    b_next: usize,
    kts: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    for q in 0..4 {
        let (ai, bj) = (q / 2, q % 2);
        // SAFETY: the caller's contract
        unsafe {
            let cq = c.byte_add(ai * TM * ldc).add(bj * TN);
            let (a, b) = (a.add(ai * a_next), b.add(bj * b_next));
            quarter_avx512((a, TILE), (b, TILE), kts * TK / 2, cq, ldc, load, false);
        }
    }
}

/// A 16×16 C quarter (at `c`, rows `ldc` bytes apart) = (C if `load` else 0) + A·B over the first
/// `pairs` pairs of K: A's row tile at `a.0`, B's column tile at `b.0`, each next K tile `a.1`
/// (`b.1`) u16 further (the pairs past `pairs` in the last tile are not read); where `stream`, C is
/// stored past the caches (non-temporal stores: its lines are not read first). In 16 registers, every product
/// `VDPBF16PS` of a B tile row (16 pairs) and an A row's pair broadcast.
///
/// The pair is broadcast by the instruction itself (`{1to16}` on its memory operand), written as
/// inline assembly: left to the compiler, the broadcast was a separate `VBROADCASTSS`, and on an AMD
/// Zen 4 that ran the kernel at 73% of `VDPBF16PS`'s rate instead of 98% (docs/BENCHMARKS.md).
///
/// # Safety
/// The CPU has AVX512_BF16 and AVX512BW; the tiles' first `pairs` pairs and the quarter are inside
/// their buffers; C's rows on cache lines where `stream`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn quarter_avx512(
    (a, a_ks): (*const u16, usize),
    (b, b_ks): (*const u16, usize),
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
    stream: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY (the whole body): the caller's contract
    unsafe {
        let mut acc = [_mm512_setzero_ps(); TM];
        if load {
            for (i, r) in acc.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(c.byte_add(i * ldc));
            }
        }
        // the assembly below spells out a tile's 16 rows of 64 bytes
        const _: () = assert!(TM == 16 && TK * 2 == 64);
        for kt in 0..pairs.div_ceil(TK / 2) {
            let (ta, tb) = (a.add(kt * a_ks), b.add(kt * b_ks));
            for r in 0..(pairs - kt * TK / 2).min(TK / 2) {
                let bv = _mm512_loadu_ps(tb.add(r * TK) as *const f32);
                // row i's pair r of the A tile is 4·r bytes into its 64-byte row
                let pa = ta.add(2 * r);
                std::arch::asm!(
                    "vdpbf16ps {c0}, {b}, dword ptr [{p}]{{1to16}}",
                    "vdpbf16ps {c1}, {b}, dword ptr [{p} + 64]{{1to16}}",
                    "vdpbf16ps {c2}, {b}, dword ptr [{p} + 128]{{1to16}}",
                    "vdpbf16ps {c3}, {b}, dword ptr [{p} + 192]{{1to16}}",
                    "vdpbf16ps {c4}, {b}, dword ptr [{p} + 256]{{1to16}}",
                    "vdpbf16ps {c5}, {b}, dword ptr [{p} + 320]{{1to16}}",
                    "vdpbf16ps {c6}, {b}, dword ptr [{p} + 384]{{1to16}}",
                    "vdpbf16ps {c7}, {b}, dword ptr [{p} + 448]{{1to16}}",
                    "vdpbf16ps {c8}, {b}, dword ptr [{p} + 512]{{1to16}}",
                    "vdpbf16ps {c9}, {b}, dword ptr [{p} + 576]{{1to16}}",
                    "vdpbf16ps {c10}, {b}, dword ptr [{p} + 640]{{1to16}}",
                    "vdpbf16ps {c11}, {b}, dword ptr [{p} + 704]{{1to16}}",
                    "vdpbf16ps {c12}, {b}, dword ptr [{p} + 768]{{1to16}}",
                    "vdpbf16ps {c13}, {b}, dword ptr [{p} + 832]{{1to16}}",
                    "vdpbf16ps {c14}, {b}, dword ptr [{p} + 896]{{1to16}}",
                    "vdpbf16ps {c15}, {b}, dword ptr [{p} + 960]{{1to16}}",
                    c0 = inout(zmm_reg) acc[0],
                    c1 = inout(zmm_reg) acc[1],
                    c2 = inout(zmm_reg) acc[2],
                    c3 = inout(zmm_reg) acc[3],
                    c4 = inout(zmm_reg) acc[4],
                    c5 = inout(zmm_reg) acc[5],
                    c6 = inout(zmm_reg) acc[6],
                    c7 = inout(zmm_reg) acc[7],
                    c8 = inout(zmm_reg) acc[8],
                    c9 = inout(zmm_reg) acc[9],
                    c10 = inout(zmm_reg) acc[10],
                    c11 = inout(zmm_reg) acc[11],
                    c12 = inout(zmm_reg) acc[12],
                    c13 = inout(zmm_reg) acc[13],
                    c14 = inout(zmm_reg) acc[14],
                    c15 = inout(zmm_reg) acc[15],
                    b = in(zmm_reg) bv,
                    p = in(reg) pa,
                    options(pure, readonly, nostack, preserves_flags)
                );
            }
        }
        for (i, r) in acc.iter().enumerate() {
            if stream {
                _mm512_stream_ps(c.byte_add(i * ldc), *r);
            } else {
                _mm512_storeu_ps(c.byte_add(i * ldc), *r);
            }
        }
    }
}

/// C = A·B on the AVX512_BF16 kernel, for operands already packed, on one thread: products of many
/// small GEMMs, each on its own thread (a convolution through the Fourier transform: one a
/// frequency).
///
/// A has `m_tiles` row tiles and B `n_tiles` column tiles, each `kts` K tiles deep, summed over the
/// first `pairs` pairs of K. An operand (pointer, step) has its tiles `step` u16 apart: row tile t's
/// K tile kt at `a.0 + (t·kts + kt)·a.1`, column tile t's at `b.0 + (t·kts + kt)·b.1` (the layout
/// [`pack_a`] and [`pack_b`] write where the step is one tile; a larger step interleaves the tiles
/// of several products). C: quarter (row tile i, column tile j) at `c.0 + 16·i·c.1 + j·c.2`, rows
/// `c.1` f32 apart, written past the caches, not read (a product read again only after all the
/// others, from memory). Each column tile of B is used for all of A's rows while it is in L1.
///
/// # Safety
/// The CPU runs [`Bf16Gemm::Avx512Bf16`]; every tile and C row named above lies inside its buffer
/// (C's on cache lines: asserted); C aliases neither operand.
pub(crate) unsafe fn tiles_product(
    a: (*const u16, usize),
    m_tiles: usize,
    b: (*const u16, usize),
    n_tiles: usize,
    (kts, pairs): (usize, usize),
    c: (*mut f32, usize, usize),
) {
    assert!(pairs <= kts * TK / 2, "{pairs} pairs in {kts} K tiles");
    assert!(
        (c.0 as usize).is_multiple_of(LINE) && c.1.is_multiple_of(TN) && c.2.is_multiple_of(TN),
        "C's quarters' rows on cache lines"
    );
    for nt in 0..n_tiles {
        for mt in 0..m_tiles {
            // SAFETY: the caller's contract
            unsafe {
                let cq = c.0.add(mt * TM * c.1 + nt * c.2);
                let (at, bt) = (a.0.add(mt * kts * a.1), b.0.add(nt * kts * b.1));
                quarter_avx512((at, a.1), (bt, b.1), pairs, cq, c.1 * 4, false, true);
            }
        }
    }
    // the streamed stores ordered before anything this thread does next (the threads' join
    // publishes them)
    // SAFETY: SSE is part of x86-64
    unsafe { std::arch::x86_64::_mm_sfence() };
}

/// `dst` = the 16×16 transpose of `src`'s pairs (pair j of row p out is pair p of row j in): a packed
/// B tile of a k×n operand as the tile of its n×k transpose, pairs kept whole (a complex value's
/// real and imaginary parts).
///
/// # Safety
/// AVX-512F; a tile (`TILE` u16) readable at `src` and writable at `dst`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_tile(src: *const u16, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract
    unsafe {
        let rows: [__m512i; 16] = std::array::from_fn(|p| _mm512_loadu_si512(src.add(p * TK) as *const __m512i));
        for (p, r) in transpose16(rows).iter().enumerate() {
            _mm512_storeu_si512(dst.add(p * TK) as *mut __m512i, *r);
        }
    }
}

/// 16 pairs (`lo[j]`, `hi[j]`) rounded to bf16 as the packing rounds them, pair j in 32-bit lane j
/// (a row of a packed tile: complex values as (real, imaginary) pairs).
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn bf16_pairs(lo: std::arch::x86_64::__m512, hi: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_or_si512(bf16x16(lo), _mm512_slli_epi32::<16>(bf16x16(hi)))
}

/// Bytes in a cache line: where the packed tiles and the C blocks the kernel loads and stores start.
const LINE: usize = 64;

/// A C block in the kernel's layout, on its own cache lines.
#[repr(C, align(64))]
struct EdgeBlock([f32; BLOCK * BLOCK]);

/// The packed operands and each thread's packing space, kept between calls (so neither is zeroed
/// by the system again each call): at batch 50 the primary conv's weights, 10 MiB, and a few MiB per
/// thread.
static PACKED: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Where a GEMM's product goes.
#[derive(Clone, Copy)]
pub(crate) enum Out<'s> {
    /// C (m×n, rows `rsc` apart) = A·B + beta·C; with beta = 0, C is not read.
    Rows { beta: f32 },
    /// C (m×n, rows `rsc` apart) = A·B + bias (added to every row), then max(·, 0) where `relu`,
    /// each block finished while it is in cache; C is not read. A layer's forward in one pass over
    /// its output.
    Affine { bias: &'s [f32], relu: bool },
    /// C (n×m, rows `rsc` apart) += (A·B)ᵀ, or = where not `add` (C not read), each block added or
    /// stored as it is done: a weight gradient that is computed transposed, without a buffer for the
    /// transpose.
    Transposed { add: bool },
    /// Each block of A·B handed to a sink as it is done (all of K in one pass): a product that is not
    /// kept as a matrix, such as a convolution's patch gradient added into the image gradient.
    Sink(&'s dyn BlockSink),
}

/// Takes the finished blocks of a GEMM's product ([`Out::Sink`]), from several threads at once.
///
/// # Safety
/// `add` writes only memory that no one else reads or writes during the GEMM, and calls for blocks in
/// different column groups (`n_group` blocks of 32 columns each: columns `32·n_group·g` on) or with
/// rows in different row groups (`m_group` rows each) write disjoint parts of it: the threads split
/// the work along these groups.
pub(crate) unsafe trait BlockSink: Sync {
    /// Row group size, in rows (at least 1).
    fn m_group(&self) -> usize;
    /// Column group size, in blocks of 32 columns (at least 1).
    fn n_group(&self) -> usize;
    /// Adds rows `rows` (within i0..i0+32) of the block at row i0, columns j0..j0+nj, held in `blk`
    /// (32×32, row-major, row i0 first).
    fn add(&self, i0: usize, rows: std::ops::Range<usize>, j0: usize, nj: usize, blk: &[f32; BLOCK * BLOCK]);
}

/// How a thread gets its A tiles.
#[derive(Clone, Copy, PartialEq, Debug)]
enum APack {
    /// Packed whole before the threads start.
    Whole,
    /// Each `MG_BLOCKS` block rows at once, all of K (K in one pass; reused across N's groups).
    Group,
    /// Each block row's pass of K just before its blocks (N in one group: used once).
    Strip,
}

/// A thread's share of C: rows (a range of whole blocks, except where a sink's row groups cut one)
/// and a range of column blocks.
#[derive(Clone, Debug)]
struct Share {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// Splits 0..n into `parts` ranges at multiples of `unit` (as even as the units allow).
fn split(n: usize, unit: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let units = n.div_ceil(unit);
    (0..parts)
        .map(|p| (p * units / parts * unit).min(n)..((p + 1) * units / parts * unit).min(n))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The groups of up to `NG_BLOCKS` column blocks of `cols`, none across a multiple of `seg`.
fn column_groups(cols: &std::ops::Range<usize>, seg: usize) -> Vec<(usize, usize)> {
    let mut groups = vec![];
    let mut s0 = cols.start;
    while s0 < cols.end {
        let s1 = ((s0 / seg + 1) * seg).min(cols.end);
        groups.extend((s0..s1).step_by(NG_BLOCKS).map(|g| (g, (g + NG_BLOCKS).min(s1))));
        s0 = s1;
    }
    groups
}

/// A (m×k) · B (k×n) into C as `out` says, on `kernel`, A and B rounded to bf16, f32 sums, both read
/// from their sources.
///
/// How the operands are packed, by shape: where B is at least four times wider than A is tall (a
/// convolution's input and weight gradients), A is packed whole up front, the threads split N and
/// each packs its B tiles `NG_BLOCKS` blocks wide just before using them for all of M; else the
/// threads split M and B is packed whole up front, A as it is reached: each block row's pass of K
/// where N is one group (a convolution's forward), `MG_BLOCKS` block rows at a time where K takes
/// one pass, else whole up front.
///
/// # Safety
/// `kernel` is supported; C holds m rows of n values (n of m for [`Out::Transposed { add: true }`]), `rsc`
/// apart, and aliases neither source (for [`Out::Sink`], the sink's contract).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_from(
    kernel: Bf16Gemm,
    m: usize,
    k: usize,
    n: usize,
    a: &impl Source,
    b: &impl Source,
    out: Out<'_>,
    c: *mut f32,
    rsc: isize,
) -> Result<()> {
    let threads = if m * n * k < 1 << 22 {
        1
    } else {
        crate::par::threads().max(1)
    };
    // SAFETY: the caller's contract
    unsafe { gemm_on(threads, kernel, m, k, n, a, b, out, c, rsc) }
}

/// [`gemm_from`] on `threads` threads (at most).
///
/// # Safety
/// As [`gemm_from`]'s.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on(
    threads: usize,
    kernel: Bf16Gemm,
    m: usize,
    k: usize,
    n: usize,
    a: &impl Source,
    b: &impl Source,
    out: Out<'_>,
    c: *mut f32,
    rsc: isize,
) -> Result<()> {
    let one_pass = !matches!(out, Out::Rows { .. } | Out::Affine { .. });
    if let Out::Affine { bias, .. } = out {
        assert!(bias.len() >= n, "a bias of {} values for {n} columns", bias.len());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 && one_pass {
        if let Out::Transposed { add: false } = out {
            // an empty product written: zeros
            for j in 0..n {
                // SAFETY: row j of C holds m values (the caller's contract)
                unsafe { std::slice::from_raw_parts_mut(c.wrapping_offset(j as isize * rsc), m).fill(0.0) };
            }
        }
        return Ok(());
    }
    let beta = match out {
        Out::Rows { beta } => beta,
        Out::Affine { .. } => 0.0,
        _ => 1.0,
    };
    // C's rows scaled first where beta is neither 0 nor 1 (then the tiles add onto them)
    let row = |i: usize| c.wrapping_offset(i as isize * rsc);
    if beta != 0.0 && beta != 1.0 || k == 0 {
        for i in 0..m {
            // SAFETY: row i of C is in bounds (the caller's contract)
            let r = unsafe { std::slice::from_raw_parts_mut(row(i), n) };
            match out {
                // an empty product: the bias, activated
                Out::Affine { bias, relu } => r
                    .iter_mut()
                    .zip(bias)
                    .for_each(|(v, b)| *v = if relu { b.max(0.0) } else { *b }),
                _ => r
                    .iter_mut()
                    .for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta }),
            }
        }
        if k == 0 {
            return Ok(());
        }
    }
    let zero_c = beta == 0.0;
    let (mb, nb, kts) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK), k.div_ceil(TK));
    // a transposed-add product (a weight gradient: K the batch's rows, thousands) over passes of
    // `KC_ADD` tiles, each thread's blocks of a column group kept in its own buffer between passes,
    // where they fit `ADD_BLOCKS_MAX`: one pass read its A and B strips (114 KiB each at the primary
    // conv's shape) from L2 for every block
    let threads = threads.max(1);
    let stream_b = n >= 4 * m && nb >= threads;
    let add_passes = matches!(out, Out::Transposed { .. })
        && stream_b
        && kts > KC_ADD
        && mb * NG_BLOCKS * BLOCK * BLOCK * 4 <= ADD_BLOCKS_MAX;
    let kc_step = if add_passes {
        KC_ADD
    } else if one_pass {
        kts
    } else {
        KC_TILES
    };
    let shares: Vec<Share> = match out {
        Out::Sink(sink) => {
            // column groups first, then row groups (each thread a group's rectangle)
            let (mg, ng) = (sink.m_group().max(1), sink.n_group().max(1));
            let cols = split(nb, ng, threads.min(nb.div_ceil(ng)));
            let rows = split(m, mg, (threads / cols.len()).clamp(1, m.div_ceil(mg)));
            cols.iter()
                .flat_map(|c| {
                    rows.iter().map(|r| Share {
                        rows: r.clone(),
                        cols: c.clone(),
                    })
                })
                .collect()
        }
        _ if stream_b => split(nb, 1, threads)
            .into_iter()
            .map(|cols| Share { rows: 0..m, cols })
            .collect(),
        _ if mb >= 4 * threads || mb >= nb => split(m, BLOCK, threads.min(mb))
            .into_iter()
            .map(|rows| Share { rows, cols: 0..nb })
            .collect(),
        _ => split(nb, 1, threads.min(nb))
            .into_iter()
            .map(|cols| Share { rows: 0..m, cols })
            .collect(),
    };
    // a sink's column groups are stepped through from their own starts, so the blocks reach each
    // element of its output in one order whatever the thread count
    let n_seg = match out {
        Out::Sink(sink) => sink.n_group().max(1),
        _ => nb,
    };
    let split_m = shares.iter().all(|s| s.cols == (0..nb)) && shares.len() > 1;
    let sink = matches!(out, Out::Sink(_));
    // B packed before the call, else each thread packs its own B columns just before using them (in
    // cache, never written whole) wherever every thread spans all of M
    let pre_b = b.packed_b(k, n);
    let b_panels = pre_b.is_none() && (stream_b || sink && shares.iter().all(|s| s.rows == (0..m)));
    // a sink's blocks add onto shared elements: A whole, so that every thread visits its blocks
    // column group by column group, each block row in turn, as one thread would
    let a_pack = if !split_m && shares.len() > 1 || b_panels || sink {
        APack::Whole
    } else if nb <= NG_BLOCKS {
        APack::Strip
    } else if kts <= KC_TILES {
        APack::Group
    } else {
        APack::Whole
    };
    // the packed buffer: whole operands first, then each thread's own space
    let kc_max = kc_step.min(kts);
    let a_len = if a_pack == APack::Whole { mb * 2 * kts * TILE } else { 0 };
    let b_len = if b_panels || pre_b.is_some() {
        0
    } else {
        nb * 2 * kts * TILE
    };
    let a_own_len = match a_pack {
        APack::Whole => 0,
        APack::Group => MG_BLOCKS * 2 * kts * TILE,
        APack::Strip => 2 * kc_max * TILE,
    };
    let own_len = a_own_len + if b_panels { NG_BLOCKS * 2 * kc_max * TILE } else { 0 };
    let total = a_len + b_len + shares.len() * own_len;
    let mut packed = PACKED.lock().unwrap_or_else(|e| e.into_inner());
    // room to start on a cache line: a tile row that straddles two lines costs two of the loads the
    // kernel waits on (the GEMMs ran a third slower with the space 48 bytes past a line)
    let room = total + LINE / 2;
    if packed.len() < room {
        let more = room - packed.len();
        packed.try_reserve_exact(more).map_err(|_| {
            Error::msg(format!(
                "out of memory: cannot allocate {} MiB for the bf16 GEMM's packed operands",
                (room * 2) >> 20
            ))
        })?;
        packed.resize(room, 0);
    }
    let start = packed.as_ptr().align_offset(LINE);
    assert!(start + total <= packed.len(), "u16 storage is 2-byte aligned");
    let (whole, own) = packed[start..start + total].split_at_mut(a_len + b_len);
    assert_eq!(
        whole.as_ptr() as usize % LINE,
        0,
        "the packed tiles start on a cache line"
    );
    let (pa, pb) = whole.split_at_mut(a_len);
    if !b_panels && pre_b.is_none() {
        pack_b(k, n, b, kts, pb);
    }
    if a_pack == APack::Whole {
        pack_a(m, k, a, kts, pa);
    }
    // the kernel only reads B's tiles: a pre-packed B's pointer is never written through
    let pb = pre_b.map_or(pb.as_mut_ptr(), |p| p as *mut u16);
    let (pa, pb, cs) = (Shared(pa.as_mut_ptr()), Shared(pb), Shared(c));
    // a large affine output (conv1's, 20 MB at batch 50) written without reading its lines first:
    // it is not read again before it leaves the caches; C rows on cache lines
    let stream_c = matches!(out, Out::Affine { .. })
        && m * n * 4 >= STREAM_MIN
        && (c as usize).is_multiple_of(LINE)
        && (rsc as usize * 4).is_multiple_of(LINE);
    let run = |share: &Share, own: &mut [u16]| {
        let (pa, pb, cs) = (pa, pb, cs);
        let (a_own, b_own) = own.split_at_mut(a_own_len);
        let blocks_m = share.rows.start / BLOCK..share.rows.end.div_ceil(BLOCK);
        let mg_step = if a_pack == APack::Group {
            MG_BLOCKS
        } else {
            blocks_m.len()
        };
        let mut edge = EdgeBlock([0f32; BLOCK * BLOCK]);
        let edge = &mut edge.0;
        let mut kept: Vec<EdgeBlock> = if add_passes {
            (0..blocks_m.len() * NG_BLOCKS)
                .map(|_| EdgeBlock([0f32; BLOCK * BLOCK]))
                .collect()
        } else {
            vec![]
        };
        // SAFETY: tiles exist (the caller's contract); every block below lies inside the packed
        // buffers and inside C (edge blocks go through `edge`), and this thread writes only the C
        // blocks of its own share (a sink's groups keep shares apart: its contract)
        unsafe {
            let _tiles = (kernel == Bf16Gemm::Amx).then(|| Tiles::configure());
            let block = |ap, an, bp, bn, kn, c, ldc, load| {
                if kernel == Bf16Gemm::Amx {
                    block(ap, an, bp, bn, kn, c, ldc, load)
                } else {
                    block_avx512(ap, an, bp, bn, kn, c, ldc, load)
                }
            };
            for mg in blocks_m.clone().step_by(mg_step) {
                let mg_end = (mg + mg_step).min(blocks_m.end);
                if a_pack == APack::Group {
                    for (d, row) in a_own.chunks_mut(kts * TILE).take(2 * (mg_end - mg)).enumerate() {
                        for (kt, tile) in row.chunks_mut(TILE).enumerate() {
                            pack_a_tile(m, k, a, 2 * mg + d, kt, tile);
                        }
                    }
                }
                for (ng, ng_end) in column_groups(&share.cols, n_seg) {
                    for kc in (0..kts).step_by(kc_step) {
                        let kn = kc_step.min(kts - kc);
                        let load = kc > 0 || !zero_c;
                        if b_panels {
                            // K outermost: the rows of a row-major B are read in order
                            for kt in 0..kn {
                                for nt in (0..2 * (ng_end - ng)).step_by(2) {
                                    let (first, second) = b_own.split_at_mut((nt + 1) * kn * TILE);
                                    let t0 = &mut first[(nt * kn + kt) * TILE..][..TILE];
                                    let t1 = &mut second[kt * TILE..][..TILE];
                                    pack_b_tiles2(k, n, b, 2 * ng + nt, kc + kt, t0, t1);
                                }
                            }
                        }
                        for bi in mg..mg_end {
                            let (ap, a_next) = match a_pack {
                                APack::Whole => ((pa.0 as *const u16).add((bi * 2 * kts + kc) * TILE), kts * TILE),
                                APack::Group => (a_own.as_ptr().add(((bi - mg) * 2 * kts + kc) * TILE), kts * TILE),
                                APack::Strip => {
                                    for r in 0..2 {
                                        for kt in 0..kn {
                                            let tile = &mut a_own[(r * kn + kt) * TILE..][..TILE];
                                            pack_a_tile(m, k, a, 2 * bi + r, kc + kt, tile);
                                        }
                                    }
                                    (a_own.as_ptr(), kn * TILE)
                                }
                            };
                            for bj in ng..ng_end {
                                let (bp, b_next) = if b_panels {
                                    (b_own.as_ptr().add(2 * (bj - ng) * kn * TILE), kn * TILE)
                                } else {
                                    ((pb.0 as *const u16).add((bj * 2 * kts + kc) * TILE), kts * TILE)
                                };
                                let (i0, j0) = (bi * BLOCK, bj * BLOCK);
                                let (ni, nj) = ((m - i0).min(BLOCK), (n - j0).min(BLOCK));
                                match out {
                                    Out::Sink(sink) => {
                                        block(ap, a_next, bp, b_next, kn, edge.as_mut_ptr(), BLOCK * 4, false);
                                        let rows = i0.max(share.rows.start)..(i0 + ni).min(share.rows.end);
                                        sink.add(i0, rows, j0, nj, edge);
                                    }
                                    Out::Transposed { add } => {
                                        let blk = if add_passes {
                                            let at = (bi - blocks_m.start) * NG_BLOCKS + (bj - ng);
                                            &mut kept[at].0
                                        } else {
                                            &mut *edge
                                        };
                                        block(ap, a_next, bp, b_next, kn, blk.as_mut_ptr(), BLOCK * 4, kc > 0);
                                        if kc + kn < kts {
                                            continue;
                                        }
                                        let edge = &*blk;
                                        if ni == BLOCK && nj == BLOCK {
                                            let c0 = cs.0.offset(j0 as isize * rsc + i0 as isize);
                                            add_block_transposed(edge, c0, rsc as usize, add);
                                        } else {
                                            for j in 0..nj {
                                                let row = cs.0.offset((j0 + j) as isize * rsc + i0 as isize);
                                                for i in 0..ni {
                                                    let v = edge[i * BLOCK + j];
                                                    *row.add(i) = if add { *row.add(i) + v } else { v };
                                                }
                                            }
                                        }
                                    }
                                    Out::Affine { bias, relu } if ni == BLOCK && nj == BLOCK && kc + kn == kts => {
                                        // the block's last pass: bias and activation while it is in
                                        // cache, each row stored once (from the tiles through a
                                        // block of its own where the product takes one pass)
                                        let c0 = cs.0.offset(i0 as isize * rsc + j0 as isize);
                                        let bias = &bias[j0..j0 + BLOCK];
                                        if load {
                                            block(ap, a_next, bp, b_next, kn, c0, rsc as usize * 4, true);
                                            affine_block(c0, rsc as usize, bias, relu, c0, rsc as usize, false);
                                        } else {
                                            block(ap, a_next, bp, b_next, kn, edge.as_mut_ptr(), BLOCK * 4, false);
                                            affine_block(edge.as_ptr(), BLOCK, bias, relu, c0, rsc as usize, stream_c);
                                        }
                                    }
                                    Out::Rows { .. } | Out::Affine { .. } if ni == BLOCK && nj == BLOCK => {
                                        let c0 = cs.0.offset(i0 as isize * rsc + j0 as isize);
                                        block(ap, a_next, bp, b_next, kn, c0, rsc as usize * 4, load);
                                    }
                                    Out::Rows { .. } | Out::Affine { .. } => {
                                        let c0 = cs.0.offset(i0 as isize * rsc + j0 as isize);
                                        for i in 0..BLOCK {
                                            for j in 0..BLOCK {
                                                edge[i * BLOCK + j] = if load && i < ni && j < nj {
                                                    *c0.offset(i as isize * rsc + j as isize)
                                                } else {
                                                    0.0
                                                };
                                            }
                                        }
                                        block(ap, a_next, bp, b_next, kn, edge.as_mut_ptr(), BLOCK * 4, true);
                                        for i in 0..ni {
                                            for j in 0..nj {
                                                *c0.offset(i as isize * rsc + j as isize) = edge[i * BLOCK + j];
                                            }
                                        }
                                    }
                                }
                                if let Out::Affine { bias, relu } = out
                                    && kc + kn == kts
                                    && (ni < BLOCK || nj < BLOCK)
                                {
                                    // an edge block's last pass: bias and activation while it is in cache
                                    let bias = &bias[j0..j0 + nj];
                                    for i in 0..ni {
                                        let row = cs.0.offset((i0 + i) as isize * rsc + j0 as isize);
                                        let row = std::slice::from_raw_parts_mut(row, nj);
                                        for (v, b) in row.iter_mut().zip(bias) {
                                            let x = *v + b;
                                            *v = if relu { x.max(0.0) } else { x };
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if stream_c {
            // the streamed stores ordered before anything this thread does next (the threads'
            // join publishes them)
            // SAFETY: SSE is part of x86-64
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    };
    let mut owns: Vec<&mut [u16]> = if own_len == 0 {
        shares.iter().map(|_| &mut [][..]).collect()
    } else {
        own.chunks_mut(own_len).collect()
    };
    if shares.len() == 1 {
        run(&shares[0], owns.pop().unwrap_or_default());
    } else {
        crate::par::scatter(shares.iter().zip(owns).collect(), |_, (share, own)| run(share, own));
    }
    Ok(())
}

/// Bytes of an affine output from which its full blocks are written with non-temporal stores.
const STREAM_MIN: usize = 8 << 20;

/// `dst` rows (32 of 32 f32, `ldd` apart) = `src` rows (`lds` apart) + `bias`, then max(·, 0) where
/// `relu` (as the scalar epilogue computes them), streamed past the caches where `stream` (then
/// followed by a store fence).
///
/// # Safety
/// 32 rows of 32 readable f32 at `src`, of 32 writable ones at `dst` (on cache lines where `stream`);
/// `bias` holds 32 values.
#[target_feature(enable = "avx512f")]
unsafe fn affine_block(src: *const f32, lds: usize, bias: &[f32], relu: bool, dst: *mut f32, ldd: usize, stream: bool) {
    use std::arch::x86_64::*;
    assert!(bias.len() >= BLOCK);
    // SAFETY (the whole body): the caller's contract
    unsafe {
        let b = [_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))];
        for i in 0..BLOCK {
            for (h, bh) in b.iter().enumerate() {
                let mut v = _mm512_add_ps(_mm512_loadu_ps(src.add(i * lds + 16 * h)), *bh);
                if relu {
                    v = _mm512_max_ps(v, _mm512_setzero_ps());
                }
                let at = dst.add(i * ldd + 16 * h);
                if stream {
                    _mm512_stream_ps(at, v);
                } else {
                    _mm512_storeu_ps(at, v);
                }
            }
        }
    }
}

/// GFLOP/s of one thread running `kernel`'s 32×32 block over B tiles spread across `b_kib` KiB, one
/// A block reused throughout (as the GEMM reuses it): what the kernel reaches with B in L1, in L2 or
/// in memory (`cargo bench --bench ops` prints it).
#[doc(hidden)]
pub fn kernel_rate(kernel: Bf16Gemm, b_kib: usize) -> f64 {
    assert!(
        kernel.supported(),
        "the {} GEMM on a CPU that cannot run it",
        kernel.flag()
    );
    let kn = 16;
    let blocks = (b_kib * 1024 / (2 * kn * TILE * 2)).max(1);
    // bf16 ones: the sums stay finite however long it runs
    // on cache lines, as the GEMM's packed tiles and C blocks are
    let (a0, b0) = (
        vec![0x3f80u16; 2 * kn * TILE + LINE / 2],
        vec![0x3f80u16; blocks * 2 * kn * TILE + LINE / 2],
    );
    let a = &a0[a0.as_ptr().align_offset(LINE)..];
    let b = &b0[b0.as_ptr().align_offset(LINE)..];
    let mut c = EdgeBlock([0f32; BLOCK * BLOCK]);
    let c = &mut c.0;
    let flops_per_block = (2 * BLOCK * BLOCK * kn * TK) as f64;
    let (mut done, start) = (0usize, std::time::Instant::now());
    // SAFETY: the kernel is supported (asserted); every tile read lies in a and b, the block in c
    unsafe {
        let _tiles = (kernel == Bf16Gemm::Amx).then(|| Tiles::configure());
        while start.elapsed().as_secs_f64() < 0.3 {
            for j in 0..blocks {
                let bp = b.as_ptr().add(j * 2 * kn * TILE);
                if kernel == Bf16Gemm::Amx {
                    block(
                        a.as_ptr(),
                        kn * TILE,
                        bp,
                        kn * TILE,
                        kn,
                        c.as_mut_ptr(),
                        BLOCK * 4,
                        true,
                    );
                } else {
                    block_avx512(
                        a.as_ptr(),
                        kn * TILE,
                        bp,
                        kn * TILE,
                        kn,
                        c.as_mut_ptr(),
                        BLOCK * 4,
                        true,
                    );
                }
            }
            done += blocks;
        }
    }
    done as f64 * flops_per_block / start.elapsed().as_secs_f64() / 1e9
}

/// As [`gemm_from`], on slices: C (m×n, row-major) = A (m×k) · B (k×n) + beta·C, A and B given by
/// (row stride, column stride); the bounds checked as `linalg::gemm` checks them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    kernel: Bf16Gemm,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    beta: f32,
) -> Result<()> {
    assert!(
        kernel.supported(),
        "the {} GEMM on a CPU that cannot run it",
        kernel.flag()
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    assert!(m.checked_mul(n).is_some_and(|mn| c.len() >= mn));
    let (a, b) = (Strided::new(a, (m, k), (rsa, csa)), Strided::new(b, (k, n), (rsb, csb)));
    // SAFETY: the kernel is supported (asserted); the asserts above keep every element read and
    // written inside the slices; C is a &mut, so aliases neither.
    unsafe { gemm_from(kernel, m, k, n, &a, &b, Out::Rows { beta }, c.as_mut_ptr(), n as isize) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::Precision;

    /// CPUID's vendor against the kernel's account of it.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_amd_cpu_is_told_as_linux_tells_it() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo is readable");
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id").and_then(|v| v.split(':').nth(1)))
            .map(str::trim)
            .expect("/proc/cpuinfo names the vendor");
        assert_eq!(amd_cpu(), vendor == "AuthenticAMD", "vendor_id {vendor}");
    }

    #[test]
    fn bf16_bits_round_as_the_reference_does() {
        let mut seed = 99u64;
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x = f32::from_bits((seed >> 32) as u32);
            if x.is_nan() {
                assert!(f32::from_bits((bf16_bits(x) as u32) << 16).is_nan());
            } else {
                assert_eq!(
                    f32::from_bits((bf16_bits(x) as u32) << 16).to_bits(),
                    Precision::Bf16.round(x).to_bits(),
                    "{x:e}"
                );
            }
        }
        assert!(f32::from_bits((bf16_bits(f32::from_bits(0x7f80_0001)) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "rounds up to infinity");
    }

    /// Each bf16 GEMM this CPU runs against f64 sums of the same inputs rounded to bf16, at shapes
    /// and strides the model uses and sizes off the tiles, K in one pass and in several: within
    /// k·2⁻²⁴·Σ|a||b| each element (f32 sums of exact products). A kernel the CPU cannot run must be
    /// refused.
    /// Folds each row group onto one row and each column group's blocks onto that group's 32 columns
    /// (as col2im adds many blocks onto one pixel): the blocks of one row group and one column group
    /// add onto the same 32 elements.
    struct Fold {
        out: *mut f32,
        rows: usize,
        groups: usize,
        m_group: usize,
        n_group: usize,
    }
    // SAFETY: written only through `add`, whose writes the groups keep apart (below)
    unsafe impl Sync for Fold {}
    // SAFETY: out holds rows × 32·groups values; a block's writes go to its rows and its column
    // group's 32 columns
    unsafe impl BlockSink for Fold {
        fn m_group(&self) -> usize {
            self.m_group
        }
        fn n_group(&self) -> usize {
            self.n_group
        }
        fn add(&self, i0: usize, rows: std::ops::Range<usize>, j0: usize, nj: usize, blk: &[f32; BLOCK * BLOCK]) {
            let g = j0 / BLOCK / self.n_group;
            assert!(g < self.groups && rows.end <= self.rows);
            for r in rows {
                let o = r / self.m_group * self.groups * BLOCK + g * BLOCK;
                for j in 0..nj {
                    // SAFETY: inside out (asserted); no other thread writes it (the groups)
                    unsafe { *self.out.add(o + j) += blk[(r - i0) * BLOCK + j] };
                }
            }
        }
    }

    /// The bf16 kernels this CPU runs, or None where it runs none (and then refuses to choose one,
    /// as it must).
    fn kernels_here() -> Option<Vec<Bf16Gemm>> {
        let kernels: Vec<Bf16Gemm> = Bf16Gemm::ALL.iter().copied().filter(|k| k.supported()).collect();
        if kernels.is_empty() {
            assert!(
                Bf16Gemm::choose().is_err(),
                "a bf16 kernel chosen on a CPU that runs none"
            );
            return None;
        }
        Some(kernels)
    }

    /// Values in [-0.5, 0.5) from a seed (a linear congruential generator).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// A sink's sums are the same, bit for bit, on 1, 2 or 3 threads: row groups of 49 rows (blocks
    /// straddle them) and one column group of nine blocks (the threads split the rows), as a conv with
    /// 32 channels and a 3x3 kernel gives its input gradient; then two column groups.
    #[test]
    fn a_sinks_sums_do_not_depend_on_the_thread_count() {
        let Some(kernels) = kernels_here() else {
            return;
        };
        let mut rand = uniform(99);
        let (m, k, n) = (49 * 24, 288, 9 * BLOCK);
        let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
        let (sa, sb) = (Strided::new(&a, (m, k), (k, 1)), Strided::new(&b, (k, n), (n, 1)));
        for kernel in kernels {
            for n_group in [9, 3] {
                let groups = 9 / n_group;
                let run = |threads: usize| {
                    let mut out = vec![0f32; m / 49 * groups * BLOCK];
                    let fold = Fold {
                        out: out.as_mut_ptr(),
                        rows: m,
                        groups,
                        m_group: 49,
                        n_group,
                    };
                    // SAFETY: the kernel is supported; the sink writes only `out`
                    unsafe {
                        gemm_on(
                            threads,
                            kernel,
                            m,
                            k,
                            n,
                            &sa,
                            &sb,
                            Out::Sink(&fold),
                            std::ptr::null_mut(),
                            0,
                        )
                    }
                    .unwrap();
                    out
                };
                let one = run(1);
                assert!(one.iter().any(|&v| v != 0.0));
                for threads in [2, 3] {
                    assert!(
                        run(threads) == one,
                        "{} sink, column groups of {n_group}: {threads} threads sum differently from one",
                        kernel.flag()
                    );
                }
            }
        }
    }

    /// W packed once for both products ([`pack_b_both`]) gives, bit for bit, the tiles of W and of
    /// Wᵀ (its column tiles moved as `place` says) that packing each alone gives, values that round
    /// up, to even, to infinity, NaNs and subnormals among them; [`PackedB`] reads its values back;
    /// and the GEMMs on the packed tiles equal those that pack their own, bit for bit: an affine
    /// product (B packed whole) and a product with B four times wider than A is tall (each thread's
    /// columns packed as it goes) into a sink.
    #[test]
    fn b_packed_once_for_both_products_equals_each_packed_alone() {
        let Some(kernels) = kernels_here() else {
            return;
        };
        let mut rand = uniform(5);
        let (k, n) = (96, 64);
        let mut w: Vec<f32> = (0..k * n).map(|_| rand()).collect();
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
            1e-40,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_8001),
        ];
        for (i, v) in special.iter().enumerate() {
            w[i * 613 % (k * n)] = *v;
        }
        let place = |t: usize| (5 * t + 1) % (k / TN);
        let (mut b, mut bt) = (vec![0u16; packed_b_len(k, n)], vec![7u16; packed_b_len(n, k)]);
        pack_b_both(&w, k, n, place, &mut b, &mut bt);
        let mut want_b = vec![1u16; packed_b_len(k, n)];
        pack_b(k, n, &Strided::new(&w, (k, n), (n, 1)), k / TK, &mut want_b);
        assert!(b == want_b, "W's tiles differ from pack_b's");
        // Wᵀ with its columns where `place` puts them: column c of tile place(t) is row 16t + c of W
        let mut wt = vec![0f32; n * k];
        for t in 0..k / TN {
            for c in 0..TN {
                for r in 0..n {
                    wt[r * k + place(t) * TN + c] = w[(TN * t + c) * n + r];
                }
            }
        }
        let mut want_bt = vec![1u16; packed_b_len(n, k)];
        pack_b(n, k, &Strided::new(&wt, (n, k), (k, 1)), n / TK, &mut want_bt);
        assert!(bt == want_bt, "Wᵀ's tiles differ from pack_b's");
        let packed = PackedB::new(&b, k, n);
        for r in 0..k {
            for c in 0..n {
                let (got, x) = (packed.at(r, c), w[r * n + c]);
                let want = f32::from_bits((bf16_bits(x) as u32) << 16);
                assert!(
                    got.to_bits() == want.to_bits() || x.is_nan() && got.is_nan(),
                    "({r}, {c})"
                );
            }
        }
        // finite values for the products
        for v in w.iter_mut().chain(wt.iter_mut()) {
            if !v.is_finite() || v.abs() > 1.0 {
                *v = 0.25;
            }
        }
        pack_b_both(&w, k, n, place, &mut b, &mut bt);
        let (pb, pbt) = (PackedB::new(&b, k, n), PackedB::new(&bt, n, k));
        let (sb, sbt) = (Strided::new(&w, (k, n), (n, 1)), Strided::new(&wt, (n, k), (k, 1)));
        let (m, m2) = (70, 20);
        let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
        let a2: Vec<f32> = (0..m2 * n).map(|_| rand()).collect();
        let (sa, sa2) = (Strided::new(&a, (m, k), (k, 1)), Strided::new(&a2, (m2, n), (n, 1)));
        let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
        for kernel in kernels {
            let affine = |bsrc: &dyn Fn(&mut [f32])| {
                let mut c = vec![f32::NAN; m * n];
                bsrc(&mut c);
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let out = Out::Affine {
                bias: &bias,
                relu: true,
            };
            // SAFETY (each call): the kernel is supported; C holds m rows of n values
            let own =
                affine(&|c| unsafe { gemm_on(2, kernel, m, k, n, &sa, &sb, out, c.as_mut_ptr(), n as isize) }.unwrap());
            let pre =
                affine(&|c| unsafe { gemm_on(2, kernel, m, k, n, &sa, &pb, out, c.as_mut_ptr(), n as isize) }.unwrap());
            assert!(
                own == pre && own.iter().any(|&v| v != 0),
                "{}: affine on packed W",
                kernel.flag()
            );
            let sink = |bsrc: &dyn Source| {
                let mut out = vec![0f32; m2 * k];
                let fold = Fold {
                    out: out.as_mut_ptr(),
                    rows: m2,
                    groups: k / BLOCK,
                    m_group: 1,
                    n_group: 1,
                };
                // SAFETY: the kernel is supported; the sink writes only `out`
                unsafe {
                    gemm_on(
                        2,
                        kernel,
                        m2,
                        n,
                        k,
                        &sa2,
                        &bsrc,
                        Out::Sink(&fold),
                        std::ptr::null_mut(),
                        0,
                    )
                }
                .unwrap();
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (own, pre) = (sink(&sbt), sink(&pbt));
            assert!(
                own == pre && own.iter().any(|&v| v != 0),
                "{}: sink on packed Wᵀ",
                kernel.flag()
            );
        }
    }

    /// An affine output equals the plain product with the bias added and the ReLU taken after, bit
    /// for bit: whole blocks in one pass (an output of 8 MiB, written with streaming stores), in
    /// several passes of K, and edge blocks; with and without the ReLU.
    #[test]
    fn an_affine_output_is_the_product_plus_bias_then_relu() {
        let kernels = kernels_here().unwrap_or_default();
        let mut rand = uniform(3);
        for (m, k, n) in [(8192, 81, 256), (100, 2100, 64), (70, 300, 50)] {
            let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
            let (sa, sb) = (Strided::new(&a, (m, k), (k, 1)), Strided::new(&b, (k, n), (n, 1)));
            // C on a cache line, as the backend's tensors are
            let mut store = vec![0f32; m * n + 16];
            let off = store.as_ptr().align_offset(LINE);
            for &kernel in &kernels {
                let mut plain = vec![0f32; m * n];
                // SAFETY (both calls): the kernel is supported; C holds m rows of n values
                unsafe {
                    gemm_on(
                        2,
                        kernel,
                        m,
                        k,
                        n,
                        &sa,
                        &sb,
                        Out::Rows { beta: 0.0 },
                        plain.as_mut_ptr(),
                        n as isize,
                    )
                }
                .unwrap();
                for relu in [false, true] {
                    let c = &mut store[off..off + m * n];
                    c.fill(f32::NAN);
                    let out = Out::Affine { bias: &bias, relu };
                    unsafe { gemm_on(2, kernel, m, k, n, &sa, &sb, out, c.as_mut_ptr(), n as isize) }.unwrap();
                    let want = plain.iter().enumerate().map(|(i, v)| {
                        let x = v + bias[i % n];
                        if relu { x.max(0.0) } else { x }
                    });
                    let (mut zeros, what) = (0, format!("{} {m}×{k}×{n} relu {relu}", kernel.flag()));
                    for (i, (got, want)) in c.iter().zip(want).enumerate() {
                        assert_eq!(got.to_bits(), want.to_bits(), "C[{i}], {what}");
                        zeros += (*got == 0.0) as usize;
                    }
                    assert!(zeros < m * n / 4 * 3, "C mostly zero, {what}: the test proves little");
                }
            }
        }
    }

    /// With K = 0 an affine output is its bias, activated.
    #[test]
    fn an_empty_affine_product_is_the_bias() {
        let (a, b) = (Strided::new(&[], (2, 0), (0, 1)), Strided::new(&[], (0, 3), (3, 1)));
        let bias = [-1.0f32, 2.0, 0.5];
        let kernels = kernels_here().unwrap_or_default();
        for kernel in kernels {
            for (relu, want) in [(false, [-1.0, 2.0, 0.5]), (true, [0.0, 2.0, 0.5])] {
                let mut c = [f32::NAN; 6];
                // SAFETY: the kernel is supported; c holds 2 rows of 3 values
                unsafe {
                    gemm_from(
                        kernel,
                        2,
                        0,
                        3,
                        &a,
                        &b,
                        Out::Affine { bias: &bias, relu },
                        c.as_mut_ptr(),
                        3,
                    )
                }
                .unwrap();
                assert_eq!(c, [want, want].concat()[..], "{} relu {relu}", kernel.flag());
            }
        }
    }

    #[test]
    fn bf16_gemms_match_f64_sums_of_rounded_inputs() {
        let mut ran = 0;
        for kernel in Bf16Gemm::ALL {
            if kernel.supported() {
                check_kernel(kernel);
                ran += 1;
            } else {
                let refused =
                    std::panic::catch_unwind(|| gemm(kernel, 1, 1, 1, &[1.0], (1, 1), &[1.0], (1, 1), &mut [0.0], 0.0));
                assert!(
                    refused.is_err(),
                    "the {} GEMM ran on a CPU that cannot run it",
                    kernel.flag()
                );
            }
        }
        eprintln!("{ran} bf16 GEMM(s) run on this CPU");
    }

    fn check_kernel(kernel: Bf16Gemm) {
        let mut seed = 777u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let r = |x: f32| Precision::Bf16.round(x) as f64;
        // (m, k, n, A transposed, B transposed); the last ones are spread over threads
        let shapes = [
            (37, 300, 19, false, false),
            (1, 1, 1, false, false),
            (200, 81, 256, false, false),
            (81, 500, 64, true, false),
            (72, 256, 333, false, true),
            (17, 2048, 33, true, true),
            (300, 700, 70, false, false),
            (64, 1200, 600, true, false),
            (40, 2100, 50, false, false),
            (33, 4200, 20, true, false),
            // B far wider than A is tall: B packed by each thread for its columns
            (40, 300, 1400, false, false),
            (33, 260, 700, true, true),
            // M split, A packed MG_BLOCKS block rows at a time; whole, K in several passes
            (400, 100, 300, true, false),
            (260, 2100, 300, false, false),
        ];
        for &(m, k, n, ta, tb) in &shapes {
            for beta in [0.0f32, 1.0, 0.5] {
                let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rand()).collect();
                let sa = if ta { (1, m) } else { (k, 1) };
                let sb = if tb { (1, k) } else { (n, 1) };
                let mut c: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
                gemm(kernel, m, k, n, &a, sa, &b, sb, &mut c, beta).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (beta as f64 * c0[i * n + j] as f64, 0.0f64);
                        for p in 0..k {
                            let x = r(a[i * sa.0 + p * sa.1]) * r(b[p * sb.0 + j * sb.1]);
                            exact += x;
                            mag += x.abs();
                        }
                        let bound = (k + 2) as f64 * 2f64.powi(-24) * (mag + (beta * c0[i * n + j]).abs() as f64);
                        let err = (c[i * n + j] as f64 - exact).abs();
                        assert!(
                            err <= bound,
                            "{} m{m} k{k} n{n} ta{ta} tb{tb} beta{beta} at ({i},{j}): {} vs {exact} (bound {bound:e})",
                            kernel.flag(),
                            c[i * n + j]
                        );
                    }
                }
                // unrounded inputs would miss by far more than the bound somewhere
                if k >= 32 && beta == 0.0 {
                    let worst = (0..m * n)
                        .map(|e| {
                            let (i, j) = (e / n, e % n);
                            let f: f64 = (0..k)
                                .map(|p| a[i * sa.0 + p * sa.1] as f64 * b[p * sb.0 + j * sb.1] as f64)
                                .sum();
                            (c[e] as f64 - f).abs()
                        })
                        .fold(0.0, f64::max);
                    assert!(worst > 1e-5, "m{m} k{k} n{n}: the result looks unrounded ({worst:e})");
                }
            }
            // the product added transposed into an n×m C whose rows are m + 3 apart
            let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let ld = m + 3;
            let sa = if ta { (1, m) } else { (k, 1) };
            let sb = if tb { (1, k) } else { (n, 1) };
            let d0: Vec<f32> = (0..n * ld).map(|_| rand()).collect();
            let mut d = d0.clone();
            let (sa_, sb_) = (Strided::new(&a, (m, k), sa), Strided::new(&b, (k, n), sb));
            // SAFETY: the kernel is supported; d holds n rows of m values ld apart
            unsafe {
                gemm_from(
                    kernel,
                    m,
                    k,
                    n,
                    &sa_,
                    &sb_,
                    Out::Transposed { add: true },
                    d.as_mut_ptr(),
                    ld as isize,
                )
                .unwrap()
            };
            for j in 0..n {
                for i in 0..ld {
                    let got = d[j * ld + i] as f64;
                    if i >= m {
                        assert_eq!(
                            got,
                            d0[j * ld + i] as f64,
                            "{} transposed: padding at ({j},{i}) written",
                            kernel.flag()
                        );
                        continue;
                    }
                    let (mut exact, mut mag) = (d0[j * ld + i] as f64, 0.0f64);
                    for p in 0..k {
                        let x = r(a[i * sa.0 + p * sa.1]) * r(b[p * sb.0 + j * sb.1]);
                        exact += x;
                        mag += x.abs();
                    }
                    let bound = (k + 2) as f64 * 2f64.powi(-24) * (mag + d0[j * ld + i].abs() as f64);
                    assert!(
                        (got - exact).abs() <= bound,
                        "{} transposed m{m} k{k} n{n} at ({j},{i}): {got} vs {exact}",
                        kernel.flag()
                    );
                }
            }
            // C = A·B + bias, with and without a ReLU, over a C that starts as NaN
            let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
            for relu in [false, true] {
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: the kernel is supported; c holds m rows of n values
                unsafe {
                    gemm_from(
                        kernel,
                        m,
                        k,
                        n,
                        &sa_,
                        &sb_,
                        Out::Affine { bias: &bias, relu },
                        c.as_mut_ptr(),
                        n as isize,
                    )
                    .unwrap()
                };
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (bias[j] as f64, bias[j].abs() as f64);
                        for p in 0..k {
                            let x = r(a[i * sa.0 + p * sa.1]) * r(b[p * sb.0 + j * sb.1]);
                            exact += x;
                            mag += x.abs();
                        }
                        let bound = (k + 2) as f64 * 2f64.powi(-24) * mag;
                        let want = if relu { exact.max(0.0) } else { exact };
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= bound,
                            "{} affine (relu {relu}) m{m} k{k} n{n} at ({i},{j}): {got} vs {want}",
                            kernel.flag()
                        );
                    }
                }
                if relu && m * n >= 64 {
                    assert!(c.contains(&0.0), "m{m} k{k} n{n}: no value was clipped to 0");
                }
            }
        }
    }
}
