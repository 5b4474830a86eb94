//! The fast CPU backend: f32 storage and f32 arithmetic on every core, for training.
//!
//! - Convolutions and dense layers are GEMMs (`matrixmultiply::sgemm`, which picks its FMA, AVX or
//!   SSE2 kernel at run time). A convolution is im2col over chunks of images into one reused
//!   scratch buffer, with the bias loaded into the GEMM's output (beta = 1) and the activation applied
//!   while the chunk is hot. The input gradient is dz·Wᵀ followed by col2im, so the stride-2 conv never
//!   multiplies by the zeros a transposed convolution would stuff between its inputs. Weight gradients
//!   accumulate straight into dW.
//! - Capsule ops (prediction vectors, routing, squash) and Adam are loops over 8-lane blocks, compiled
//!   twice: with AVX2+FMA, used when the CPU has them (checked at run time), and for the baseline.
//! - Work is split over threads by output rows ([`crate::par`]), each sum inside one thread, so results
//!   are bit-identical run to run on one machine.
//!
//! Tested against the f64 reference ([`super::cpu`]) per op and for whole training steps
//! (tests/cpu_fast.rs), at tolerances stated there.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use super::host;
use super::linalg::{col2im_add, gemm, im2col};
use super::{
    Act, AdamGroup, AdamHyper, Backend, CapsShape, ConvShape, DenseShape, NORM_EPS, RoutingSaved, alloc_zeros, check,
    check_adam_group, check_routing,
};
use crate::par::{par_blocks, par_items, par_rows};
use crate::{Error, Result};

/// Largest im2col chunk, in f32 elements (128 MiB).
const CHUNK_ELEMS: usize = 1 << 25;
/// Adam updates parameters in slices of this many values, split over the threads.
const ADAM_SLICE: usize = 1 << 15;
const EPS: f32 = NORM_EPS as f32;

/// The fast CPU backend. Tensors come from a pool of freed buffers keyed by length, so once the first
/// step has run, later steps of the same shapes allocate no tensor ([`FastCpu::fresh_allocations`]
/// counts the allocations made). One scratch buffer (im2col patches, transposed capsule weights) is
/// allocated at the largest size asked for and reused.
#[derive(Debug, Default)]
pub struct FastCpu {
    scratch: Mutex<Vec<f32>>,
    pool: Arc<Mutex<Shelves>>,
}

/// Freed buffers by length.
#[derive(Debug, Default)]
struct Shelves {
    free: HashMap<usize, Vec<Vec<f32>>>,
    /// Bytes held in `free`, at most [`POOL_BYTES`].
    bytes: usize,
    /// Buffers allocated (not taken from the pool) so far.
    fresh: usize,
}

/// The most freed memory the pool keeps; a buffer freed beyond it goes back to the allocator.
const POOL_BYTES: usize = 1 << 30;

/// A tensor of the fast CPU backend: f32 values that go back to the backend's pool when dropped.
#[derive(Debug)]
pub struct PoolBuf {
    data: Vec<f32>,
    pool: Arc<Mutex<Shelves>>,
}

impl Deref for PoolBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

impl<'a> IntoIterator for &'a PoolBuf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.data.iter()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let bytes = data.len() * 4;
        if let Ok(mut p) = self.pool.lock()
            && bytes > 0
            && p.bytes + bytes <= POOL_BYTES
        {
            p.bytes += bytes;
            p.free.entry(data.len()).or_default().push(data);
        }
    }
}

impl FastCpu {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tensors allocated so far (buffers reused from the pool are not counted).
    pub fn fresh_allocations(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).fresh
    }

    /// A buffer of `n` values from the pool (else newly allocated), its contents set by `init`.
    fn take(&self, n: usize, init: impl FnOnce(&mut [f32])) -> Result<PoolBuf> {
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
            None => alloc_zeros(n)?,
        };
        let mut b = PoolBuf {
            data,
            pool: self.pool.clone(),
        };
        init(&mut b);
        Ok(b)
    }

    /// Runs `f` on the first `n` values of the scratch buffer (old contents, not zeros).
    fn with_scratch<R>(&self, n: usize, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < n {
            let more = n - s.len();
            s.try_reserve_exact(more).map_err(|_| {
                Error::msg(format!(
                    "out of memory: cannot allocate {} MiB of scratch",
                    (n * 4) >> 20
                ))
            })?;
            s.resize(n, 0.0);
        }
        Ok(f(&mut s[..n]))
    }
}

/// Images per im2col chunk for `batch` images of `elems` patch values each: as few chunks as
/// [`CHUNK_ELEMS`] allows, of equal size (a small last chunk would make an inefficient GEMM).
fn images_per_chunk(batch: usize, elems: usize) -> usize {
    let most = (CHUNK_ELEMS / elems.max(1)).max(1);
    batch.div_ceil(batch.div_ceil(most).max(1)).max(1)
}

/// Whether the AVX2+FMA versions of the loops below can run here.
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

/// How a loop body multiplies and adds: fused where the CPU has FMA, else separately.
trait Arith {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}
struct Fused;
struct Plain;
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

#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Σ a·b, in eight lanes.
#[inline(always)]
fn dot<A: Arith>(a: &[f32], b: &[f32]) -> f32 {
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
fn axpy<A: Arith>(alpha: f32, x: &[f32], y: &mut [f32]) {
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

#[inline(always)]
fn squash_row<A: Arith>(s: &[f32], v: &mut [f32]) {
    let n2 = dot::<A>(s, s);
    let f = n2 / ((1.0 + n2) * (n2 + EPS).sqrt());
    for (o, x) in v.iter_mut().zip(s) {
        *o = f * x;
    }
}

/// ds += (∂squash(s)/∂s)ᵀ dv; the derivation is at [`super::cpu::squash_vec_bwd`].
#[inline(always)]
fn squash_row_bwd<A: Arith>(s: &[f32], dv: &[f32], ds: &mut [f32]) {
    let n2 = dot::<A>(s, s);
    let g = 1.0 / ((1.0 + n2) * (n2 + EPS).sqrt());
    let f = n2 * g;
    let fp = g * (1.0 / (1.0 + n2) - n2 / (2.0 * (n2 + EPS)));
    let k = 2.0 * fp * dot::<A>(dv, s);
    for ((o, x), d) in ds.iter_mut().zip(s).zip(dv) {
        *o = A::fma(k, *x, A::fma(f, *d, *o));
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn act_in_place(act: Act, rows: &mut [f32], cols: usize) {
    match act {
        Act::None => {}
        Act::Relu => par_rows(rows, cols, cols, |_, r| r.iter_mut().for_each(|x| *x = x.max(0.0))),
        Act::Sigmoid => par_rows(rows, cols, cols * 8, |_, r| r.iter_mut().for_each(|x| *x = sigmoid(*x))),
    }
}

/// dz = dy · act'(y), from the activation's output y.
fn act_grad(act: Act, y: &[f32], dy: &[f32], dz: &mut [f32]) {
    match act {
        Act::None => dz.copy_from_slice(dy),
        Act::Relu => {
            for ((o, yv), g) in dz.iter_mut().zip(y).zip(dy) {
                *o = if *yv > 0.0 { *g } else { 0.0 };
            }
        }
        Act::Sigmoid => {
            for ((o, yv), g) in dz.iter_mut().zip(y).zip(dy) {
                *o = g * (yv * (1.0 - yv));
            }
        }
    }
}

/// y rows = bias, then y += x·w (the GEMM's epilogue is the bias it starts from), then the activation.
#[allow(clippy::too_many_arguments)]
fn affine(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], act: Act) {
    for r in y.chunks_mut(n) {
        r.copy_from_slice(b);
    }
    gemm(m, k, n, x, (k, 1), w, (n, 1), y, 1.0);
    act_in_place(act, y, n);
}

// ---- capsule loops, one image (or one block of images) per call -----------------------------------

/// û for a block of images: for each capsule i (outer, so its transposed weights stay in L1) and each
/// image b of the block, û[b,i,:] = Σ_t u[b,i,t] · Wᵀ[i,t,:].
#[inline(always)]
fn predict_fwd_body<A: Arith>(s: &CapsShape, b0: usize, block: &mut [f32], u: &[f32], wt: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    let nb = block.len() / (ni * njd);
    for i in 0..ni {
        let wti = &wt[i * din * njd..(i + 1) * din * njd];
        for bl in 0..nb {
            let ui = &u[((b0 + bl) * ni + i) * din..((b0 + bl) * ni + i + 1) * din];
            let out = &mut block[(bl * ni + i) * njd..(bl * ni + i + 1) * njd];
            out.fill(0.0);
            for (t, &x) in ui.iter().enumerate() {
                axpy::<A>(x, &wti[t * njd..(t + 1) * njd], out);
            }
        }
    }
}
simd_fn!(fn predict_fwd_block(s: &CapsShape, b0: usize, block: &mut [f32], u: &[f32], wt: &[f32]) => predict_fwd_body;);

/// du[b,i,:] += Σ_jk dû[b,i,jk] · W[i,jk,:] for a block of images, capsule i outer so that W[i]
/// stays in L1 across the block.
#[inline(always)]
fn predict_bwd_input_body<A: Arith>(s: &CapsShape, b0: usize, block: &mut [f32], duhat: &[f32], w: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    let nb = block.len() / (ni * din);
    for i in 0..ni {
        let wi = &w[i * njd * din..(i + 1) * njd * din];
        for bl in 0..nb {
            let b = b0 + bl;
            let g = &duhat[(b * ni + i) * njd..(b * ni + i + 1) * njd];
            let acc = &mut block[(bl * ni + i) * din..(bl * ni + i + 1) * din];
            if din == 8 {
                // four independent accumulators: one chain of 160 dependent FMAs would wait on latency
                let mut a = [[0f32; 8]; 4];
                for (gq, wq) in g.chunks(4).zip(wi.chunks(32)) {
                    for (lane, (&gv, wr)) in gq.iter().zip(wq.chunks_exact(8)).enumerate() {
                        for l in 0..8 {
                            a[lane][l] = A::fma(gv, wr[l], a[lane][l]);
                        }
                    }
                }
                for l in 0..8 {
                    acc[l] += (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]);
                }
            } else {
                for (jk, &gv) in g.iter().enumerate() {
                    axpy::<A>(gv, &wi[jk * din..(jk + 1) * din], acc);
                }
            }
        }
    }
}
simd_fn!(fn predict_bwd_input_block(s: &CapsShape, b0: usize, block: &mut [f32], duhat: &[f32], w: &[f32]) => predict_bwd_input_body;);

/// dW[i,jk,:] += Σ_b dû[b,i,jk] · u[b,i,:] for one capsule i.
#[inline(always)]
fn predict_bwd_weight_body<A: Arith>(s: &CapsShape, i: usize, dwi: &mut [f32], u: &[f32], duhat: &[f32]) {
    let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
    for b in 0..s.batch {
        let ui = &u[(b * ni + i) * din..(b * ni + i + 1) * din];
        let g = &duhat[(b * ni + i) * njd..(b * ni + i + 1) * njd];
        for (jk, &gv) in g.iter().enumerate() {
            axpy::<A>(gv, ui, &mut dwi[jk * din..(jk + 1) * din]);
        }
    }
}
simd_fn!(fn predict_bwd_weight_row(s: &CapsShape, i: usize, dwi: &mut [f32], u: &[f32], duhat: &[f32]) => predict_bwd_weight_body;);

fn softmax_row(x: &[f32], out: &mut [f32]) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        z += *o;
    }
    let r = 1.0 / z;
    out.iter_mut().for_each(|o| *o *= r);
}

/// One image's routing forward: every round's c, s and v into `cs`, `ss`, `vs`, the last v into `v`.
#[inline(always)]
fn routing_fwd_body<A: Arith>(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    let mut logits = vec![0f32; ni * nj];
    for r in 0..rounds {
        let c = &mut cs[r * ni * nj..(r + 1) * ni * nj];
        for (cr, lr) in c.chunks_mut(nj).zip(logits.chunks(nj)) {
            softmax_row(lr, cr);
        }
        let sr = &mut ss[r * nj * d..(r + 1) * nj * d];
        sr.fill(0.0);
        for i in 0..ni {
            for j in 0..nj {
                let k = (i * nj + j) * d;
                axpy::<A>(c[i * nj + j], &uh[k..k + d], &mut sr[j * d..(j + 1) * d]);
            }
        }
        let vr = &mut vs[r * nj * d..(r + 1) * nj * d];
        for (vj, sj) in vr.chunks_mut(d).zip(sr.chunks(d)) {
            squash_row::<A>(sj, vj);
        }
        if r + 1 < rounds {
            for i in 0..ni {
                for j in 0..nj {
                    let k = (i * nj + j) * d;
                    logits[i * nj + j] += dot::<A>(&uh[k..k + d], &vr[j * d..(j + 1) * d]);
                }
            }
        }
    }
    v.copy_from_slice(&vs[(rounds - 1) * nj * d..]);
}
simd_fn!(fn routing_fwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
) => routing_fwd_body;);

/// One image's routing backward: duh += dv's gradient through every round (the reference's order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn routing_bwd_body<A: Arith>(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    vs: &[f32],
    dv: &[f32],
    duh: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    // gradient with respect to the logits b_{r+1} entering the round after this one
    let mut db_next = vec![0f32; ni * nj];
    let mut dc = vec![0f32; ni * nj];
    let mut dvr = vec![0f32; nj * d];
    let mut ds = vec![0f32; nj * d];
    for r in (0..rounds).rev() {
        let c = &cs[r * ni * nj..(r + 1) * ni * nj];
        let sr = &ss[r * nj * d..(r + 1) * nj * d];
        let vr = &vs[r * nj * d..(r + 1) * nj * d];
        if r + 1 == rounds {
            dvr.copy_from_slice(dv);
        } else {
            // b_{r+1} = b_r + û·v_r: v_r and û receive db_{r+1}
            dvr.fill(0.0);
            for i in 0..ni {
                for j in 0..nj {
                    let (g, k) = (db_next[i * nj + j], (i * nj + j) * d);
                    axpy::<A>(g, &uh[k..k + d], &mut dvr[j * d..(j + 1) * d]);
                    axpy::<A>(g, &vr[j * d..(j + 1) * d], &mut duh[k..k + d]);
                }
            }
        }
        ds.fill(0.0);
        for ((sj, dvj), dsj) in sr.chunks(d).zip(dvr.chunks(d)).zip(ds.chunks_mut(d)) {
            squash_row_bwd::<A>(sj, dvj, dsj);
        }
        // s_j = Σ_i c_ij û_{j|i}
        for i in 0..ni {
            for j in 0..nj {
                let k = (i * nj + j) * d;
                let dsj = &ds[j * d..(j + 1) * d];
                axpy::<A>(c[i * nj + j], dsj, &mut duh[k..k + d]);
                dc[i * nj + j] = dot::<A>(&uh[k..k + d], dsj);
            }
        }
        // c_i = softmax(b_i): db_ij = c_ij (dc_ij − Σ_j' c_ij' dc_ij'); b_r also flows on to b_{r+1}
        for ((ci, dci), dbi) in c.chunks(nj).zip(dc.chunks(nj)).zip(db_next.chunks_mut(nj)) {
            let m: f32 = ci.iter().zip(dci).map(|(a, b)| a * b).sum();
            for ((o, cv), dcv) in dbi.iter_mut().zip(ci).zip(dci) {
                *o += cv * (dcv - m);
            }
        }
    }
}
simd_fn!(fn routing_bwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    vs: &[f32],
    dv: &[f32],
    duh: &mut [f32],
) => routing_bwd_body;);

/// One slice of an Adam update; `k` = [lr, β1, β2, ε, 1 − β1ᵗ, 1 − β2ᵗ].
#[inline(always)]
fn adam_body<A: Arith>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 6]) {
    let [lr, b1, b2, eps, bc1, bc2] = *k;
    for (((pv, gv), mv), vv) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mn = A::fma(b1, *mv, (1.0 - b1) * gv);
        let vn = A::fma(b2, *vv, (1.0 - b2) * gv * gv);
        *mv = mn;
        *vv = vn;
        *pv -= lr * (mn / bc1) / ((vn / bc2).sqrt() + eps);
    }
}
simd_fn!(fn adam_slice(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 6]) => adam_body;);

impl Backend for FastCpu {
    type E = f32;
    type Buf = PoolBuf;
    type Idx = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, f32, {} loops, matrixmultiply sgemm)",
            crate::par::threads(),
            if wide_simd() { "AVX2+FMA" } else { "baseline" }
        )
    }

    fn zeros(&self, n: usize) -> Result<PoolBuf> {
        self.take(n, |b| b.fill(0.0))
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
    fn idx_len(&self, idx: &Vec<u32>) -> usize {
        idx.len()
    }
    fn buf_len(&self, buf: &PoolBuf) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut PoolBuf, value: f64) -> Result<()> {
        buf.fill(value as f32);
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

    // ---- convolution ----------------------------------------------------------------------------

    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<()> {
        const OP: &str = "conv2d_fwd";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "b", b.len(), s.out_c)?;
        check(OP, "y", y.len(), s.y_len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                let ys = &mut y[b0 * npix * co..(b0 + nb) * npix * co];
                affine(nb * npix, kd, co, col, w, b, ys, act);
            }
        })
    }

    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &PoolBuf, w: &PoolBuf, dx: &mut PoolBuf) -> Result<()> {
        const OP: &str = "conv2d_bwd_input";
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "dx", dx.len(), s.x_len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let img = s.in_h * s.in_w * s.in_c;
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |dcol| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                let dcol = &mut dcol[..nb * npix * kd];
                // dcol = dz · Wᵀ, with W [kd, co] read transposed through its strides
                let dzc = &dz[b0 * npix * co..(b0 + nb) * npix * co];
                gemm(nb * npix, co, kd, dzc, (co, 1), w, (1, co), dcol, 0.0);
                col2im_add(s, dcol, &mut dx[b0 * img..(b0 + nb) * img]);
            }
        })
    }

    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &PoolBuf, dz: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "dw", dw.len(), s.w_len())?;
        let (npix, kd, co) = (s.out_h() * s.out_w(), s.patch_len(), s.out_c);
        let chunk = images_per_chunk(s.batch, npix * kd);
        self.with_scratch(chunk * npix * kd, |col| {
            for b0 in (0..s.batch).step_by(chunk) {
                let nb = chunk.min(s.batch - b0);
                im2col(s, x, b0, nb, col, |v| v);
                // dW += colᵀ · dz, with col [rows, kd] read transposed through its strides
                let dzc = &dz[b0 * npix * co..(b0 + nb) * npix * co];
                gemm(
                    kd,
                    nb * npix,
                    co,
                    &col[..nb * npix * kd],
                    (1, kd),
                    dzc,
                    (co, 1),
                    dw,
                    1.0,
                );
            }
        })
    }

    fn bias_bwd(&self, rows: usize, cols: usize, dz: &PoolBuf, db: &mut PoolBuf) -> Result<()> {
        check("bias_bwd", "dz", dz.len(), rows * cols)?;
        check("bias_bwd", "db", db.len(), cols)?;
        // f32 sums over blocks of 64 rows, the blocks summed in f64
        let (mut total, mut part) = (vec![0f64; cols], vec![0f32; cols]);
        for block in dz.chunks((64 * cols).max(1)) {
            part.fill(0.0);
            for r in block.chunks(cols.max(1)) {
                part.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            total.iter_mut().zip(&part).for_each(|(t, p)| *t += *p as f64);
        }
        db.iter_mut().zip(&total).for_each(|(o, t)| *o = (*o as f64 + t) as f32);
        Ok(())
    }

    fn act_bwd(&self, act: Act, y: &PoolBuf, dy: &PoolBuf, dz: &mut PoolBuf) -> Result<()> {
        check("act_bwd", "dy", dy.len(), y.len())?;
        check("act_bwd", "dz", dz.len(), y.len())?;
        const ROW: usize = 4096;
        par_rows(dz, ROW, ROW, |r, out| {
            act_grad(act, &y[r * ROW..][..out.len()], &dy[r * ROW..][..out.len()], out)
        });
        // par_rows hands out whole rows only: the tail shorter than ROW
        let tail = dz.len() / ROW * ROW;
        act_grad(act, &y[tail..], &dy[tail..], &mut dz[tail..]);
        Ok(())
    }

    // ---- dense ----------------------------------------------------------------------------------

    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<()> {
        const OP: &str = "dense_fwd";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "b", b.len(), s.out)?;
        check(OP, "y", y.len(), s.rows * s.out)?;
        affine(s.rows, s.inp, s.out, x, w, b, y, act);
        Ok(())
    }

    fn dense_bwd_input(&self, s: &DenseShape, dz: &PoolBuf, w: &PoolBuf, dx: &mut PoolBuf) -> Result<()> {
        const OP: &str = "dense_bwd_input";
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "dx", dx.len(), s.rows * s.inp)?;
        gemm(s.rows, s.out, s.inp, dz, (s.out, 1), w, (1, s.out), dx, 1.0);
        Ok(())
    }

    fn dense_bwd_weight(&self, s: &DenseShape, x: &PoolBuf, dz: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        const OP: &str = "dense_bwd_weight";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "dw", dw.len(), s.inp * s.out)?;
        gemm(s.inp, s.rows, s.out, x, (1, s.inp), dz, (s.out, 1), dw, 1.0);
        Ok(())
    }

    // ---- capsules -------------------------------------------------------------------------------

    fn squash_fwd(&self, rows: usize, dim: usize, s: &PoolBuf, v: &mut PoolBuf) -> Result<()> {
        check("squash_fwd", "s", s.len(), rows * dim)?;
        check("squash_fwd", "v", v.len(), rows * dim)?;
        let d = dim.max(1);
        for (vr, sr) in v.chunks_mut(d).zip(s.chunks(d)) {
            squash_row::<Plain>(sr, vr);
        }
        Ok(())
    }

    fn squash_bwd(&self, rows: usize, dim: usize, s: &PoolBuf, dv: &PoolBuf, ds: &mut PoolBuf) -> Result<()> {
        check("squash_bwd", "s", s.len(), rows * dim)?;
        check("squash_bwd", "dv", dv.len(), rows * dim)?;
        check("squash_bwd", "ds", ds.len(), rows * dim)?;
        let d = dim.max(1);
        for ((dsr, sr), dvr) in ds.chunks_mut(d).zip(s.chunks(d)).zip(dv.chunks(d)) {
            squash_row_bwd::<Plain>(sr, dvr, dsr);
        }
        Ok(())
    }

    fn predict_fwd(&self, s: &CapsShape, u: &PoolBuf, w: &PoolBuf, uhat: &mut PoolBuf) -> Result<()> {
        check("predict_fwd", "u", u.len(), s.u_len())?;
        check("predict_fwd", "w", w.len(), s.w_len())?;
        check("predict_fwd", "uhat", uhat.len(), s.uhat_len())?;
        let (ni, din, njd) = (s.in_caps, s.in_dim, s.out_caps * s.out_dim);
        self.with_scratch(w.len(), |wt| {
            // Wᵀ[i, t, jk] = W[i, jk, t]: each input dimension's row of weights is contiguous
            par_rows(wt, din * njd, din * njd, |i, wti| {
                for jk in 0..njd {
                    for t in 0..din {
                        wti[t * njd + jk] = w[(i * njd + jk) * din + t];
                    }
                }
            });
            let wt = &*wt;
            par_blocks(uhat, ni * njd, ni * njd * din, |b0, block| {
                predict_fwd_block(s, b0, block, u, wt)
            });
        })
    }

    fn predict_bwd_input(&self, s: &CapsShape, duhat: &PoolBuf, w: &PoolBuf, du: &mut PoolBuf) -> Result<()> {
        check("predict_bwd_input", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_input", "w", w.len(), s.w_len())?;
        check("predict_bwd_input", "du", du.len(), s.u_len())?;
        let work = s.w_len();
        par_blocks(du, s.in_caps * s.in_dim, work, |b0, block| {
            predict_bwd_input_block(s, b0, block, duhat, w)
        });
        Ok(())
    }

    fn predict_bwd_weight(&self, s: &CapsShape, u: &PoolBuf, duhat: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        check("predict_bwd_weight", "u", u.len(), s.u_len())?;
        check("predict_bwd_weight", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_weight", "dw", dw.len(), s.w_len())?;
        let row = s.out_caps * s.out_dim * s.in_dim;
        // one row per primary capsule i: the sum over the batch stays inside one thread
        par_rows(dw, row, s.batch * row, |i, dwi| {
            predict_bwd_weight_row(s, i, dwi, u, duhat)
        });
        Ok(())
    }

    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &PoolBuf,
        v: &mut PoolBuf,
        saved: &mut RoutingSaved<PoolBuf>,
    ) -> Result<()> {
        const OP: &str = "routing_fwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check(OP, "v", v.len(), s.v_len())?;
        let items: Vec<_> = saved
            .c
            .chunks_mut(rounds * ni * nj)
            .zip(saved.s.chunks_mut(rounds * nj * d))
            .zip(saved.v.chunks_mut(rounds * nj * d))
            .zip(v.chunks_mut(nj * d))
            .collect();
        par_items(items, rounds * ni * nj * d * 2, |b, (((cs, ss), vs), vb)| {
            let uh = &uhat[b * ni * nj * d..(b + 1) * ni * nj * d];
            routing_fwd_image(s, rounds, uh, cs, ss, vs, vb)
        });
        Ok(())
    }

    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &PoolBuf,
        saved: &RoutingSaved<PoolBuf>,
        dv: &PoolBuf,
        duhat: &mut PoolBuf,
    ) -> Result<()> {
        const OP: &str = "routing_bwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check(OP, "dv", dv.len(), s.v_len())?;
        check(OP, "duhat", duhat.len(), s.uhat_len())?;
        let (per_c, per_s) = (rounds * ni * nj, rounds * nj * d);
        par_rows(duhat, ni * nj * d, rounds * ni * nj * d * 4, |b, duh| {
            routing_bwd_image(
                s,
                rounds,
                &uhat[b * ni * nj * d..(b + 1) * ni * nj * d],
                &saved.c[b * per_c..(b + 1) * per_c],
                &saved.s[b * per_s..(b + 1) * per_s],
                &saved.v[b * per_s..(b + 1) * per_s],
                &dv[b * nj * d..(b + 1) * nj * d],
                duh,
            )
        });
        Ok(())
    }

    fn lengths_fwd(&self, rows: usize, dim: usize, v: &PoolBuf, l: &mut PoolBuf) -> Result<()> {
        check("lengths_fwd", "v", v.len(), rows * dim)?;
        check("lengths_fwd", "l", l.len(), rows)?;
        for (o, vr) in l.iter_mut().zip(v.chunks(dim.max(1))) {
            *o = (dot::<Plain>(vr, vr) + EPS).sqrt();
        }
        Ok(())
    }

    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &PoolBuf,
        l: &PoolBuf,
        dl: &PoolBuf,
        dv: &mut PoolBuf,
    ) -> Result<()> {
        check("lengths_bwd", "v", v.len(), rows * dim)?;
        check("lengths_bwd", "l", l.len(), rows)?;
        check("lengths_bwd", "dl", dl.len(), rows)?;
        check("lengths_bwd", "dv", dv.len(), rows * dim)?;
        for (r, dvr) in dv.chunks_mut(dim.max(1)).enumerate() {
            axpy::<Plain>(dl[r] / l[r], &v[r * dim..(r + 1) * dim], dvr);
        }
        Ok(())
    }

    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &PoolBuf,
        idx: &Vec<u32>,
        out: &mut PoolBuf,
    ) -> Result<()> {
        host::mask_fwd(batch, caps, dim, v, idx, out)
    }
    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &PoolBuf,
        idx: &Vec<u32>,
        dv: &mut PoolBuf,
    ) -> Result<()> {
        host::mask_bwd(batch, caps, dim, dout, idx, dv)
    }
    fn argmax(&self, rows: usize, cols: usize, x: &PoolBuf, idx: &mut Vec<u32>) -> Result<()> {
        host::argmax(rows, cols, x, idx)
    }

    // ---- losses ---------------------------------------------------------------------------------

    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &PoolBuf,
        labels: &Vec<u32>,
        loss: &mut PoolBuf,
    ) -> Result<()> {
        host::margin_loss_fwd(batch, classes, per, l, labels, loss)
    }
    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &PoolBuf,
        labels: &Vec<u32>,
        dloss: &PoolBuf,
        dl: &mut PoolBuf,
    ) -> Result<()> {
        host::margin_loss_bwd(batch, classes, per, l, labels, dloss, dl)
    }
    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &PoolBuf,
        target: &PoolBuf,
        scale: f64,
        loss: &mut PoolBuf,
    ) -> Result<()> {
        host::sq_err_fwd(rows, cols, pred, target, scale, loss)
    }
    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &PoolBuf,
        target: &PoolBuf,
        scale: f64,
        dloss: &PoolBuf,
        dpred: &mut PoolBuf,
    ) -> Result<()> {
        host::sq_err_bwd(rows, cols, pred, target, scale, dloss, dpred)
    }

    // ---- optimiser ------------------------------------------------------------------------------

    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::msg("adam_step: step numbers start at 1"));
        }
        for (n, g) in groups.iter().enumerate() {
            check_adam_group(n, g.param.len(), g.grad.len(), g.m.len(), g.v.len())?;
        }
        let k = [
            hp.lr as f32,
            hp.beta1 as f32,
            hp.beta2 as f32,
            hp.eps as f32,
            (1.0 - hp.beta1.powf(hp.step as f64)) as f32,
            (1.0 - hp.beta2.powf(hp.step as f64)) as f32,
        ];
        // every group's slices in one list: one pass over all parameters, split over the threads
        let slices: Vec<_> = groups
            .iter_mut()
            .flat_map(|g| {
                g.param
                    .chunks_mut(ADAM_SLICE)
                    .zip(g.grad.chunks(ADAM_SLICE))
                    .zip(g.m.chunks_mut(ADAM_SLICE))
                    .zip(g.v.chunks_mut(ADAM_SLICE))
            })
            .collect();
        par_items(slices, ADAM_SLICE, |_, (((p, gr), m), v)| adam_slice(p, gr, m, v, &k));
        Ok(())
    }
}
