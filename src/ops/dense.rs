//! dense: y = act(x · w + b). x [N, in] · w [in, out] + b [out] → y [N, out].

use super::shape_err;
use crate::Result;
use crate::backend::{Act, Backend, DenseShape};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

pub fn dense<B: Backend>(t: &mut Tape<B>, x: Var, w: Var, b: Var, act: Act) -> Result<Var> {
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

impl<B: Backend> BackwardOp<B> for DenseBackward {
    fn name(&self) -> &'static str {
        "dense"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let be = ctx.backend;
        let mut dz = be.alloc_out(self.s.rows * self.s.out)?;
        be.act_bwd(self.act, ctx.y(), ctx.dout, &mut dz)?;
        if let Some(dx) = g.get(self.x)? {
            be.dense_bwd_input(&self.s, &dz, ctx.value(self.w), dx)?;
        }
        if let Some(dw) = g.get(self.w)? {
            be.dense_bwd_weight(&self.s, ctx.value(self.x), &dz, dw)?;
        }
        if let Some(db) = g.get(self.b)? {
            be.bias_bwd(self.s.rows, self.s.out, &dz, db)?;
        }
        Ok(())
    }
}
