//! Capsule ops.
//!
//! - squash:  s [..., D] → v [..., D], v = ‖s‖²/(1+‖s‖²) · s/√(‖s‖²+ε)
//! - predict: u [B, I, Din], W [I, J, Dout, Din] → û [B, I, J, Dout]
//! - lengths: v [..., D] → [...], √(‖v‖² + ε)
//! - mask:    v [B, J, D], class per image → [B, J·D], every capsule zeroed but that class's
//! - argmax: [rows, cols] → the index of each row's largest entry (not differentiable)
//!
//! Here: [`CapsShape`], [`NORM_EPS`], the [`CapsuleOps`] interface and the tape ops; the implementations
//! beside them.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
mod host;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use crate::Result;
use crate::backend::{Core, check, shape_err};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

/// ε inside the square root of every safe norm (squash and capsule lengths): a zero vector then has
/// a finite norm (√ε) and a finite gradient.
pub const NORM_EPS: f64 = 1e-7;

/// Prediction vectors û[b,i,j,:] = W[i,j] (out_dim × in_dim) · u[b,i,:].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsShape {
    pub batch: usize,
    /// I: primary capsules (1152 in the paper's model).
    pub in_caps: usize,
    /// Primary capsule dimension (8).
    pub in_dim: usize,
    /// J: digit capsules (10).
    pub out_caps: usize,
    /// Digit capsule dimension (16).
    pub out_dim: usize,
}

impl CapsShape {
    pub fn u_len(&self) -> usize {
        self.batch * self.in_caps * self.in_dim
    }
    pub fn w_len(&self) -> usize {
        self.in_caps * self.out_caps * self.out_dim * self.in_dim
    }
    pub fn uhat_len(&self) -> usize {
        self.batch * self.in_caps * self.out_caps * self.out_dim
    }
    pub fn v_len(&self) -> usize {
        self.batch * self.out_caps * self.out_dim
    }
    /// The capsule sizes, as the routing kernels' launch geometry takes them.
    pub fn dims(&self) -> crate::cuda::registry::CapsDims {
        crate::cuda::registry::CapsDims {
            in_caps: self.in_caps,
            in_dim: self.in_dim,
            out_caps: self.out_caps,
            out_dim: self.out_dim,
        }
    }
}

/// Squash, prediction vectors, capsule lengths, masks and argmax.
pub trait CapsuleOps: Core {
    /// v = squash(s) = ‖s‖² / (1 + ‖s‖²) · s / √(‖s‖² + ε), row by row ([rows, dim]).
    fn squash_fwd(&self, rows: usize, dim: usize, s: &Self::Buf, v: &mut Self::Buf) -> Result<()>;
    /// ds += (∂v/∂s)ᵀ dv.
    fn squash_bwd(&self, rows: usize, dim: usize, s: &Self::Buf, dv: &Self::Buf, ds: &mut Self::Buf) -> Result<()>;
    /// û[b,i,j,:] = W[i,j] · u[b,i,:].
    fn predict_fwd(&self, s: &CapsShape, u: &Self::Buf, w: &Self::Buf, uhat: &mut Self::Buf) -> Result<()>;
    /// du[b,i,:] += Σ_j W[i,j]ᵀ · dû[b,i,j,:].
    fn predict_bwd_input(&self, s: &CapsShape, duhat: &Self::Buf, w: &Self::Buf, du: &mut Self::Buf) -> Result<()>;
    /// dW[i,j] += Σ_b dû[b,i,j,:] ⊗ u[b,i,:].
    fn predict_bwd_weight(&self, s: &CapsShape, u: &Self::Buf, duhat: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;
    /// l[r] = √(Σ_d v[r,d]² + ε).
    fn lengths_fwd(&self, rows: usize, dim: usize, v: &Self::Buf, l: &mut Self::Buf) -> Result<()>;
    /// dv[r,:] += dl[r] · v[r,:] / l[r].
    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &Self::Buf,
        l: &Self::Buf,
        dl: &Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;
    /// out[b, :] = v[b, :, :] with every capsule zeroed but capsule idx[b] ([B, J·D]).
    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &Self::Buf,
        idx: &Self::Idx,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dv[b, idx[b], :] += dout[b, idx[b]·D ..].
    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &Self::Buf,
        idx: &Self::Idx,
        dv: &mut Self::Buf,
    ) -> Result<()>;
    /// idx[r] = argmax_c x[r, c] (the first maximum).
    fn argmax(&self, rows: usize, cols: usize, x: &Self::Buf, idx: &mut Self::Idx) -> Result<()>;
}

/// (rows, dim) of a tensor whose last axis is the capsule dimension.
fn rows_dim(shape: &[usize]) -> (usize, usize) {
    let dim = *shape.last().unwrap_or(&1);
    (shape.iter().product::<usize>() / dim.max(1), dim)
}

pub fn squash<B: CapsuleOps>(t: &mut Tape<B>, s: Var) -> Result<Var> {
    let shape = t.value(s).shape.clone();
    let (rows, dim) = rows_dim(&shape);
    let mut v = t.backend().alloc_out(rows * dim)?;
    t.backend().squash_fwd(rows, dim, &t.value(s).buf, &mut v)?;
    t.push_op(v, &shape, &[s], SquashBackward { s, rows, dim })
}

struct SquashBackward {
    s: Var,
    rows: usize,
    dim: usize,
}

impl<B: CapsuleOps> BackwardOp<B> for SquashBackward {
    fn name(&self) -> &'static str {
        "squash"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(ds) = g.get(self.s)? {
            ctx.backend
                .squash_bwd(self.rows, self.dim, ctx.value(self.s), ctx.dout, ds)?;
        }
        Ok(())
    }
}

/// The shape of prediction vectors from u [B, I, Din] and W [I, J, Dout, Din], or `op`'s error.
pub(crate) fn caps_shape<B: CapsuleOps>(op: &str, t: &Tape<B>, u: Var, w: Var) -> Result<CapsShape> {
    let (us, ws) = (&t.value(u).shape, &t.value(w).shape);
    if us.len() != 3 || ws.len() != 4 || us[1] != ws[0] || us[2] != ws[3] {
        return shape_err(op, format!("u {us:?} and W {ws:?} do not fit"));
    }
    Ok(CapsShape {
        batch: us[0],
        in_caps: us[1],
        in_dim: us[2],
        out_caps: ws[1],
        out_dim: ws[2],
    })
}

pub fn predict<B: CapsuleOps>(t: &mut Tape<B>, u: Var, w: Var) -> Result<Var> {
    let s = caps_shape("predict", t, u, w)?;
    let mut uhat = t.backend().alloc_out(s.uhat_len())?;
    t.backend()
        .predict_fwd(&s, &t.value(u).buf, &t.value(w).buf, &mut uhat)?;
    t.push_op(
        uhat,
        &[s.batch, s.in_caps, s.out_caps, s.out_dim],
        &[u, w],
        PredictBackward { u, w, s },
    )
}

struct PredictBackward {
    u: Var,
    w: Var,
    s: CapsShape,
}

impl<B: CapsuleOps> BackwardOp<B> for PredictBackward {
    fn name(&self) -> &'static str {
        "predict"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(du) = g.get(self.u)? {
            ctx.backend
                .predict_bwd_input(&self.s, ctx.dout, ctx.value(self.w), du)?;
        }
        if let Some(dw) = g.get(self.w)? {
            ctx.backend
                .predict_bwd_weight(&self.s, ctx.value(self.u), ctx.dout, dw)?;
        }
        Ok(())
    }
}

pub fn lengths<B: CapsuleOps>(t: &mut Tape<B>, v: Var) -> Result<Var> {
    let shape = t.value(v).shape.clone();
    let (rows, dim) = rows_dim(&shape);
    let mut l = t.backend().alloc_out(rows)?;
    t.backend().lengths_fwd(rows, dim, &t.value(v).buf, &mut l)?;
    t.push_op(l, &shape[..shape.len() - 1], &[v], LengthsBackward { v, rows, dim })
}

struct LengthsBackward {
    v: Var,
    rows: usize,
    dim: usize,
}

impl<B: CapsuleOps> BackwardOp<B> for LengthsBackward {
    fn name(&self) -> &'static str {
        "lengths"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(dv) = g.get(self.v)? {
            ctx.backend
                .lengths_bwd(self.rows, self.dim, ctx.value(self.v), ctx.y(), ctx.dout, dv)?;
        }
        Ok(())
    }
}

/// Keeps capsule idx[b] of each image and zeroes the others: v [B, J, D] → [B, J·D].
pub fn mask<B: CapsuleOps>(t: &mut Tape<B>, v: Var, idx: Rc<B::Idx>) -> Result<Var> {
    let vs = &t.value(v).shape;
    if vs.len() != 3 {
        return shape_err("mask", format!("needs v [B, J, D], got {vs:?}"));
    }
    let (batch, caps, dim) = (vs[0], vs[1], vs[2]);
    let mut out = t.backend().alloc_out(batch * caps * dim)?;
    t.backend()
        .mask_fwd(batch, caps, dim, &t.value(v).buf, &idx, &mut out)?;
    t.push_op(
        out,
        &[batch, caps * dim],
        &[v],
        MaskBackward::<B> {
            v,
            batch,
            caps,
            dim,
            idx,
        },
    )
}

struct MaskBackward<B: CapsuleOps> {
    v: Var,
    batch: usize,
    caps: usize,
    dim: usize,
    idx: Rc<B::Idx>,
}

impl<B: CapsuleOps> BackwardOp<B> for MaskBackward<B> {
    fn name(&self) -> &'static str {
        "mask"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(dv) = g.get(self.v)? {
            ctx.backend
                .mask_bwd(self.batch, self.caps, self.dim, ctx.dout, &self.idx, dv)?;
        }
        Ok(())
    }
}

/// The index of the largest entry of each row of a [rows, cols] value (not differentiable).
pub fn argmax<B: CapsuleOps>(t: &Tape<B>, x: Var) -> Result<Rc<B::Idx>> {
    let xs = &t.value(x).shape;
    if xs.len() != 2 {
        return shape_err("argmax", format!("needs a [rows, cols] value, got {xs:?}"));
    }
    let mut idx = t.backend().alloc_idx(xs[0])?;
    t.backend().argmax(xs[0], xs[1], &t.value(x).buf, &mut idx)?;
    Ok(Rc::new(idx))
}

/// The buffers of `squash_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_squash_fwd(rows: usize, dim: usize, s: usize, v: usize) -> Result<()> {
    check("squash_fwd", "s", s, rows * dim)?;
    check("squash_fwd", "v", v, rows * dim)
}

/// The buffers of `squash_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_squash_bwd(rows: usize, dim: usize, s: usize, dv: usize, ds: usize) -> Result<()> {
    check("squash_bwd", "s", s, rows * dim)?;
    check("squash_bwd", "dv", dv, rows * dim)?;
    check("squash_bwd", "ds", ds, rows * dim)
}

/// The buffers of `predict_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_predict_fwd(s: &CapsShape, u: usize, w: usize, uhat: usize) -> Result<()> {
    check("predict_fwd", "u", u, s.u_len())?;
    check("predict_fwd", "w", w, s.w_len())?;
    check("predict_fwd", "uhat", uhat, s.uhat_len())
}

/// The buffers of `predict_bwd_input` against its shape: every backend's check, in one place.
pub(crate) fn check_predict_bwd_input(s: &CapsShape, duhat: usize, w: usize, du: usize) -> Result<()> {
    check("predict_bwd_input", "duhat", duhat, s.uhat_len())?;
    check("predict_bwd_input", "w", w, s.w_len())?;
    check("predict_bwd_input", "du", du, s.u_len())
}

/// The buffers of `predict_bwd_weight` against its shape: every backend's check, in one place.
pub(crate) fn check_predict_bwd_weight(s: &CapsShape, u: usize, duhat: usize, dw: usize) -> Result<()> {
    check("predict_bwd_weight", "u", u, s.u_len())?;
    check("predict_bwd_weight", "duhat", duhat, s.uhat_len())?;
    check("predict_bwd_weight", "dw", dw, s.w_len())
}

/// The buffers of `lengths_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_lengths_fwd(rows: usize, dim: usize, v: usize, l: usize) -> Result<()> {
    check("lengths_fwd", "v", v, rows * dim)?;
    check("lengths_fwd", "l", l, rows)
}

/// The buffers of `lengths_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_lengths_bwd(rows: usize, dim: usize, v: usize, l: usize, dl: usize, dv: usize) -> Result<()> {
    check("lengths_bwd", "v", v, rows * dim)?;
    check("lengths_bwd", "l", l, rows)?;
    check("lengths_bwd", "dl", dl, rows)?;
    check("lengths_bwd", "dv", dv, rows * dim)
}

/// The buffers of `mask_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_mask_fwd(batch: usize, caps: usize, dim: usize, v: usize, idx: usize, out: usize) -> Result<()> {
    check("mask_fwd", "v", v, batch * caps * dim)?;
    check("mask_fwd", "idx", idx, batch)?;
    check("mask_fwd", "out", out, batch * caps * dim)
}

/// The buffers of `mask_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_mask_bwd(batch: usize, caps: usize, dim: usize, dout: usize, idx: usize, dv: usize) -> Result<()> {
    check("mask_bwd", "dout", dout, batch * caps * dim)?;
    check("mask_bwd", "idx", idx, batch)?;
    check("mask_bwd", "dv", dv, batch * caps * dim)
}

/// The buffers of `argmax` against its shape: every backend's check, in one place.
pub(crate) fn check_argmax(rows: usize, cols: usize, x: usize, idx: usize) -> Result<()> {
    check("argmax", "x", x, rows * cols)?;
    check("argmax", "idx", idx, rows)
}
