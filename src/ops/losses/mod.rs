//! Losses and the scalar sum that joins them.
//! - margin_loss: lengths [B, K], labels [B, per] → [1], mean over the batch of the paper's margin
//!   terms, every label of an image present
//! - sq_err: pred [B, P], target [B, P] → [1], scale · mean over the batch of Σ_p (pred − target)²
//! - add: a + b, same shapes
//!
//! Here: the margin loss's constants, the [`LossOps`] interface and the tape ops; the implementations
//! beside them.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
mod host;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use crate::Result;
use crate::backend::{Core, check, check_labels, shape_err};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

/// Margin loss constants of the paper: T_k max(0, m+ − ‖v_k‖)² + λ (1 − T_k) max(0, ‖v_k‖ − m−)².
pub const M_PLUS: f64 = 0.9;

pub const M_MINUS: f64 = 0.1;

pub const LAMBDA: f64 = 0.5;

/// The margin loss and the reconstruction's squared error.
pub trait LossOps: Core {
    /// loss[0] = mean over the batch of Σ_k margin terms (see [`M_PLUS`]). `labels` holds `per`
    /// classes per image ([batch, per]): each is present (T_k = 1), as MultiMNIST's two digits are.
    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Self::Buf,
        labels: &Self::Idx,
        loss: &mut Self::Buf,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &Self::Buf,
        labels: &Self::Idx,
        dloss: &Self::Buf,
        dl: &mut Self::Buf,
    ) -> Result<()>;
    /// loss[0] = scale · (1/rows) Σ (pred − target)²: per-row sums of squares, mean over rows.
    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Self::Buf,
        target: &Self::Buf,
        scale: f64,
        loss: &mut Self::Buf,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &Self::Buf,
        target: &Self::Buf,
        scale: f64,
        dloss: &Self::Buf,
        dpred: &mut Self::Buf,
    ) -> Result<()>;
}

pub fn margin_loss<B: LossOps>(t: &mut Tape<B>, l: Var, labels: Rc<B::Idx>, per: usize) -> Result<Var> {
    let ls = &t.value(l).shape;
    if ls.len() != 2 {
        return shape_err("margin_loss", format!("needs lengths [B, K], got {ls:?}"));
    }
    let (batch, classes) = (ls[0], ls[1]);
    let mut loss = t.backend().alloc_out(1)?;
    t.backend()
        .margin_loss_fwd(batch, classes, per, &t.value(l).buf, &labels, &mut loss)?;
    t.push_op(
        loss,
        &[1],
        &[l],
        MarginBackward::<B> {
            l,
            batch,
            classes,
            per,
            labels,
        },
    )
}

struct MarginBackward<B: LossOps> {
    l: Var,
    batch: usize,
    classes: usize,
    per: usize,
    labels: Rc<B::Idx>,
}

impl<B: LossOps> BackwardOp<B> for MarginBackward<B> {
    fn name(&self) -> &'static str {
        "margin_loss"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        if let Some(dl) = g.get(self.l)? {
            ctx.backend.margin_loss_bwd(
                self.batch,
                self.classes,
                self.per,
                ctx.value(self.l),
                &self.labels,
                ctx.dout,
                dl,
            )?;
        }
        Ok(())
    }
}

pub fn sq_err<B: LossOps>(t: &mut Tape<B>, pred: Var, target: Var, scale: f64) -> Result<Var> {
    let (ps, ts) = (&t.value(pred).shape, &t.value(target).shape);
    if ps.len() != 2 || ps != ts {
        return shape_err("sq_err", format!("pred {ps:?} and target {ts:?} must both be [B, P]"));
    }
    let (rows, cols) = (ps[0], ps[1]);
    let mut loss = t.backend().alloc_out(1)?;
    t.backend()
        .sq_err_fwd(rows, cols, &t.value(pred).buf, &t.value(target).buf, scale, &mut loss)?;
    t.push_op(
        loss,
        &[1],
        &[pred, target],
        SqErrBackward {
            pred,
            target,
            rows,
            cols,
            scale,
        },
    )
}

struct SqErrBackward {
    pred: Var,
    target: Var,
    rows: usize,
    cols: usize,
    scale: f64,
}

impl<B: LossOps> BackwardOp<B> for SqErrBackward {
    fn name(&self) -> &'static str {
        "sq_err"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let (p, tg) = (ctx.value(self.pred), ctx.value(self.target));
        if let Some(dp) = g.get(self.pred)? {
            ctx.backend
                .sq_err_bwd(self.rows, self.cols, p, tg, self.scale, ctx.dout, dp)?;
        }
        // the target's gradient is the prediction's with the sign flipped: swap the two
        if let Some(dt) = g.get(self.target)? {
            ctx.backend
                .sq_err_bwd(self.rows, self.cols, tg, p, self.scale, ctx.dout, dt)?;
        }
        Ok(())
    }
}

pub fn add<B: LossOps>(t: &mut Tape<B>, a: Var, b: Var) -> Result<Var> {
    let (as_, bs) = (t.value(a).shape.clone(), &t.value(b).shape);
    if &as_ != bs {
        return shape_err("add", format!("shapes {as_:?} and {bs:?} differ"));
    }
    let mut out = t.backend().alloc_out(t.value(a).numel())?;
    t.backend().add_fwd(&t.value(a).buf, &t.value(b).buf, &mut out)?;
    t.push_op(out, &as_, &[a, b], AddBackward { a, b })
}

struct AddBackward {
    a: Var,
    b: Var,
}

impl<B: LossOps> BackwardOp<B> for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        for v in [self.a, self.b] {
            if let Some(d) = g.get(v)? {
                ctx.backend.add_assign(d, ctx.dout)?;
            }
        }
        Ok(())
    }
}

/// The buffers of `margin_loss_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_margin_loss_fwd(
    batch: usize,
    classes: usize,
    per: usize,
    l: usize,
    labels: usize,
    loss: usize,
) -> Result<()> {
    check("margin_loss_fwd", "l", l, batch * classes)?;
    check_labels("margin_loss_fwd", batch, per, labels)?;
    check("margin_loss_fwd", "loss", loss, 1)
}

/// The buffers of `margin_loss_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_margin_loss_bwd(
    batch: usize,
    classes: usize,
    per: usize,
    l: usize,
    labels: usize,
    dloss: usize,
    dl: usize,
) -> Result<()> {
    check("margin_loss_bwd", "l", l, batch * classes)?;
    check_labels("margin_loss_bwd", batch, per, labels)?;
    check("margin_loss_bwd", "dloss", dloss, 1)?;
    check("margin_loss_bwd", "dl", dl, batch * classes)
}

/// The buffers of `sq_err_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_sq_err_fwd(rows: usize, cols: usize, pred: usize, target: usize, loss: usize) -> Result<()> {
    check("sq_err_fwd", "pred", pred, rows * cols)?;
    check("sq_err_fwd", "target", target, rows * cols)?;
    check("sq_err_fwd", "loss", loss, 1)
}

/// The buffers of `sq_err_bwd` against its shape: every backend's check, in one place.
pub(crate) fn check_sq_err_bwd(
    rows: usize,
    cols: usize,
    pred: usize,
    target: usize,
    dloss: usize,
    dpred: usize,
) -> Result<()> {
    check("sq_err_bwd", "pred", pred, rows * cols)?;
    check("sq_err_bwd", "target", target, rows * cols)?;
    check("sq_err_bwd", "dloss", dloss, 1)?;
    check("sq_err_bwd", "dpred", dpred, rows * cols)
}
