//! conv2d: y = act(conv(x, w) + b), valid padding.
//! x [B, H, W, Cin] · w [K, K, Cin, Cout] + b [Cout] → y [B, OH, OW, Cout].
//!
//! Here: [`ConvShape`], the [`ConvOps`] interface, the tape op [`conv2d`]; the CPU reference, fast CPU
//! and CUDA implementations beside it (cpu.rs, fast.rs with its AVX-512 kernel in avx512.rs and its
//! Fourier path in fft.rs, cuda.rs).

#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
pub(crate) mod fft;
mod im2col;
#[cfg(test)]
mod tests;

use super::dense::{Act, DenseOps};
use crate::Result;
use crate::backend::{Core, check, shape_err};
use crate::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

/// A valid (unpadded) 2-D convolution over channels-last images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub out_c: usize,
    pub k: usize,
    pub stride: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        (self.in_h - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w - self.k) / self.stride + 1
    }
    /// Length of one im2col row: K·K·Cin, ordered (ky, kx, c) like the kernel's first three axes.
    pub fn patch_len(&self) -> usize {
        self.k * self.k * self.in_c
    }
    pub fn x_len(&self) -> usize {
        self.batch * self.in_h * self.in_w * self.in_c
    }
    pub fn w_len(&self) -> usize {
        self.patch_len() * self.out_c
    }
    /// Output rows of the implicit GEMM: B·OH·OW.
    pub fn rows(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }
    pub fn y_len(&self) -> usize {
        self.rows() * self.out_c
    }
    /// Multiply-accumulates of the forward pass.
    pub fn macs(&self) -> usize {
        self.rows() * self.patch_len() * self.out_c
    }
}

/// What a backend keeps from a conv's forward for its backward, made once per step instead of once
/// per GEMM: the fast CPU backend's bf16 mode keeps the input rounded to bf16 (for the weight
/// gradient) and the weights packed for the input gradient's GEMM (packed together with the
/// forward's). Bits of bf16, two to an element of `Buf`. Empty by default.
pub struct ConvSaved<Buf> {
    /// x rounded to bf16.
    pub x_bf16: Option<Buf>,
    /// Wᵀ packed as the input gradient GEMM's B.
    pub wt_tiles: Option<Buf>,
    /// The kernels' spectra packed for the input gradient (the Fourier path, [`fft`]).
    pub w_spectra: Option<Buf>,
    /// The images' spectra packed for the weight gradient (the Fourier path).
    pub x_spectra: Option<Buf>,
}

impl<Buf> ConvSaved<Buf> {
    /// Nothing kept.
    pub fn none() -> ConvSaved<Buf> {
        ConvSaved {
            x_bf16: None,
            wt_tiles: None,
            w_spectra: None,
            x_spectra: None,
        }
    }
}

/// Convolutions: an implicit GEMM [B·OH·OW, K·K·Cin] × [K·K·Cin, Cout]. The bias and activation
/// gradients are [`super::dense::DenseOps`]'.
pub trait ConvOps: Core {
    /// y = act(conv(x, w) + b).
    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        act: Act,
    ) -> Result<()>;
    /// [`ConvOps::conv2d_fwd`] for a training step: also returns what the backward may reuse
    /// ([`ConvSaved`]). This default keeps nothing.
    fn conv2d_fwd_saving(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        act: Act,
    ) -> Result<ConvSaved<Self::Buf>> {
        self.conv2d_fwd(s, x, w, b, y, act)?;
        Ok(ConvSaved::none())
    }
    /// dx += conv_transpose(dz, w), where dz is the gradient before the activation.
    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &Self::Buf, w: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// [`ConvOps::conv2d_bwd_input`] with what the forward of the same x and w kept. This default
    /// ignores it.
    fn conv2d_bwd_input_saved(
        &self,
        s: &ConvShape,
        dz: &Self::Buf,
        w: &Self::Buf,
        _saved: &ConvSaved<Self::Buf>,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        self.conv2d_bwd_input(s, dz, w, dx)
    }
    /// dw += Σ over batch and positions of patch(x)ᵀ · dz.
    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &Self::Buf, dz: &Self::Buf, dw: &mut Self::Buf) -> Result<()>;
    /// [`ConvOps::conv2d_bwd_weight`] with what the forward of the same x and w kept, and where
    /// `overwrite`, dw = instead of += (dw holds no value yet: its first producer). This default
    /// ignores what was kept and zeroes dw first where it is to be overwritten.
    fn conv2d_bwd_weight_saved(
        &self,
        s: &ConvShape,
        x: &Self::Buf,
        _saved: &ConvSaved<Self::Buf>,
        dz: &Self::Buf,
        dw: &mut Self::Buf,
        overwrite: bool,
    ) -> Result<()> {
        if overwrite {
            self.fill(dw, 0.0)?;
        }
        self.conv2d_bwd_weight(s, x, dz, dw)
    }
    /// The weight and bias gradients of a conv whose input needs none (the first layer):
    /// dw += Σ patch(x)ᵀ · dz and, where given, db += Σ dz, with dz = dy · act'(y) from the output y
    /// and its gradient dy. This default makes dz ([`DenseOps::act_bias_bwd`]), then runs
    /// [`ConvOps::conv2d_bwd_weight`]; a backend may never store dz.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bwd_params(
        &self,
        s: &ConvShape,
        act: Act,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
    ) -> Result<()>
    where
        Self: DenseOps,
    {
        conv2d_bwd_params_in_two_steps(self, s, act, x, y, dy, dw, db)
    }
}

/// [`ConvOps::conv2d_bwd_params`] as its default runs it: dz with its bias gradient
/// ([`DenseOps::act_bias_bwd`]), then [`ConvOps::conv2d_bwd_weight`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_bwd_params_in_two_steps<B: ConvOps + DenseOps + ?Sized>(
    be: &B,
    s: &ConvShape,
    act: Act,
    x: &B::Buf,
    y: &B::Buf,
    dy: &B::Buf,
    dw: &mut B::Buf,
    db: Option<&mut B::Buf>,
) -> Result<()> {
    let mut dz = be.alloc_out(s.y_len())?;
    be.act_bias_bwd(act, s.rows(), s.out_c, y, dy, &mut dz, db)?;
    be.conv2d_bwd_weight(s, x, &dz, dw)
}

pub fn conv2d<B: ConvOps + DenseOps>(t: &mut Tape<B>, x: Var, w: Var, b: Var, stride: usize, act: Act) -> Result<Var> {
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
    let (be, xb, wb, bb) = (t.backend(), &t.value(x).buf, &t.value(w).buf, &t.value(b).buf);
    // the input gradient needs x to want one; without it (the first layer) nothing kept serves
    let saved = if t.records(&[x, w, b]) && t.needs_grad(x) {
        be.conv2d_fwd_saving(&s, xb, wb, bb, &mut y, act)?
    } else {
        be.conv2d_fwd(&s, xb, wb, bb, &mut y, act)?;
        ConvSaved::none()
    };
    t.push_op(
        y,
        &[s.batch, s.out_h(), s.out_w(), s.out_c],
        &[x, w, b],
        Conv2dBackward { x, w, b, s, act, saved },
    )
}

struct Conv2dBackward<Buf> {
    x: Var,
    w: Var,
    b: Var,
    s: ConvShape,
    act: Act,
    saved: ConvSaved<Buf>,
}

impl<B: ConvOps + DenseOps> BackwardOp<B> for Conv2dBackward<B::Buf> {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn label(&self) -> String {
        let s = &self.s;
        format!("conv2d {}->{} {}x{}/{}", s.in_c, s.out_c, s.k, s.k, s.stride)
    }
    fn backward(&self, ctx: &Ctx<'_, B>, g: &mut GradStore<'_, B>) -> Result<()> {
        let be = ctx.backend;
        if g.get(self.x)?.is_none()
            && self.w != self.b
            && let (Some(dw), db) = g.get_two(self.w, self.b)?
        {
            // no input gradient (the first layer): the parameters' gradients in one op
            let x = ctx.value(self.x);
            return be.conv2d_bwd_params(&self.s, self.act, x, ctx.y(), ctx.dout, dw, db);
        }
        let mut dz = be.alloc_out(self.s.y_len())?;
        let db = g.get(self.b)?;
        be.act_bias_bwd(self.act, self.s.rows(), self.s.out_c, ctx.y(), ctx.dout, &mut dz, db)?;
        if let Some(dx) = g.get(self.x)? {
            be.conv2d_bwd_input_saved(&self.s, &dz, ctx.value(self.w), &self.saved, dx)?;
        }
        if let Some((dw, unwritten)) = g.get_to_write(self.w)? {
            be.conv2d_bwd_weight_saved(&self.s, ctx.value(self.x), &self.saved, &dz, dw, unwritten)?;
        }
        Ok(())
    }
}

/// The buffers of `conv2d_fwd` against its shape: every backend's check, in one place.
pub(crate) fn check_conv2d_fwd(s: &ConvShape, x: usize, w: usize, b: usize, y: usize) -> Result<()> {
    check("conv2d_fwd", "x", x, s.x_len())?;
    check("conv2d_fwd", "w", w, s.w_len())?;
    check("conv2d_fwd", "b", b, s.out_c)?;
    check("conv2d_fwd", "y", y, s.y_len())
}

/// The buffers of `conv2d_bwd_input` against its shape: every backend's check, in one place.
pub(crate) fn check_conv2d_bwd_input(s: &ConvShape, dz: usize, w: usize, dx: usize) -> Result<()> {
    check("conv2d_bwd_input", "dz", dz, s.y_len())?;
    check("conv2d_bwd_input", "w", w, s.w_len())?;
    check("conv2d_bwd_input", "dx", dx, s.x_len())
}

/// The buffers of `conv2d_bwd_weight` against its shape: every backend's check, in one place.
pub(crate) fn check_conv2d_bwd_weight(s: &ConvShape, x: usize, dz: usize, dw: usize) -> Result<()> {
    check("conv2d_bwd_weight", "x", x, s.x_len())?;
    check("conv2d_bwd_weight", "dz", dz, s.y_len())?;
    check("conv2d_bwd_weight", "dw", dw, s.w_len())
}
