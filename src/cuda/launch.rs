//! Launch helpers shared by every op family's CUDA code: grids, the launch macros (each launch
//! after its `// SAFETY:` argument), split-K GEMMs.

use cudarc::driver::{DriverError, LaunchConfig, PushKernelArg};

use super::registry::{self as reg, Kernel};
use super::{CudaBackend, CudaBuf, describe};
use crate::{Error, Result};

pub(crate) fn de(op: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::msg(format!("{op}: {}", describe(&e)))
}

/// Blocks of 256 threads covering n elements in a grid-stride loop.
pub(crate) fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(reg::FLAT_THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (reg::FLAT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` threads.
pub(crate) fn single(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The grid of GEMM kernel `k` over an M×N output; `None` when the output is empty (nothing to launch).
pub(crate) fn gemm_grid(k: Kernel, m: usize, n: usize) -> Result<Option<LaunchConfig>> {
    if m == 0 || n == 0 {
        return Ok(None);
    }
    let (tm, tn) = (k.tile.0 as usize, k.tile.1 as usize);
    assert!(tm > 0 && tn > 0, "{} is not a GEMM kernel", k.name);
    let (gx, gy) = (n.div_ceil(tn), m.div_ceil(tm));
    if gy > 65535 {
        return Err(Error::msg(format!(
            "GEMM with {m} rows exceeds the grid's 65535 row tiles"
        )));
    }
    Ok(Some(LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (k.threads, 1, 1),
        shared_mem_bytes: 0,
    }))
}

/// A (x, y) grid of ROUTING_THREADS-thread blocks with `smem` bytes of dynamic shared memory.
pub(crate) fn blocks(grid: (u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (reg::ROUTING_THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Launches `$k` with `$cfg` and the arguments after it; `$why` is the SAFETY argument.
macro_rules! launch {
    ($self:ident, $k:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let mut b = $self.stream.launch_builder($self.f($k));
        $(b.arg($arg);)*
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(de($k.name))
    }};
}
pub(crate) use launch;

/// [`launch!`] for a GEMM grid, which is `None` (no launch) when the output is empty.
macro_rules! launch_gemm {
    ($self:ident, $k:expr, $grid:expr, [$($arg:expr),* $(,)?]) => {{
        match $grid {
            Some(cfg) => launch!($self, $k, cfg, [$($arg),*]),
            None => Ok(()),
        }
    }};
}
pub(crate) use launch_gemm;

/// Split-K, for the tensor-core GEMMs that sum over many products into few outputs.
impl CudaBackend {
    /// How a tensor-core GEMM with an m×n output, summing `depth` products, is launched: its grid, with
    /// as many slices of K (grid z) as give every SM a block when the output tiles alone do not, each
    /// slice at least SPLITK_MIN_STEPS K-steps deep; and the workspace of the slices' partial sums (a
    /// one-float placeholder when there is one slice). None when the output is empty.
    pub(crate) fn splitk_plan(
        &self,
        k: Kernel,
        m: usize,
        n: usize,
        depth: usize,
    ) -> Result<Option<(LaunchConfig, usize, CudaBuf)>> {
        let Some(mut cfg) = gemm_grid(k, m, n)? else {
            return Ok(None);
        };
        let tiles = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
        let sms = self.info.sms.max(1) as usize;
        let split = if tiles >= sms {
            1
        } else {
            (sms / tiles)
                .min(depth / (reg::SPLITK_MIN_STEPS * reg::MMA_K_STEP))
                .clamp(1, 65535)
        };
        if split * m * n > i32::MAX as usize {
            return Err(Error::msg(format!(
                "{}: {split} slices of a {m}x{n} output exceed 32-bit indices",
                k.name
            )));
        }
        cfg.grid_dim.2 = split as u32;
        let ws = self.take::<f32>(if split > 1 { split * m * n } else { 1 })?;
        Ok(Some((cfg, split, ws)))
    }

    /// The second pass of a split-K GEMM: out += the slices of `ws` summed in order (nothing for one slice).
    pub(crate) fn splitk_reduce(
        &self,
        ks: &[Kernel],
        ws: &CudaBuf,
        out: &mut CudaBuf,
        n: usize,
        split: usize,
    ) -> Result<()> {
        if split == 1 {
            return Ok(());
        }
        let (ni, si) = (n as i32, split as i32);
        // SAFETY: splitk_reduce_add(ws [split·n], out [n], int n, int split), lengths from splitk_plan.
        launch!(self, ks[1], flat(n), [ws.slice(), out.slice_mut(), &ni, &si])
    }
}
