//! Adam on the fast CPU backend.

use crate::backend::fast::{Arith, FastCpu, Fused, Plain, simd_fn, wide_simd};
use crate::par::par_items;
use crate::{Error, Result};

use super::{AdamGroup, AdamHyper, AdamOps, check_adam_group};

/// Adam updates parameters in slices of this many values, split over the threads.
const ADAM_SLICE: usize = 1 << 15;

/// A moment below f32's smallest normal number, as zero. A parameter whose gradient stays zero (a
/// unit that no image turns on) sees its first moment shrink by β1 every step, into subnormal numbers
/// within about 800 steps; on x86 every vector operation that reads or makes one waits on a microcode
/// assist (after four epochs of the notebook's run, a third of the primary conv's first moments were
/// subnormal). Such a moment moves its parameter by less than 1e-30·lr.
#[inline(always)]
fn normal_or_zero(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

/// One slice of an Adam update; `k` = [lr, β1, β2, ε, 1 − β1ᵗ, 1 − β2ᵗ]. The moments are stored
/// flushed to zero below f32's normal range ([`normal_or_zero`]); the reference keeps them.
#[inline(always)]
fn adam_body<A: Arith>(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 6]) {
    let [lr, b1, b2, eps, bc1, bc2] = *k;
    for (((pv, gv), mv), vv) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mn = normal_or_zero(A::fma(b1, *mv, (1.0 - b1) * gv));
        let vn = normal_or_zero(A::fma(b2, *vv, (1.0 - b2) * gv * gv));
        *mv = mn;
        *vv = vn;
        *pv -= lr * (mn / bc1) / ((vn / bc2).sqrt() + eps);
    }
}
simd_fn!(fn adam_slice(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 6]) => adam_body;);

impl AdamOps for FastCpu {
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
