//! Routing by agreement on the fast CPU backend.

use crate::Result;
use crate::backend::fast::{Arith, FastCpu, Fused, Plain, PoolBuf, axpy, dot, simd_fn, wide_simd};
use crate::par::{par_items, par_rows};

use super::{RoutingOps, RoutingSaved, check_routing, check_routing_bwd, check_routing_fwd};
use crate::backend::{Core, check};
use crate::ops::capsules::fast::{squash_row, squash_row_bwd, transpose_weights};
use crate::ops::capsules::{CapsShape, CapsuleOps, check_predict_bwd_input, check_predict_fwd};

use super::softmax::{softmax_row, softmax_rows_bwd_add};

/// One image's routing forward: every round's c, s and v into `cs`, `ss`, `vs`, the last v into `v`.
#[inline(always)]
fn routing_fwd_body<A: Arith>(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    let mut logits = vec![0f32; ni * nj];
    for r in 0..rounds {
        let c = &mut cs[r * ni * nj..(r + 1) * ni * nj];
        for (cr, lr) in c.chunks_mut(nj).zip(logits.chunks(nj)) {
            softmax_row(lr, cr);
        }
        let sr = &mut ss[r * nj * d..(r + 1) * nj * d];
        if d == 16 {
            // each s_j summed in registers: four partial sums (i mod 4) hide the FMA's latency
            for (j, sj) in sr.chunks_exact_mut(16).enumerate() {
                let mut acc = [[0f32; 16]; 4];
                for (q, (cq, uq)) in c.chunks_exact(nj).zip(uh.chunks_exact(nj * 16)).enumerate() {
                    let u: &[f32; 16] = uq[j * 16..][..16].try_into().expect("16 values");
                    let a = &mut acc[q % 4];
                    for l in 0..16 {
                        a[l] = A::fma(cq[j], u[l], a[l]);
                    }
                }
                for l in 0..16 {
                    sj[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
                }
            }
        } else {
            sr.fill(0.0);
            for i in 0..ni {
                for j in 0..nj {
                    let k = (i * nj + j) * d;
                    axpy::<A>(c[i * nj + j], &uh[k..k + d], &mut sr[j * d..(j + 1) * d]);
                }
            }
        }
        let vr = &mut vs[r * nj * d..(r + 1) * nj * d];
        for (vj, sj) in vr.chunks_mut(d).zip(sr.chunks(d)) {
            squash_row::<A>(sj, vj);
        }
        if r + 1 < rounds {
            for i in 0..ni {
                for j in 0..nj {
                    let k = (i * nj + j) * d;
                    logits[i * nj + j] += dot::<A>(&uh[k..k + d], &vr[j * d..(j + 1) * d]);
                }
            }
        }
    }
    v.copy_from_slice(&vs[(rounds - 1) * nj * d..]);
}
simd_fn!(fn routing_fwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &mut [f32],
    ss: &mut [f32],
    vs: &mut [f32],
    v: &mut [f32],
) => routing_fwd_body;);

/// One image's routing backward: duh += dv's gradient through every round (the reference's order).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn routing_bwd_body<A: Arith>(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    vs: &[f32],
    dv: &[f32],
    duh: &mut [f32],
) {
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    // gradient with respect to the logits b_{r+1} entering the round after this one
    let mut db_next = vec![0f32; ni * nj];
    let mut dc = vec![0f32; ni * nj];
    let mut dvr = vec![0f32; nj * d];
    let mut ds = vec![0f32; nj * d];
    for r in (0..rounds).rev() {
        let c = &cs[r * ni * nj..(r + 1) * ni * nj];
        let sr = &ss[r * nj * d..(r + 1) * nj * d];
        let vr = &vs[r * nj * d..(r + 1) * nj * d];
        if r + 1 == rounds {
            dvr.copy_from_slice(dv);
        } else {
            // b_{r+1} = b_r + û·v_r: v_r and û receive db_{r+1}
            dvr.fill(0.0);
            for i in 0..ni {
                for j in 0..nj {
                    let (g, k) = (db_next[i * nj + j], (i * nj + j) * d);
                    axpy::<A>(g, &uh[k..k + d], &mut dvr[j * d..(j + 1) * d]);
                    axpy::<A>(g, &vr[j * d..(j + 1) * d], &mut duh[k..k + d]);
                }
            }
        }
        ds.fill(0.0);
        for ((sj, dvj), dsj) in sr.chunks(d).zip(dvr.chunks(d)).zip(ds.chunks_mut(d)) {
            squash_row_bwd::<A>(sj, dvj, dsj);
        }
        // s_j = Σ_i c_ij û_{j|i}
        for i in 0..ni {
            for j in 0..nj {
                let k = (i * nj + j) * d;
                let dsj = &ds[j * d..(j + 1) * d];
                axpy::<A>(c[i * nj + j], dsj, &mut duh[k..k + d]);
                dc[i * nj + j] = dot::<A>(&uh[k..k + d], dsj);
            }
        }
        // c_i = softmax(b_i); b_r also flows on to b_{r+1}
        softmax_rows_bwd_add(nj, c, &dc, &mut db_next);
    }
}
simd_fn!(fn routing_bwd_image(
    s: &CapsShape,
    rounds: usize,
    uh: &[f32],
    cs: &[f32],
    ss: &[f32],
    vs: &[f32],
    dv: &[f32],
    duh: &mut [f32],
) => routing_bwd_body;);

/// Whether the AVX-512 kernels of 16-D capsules route `s` here.
fn avx512_usable(s: &CapsShape) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx512::usable(s);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

impl RoutingOps for FastCpu {
    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &PoolBuf,
        v: &mut PoolBuf,
        saved: &mut RoutingSaved<PoolBuf>,
    ) -> Result<()> {
        const OP: &str = "routing_fwd";
        let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check_routing_fwd(s, v.len())?;
        let items: Vec<_> = saved
            .c
            .chunks_mut(rounds * ni * nj)
            .zip(saved.s.chunks_mut(rounds * nj * d))
            .zip(saved.v.chunks_mut(rounds * nj * d))
            .zip(v.chunks_mut(nj * d))
            .collect();
        let wide16 = avx512_usable(s);
        par_items(items, rounds * ni * nj * d * 2, |b, (((cs, ss), vs), vb)| {
            let uh = &uhat[b * ni * nj * d..(b + 1) * ni * nj * d];
            if wide16 {
                // SAFETY: the CPU has AVX-512F (`usable`); one image's slices
                #[cfg(target_arch = "x86_64")]
                return unsafe { super::avx512::fwd_image(s, rounds, uh, cs, ss, vs, vb) };
            }
            routing_fwd_image(s, rounds, uh, cs, ss, vs, vb)
        });
        Ok(())
    }

    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &PoolBuf,
        saved: &RoutingSaved<PoolBuf>,
        dv: &PoolBuf,
        duhat: &mut PoolBuf,
    ) -> Result<()> {
        routing_bwd(s, rounds, uhat, saved, dv, duhat, false)
    }

    /// Of 8-D capsules into at most 16 classes of 16-D ones on AVX-512, without û (37 MB at batch
    /// 50): the threads split the images, and each round is one pass over their capsules that makes û
    /// again in L1 (the results those of the unfused pair, bit for bit). Elsewhere as the unfused
    /// pair, û kept for the backward. The transposed weights are kept for the backward in both cases.
    fn caps_routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &PoolBuf,
        w: &PoolBuf,
        v: &mut PoolBuf,
        saved: &mut RoutingSaved<PoolBuf>,
    ) -> Result<()> {
        check_predict_fwd(s, u.len(), w.len(), s.uhat_len())?;
        let mut wt = self.alloc_out(w.len())?;
        transpose_weights(s, w, &mut wt);
        #[cfg(target_arch = "x86_64")]
        if fused_usable(s) {
            self.caps_routing_fwd_avx512(s, rounds, u, &wt, v, saved)?;
            saved.uhat = None;
            saved.wt = Some(wt);
            return Ok(());
        }
        let mut uhat = self.alloc_out(s.uhat_len())?;
        self.predict_fwd_transposed(s, u, &wt, &mut uhat);
        self.routing_fwd(s, rounds, &uhat, v, saved)?;
        saved.uhat = Some(uhat);
        saved.wt = Some(wt);
        Ok(())
    }

    /// As the unfused pair, with the û the forward kept (else computed again), and dû written image
    /// by image, each zeroed just before (in cache), not zeroed whole first.
    fn caps_routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &PoolBuf,
        w: &PoolBuf,
        saved: &RoutingSaved<PoolBuf>,
        dv: &PoolBuf,
        du: Option<&mut PoolBuf>,
        dw: Option<&mut PoolBuf>,
    ) -> Result<()> {
        if du.is_none() && dw.is_none() {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(wt) = fused_weights(s, w, saved) {
            let (du, dw) = (du.map(|g| (g, false)), dw.map(|g| (g, false)));
            return self.caps_routing_bwd_avx512(s, rounds, u, wt, saved, dv, du, dw);
        }
        let computed;
        let uhat = match &saved.uhat {
            Some(uhat) => uhat,
            None => {
                let mut uhat = self.alloc_out(s.uhat_len())?;
                self.predict_fwd(s, u, w, &mut uhat)?;
                computed = uhat;
                &computed
            }
        };
        let mut duhat = self.alloc_out(s.uhat_len())?;
        routing_bwd(s, rounds, uhat, saved, dv, &mut duhat, true)?;
        if let Some(du) = du {
            let done = match &saved.wt {
                Some(wt) if wt.len() == w.len() => {
                    check_predict_bwd_input(s, duhat.len(), w.len(), du.len())?;
                    self.predict_bwd_input_transposed(s, &duhat, wt, du)
                }
                _ => false,
            };
            if !done {
                self.predict_bwd_input(s, &duhat, w, du)?;
            }
        }
        if let Some(dw) = dw {
            self.predict_bwd_weight(s, u, &duhat, dw)?;
        }
        Ok(())
    }

    /// As [`RoutingOps::caps_routing_bwd`]; on the fused AVX-512 path the buffers to write are
    /// written (no zeroing first, and no zeros read back), elsewhere zeroed first.
    fn caps_routing_bwd_into(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &PoolBuf,
        w: &PoolBuf,
        saved: &RoutingSaved<PoolBuf>,
        dv: &PoolBuf,
        du: Option<(&mut PoolBuf, bool)>,
        dw: Option<(&mut PoolBuf, bool)>,
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if let Some(wt) = fused_weights(s, w, saved)
            && (du.is_some() || dw.is_some())
        {
            return self.caps_routing_bwd_avx512(s, rounds, u, wt, saved, dv, du, dw);
        }
        super::caps_routing_bwd_zeroing(self, s, rounds, u, w, saved, dv, du, dw)
    }
}

impl FastCpu {
    /// [`RoutingOps::caps_routing_fwd`] of 8-D capsules into 16-D ones on AVX-512, from the
    /// transposed weights: the threads split the images into blocks, one pass per round over each.
    #[cfg(target_arch = "x86_64")]
    fn caps_routing_fwd_avx512(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &PoolBuf,
        wt: &PoolBuf,
        v: &mut PoolBuf,
        saved: &mut RoutingSaved<PoolBuf>,
    ) -> Result<()> {
        const OP: &str = "caps_routing_fwd";
        let (nb, n, njd) = (s.batch, s.in_caps * s.out_caps, s.out_caps * 16);
        check_routing(
            OP,
            s,
            rounds,
            s.uhat_len(),
            [saved.c.len(), saved.s.len(), saved.v.len()],
        )?;
        check_routing_fwd(s, v.len())?;
        if nb == 0 || n == 0 {
            return Ok(());
        }
        let mut logits = self.alloc_out(nb * n)?;
        let per = image_block(s);
        let parts: Vec<_> = saved
            .c
            .chunks_mut(per * rounds * n)
            .zip(saved.s.chunks_mut(per * rounds * njd))
            .zip(saved.v.chunks_mut(per * rounds * njd))
            .zip(v.chunks_mut(per * njd))
            .zip(logits.chunks_mut(per * n))
            .collect();
        crate::par::scatter(parts, |t, ((((cs, ss), vs), vb), lg)| {
            // SAFETY: AVX-512F and FMA (`avx512_usable`), 8-D into 16-D; block t's slices, whole images
            unsafe { super::fused::fwd_block(s, rounds, t * per, u, wt, cs, ss, vs, vb, lg) }
        });
        Ok(())
    }

    /// [`RoutingOps::caps_routing_bwd`] of 8-D capsules into 16-D ones on AVX-512, with neither û nor
    /// dû (37 MB each at batch 50): the threads split the images into blocks, and the routing's
    /// backward keeps only what dû is made of (each round's ds and the logits' gradients, 2.4 MB), û
    /// made again in L1 as the forward makes it; then the threads split the capsules, and for each
    /// capsule and image dû is made in L1 and used at once for du and dW (with that capsule's 5 KiB of
    /// Wᵀ and of dW's sums).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn caps_routing_bwd_avx512(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &PoolBuf,
        wt: &PoolBuf,
        saved: &RoutingSaved<PoolBuf>,
        dv: &PoolBuf,
        du: Option<(&mut PoolBuf, bool)>,
        dw: Option<(&mut PoolBuf, bool)>,
    ) -> Result<()> {
        const OP: &str = "caps_routing_bwd";
        let (nb, ni, nj, d) = (s.batch, s.in_caps, s.out_caps, s.out_dim);
        let (n, njd) = (ni * nj, nj * d);
        check_routing(
            OP,
            s,
            rounds,
            s.uhat_len(),
            [saved.c.len(), saved.s.len(), saved.v.len()],
        )?;
        check(OP, "dv", dv.len(), nb * nj * d)?;
        check(OP, "u", u.len(), nb * ni * 8)?;
        check(OP, "w", wt.len(), s.w_len())?;
        if let Some((du, _)) = &du {
            check(OP, "du", du.len(), u.len())?;
        }
        if let Some((dw, _)) = &dw {
            check(OP, "dw", dw.len(), s.w_len())?;
        }
        if nb == 0 || n == 0 {
            // nothing to add; a buffer to write holds zeros then
            for (g, _) in [du, dw].into_iter().flatten().filter(|g| g.1) {
                g.fill(0.0);
            }
            return Ok(());
        }
        let mut ds_all = self.alloc_out(nb * rounds * njd)?;
        let mut g_all = self.alloc_out(nb * (rounds - 1) * n)?;
        let per = image_block(s);
        let g_per = ((rounds - 1) * n * per).max(1);
        let parts: Vec<_> = ds_all
            .chunks_mut(per * rounds * njd)
            .zip(saved.c.chunks(per * rounds * n))
            .zip(saved.s.chunks(per * rounds * njd))
            .zip(dv.chunks(per * njd))
            .zip(g_all.chunks_mut(g_per).chain(std::iter::repeat_with(|| &mut [][..])))
            .collect();
        crate::par::scatter(parts, |t, ((((dsb, cs), ss), dvb), gb)| {
            let g_len = (rounds - 1) * n * (dvb.len() / njd);
            // SAFETY: AVX-512F and FMA (`avx512_usable`), 8-D into 16-D; block t's slices, whole images
            unsafe { super::fused::bwd_coeffs_block(s, rounds, t * per, u, wt, cs, ss, dvb, dsb, &mut gb[..g_len]) }
        });
        let out = super::avx512::GradsOut {
            du: du.map(|(b, write)| (b.as_mut_ptr(), write)),
            dw: dw.map(|(b, write)| (b.as_mut_ptr(), write)),
        };
        // parts of 16 capsules, fixed by the shape: each capsule's sums in one thread
        const CAPS: usize = 16;
        crate::par::par_map(ni.div_ceil(CAPS), CAPS * nb * nj * d * 8 * 4, |p| {
            let caps = p * CAPS..((p + 1) * CAPS).min(ni);
            // SAFETY: AVX-512F and FMA (`avx512_usable`), 8-D into 16-D; the lengths checked above;
            // the parts' capsules are disjoint, and du and dW are borrowed mutably for the call
            unsafe { super::avx512::predict_grads(s, rounds, caps, &saved.c, &saved.v, &ds_all, &g_all, u, wt, out) }
        });
        Ok(())
    }
}

/// Whether the fused AVX-512 kernels (`super::fused`, never holding û) run `s` here: 8-D capsules
/// into at most 16 classes of 16-D ones, a class's coupling each in a lane of one register.
#[cfg(target_arch = "x86_64")]
fn fused_usable(s: &CapsShape) -> bool {
    s.in_dim == 8 && s.out_caps <= 16 && avx512_usable(s)
}

/// The transposed weights the forward kept, where the fused backward runs `s` with them (W's own
/// length: kept for these weights).
#[cfg(target_arch = "x86_64")]
fn fused_weights<'a>(s: &CapsShape, w: &PoolBuf, saved: &'a RoutingSaved<PoolBuf>) -> Option<&'a PoolBuf> {
    saved.wt.as_ref().filter(|wt| wt.len() == w.len() && fused_usable(s))
}

/// Images per block of the fused kernels: the batch split evenly over the threads.
#[cfg(target_arch = "x86_64")]
fn image_block(s: &CapsShape) -> usize {
    s.batch.div_ceil(crate::par::threads().min(s.batch).max(1)).max(1)
}

/// dû += (or, with `overwrite`, =) the routing's gradient, image by image over the threads.
fn routing_bwd(
    s: &CapsShape,
    rounds: usize,
    uhat: &PoolBuf,
    saved: &RoutingSaved<PoolBuf>,
    dv: &PoolBuf,
    duhat: &mut PoolBuf,
    overwrite: bool,
) -> Result<()> {
    const OP: &str = "routing_bwd";
    let (ni, nj, d) = (s.in_caps, s.out_caps, s.out_dim);
    check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
    check_routing_bwd(s, dv.len(), duhat.len())?;
    let (per_c, per_s) = (rounds * ni * nj, rounds * nj * d);
    let wide16 = avx512_usable(s);
    par_rows(duhat, ni * nj * d, rounds * ni * nj * d * 4, |b, duh| {
        let (uh, cs) = (
            &uhat[b * ni * nj * d..(b + 1) * ni * nj * d],
            &saved.c[b * per_c..(b + 1) * per_c],
        );
        let (ss, vs) = (
            &saved.s[b * per_s..(b + 1) * per_s],
            &saved.v[b * per_s..(b + 1) * per_s],
        );
        let dv = &dv[b * nj * d..(b + 1) * nj * d];
        if wide16 {
            // SAFETY: the CPU has AVX-512F (`usable`); one image's slices
            #[cfg(target_arch = "x86_64")]
            return unsafe { super::avx512::bwd_image(s, rounds, uh, cs, ss, vs, dv, duh, overwrite) };
        }
        if overwrite {
            duh.fill(0.0);
        }
        routing_bwd_image(s, rounds, uh, cs, ss, vs, dv, duh)
    });
    Ok(())
}
