//! Routing by agreement on the GPU: the launches of its kernels.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::backend::check;
use crate::cuda::launch::{blocks, de, launch};
use crate::cuda::params::i32_of;
use crate::cuda::registry::{self as reg, Kernel};
use crate::cuda::{CudaBackend, CudaBuf};
use crate::{Error, Result};

use super::{
    RoutingOps, RoutingSaved, caps_routing_bwd_unfused, caps_routing_fwd_unfused, check_routing, check_routing_bwd,
    check_routing_fwd,
};
use crate::ops::capsules::CapsShape;
use crate::ops::capsules::cuda::CapsParams;

impl RoutingOps for CudaBackend {
    fn routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &CudaBuf,
        v: &mut CudaBuf,
        saved: &mut RoutingSaved<CudaBuf>,
    ) -> Result<()> {
        const OP: &str = "routing_fwd";
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check_routing_fwd(s, v.len())?;
        if s.batch == 0 {
            return Ok(());
        }
        let (p, r) = (CapsParams::new(s)?, rounds as i32);
        let (kernel, smem) = self.routing_kernel(s, rounds, true)?;
        let cfg = LaunchConfig {
            grid_dim: (s.batch as u32, 1, 1),
            block_dim: (reg::ROUTING_THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        let RoutingSaved { c, s: ss, v: sv, .. } = saved;
        // SAFETY: routing_fwd_v1 and _v2 (uhat, v, saved_c, saved_s, saved_v, CapsParams, int rounds), one
        // block per image with the dynamic shared memory routing_kernel computes; lengths checked above.
        launch!(
            self,
            kernel,
            cfg,
            [
                uhat.slice(),
                v.slice_mut(),
                c.slice_mut(),
                ss.slice_mut(),
                sv.slice_mut(),
                &p,
                &r
            ]
        )
    }

    fn routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        uhat: &CudaBuf,
        saved: &RoutingSaved<CudaBuf>,
        dv: &CudaBuf,
        duhat: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "routing_bwd";
        check_routing(OP, s, rounds, uhat.len(), [saved.c.len(), saved.s.len(), saved.v.len()])?;
        check_routing_bwd(s, dv.len(), duhat.len())?;
        if s.batch == 0 {
            return Ok(());
        }
        let (p, r) = (CapsParams::new(s)?, rounds as i32);
        let (kernel, smem) = self.routing_kernel(s, rounds, false)?;
        let cfg = LaunchConfig {
            grid_dim: (s.batch as u32, 1, 1),
            block_dim: (reg::ROUTING_THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        if kernel == reg::ROUTING_BWD_V1 {
            // SAFETY: routing_bwd_v1(uhat, saved_c, saved_s, saved_v, dv, duhat, CapsParams, int rounds), one
            // block per image with the dynamic shared memory routing_kernel computes; lengths checked above.
            return launch!(
                self,
                kernel,
                cfg,
                [
                    uhat.slice(),
                    saved.c.slice(),
                    saved.s.slice(),
                    saved.v.slice(),
                    dv.slice(),
                    duhat.slice_mut(),
                    &p,
                    &r
                ]
            );
        }
        // v2 keeps db [B, I, J] in global memory: a pooled buffer the kernel zeroes first (the stream
        // orders its next user after this launch)
        let mut scratch = self.take::<f32>(s.batch * s.in_caps * s.out_caps)?;
        // SAFETY: routing_bwd_v2(uhat, saved_c, saved_s, saved_v, dv, duhat, CapsParams, int rounds,
        // scratch [B, I, J]), one block per image with the dynamic shared memory routing_kernel computes;
        // lengths checked above, scratch sized here.
        launch!(
            self,
            kernel,
            cfg,
            [
                uhat.slice(),
                saved.c.slice(),
                saved.s.slice(),
                saved.v.slice(),
                dv.slice(),
                duhat.slice_mut(),
                &p,
                &r,
                scratch.slice_mut()
            ]
        )
    }

    fn caps_routing_fwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &CudaBuf,
        w: &CudaBuf,
        v: &mut CudaBuf,
        saved: &mut RoutingSaved<CudaBuf>,
    ) -> Result<()> {
        if !self.fused_routing_runs(s, rounds) {
            return caps_routing_fwd_unfused(self, s, rounds, u, w, v, saved);
        }
        const OP: &str = "caps_routing_fwd";
        self.check_caps_routing(OP, s, rounds, u, w, saved)?;
        check(OP, "v", v.len(), s.v_len())?;
        if s.batch == 0 {
            return Ok(());
        }
        let (p, nr) = (CapsParams::new(s)?, rounds as i32);
        let (chunk, smem) = reg::fused_routing_plan(reg::CAPS_ROUTE_FWD_PARTIAL, &s.dims(), rounds)?;
        let (grid, chunks, group) = self.chunk_grid(s, chunk);
        let chunk = chunk as i32;
        let (_, smem_reduce) = reg::fused_routing_plan(reg::CAPS_ROUTE_FWD_REDUCE, &s.dims(), rounds)?;
        let mut partial = self.take::<f32>(s.batch * chunks as usize * s.out_caps * s.out_dim)?;
        let RoutingSaved { c, s: ss, v: sv, .. } = saved;
        for r in 0..nr {
            // SAFETY: caps_route_fwd_partial(u, w, saved_c, saved_v, partial [B, chunks, J, D], CapsParams,
            // int rounds, int r, int chunk, int group) on a (chunks, groups) grid with the shared memory
            // fused_routing_plan computes; lengths checked above, partial sized here.
            launch!(
                self,
                reg::CAPS_ROUTE_FWD_PARTIAL,
                blocks(grid, smem),
                [
                    u.slice(),
                    w.slice(),
                    c.slice_mut(),
                    sv.slice(),
                    partial.slice_mut(),
                    &p,
                    &nr,
                    &r,
                    &chunk,
                    &group
                ]
            )?;
            // SAFETY: caps_route_fwd_reduce(partial, saved_s, saved_v, v, CapsParams, int rounds, int r,
            // int chunks), one block per image.
            launch!(
                self,
                reg::CAPS_ROUTE_FWD_REDUCE,
                blocks((s.batch as u32, 1), smem_reduce),
                [
                    partial.slice(),
                    ss.slice_mut(),
                    sv.slice_mut(),
                    v.slice_mut(),
                    &p,
                    &nr,
                    &r,
                    &chunks
                ]
            )?;
        }
        Ok(())
    }

    fn caps_routing_bwd(
        &self,
        s: &CapsShape,
        rounds: usize,
        u: &CudaBuf,
        w: &CudaBuf,
        saved: &RoutingSaved<CudaBuf>,
        dv: &CudaBuf,
        du: Option<&mut CudaBuf>,
        dw: Option<&mut CudaBuf>,
    ) -> Result<()> {
        if !self.fused_routing_runs(s, rounds) {
            return caps_routing_bwd_unfused(self, s, rounds, u, w, saved, dv, du, dw);
        }
        const OP: &str = "caps_routing_bwd";
        self.check_caps_routing(OP, s, rounds, u, w, saved)?;
        check(OP, "dv", dv.len(), s.v_len())?;
        if let Some(du) = &du {
            check(OP, "du", du.len(), s.u_len())?;
        }
        if let Some(dw) = &dw {
            check(OP, "dw", dw.len(), s.w_len())?;
        }
        if (du.is_none() && dw.is_none()) || s.batch == 0 {
            return Ok(());
        }
        let (p, nr) = (CapsParams::new(s)?, rounds as i32);
        let (jd, ij) = (s.out_caps * s.out_dim, s.in_caps * s.out_caps);
        let (chunk, smem) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_PARTIAL, &s.dims(), rounds)?;
        let (grid, chunks, group) = self.chunk_grid(s, chunk);
        let chunk = chunk as i32;
        let (_, smem_reduce) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_REDUCE, &s.dims(), rounds)?;
        let (chunk_i, smem_i) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_INPUT, &s.dims(), rounds)?;
        // ds [B, R, J, D]; db [B, R−1, I, J]: slot q holds the logits' gradient of round q + 1; every
        // element is written before it is read
        let mut ds = self.take::<f32>(s.batch * rounds * jd)?;
        // (one float for a single round, which needs none: a launch argument cannot be a null slice)
        let mut db = self.take::<f32>((s.batch * (rounds - 1) * ij).max(1))?;
        let mut partial = self.take::<f32>(s.batch * chunks as usize * jd)?;
        for r in (0..nr).rev() {
            // SAFETY: caps_route_bwd_reduce(partial, dv, saved_s, ds, CapsParams, int rounds, int r,
            // int chunks), one block per image; partial is read only below the last round, after
            // caps_route_bwd_partial of round r + 1 wrote it.
            launch!(
                self,
                reg::CAPS_ROUTE_BWD_REDUCE,
                blocks((s.batch as u32, 1), smem_reduce),
                [
                    partial.slice(),
                    dv.slice(),
                    saved.s.slice(),
                    ds.slice_mut(),
                    &p,
                    &nr,
                    &r,
                    &chunks
                ]
            )?;
            if r == 0 {
                break;
            }
            // SAFETY: caps_route_bwd_partial(u, w, saved_c, ds, db, partial, CapsParams, int rounds,
            // int r, int chunk, int group) on a (chunks, groups) grid with fused_routing_plan's shared
            // memory; r ≥ 1, so db's slot r − 1 exists.
            launch!(
                self,
                reg::CAPS_ROUTE_BWD_PARTIAL,
                blocks(grid, smem),
                [
                    u.slice(),
                    w.slice(),
                    saved.c.slice(),
                    ds.slice(),
                    db.slice_mut(),
                    partial.slice_mut(),
                    &p,
                    &nr,
                    &r,
                    &chunk,
                    &group
                ]
            )?;
        }
        if let Some(du) = du {
            let (grid, _, group) = self.chunk_grid(s, chunk_i);
            let chunk_i = chunk_i as i32;
            // SAFETY: caps_route_bwd_input(w, saved_c, saved_v, ds, db, du, CapsParams, int rounds,
            // int chunk, int group) on a (chunks, groups) grid with fused_routing_plan's shared memory.
            launch!(
                self,
                reg::CAPS_ROUTE_BWD_INPUT,
                blocks(grid, smem_i),
                [
                    w.slice(),
                    saved.c.slice(),
                    saved.v.slice(),
                    ds.slice(),
                    db.slice(),
                    du.slice_mut(),
                    &p,
                    &nr,
                    &chunk_i,
                    &group
                ]
            )?;
        }
        if let Some(dw) = dw {
            let threads = s.in_caps * jd;
            let grid = (threads.div_ceil(reg::ROUTING_THREADS as usize) as u32, 1);
            // SAFETY: caps_route_bwd_weight(u, saved_c, saved_v, ds, db, dw, CapsParams, int rounds), a
            // thread per (i, j, d) in a grid-stride loop; in_dim checked by fused_routing_plan.
            launch!(
                self,
                reg::CAPS_ROUTE_BWD_WEIGHT,
                blocks(grid, 0),
                [
                    u.slice(),
                    saved.c.slice(),
                    saved.v.slice(),
                    ds.slice(),
                    db.slice(),
                    dw.slice_mut(),
                    &p,
                    &nr
                ]
            )?;
        }
        Ok(())
    }
}

/// Which routing kernels run, and the fused version's launch geometry.
impl CudaBackend {
    /// The routing kernel for `s` and `rounds`, with its dynamic shared memory: v1 (every per-image
    /// array in shared memory: 2·I·J + 2 or 4·J·D floats) where the device allows that much, else v2
    /// (only (R + 1)·J·D or 4·J·D floats; any number of input capsules). A set that names v2 always
    /// gets v2; the fused version's standalone routing (û given, not W and u) is v1's or v2's.
    fn routing_kernel(&self, s: &CapsShape, rounds: usize, forward: bool) -> Result<(Kernel, u32)> {
        let (ij, jd) = (s.in_caps * s.out_caps, s.out_caps * s.out_dim);
        let v1 = 4 * (2 * ij + if forward { 2 } else { 4 } * jd);
        let limit = self.info.max_smem_optin as usize;
        if v1 <= limit && self.kernels.borrow().version(reg::ROUTING).label != "v2" {
            return Ok((
                if forward {
                    reg::ROUTING_FWD_V1
                } else {
                    reg::ROUTING_BWD_V1
                },
                v1 as u32,
            ));
        }
        let v2 = 4 * jd * if forward { rounds + 1 } else { 4 };
        if v2 > limit {
            return Err(Error::msg(format!(
                "routing: {} x {} capsules of {} dimensions over {rounds} rounds need {v2} bytes of shared memory per image; this GPU allows {limit}",
                s.in_caps, s.out_caps, s.out_dim
            )));
        }
        Ok((
            if forward {
                reg::ROUTING_FWD_V2
            } else {
                reg::ROUTING_BWD_V2
            },
            v2 as u32,
        ))
    }

    /// Whether routing runs fused with the prediction vectors: the "fused" version is chosen and its
    /// kernels take the shape (at least one input capsule, primary capsules of at most
    /// FUSED_MAX_IN_DIM dimensions, one capsule's W within a block's shared memory). Elsewhere the
    /// unfused path runs, routing v1 or v2 (as v1 falls back to v2), so a configuration that trains
    /// keeps training.
    fn fused_routing_runs(&self, s: &CapsShape, rounds: usize) -> bool {
        self.kernels.borrow().version(reg::ROUTING).label == "fused"
            && s.in_caps > 0
            && [
                reg::CAPS_ROUTE_FWD_PARTIAL,
                reg::CAPS_ROUTE_BWD_PARTIAL,
                reg::CAPS_ROUTE_BWD_INPUT,
                reg::CAPS_ROUTE_BWD_WEIGHT,
            ]
            .iter()
            .all(|&k| reg::fused_routing_plan(k, &s.dims(), rounds).is_ok())
    }

    /// The fused op's inputs and saved buffers against `s` and `rounds`.
    fn check_caps_routing(
        &self,
        op: &str,
        s: &CapsShape,
        rounds: usize,
        u: &CudaBuf,
        w: &CudaBuf,
        saved: &RoutingSaved<CudaBuf>,
    ) -> Result<()> {
        check(op, "u", u.len(), s.u_len())?;
        check(op, "w", w.len(), s.w_len())?;
        check_routing(
            op,
            s,
            rounds,
            s.uhat_len(),
            [saved.c.len(), saved.s.len(), saved.v.len()],
        )?;
        // the chunk kernels index one image's couplings [R, I, J] in 32 bits
        i32_of(
            &format!("{op}: couplings of one image"),
            rounds * s.in_caps * s.out_caps,
        )?;
        Ok(())
    }

    /// The grid of a chunked fused kernel: (chunks, image groups), with the images per group chosen so
    /// that the grid has about four blocks per SM (each block loads its W chunk once per group).
    /// Returns the grid, the number of chunks and the images per group.
    fn chunk_grid(&self, s: &CapsShape, chunk: usize) -> ((u32, u32), i32, i32) {
        let chunks = s.in_caps.div_ceil(chunk);
        let target = 4 * self.info.sms.max(1) as usize;
        let groups = target.div_ceil(chunks).clamp(1, s.batch.max(1));
        let group = s.batch.div_ceil(groups).max(1);
        let groups = s.batch.div_ceil(group);
        ((chunks as u32, groups as u32), chunks as i32, group as i32)
    }
}
