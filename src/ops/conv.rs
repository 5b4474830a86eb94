//! conv2d: y = act(conv(x, w) + b), valid padding.
//! x [B, H, W, Cin] · w [K, K, Cin, Cout] + b [Cout] → y [B, OH, OW, Cout].

use super::shape_err;
use crate::Result;
use crate::backend::{Act, Backend, ConvShape};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

pub fn conv2d<B: Backend>(t: &mut Tape<B>, x: Var, w: Var, b: Var, stride: usize, act: Act) -> Result<Var> {
    const OP: &str = "conv2d";
    let (xs, ws, bs) = (&t.value(x).shape, &t.value(w).shape, &t.value(b).shape);
    if xs.len() != 4 || ws.len() != 4 || ws[0] != ws[1] || ws[2] != xs[3] || bs[..] != [ws[3]] || stride == 0 {
        return shape_err(OP, format!("x {xs:?}, w {ws:?}, b {bs:?}, stride {stride} do not fit"));
    }
    if xs[1] < ws[0] || xs[2] < ws[0] {
        return shape_err(
            OP,
            format!("image {}x{} smaller than the {}x{} kernel", xs[1], xs[2], ws[0], ws[0]),
        );
    }
    let s = ConvShape {
        batch: xs[0],
        in_h: xs[1],
        in_w: xs[2],
        in_c: xs[3],
        out_c: ws[3],
        k: ws[0],
        stride,
    };
    let mut y = t.backend().alloc_out(s.y_len())?;
    t.backend()
        .conv2d_fwd(&s, &t.value(x).buf, &t.value(w).buf, &t.value(b).buf, &mut y, act)?;
    t.push_op(
        y,
        &[s.batch, s.out_h(), s.out_w(), s.out_c],
        &[x, w, b],
        Conv2dBackward { x, w, b, s, act },
    )
}

struct Conv2dBackward {
    x: Var,
    w: Var,
    b: Var,
    s: ConvShape,
    act: Act,
}

impl<B: Backend> BackwardOp<B> for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let be = ctx.backend;
        let mut dz = be.alloc_out(self.s.y_len())?;
        be.act_bwd(self.act, ctx.y(), ctx.dout, &mut dz)?;
        if let Some(dx) = g.get(self.x)? {
            be.conv2d_bwd_input(&self.s, &dz, ctx.value(self.w), dx)?;
        }
        if let Some(dw) = g.get(self.w)? {
            be.conv2d_bwd_weight(&self.s, ctx.value(self.x), &dz, dw)?;
        }
        if let Some(db) = g.get(self.b)? {
            be.bias_bwd(self.s.rows(), self.s.out_c, &dz, db)?;
        }
        Ok(())
    }
}
