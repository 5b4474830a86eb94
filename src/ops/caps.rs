//! Capsule ops.
//!
//! - squash:  s [..., D] → v [..., D], v = ‖s‖²/(1+‖s‖²) · s/√(‖s‖²+ε)
//! - predict: u [B, I, Din], W [I, J, Dout, Din] → û [B, I, J, Dout]
//! - routing: û [B, I, J, D] → v [B, J, D], all rounds in one op (one fused kernel pair on a GPU)
//! - predict_routing: u [B, I, Din], W → v [B, J, D], predict then routing as one op, so that a backend
//!   can fuse them and never store û or its gradient (the model's path)
//! - lengths: v [..., D] → [...], √(‖v‖² + ε)
//! - mask:    v [B, J, D], class per image → [B, J·D], every capsule zeroed but that class's

use std::rc::Rc;

use super::shape_err;
use crate::Result;
use crate::backend::{Backend, CapsShape, RoutingSaved};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

/// (rows, dim) of a tensor whose last axis is the capsule dimension.
fn rows_dim(shape: &[usize]) -> (usize, usize) {
    let dim = *shape.last().unwrap_or(&1);
    (shape.iter().product::<usize>() / dim.max(1), dim)
}

pub fn squash<B: Backend>(t: &mut Tape<B>, s: Var) -> Result<Var> {
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

impl<B: Backend> BackwardOp<B> for SquashBackward {
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
fn caps_shape<B: Backend>(op: &str, t: &Tape<B>, u: Var, w: Var) -> Result<CapsShape> {
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

pub fn predict<B: Backend>(t: &mut Tape<B>, u: Var, w: Var) -> Result<Var> {
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

impl<B: Backend> BackwardOp<B> for PredictBackward {
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

/// Routing by agreement over `rounds` rounds (≥ 1). Gradients flow through every round.
pub fn routing<B: Backend>(t: &mut Tape<B>, uhat: Var, rounds: usize) -> Result<Var> {
    let us = &t.value(uhat).shape;
    if us.len() != 4 || rounds == 0 {
        return shape_err(
            "routing",
            format!("needs û [B, I, J, D] and at least one round, got {us:?}, {rounds} rounds"),
        );
    }
    // in_dim is unused by routing; the shape is û's
    let s = CapsShape {
        batch: us[0],
        in_caps: us[1],
        in_dim: 0,
        out_caps: us[2],
        out_dim: us[3],
    };
    let mut v = t.backend().alloc_out(s.v_len())?;
    let mut saved = t.backend().routing_saved(&s, rounds)?;
    t.backend()
        .routing_fwd(&s, rounds, &t.value(uhat).buf, &mut v, &mut saved)?;
    t.push_op(
        v,
        &[s.batch, s.out_caps, s.out_dim],
        &[uhat],
        RoutingBackward { uhat, s, rounds, saved },
    )
}

struct RoutingBackward<Buf> {
    uhat: Var,
    s: CapsShape,
    rounds: usize,
    saved: RoutingSaved<Buf>,
}

impl<B: Backend> BackwardOp<B> for RoutingBackward<B::Buf> {
    fn name(&self) -> &'static str {
        "routing"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(duhat) = g.get(self.uhat)? {
            ctx.backend
                .routing_bwd(&self.s, self.rounds, ctx.value(self.uhat), &self.saved, ctx.dout, duhat)?;
        }
        Ok(())
    }
}

/// Prediction vectors and routing as one op: v = routing(W · u) over `rounds` rounds (≥ 1), through
/// [`Backend::caps_routing_fwd`]; û is the backend's business (the fused CUDA version never stores it).
pub fn predict_routing<B: Backend>(t: &mut Tape<B>, u: Var, w: Var, rounds: usize) -> Result<Var> {
    let s = caps_shape("predict_routing", t, u, w)?;
    if rounds == 0 {
        return shape_err("predict_routing", "at least one routing round is needed");
    }
    let mut v = t.backend().alloc_out(s.v_len())?;
    let mut saved = t.backend().routing_saved(&s, rounds)?;
    t.backend()
        .caps_routing_fwd(&s, rounds, &t.value(u).buf, &t.value(w).buf, &mut v, &mut saved)?;
    t.push_op(
        v,
        &[s.batch, s.out_caps, s.out_dim],
        &[u, w],
        PredictRoutingBackward { u, w, s, rounds, saved },
    )
}

struct PredictRoutingBackward<Buf> {
    u: Var,
    w: Var,
    s: CapsShape,
    rounds: usize,
    saved: RoutingSaved<Buf>,
}

impl<B: Backend> BackwardOp<B> for PredictRoutingBackward<B::Buf> {
    fn name(&self) -> &'static str {
        "predict_routing"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let (du, dw) = g.get_two(self.u, self.w)?;
        ctx.backend.caps_routing_bwd(
            &self.s,
            self.rounds,
            ctx.value(self.u),
            ctx.value(self.w),
            &self.saved,
            ctx.dout,
            du,
            dw,
        )
    }
}

pub fn lengths<B: Backend>(t: &mut Tape<B>, v: Var) -> Result<Var> {
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

impl<B: Backend> BackwardOp<B> for LengthsBackward {
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
pub fn mask<B: Backend>(t: &mut Tape<B>, v: Var, idx: Rc<B::Idx>) -> Result<Var> {
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

struct MaskBackward<B: Backend> {
    v: Var,
    batch: usize,
    caps: usize,
    dim: usize,
    idx: Rc<B::Idx>,
}

impl<B: Backend> BackwardOp<B> for MaskBackward<B> {
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
pub fn argmax<B: Backend>(t: &Tape<B>, x: Var) -> Result<Rc<B::Idx>> {
    let xs = &t.value(x).shape;
    if xs.len() != 2 {
        return shape_err("argmax", format!("needs a [rows, cols] value, got {xs:?}"));
    }
    let mut idx = t.backend().alloc_idx(xs[0])?;
    t.backend().argmax(xs[0], xs[1], &t.value(x).buf, &mut idx)?;
    Ok(Rc::new(idx))
}
