//! Routing by agreement.
//!
//! - routing: û [B, I, J, D] → v [B, J, D], all rounds in one op (one fused kernel pair on a GPU)
//! - predict_routing: u [B, I, Din], W → v [B, J, D], predict then routing as one op, so that a backend
//!   can fuse them and never store û or its gradient (the model's path)
//!
//! Here: [`RoutingSaved`], the [`RoutingOps`] interface with its unfused defaults, and the tape ops;
//! the implementations beside them.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
#[cfg(target_arch = "x86_64")]
mod fused;
mod softmax;
#[cfg(test)]
mod tests;

use super::capsules::{CapsShape, CapsuleOps, caps_shape};
use crate::backend::{check, shape_err};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};
use crate::{Error, Result};

/// What the routing forward saves for its backward, per image and round:
/// c [B, R, I, J] (coupling coefficients), s [B, R, J, D] (weighted sums), v [B, R, J, D] (squashed).
pub struct RoutingSaved<Buf> {
    pub c: Buf,
    pub s: Buf,
    pub v: Buf,
    /// The prediction vectors û, where a backend keeps them from the forward for the backward (the
    /// fast CPU backend where its fused AVX-512 kernels do not run; the others compute them again, or
    /// never store them).
    pub uhat: Option<Buf>,
    /// The capsule weights transposed (each input dimension's weights of a capsule contiguous), where
    /// a backend keeps them from the forward for the backward (the fast CPU backend).
    pub wt: Option<Buf>,
}

/// The routing op's common preconditions: at least one round, û and the saved buffers' lengths.
pub(crate) fn check_routing(op: &str, s: &CapsShape, rounds: usize, uhat: usize, saved: [usize; 3]) -> Result<()> {
    if rounds == 0 {
        return Err(Error::msg(format!("{op}: at least one routing round is needed")));
    }
    check(op, "uhat", uhat, s.uhat_len())?;
    let per_round = s.batch * rounds * s.out_caps;
    check(op, "saved.c", saved[0], per_round * s.in_caps)?;
    check(op, "saved.s", saved[1], per_round * s.out_dim)?;
    check(op, "saved.v", saved[2], per_round * s.out_dim)
}

/// Routing by agreement, alone (û given) and fused with the prediction vectors (u and W given).
pub trait RoutingOps: CapsuleOps {
    /// Allocates what [`RoutingOps::routing_fwd`] saves for `rounds` rounds.
    fn routing_saved(&self, s: &CapsShape, rounds: usize) -> Result<RoutingSaved<Self::Buf>> {
        let (b, i, j, d) = (s.batch, s.in_caps, s.out_caps, s.out_dim);
        Ok(RoutingSaved {
            c: self.zeros(b * rounds * i * j)?,
            s: self.zeros(b * rounds * j * d)?,
            v: self.zeros(b * rounds * j * d)?,
            uhat: None,
            wt: None,
        })
    }
    /// Routing by agreement, all rounds: b = 0; per round c = softmax_j(b), s_j = Σ_i c_ij û_{j|i},
    /// v_j = squash(s_j), and (all but the last round) b_ij += û_{j|i} · v_j. Writes the last v.
    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Self::Buf,
        v: &mut Self::Buf,
        saved: &mut RoutingSaved<Self::Buf>,
    ) -> Result<()>;
    /// dû += the gradient of the routing output with respect to û, through every round.
    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &Self::Buf,
        saved: &RoutingSaved<Self::Buf>,
        dv: &Self::Buf,
        duhat: &mut Self::Buf,
    ) -> Result<()>;
    /// Prediction vectors and routing in one op: v = routing(û) with û[b,i,j,:] = W[i,j] · u[b,i,:],
    /// saving what [`RoutingOps::routing_fwd`] saves. A backend may fuse the two and never hold û; this
    /// default runs [`CapsuleOps::predict_fwd`] into a temporary û, then [`RoutingOps::routing_fwd`].
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &Self::Buf,
        w: &Self::Buf,
        v: &mut Self::Buf,
        saved: &mut RoutingSaved<Self::Buf>,
    ) -> Result<()> {
        caps_routing_fwd_unfused(self, s, rounds, u, w, v, saved)
    }
    /// The gradients of [`RoutingOps::caps_routing_fwd`]: du += ∂/∂u and dw += ∂/∂W of the loss whose
    /// gradient with respect to v is `dv` (either may be `None`: not wanted). This default recomputes
    /// û, runs [`RoutingOps::routing_bwd`] into a temporary dû, then the prediction's backward.
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &Self::Buf,
        w: &Self::Buf,
        saved: &RoutingSaved<Self::Buf>,
        dv: &Self::Buf,
        du: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
    ) -> Result<()> {
        caps_routing_bwd_unfused(self, s, rounds, u, w, saved, dv, du, dw)
    }
    /// [`RoutingOps::caps_routing_bwd`] with each gradient buffer paired with whether to write it
    /// whole (`true`: it holds no value yet, and every element is set as if added to zeros) or add
    /// to it. This default zeroes the ones to write, then adds.
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_bwd_into(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &Self::Buf,
        w: &Self::Buf,
        saved: &RoutingSaved<Self::Buf>,
        dv: &Self::Buf,
        du: Option<(&mut Self::Buf, bool)>,
        dw: Option<(&mut Self::Buf, bool)>,
    ) -> Result<()> {
        caps_routing_bwd_zeroing(self, s, rounds, u, w, saved, dv, du, dw)
    }
}

/// [`RoutingOps::caps_routing_bwd_into`] by zeroing the buffers to write, then
/// [`RoutingOps::caps_routing_bwd`] (the default, and a fusing backend's where it does not fuse).
#[allow(clippy::too_many_arguments)]
pub fn caps_routing_bwd_zeroing<B: RoutingOps + ?Sized>(
    be: &B,
    s: &CapsShape,
    rounds: usize,
    u: &B::Buf,
    w: &B::Buf,
    saved: &RoutingSaved<B::Buf>,
    dv: &B::Buf,
    du: Option<(&mut B::Buf, bool)>,
    dw: Option<(&mut B::Buf, bool)>,
) -> Result<()> {
    fn zeroed<'g, B: RoutingOps + ?Sized>(be: &B, g: Option<(&'g mut B::Buf, bool)>) -> Result<Option<&'g mut B::Buf>> {
        match g {
            Some((buf, write)) => {
                if write {
                    be.fill(buf, 0.0)?;
                }
                Ok(Some(buf))
            }
            None => Ok(None),
        }
    }
    let (du, dw) = (zeroed(be, du)?, zeroed(be, dw)?);
    be.caps_routing_bwd(s, rounds, u, w, saved, dv, du, dw)
}

/// [`RoutingOps::caps_routing_fwd`] as two ops: [`CapsuleOps::predict_fwd`] into a temporary û, then
/// [`RoutingOps::routing_fwd`] (the default, and what a fusing backend runs for its unfused versions).
pub fn caps_routing_fwd_unfused<B: RoutingOps + ?Sized>(
    be: &B,
    s: &CapsShape,
    rounds: usize,
    u: &B::Buf,
    w: &B::Buf,
    v: &mut B::Buf,
    saved: &mut RoutingSaved<B::Buf>,
) -> Result<()> {
    let mut uhat = be.alloc_out(s.uhat_len())?;
    be.predict_fwd(s, u, w, &mut uhat)?;
    be.routing_fwd(s, rounds, &uhat, v, saved)
}

/// [`RoutingOps::caps_routing_bwd`] as separate ops: û recomputed, [`RoutingOps::routing_bwd`] into a
/// temporary dû, then the prediction's input and weight gradients.
#[allow(clippy::too_many_arguments)]
pub fn caps_routing_bwd_unfused<B: RoutingOps + ?Sized>(
    be: &B,
    s: &CapsShape,
    rounds: usize,
    u: &B::Buf,
    w: &B::Buf,
    saved: &RoutingSaved<B::Buf>,
    dv: &B::Buf,
    du: Option<&mut B::Buf>,
    dw: Option<&mut B::Buf>,
) -> Result<()> {
    if du.is_none() && dw.is_none() {
        return Ok(());
    }
    let mut uhat = be.alloc_out(s.uhat_len())?;
    be.predict_fwd(s, u, w, &mut uhat)?;
    let mut duhat = be.zeros(s.uhat_len())?;
    be.routing_bwd(s, rounds, &uhat, saved, dv, &mut duhat)?;
    if let Some(du) = du {
        be.predict_bwd_input(s, &duhat, w, du)?;
    }
    if let Some(dw) = dw {
        be.predict_bwd_weight(s, u, &duhat, dw)?;
    }
    Ok(())
}

/// Routing by agreement over `rounds` rounds (≥ 1). Gradients flow through every round.
pub fn routing<B: RoutingOps>(t: &mut Tape<B>, uhat: Var, rounds: usize) -> Result<Var> {
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

impl<B: RoutingOps> BackwardOp<B> for RoutingBackward<B::Buf> {
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
/// [`RoutingOps::caps_routing_fwd`]; û is the backend's business (the fused CUDA version never stores it).
pub fn predict_routing<B: RoutingOps>(t: &mut Tape<B>, u: Var, w: Var, rounds: usize) -> Result<Var> {
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

impl<B: RoutingOps> BackwardOp<B> for PredictRoutingBackward<B::Buf> {
    fn name(&self) -> &'static str {
        "predict_routing"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let (du, dw) = g.get_two_to_write(self.u, self.w)?;
        ctx.backend.caps_routing_bwd_into(
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

/// The buffers of `routing_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_routing_fwd(s: &CapsShape, v: usize) -> Result<()> {
    check("routing_fwd", "v", v, s.v_len())
}

/// The buffers of `routing_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_routing_bwd(s: &CapsShape, dv: usize, duhat: usize) -> Result<()> {
    check("routing_bwd", "dv", dv, s.v_len())?;
    check("routing_bwd", "duhat", duhat, s.uhat_len())
}
