//! Dense layers, biases and activations on the fast CPU backend.

use crate::Result;
use crate::backend::bf16::{self, Bf16Gemm, Out, Source, Strided};
use crate::backend::fast::{FastCpu, PoolBuf};
use crate::par::{par_blocks, par_items, par_rows};

use super::{
    Act, DenseOps, DenseShape, check_act_bwd, check_bias_bwd, check_dense_bwd_input, check_dense_bwd_weight,
    check_dense_fwd,
};

pub(crate) fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub(crate) fn act_in_place(act: Act, rows: &mut [f32], cols: usize) {
    match act {
        Act::None => {}
        Act::Relu => par_rows(rows, cols, cols, |_, r| r.iter_mut().for_each(|x| *x = x.max(0.0))),
        Act::Sigmoid => par_rows(rows, cols, cols * 8, |_, r| r.iter_mut().for_each(|x| *x = sigmoid(*x))),
    }
}

/// dz = dy · act'(y), from the activation's output y.
pub(crate) fn act_grad(act: Act, y: &[f32], dy: &[f32], dz: &mut [f32]) {
    match act {
        Act::None => dz.copy_from_slice(dy),
        Act::Relu => {
            // dy where y > 0, else 0, as a mask on dy's bits: the same values as the branch, but a
            // loop the compiler vectorises (the branch was compiled to scalar code)
            let n = dz.len();
            let (y, dy) = (&y[..n], &dy[..n]);
            for i in 0..n {
                let keep = if y[i] > 0.0 { u32::MAX } else { 0 };
                dz[i] = f32::from_bits(dy[i].to_bits() & keep);
            }
        }
        Act::Sigmoid => {
            for ((o, yv), g) in dz.iter_mut().zip(y).zip(dy) {
                *o = g * (yv * (1.0 - yv));
            }
        }
    }
}

/// dz = dy · act'(y) (rows × cols, cols a multiple of 32) not stored but packed as the B of a GEMM
/// over its rows (bf16 tiles laid out as [`Source::packed_b`] says, k = rows, n = cols), and db +=
/// Σ dz where given: each block of 64 rows made, added to db's partial sums exactly as
/// [`DenseOps::act_bias_bwd`] adds them (so db is the same to the bit), and packed while in cache. A
/// first layer's weight gradient, whose dz nothing else reads.
pub(crate) fn act_bias_bwd_tiles(
    act: Act,
    rows: usize,
    cols: usize,
    y: &[f32],
    dy: &[f32],
    tiles: &mut [u16],
    db: Option<&mut [f32]>,
) {
    assert!(
        cols.is_multiple_of(32)
            && tiles.len() == bf16::packed_b_len(rows, cols)
            && y.len() >= rows * cols
            && dy.len() >= rows * cols
            && db.as_ref().is_none_or(|d| d.len() == cols)
            && std::arch::is_x86_feature_detected!("avx512f"),
        "act_bias_bwd_tiles: {rows}×{cols} values and their tiles"
    );
    assert!(matches!(act, Act::Relu | Act::None), "act_bias_bwd_tiles: {act:?}");
    const RB: usize = 64;
    let block = RB * cols;
    let mut parts = vec![0f32; rows.div_ceil(RB) * cols];
    // each block writes only its own rows' K tiles
    let at = tiles.as_mut_ptr() as usize;
    let items: Vec<_> = parts.chunks_mut(cols).collect();
    par_items(items, block, |b, part| {
        let rs = b * block..(b * block + block).min(rows * cols);
        // SAFETY: AVX-512F (asserted); the tiles are a whole packed B of rows × cols (asserted), and
        // this block's rows' tiles are its own
        unsafe {
            bf16::pack_b_act_rows(
                act == Act::Relu,
                &y[rs.clone()],
                &dy[rs],
                cols,
                b * RB,
                rows,
                part,
                at as *mut u16,
            )
        };
    });
    if let Some(db) = db {
        for (c, o) in db.iter_mut().enumerate() {
            let total = parts.chunks(cols).fold(0f64, |t, p| t + p[c] as f64);
            *o = (*o as f64 + total) as f32;
        }
    }
}

/// y = act(x·w + b) (x m×k, w k×n, y m×n): in bf16, x and w read from their sources and the bias and
/// a ReLU added to each block of y as the GEMM finishes it (one pass over y; a sigmoid after).
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine_bf16(
    kernel: Bf16Gemm,
    m: usize,
    k: usize,
    n: usize,
    x: &impl Source,
    w: &impl Source,
    b: &[f32],
    y: &mut [f32],
    act: Act,
) -> Result<()> {
    assert!(m.checked_mul(n).is_some_and(|mn| y.len() >= mn) && b.len() >= n);
    let out = Out::Affine {
        bias: b,
        relu: act == Act::Relu,
    };
    // SAFETY: the caller's kernel is supported (a bf16 backend's); y holds m rows of n values
    // (asserted) and, a &mut, aliases neither operand
    unsafe { bf16::gemm_from(kernel, m, k, n, x, w, out, y.as_mut_ptr(), n as isize)? };
    if act == Act::Sigmoid {
        act_in_place(act, y, n);
    }
    Ok(())
}

/// y = act(x·w + b) (x m×k, w k×n, y m×n): y rows = bias, then y += x·w, then the activation; in
/// bf16, [`affine_bf16`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn affine(
    be: &FastCpu,
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
    act: Act,
) -> Result<()> {
    if let Some(kernel) = be.bf16_gemm() {
        let (x, w) = (Strided::new(x, (m, k), (k, 1)), Strided::new(w, (k, n), (n, 1)));
        return affine_bf16(kernel, m, k, n, &x, &w, b, y, act);
    }
    for r in y.chunks_mut(n) {
        r.copy_from_slice(b);
    }
    be.gemm(m, k, n, x, (k, 1), w, (n, 1), y, 1.0)?;
    act_in_place(act, y, n);
    Ok(())
}

impl DenseOps for FastCpu {
    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &PoolBuf,
        w: &PoolBuf,
        b: &PoolBuf,
        y: &mut PoolBuf,
        act: Act,
    ) -> Result<()> {
        check_dense_fwd(s, x.len(), w.len(), b.len(), y.len())?;
        affine(self, s.rows, s.inp, s.out, x, w, b, y, act)
    }

    fn dense_bwd_input(&self, s: &DenseShape, dz: &PoolBuf, w: &PoolBuf, dx: &mut PoolBuf) -> Result<()> {
        check_dense_bwd_input(s, dz.len(), w.len(), dx.len())?;
        self.gemm(s.rows, s.out, s.inp, dz, (s.out, 1), w, (1, s.out), dx, 1.0)
    }

    fn dense_bwd_weight(&self, s: &DenseShape, x: &PoolBuf, dz: &PoolBuf, dw: &mut PoolBuf) -> Result<()> {
        self.dense_bwd_weight_into(s, x, dz, dw, false)
    }

    /// The GEMM writes dw (β = 0: dw is neither zeroed first nor read) where `write`, else adds.
    fn dense_bwd_weight_into(
        &self,
        s: &DenseShape,
        x: &PoolBuf,
        dz: &PoolBuf,
        dw: &mut PoolBuf,
        write: bool,
    ) -> Result<()> {
        check_dense_bwd_weight(s, x.len(), dz.len(), dw.len())?;
        let beta = if write { 0.0 } else { 1.0 };
        self.gemm(s.inp, s.rows, s.out, x, (1, s.inp), dz, (s.out, 1), dw, beta)
    }

    fn bias_bwd(&self, rows: usize, cols: usize, dz: &PoolBuf, db: &mut PoolBuf) -> Result<()> {
        check_bias_bwd(rows, cols, dz.len(), db.len())?;
        // f32 sums over blocks of 64 rows, the blocks summed in f64; the threads split the columns
        // (each column summed in one order whatever their number)
        par_blocks(db, 1, rows, |c0, db| {
            let n = db.len();
            let (mut total, mut part) = (vec![0f64; n], vec![0f32; n]);
            for block in dz.chunks((64 * cols).max(1)) {
                part.fill(0.0);
                for r in block.chunks(cols.max(1)) {
                    part.iter_mut().zip(&r[c0..c0 + n]).for_each(|(a, v)| *a += v);
                }
                total.iter_mut().zip(&part).for_each(|(t, p)| *t += *p as f64);
            }
            db.iter_mut().zip(&total).for_each(|(o, t)| *o = (*o as f64 + t) as f32);
        });
        Ok(())
    }

    /// In one pass: each block of 64 rows of dz written, then summed (as `bias_bwd` sums it) while
    /// in cache; the blocks' sums added up in f64 in block order, so db is `bias_bwd`'s to the bit.
    fn act_bias_bwd(
        &self,
        act: Act,
        rows: usize,
        cols: usize,
        y: &PoolBuf,
        dy: &PoolBuf,
        dz: &mut PoolBuf,
        db: Option<&mut PoolBuf>,
    ) -> Result<()> {
        check_act_bwd(y.len(), dy.len(), dz.len())?;
        if let Some(db) = &db {
            check_bias_bwd(rows, cols, dz.len(), db.len())?;
        }
        let Some(db) = db.filter(|_| rows > 0 && cols > 0) else {
            return self.act_bwd(act, y, dy, dz);
        };
        let block = 64 * cols;
        let mut parts = vec![0f32; rows.div_ceil(64) * cols];
        let items: Vec<_> = dz.chunks_mut(block).zip(parts.chunks_mut(cols)).collect();
        par_items(items, block, |b, (dzb, part)| {
            let at = b * block;
            act_grad(act, &y[at..at + dzb.len()], &dy[at..at + dzb.len()], dzb);
            for r in dzb.chunks(cols) {
                part.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
        });
        for (c, o) in db.iter_mut().enumerate() {
            let total = parts.chunks(cols).fold(0f64, |t, p| t + p[c] as f64);
            *o = (*o as f64 + total) as f32;
        }
        Ok(())
    }

    fn act_bwd(&self, act: Act, y: &PoolBuf, dy: &PoolBuf, dz: &mut PoolBuf) -> Result<()> {
        check_act_bwd(y.len(), dy.len(), dz.len())?;
        const ROW: usize = 4096;
        par_rows(dz, ROW, ROW, |r, out| {
            act_grad(act, &y[r * ROW..][..out.len()], &dy[r * ROW..][..out.len()], out)
        });
        // par_rows hands out whole rows only: the tail shorter than ROW
        let tail = dz.len() / ROW * ROW;
        act_grad(act, &y[tail..], &dy[tail..], &mut dz[tail..]);
        Ok(())
    }
}
