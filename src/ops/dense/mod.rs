//! dense: y = act(x · w + b). x [N, in] · w [in, out] + b [out] → y [N, out].
//!
//! Here: [`DenseShape`], [`Act`], the [`DenseOps`] interface (with the bias and activation gradients
//! that convolutions share), the tape op [`dense`]; the implementations beside it.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
#[cfg(test)]
mod tests;

use crate::Result;
use crate::backend::{Core, check, shape_err};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

/// A dense layer y = act(x · W + b) over `rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseShape {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// Fused activation of conv and dense layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Sigmoid,
}

/// Dense layers, and the bias and activation gradients of dense and convolutional layers alike.
pub trait DenseOps: Core {
    /// y = act(x · w + b).
    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        act: Act,
    ) -> Result<()>;
    /// dx += dz · wᵀ.
    fn dense_bwd_input(&self, s: &DenseShape, dz: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// dw += xᵀ · dz.
    fn dense_bwd_weight(&self, s: &DenseShape, x: &Self::Buf, dz: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;
    /// [`DenseOps::dense_bwd_weight`], or with `write`, dw = xᵀ · dz whatever dw held (what adding
    /// to zeros gives). This default zeroes dw first, then adds.
    fn dense_bwd_weight_into(
        &self,
        s: &DenseShape,
        x: &Self::Buf,
        dz: &Self::Buf,
        dw: &mut Self::Buf,
        write: bool,
    ) -> Result<()> {
        if write {
            self.fill(dw, 0.0)?;
        }
        self.dense_bwd_weight(s, x, dz, dw)
    }
    /// db[c] += Σ_r dz[r, c] over `rows` rows of `cols` columns (bias gradient of conv and dense).
    fn bias_bwd(&self, rows: usize, cols: usize, dz: &Self::Buf, db: &mut Self::Buf) -> Result<()>;
    /// dz = dy · act'(y), from the activation's output y. Overwrites dz (a temporary).
    fn act_bwd(&self, act: Act, y: &Self::Buf, dy: &Self::Buf, dz: &mut Self::Buf) -> Result<()>;
    /// [`DenseOps::act_bwd`] over `rows` rows of `cols` columns, then, where `db` is given,
    /// [`DenseOps::bias_bwd`] of the dz it wrote: a backend may do both in one pass over dz.
    #[allow(clippy::too_many_arguments)]
    fn act_bias_bwd(
        &self,
        act: Act,
        rows: usize,
        cols: usize,
        y: &Self::Buf,
        dy: &Self::Buf,
        dz: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
    ) -> Result<()> {
        self.act_bwd(act, y, dy, dz)?;
        match db {
            Some(db) => self.bias_bwd(rows, cols, dz, db),
            None => Ok(()),
        }
    }
}

pub fn dense<B: DenseOps>(t: &mut Tape<B>, x: Var, w: Var, b: Var, act: Act) -> Result<Var> {
    let (xs, ws, bs) = (&t.value(x).shape, &t.value(w).shape, &t.value(b).shape);
    if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[0] || bs[..] != [ws[1]] {
        return shape_err("dense", format!("x {xs:?}, w {ws:?}, b {bs:?} do not fit"));
    }
    let s = DenseShape {
        rows: xs[0],
        inp: xs[1],
        out: ws[1],
    };
    let mut y = t.backend().alloc_out(s.rows * s.out)?;
    t.backend()
        .dense_fwd(&s, &t.value(x).buf, &t.value(w).buf, &t.value(b).buf, &mut y, act)?;
    t.push_op(y, &[s.rows, s.out], &[x, w, b], DenseBackward { x, w, b, s, act })
}

struct DenseBackward {
    x: Var,
    w: Var,
    b: Var,
    s: DenseShape,
    act: Act,
}

impl<B: DenseOps> BackwardOp<B> for DenseBackward {
    fn name(&self) -> &'static str {
        "dense"
    }
    fn label(&self) -> String {
        format!("dense {}->{}", self.s.inp, self.s.out)
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let be = ctx.backend;
        let mut dz = be.alloc_out(self.s.rows * self.s.out)?;
        let db = g.get(self.b)?;
        be.act_bias_bwd(self.act, self.s.rows, self.s.out, ctx.y(), ctx.dout, &mut dz, db)?;
        if let Some(dx) = g.get(self.x)? {
            be.dense_bwd_input(&self.s, &dz, ctx.value(self.w), dx)?;
        }
        if let Some((dw, write)) = g.get_to_write(self.w)? {
            be.dense_bwd_weight_into(&self.s, ctx.value(self.x), &dz, dw, write)?;
        }
        Ok(())
    }
}

/// The buffers of `dense_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_dense_fwd(s: &DenseShape, x: usize, w: usize, b: usize, y: usize) -> Result<()> {
    check("dense_fwd", "x", x, s.rows * s.inp)?;
    check("dense_fwd", "w", w, s.inp * s.out)?;
    check("dense_fwd", "b", b, s.out)?;
    check("dense_fwd", "y", y, s.rows * s.out)
}

/// The buffers of `dense_bwd_input` against its shape: every backend's check, in one place.
pub(crate) fn check_dense_bwd_input(s: &DenseShape, dz: usize, w: usize, dx: usize) -> Result<()> {
    check("dense_bwd_input", "dz", dz, s.rows * s.out)?;
    check("dense_bwd_input", "w", w, s.inp * s.out)?;
    check("dense_bwd_input", "dx", dx, s.rows * s.inp)
}

/// The buffers of `dense_bwd_weight` against its shape: every backend's check, in one place.
pub(crate) fn check_dense_bwd_weight(s: &DenseShape, x: usize, dz: usize, dw: usize) -> Result<()> {
    check("dense_bwd_weight", "x", x, s.rows * s.inp)?;
    check("dense_bwd_weight", "dz", dz, s.rows * s.out)?;
    check("dense_bwd_weight", "dw", dw, s.inp * s.out)
}

/// The buffers of `bias_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_bias_bwd(rows: usize, cols: usize, dz: usize, db: usize) -> Result<()> {
    check("bias_bwd", "dz", dz, rows * cols)?;
    check("bias_bwd", "db", db, cols)
}

/// The buffers of `act_bwd`: dy and dz as long as y.
pub(crate) fn check_act_bwd(y: usize, dy: usize, dz: usize) -> Result<()> {
    check("act_bwd", "dy", dy, y)?;
    check("act_bwd", "dz", dz, y)
}
