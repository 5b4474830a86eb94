//! [`CudaBackend`]: the op interface on an NVIDIA GPU, one kernel launch (or a few) per op, all on
//! one stream, so a training step needs no host round trip until its loss is read.
//!
//! Memory: buffers come from a pool keyed by length and go back to it when dropped, so once the
//! first step has run, later steps of the same shapes allocate no device memory
//! ([`CudaBackend::fresh_allocations`] counts the allocations made).
//!
//! Graphs: a step can be captured as a CUDA graph and replayed ([`Backend::begin_capture`]). The graph
//! holds raw device pointers, so the buffers a captured step takes belong to the graph from then on:
//! the pool keeps them in the graph's own arena, handed out again only inside that capture, never to
//! eager work. Likewise a graph keeps the Adam table it was captured with: an update of other buffers
//! afterwards writes a new table, not that one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::params::{AdamParams, AdamTensor, CapsParams, ConvParams, DenseParams, i32_of};
use super::registry::{self as reg, Kernel};
use super::{DeviceInfo, compile_all, describe, device_info, kernel_target, open_device};
use crate::backend::{
    Act, AdamGroup, AdamHyper, Backend, CapsShape, ConvShape, DenseShape, GraphId, PLAN_HEADER, PLAN_ROW, ResidentSet,
    RoutingSaved, caps_routing_bwd_unfused, caps_routing_fwd_unfused, check, check_adam_group, check_labels,
    check_routing, image_side,
};
use crate::{Error, Result};

/// Free device buffers by (arena, length) (opaque outside this module). Arena 0 is eager work's; arena
/// g > 0 holds the buffers of the g-th captured graph.
#[derive(Default)]
pub struct Pool {
    f32s: HashMap<(usize, usize), Vec<CudaSlice<f32>>>,
    u32s: HashMap<(usize, usize), Vec<CudaSlice<u32>>>,
    fresh: usize,
    /// Bytes of every allocation made (buffers are never freed, only pooled).
    bytes: usize,
    /// Arenas made so far.
    arenas: usize,
    /// The arena of the capture under way.
    capturing: Option<usize>,
    /// Whether an op refused to run inside the capture under way (its graph would lack it).
    capture_failed: bool,
}

type PoolRef = Rc<RefCell<Pool>>;

/// Element types the pool keeps (f32 values, u32 class indices).
pub trait Pooled: DeviceRepr + ValidAsZeroBits + Sized {
    fn shelf(pool: &mut Pool) -> &mut HashMap<(usize, usize), Vec<CudaSlice<Self>>>;
}
impl Pooled for f32 {
    fn shelf(pool: &mut Pool) -> &mut HashMap<(usize, usize), Vec<CudaSlice<f32>>> {
        &mut pool.f32s
    }
}
impl Pooled for u32 {
    fn shelf(pool: &mut Pool) -> &mut HashMap<(usize, usize), Vec<CudaSlice<u32>>> {
        &mut pool.u32s
    }
}

/// A device buffer that returns to its arena of the pool when dropped.
pub struct PooledBuf<T: Pooled> {
    slice: Option<CudaSlice<T>>,
    pool: PoolRef,
    arena: usize,
}

impl<T: Pooled> PooledBuf<T> {
    pub fn slice(&self) -> &CudaSlice<T> {
        self.slice.as_ref().expect("present until drop")
    }
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        self.slice.as_mut().expect("present until drop")
    }
    pub fn len(&self) -> usize {
        self.slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Pooled> Drop for PooledBuf<T> {
    fn drop(&mut self) {
        if let (Some(s), Ok(mut pool)) = (self.slice.take(), self.pool.try_borrow_mut()) {
            T::shelf(&mut pool).entry((self.arena, s.len())).or_default().push(s);
        }
    }
}

pub type CudaBuf = PooledBuf<f32>;
pub type CudaIdx = PooledBuf<u32>;

/// One kernel as the driver loaded it ([`CudaBackend::loaded_kernels`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    pub kernel: Kernel,
    pub registers: i32,
    pub static_smem: i32,
    pub max_threads: i32,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    funcs: HashMap<&'static str, CudaFunction>,
    pool: PoolRef,
    /// The fused Adam step's table of tensors on the device, with the host copy last uploaded: a step
    /// whose buffers are the last step's (the pool hands them out in the same order) uploads nothing.
    adam_table: RefCell<Option<(Vec<AdamTensor>, CudaSlice<AdamTensor>)>>,
    /// Uploads of the Adam table so far.
    adam_uploads: std::cell::Cell<usize>,
    /// The version of each op this backend launches.
    kernels: RefCell<reg::KernelSet>,
    /// Captured steps, by [`GraphId`].
    graphs: RefCell<Vec<CudaGraph>>,
    /// Adam tables that captured steps read, replaced for eager work by tables of other buffers.
    retired_tables: RefCell<Vec<CudaSlice<AdamTensor>>>,
}

/// Graph launches by every [`CudaBackend`] of this process.
static GRAPH_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn de(op: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::msg(format!("{op}: {}", describe(&e)))
}

/// Blocks of 256 threads covering n elements in a grid-stride loop.
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(reg::FLAT_THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (reg::FLAT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` threads.
fn single(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The grid of GEMM kernel `k` over an M×N output; `None` when the output is empty (nothing to launch).
fn gemm_grid(k: Kernel, m: usize, n: usize) -> Result<Option<LaunchConfig>> {
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

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles every kernel for its architecture (once per process) and loads them;
    /// launches the default versions, changed by `CAPSNET_KERNELS=op=version,...` when it is set.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_kernels(ordinal, reg::KernelSet::default().with_env()?)
    }

    /// [`CudaBackend::new`] launching the versions of `kernels`.
    pub fn with_kernels(ordinal: usize, kernels: reg::KernelSet) -> Result<Self> {
        let ctx = open_device(ordinal)?;
        let info = device_info(&ctx)?;
        let target = kernel_target(info.compute_capability)?;
        let mut funcs = HashMap::new();
        for (file, image) in compile_all(target)?.iter() {
            let module = ctx.load_module(image.module()).map_err(|e| {
                Error::msg(format!(
                    "kernels/{file}: the driver cannot load {target}: {}",
                    describe(&e)
                ))
            })?;
            for k in reg::ALL.iter().filter(|k| k.file == *file) {
                let f = module
                    .load_function(k.name)
                    .map_err(|e| Error::msg(format!("kernels/{file}: no kernel {}: {}", k.name, describe(&e))))?;
                funcs.insert(k.name, f);
            }
        }
        for k in reg::ALL {
            if !funcs.contains_key(k.name) {
                return Err(Error::msg(format!(
                    "kernel {} (kernels/{}) was not loaded",
                    k.name, k.file
                )));
            }
        }
        // routing keeps per-image state in dynamic shared memory: allow up to the device's opt-in
        // limit, which covers static and dynamic shared memory together
        use cudarc::driver::sys::CUfunction_attribute::{
            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC,
            CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES as STATIC,
        };
        for k in [
            reg::ROUTING_FWD_V1,
            reg::ROUTING_BWD_V1,
            reg::ROUTING_FWD_V2,
            reg::ROUTING_BWD_V2,
        ] {
            let f = &funcs[k.name];
            let static_smem = f.get_attribute(STATIC).map_err(de(k.name))?;
            f.set_attribute(MAX_DYNAMIC, info.max_smem_optin - static_smem)
                .map_err(de(k.name))?;
        }
        // one stream of our own (the legacy default stream cannot be captured) and no per-buffer
        // events: every op is ordered by that stream, and a capture must record launches alone
        // SAFETY: no buffer of this context exists yet, and this backend uses one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(de("create a stream"))?;
        Ok(CudaBackend {
            ctx,
            stream,
            info,
            funcs,
            pool: PoolRef::default(),
            adam_table: RefCell::new(None),
            adam_uploads: std::cell::Cell::new(0),
            kernels: RefCell::new(kernels),
            graphs: RefCell::new(vec![]),
            retired_tables: RefCell::new(vec![]),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// What the driver says of each loaded kernel, in registry order: registers per thread, static
    /// shared memory, and the most threads a block of it can have.
    pub fn loaded_kernels(&self) -> Result<Vec<LoadedKernel>> {
        use cudarc::driver::sys::CUfunction_attribute::*;
        reg::ALL
            .iter()
            .map(|k| {
                let f = &self.funcs[k.name];
                let get = |a| f.get_attribute(a).map_err(de(k.name));
                Ok(LoadedKernel {
                    kernel: *k,
                    registers: get(CU_FUNC_ATTRIBUTE_NUM_REGS)?,
                    static_smem: get(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
                    max_threads: get(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
                })
            })
            .collect()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device allocations made so far (buffers taken from the pool are not counted).
    pub fn fresh_allocations(&self) -> usize {
        self.pool.borrow().fresh
    }

    /// Times the fused Adam step's table of tensors was copied to the device: once, while every step
    /// updates the same buffers.
    pub fn adam_table_uploads(&self) -> usize {
        self.adam_uploads.get()
    }

    /// Graphs launched so far ([`Backend::launch_graph`]) by every CUDA backend of this process.
    pub fn graph_launches_in_process() -> usize {
        GRAPH_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A buffer of `n` values: from the pool (inside a capture, the capture's arena first, then eager
    /// work's free buffers, which become the graph's), else a new allocation, which a capture refuses.
    fn take<T: Pooled>(&self, n: usize) -> Result<PooledBuf<T>> {
        let (arena, reused) = {
            let mut pool = self.pool.borrow_mut();
            let arena = pool.capturing.unwrap_or(0);
            let shelf = T::shelf(&mut pool);
            let own = shelf.get_mut(&(arena, n)).and_then(|v| v.pop());
            (arena, own.or_else(|| shelf.get_mut(&(0, n)).and_then(|v| v.pop())))
        };
        let slice = match reused {
            Some(s) => s,
            None if arena != 0 => {
                self.pool.borrow_mut().capture_failed = true;
                return Err(Error::msg(format!(
                    "a captured step allocated a new buffer of {n} values: run the step once eagerly first"
                )));
            }
            None => {
                let mut pool = self.pool.borrow_mut();
                pool.fresh += 1;
                pool.bytes += n * std::mem::size_of::<T>();
                drop(pool);
                if n == 0 {
                    self.stream.null::<T>().map_err(de("alloc"))?
                } else {
                    // SAFETY: every caller writes the buffer (memset, copy or a kernel) before reading it.
                    unsafe { self.stream.alloc::<T>(n) }.map_err(de("alloc"))?
                }
            }
        };
        Ok(PooledBuf {
            slice: Some(slice),
            pool: self.pool.clone(),
            arena,
        })
    }

    fn f(&self, k: Kernel) -> &CudaFunction {
        &self.funcs[k.name]
    }

    /// The versions this backend launches.
    pub fn kernels(&self) -> reg::KernelSet {
        self.kernels.borrow().clone()
    }

    /// Launch the versions of `ks` from now on.
    pub fn set_kernels(&self, ks: reg::KernelSet) {
        *self.kernels.borrow_mut() = ks;
    }

    /// An event recorded on the stream now, with timing enabled (for `CudaEvent::elapsed_ms`).
    pub fn record_timing_event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(de("cuEventRecord"))
    }

    /// Launch version `label` of the op named `op` from now on.
    pub fn set_version(&self, op: &str, label: &str) -> Result<()> {
        self.kernels.borrow_mut().set(op, label)
    }

    /// The kernels of the version of `op` this backend launches.
    fn version(&self, op: reg::OpId) -> &'static [Kernel] {
        self.kernels.borrow().version(op).kernels
    }

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
}

/// The fused routing version's launch geometry.
impl CudaBackend {
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
            .all(|&k| reg::fused_routing_plan(k, s, rounds).is_ok())
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

/// A step plan holds its cursor and at least one row, or `op` says it does not.
fn check_plan(op: &str, plan: &CudaIdx) -> Result<()> {
    if plan.len() < PLAN_HEADER + PLAN_ROW {
        return Err(Error::msg(format!(
            "{op}: a step plan of {} words has no row",
            plan.len()
        )));
    }
    Ok(())
}

/// A (x, y) grid of ROUTING_THREADS-thread blocks with `smem` bytes of dynamic shared memory.
fn blocks(grid: (u32, u32), smem: u32) -> LaunchConfig {
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

/// [`launch!`] for a GEMM grid, which is `None` (no launch) when the output is empty.
macro_rules! launch_gemm {
    ($self:ident, $k:expr, $grid:expr, [$($arg:expr),* $(,)?]) => {{
        match $grid {
            Some(cfg) => launch!($self, $k, cfg, [$($arg),*]),
            None => Ok(()),
        }
    }};
}

/// Split-K, for the tensor-core GEMMs that sum over many products into few outputs.
impl CudaBackend {
    /// How a tensor-core GEMM with an m×n output, summing `depth` products, is launched: its grid, with
    /// as many slices of K (grid z) as give every SM a block when the output tiles alone do not, each
    /// slice at least SPLITK_MIN_STEPS K-steps deep; and the workspace of the slices' partial sums (a
    /// one-float placeholder when there is one slice). None when the output is empty.
    fn splitk_plan(
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
    fn splitk_reduce(&self, ks: &[Kernel], ws: &CudaBuf, out: &mut CudaBuf, n: usize, split: usize) -> Result<()> {
        if split == 1 {
            return Ok(());
        }
        let (ni, si) = (n as i32, split as i32);
        // SAFETY: splitk_reduce_add(ws [split·n], out [n], int n, int split), lengths from splitk_plan.
        launch!(self, ks[1], flat(n), [ws.slice(), out.slice_mut(), &ni, &si])
    }
}

impl Backend for CudaBackend {
    type E = f32;
    type Buf = CudaBuf;
    type Idx = CudaIdx;

    fn name(&self) -> String {
        let (a, b) = self.info.compute_capability;
        let ks = self.kernels.borrow();
        // a precision's whole set by its name, any other set op by op
        let kernels = match reg::Precision::ALL
            .into_iter()
            .find(|&p| *ks == reg::KernelSet::for_precision(p))
        {
            Some(p) => format!("{} GEMMs", p.name()),
            None => format!("kernels {}", ks.describe()),
        };
        format!("cuda: {} (sm_{a}{b}, {} SMs), {kernels}", self.info.name, self.info.sms)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(de("synchronize"))
    }

    fn device_bytes(&self) -> Option<usize> {
        Some(self.pool.borrow().bytes)
    }

    // ---- memory -------------------------------------------------------------------------------

    fn zeros(&self, n: usize) -> Result<CudaBuf> {
        let mut b = self.take::<f32>(n)?;
        if n > 0 {
            self.stream.memset_zeros(b.slice_mut()).map_err(de("memset"))?;
        }
        Ok(b)
    }
    fn keeps_data_resident(&self) -> bool {
        true
    }
    #[allow(clippy::too_many_arguments)]
    fn gather_batch(
        &self,
        set: &ResidentSet<'_, Self>,
        start: usize,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        if start + batch > set.order.len() {
            return Err(Error::msg(format!(
                "gather_batch: images {start}..{} of an order of {}",
                start + batch,
                set.order.len()
            )));
        }
        i32_of("gather_batch: end of the batch", start + batch)?;
        self.gather(set, None, start, batch, x, y)
    }
    fn gather_planned(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: &CudaIdx,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        check_plan("gather_planned", plan)?;
        self.gather(set, Some(plan), 0, batch, x, y)
    }
    fn alloc_out(&self, n: usize) -> Result<CudaBuf> {
        self.take::<f32>(n)
    }
    fn alloc_idx(&self, n: usize) -> Result<CudaIdx> {
        self.take::<u32>(n)
    }
    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        let mut b = self.take::<f32>(host.len())?;
        if !host.is_empty() {
            self.stream.memcpy_htod(host, b.slice_mut()).map_err(de("upload"))?;
        }
        Ok(b)
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(vec![]);
        }
        self.stream.clone_dtoh(buf.slice()).map_err(de("download"))
    }
    fn upload_idx(&self, host: &[u32]) -> Result<CudaIdx> {
        let mut b = self.take::<u32>(host.len())?;
        if !host.is_empty() {
            self.stream.memcpy_htod(host, b.slice_mut()).map_err(de("upload"))?;
        }
        Ok(b)
    }
    fn download_idx(&self, idx: &CudaIdx) -> Result<Vec<u32>> {
        if idx.is_empty() {
            return Ok(vec![]);
        }
        self.stream.clone_dtoh(idx.slice()).map_err(de("download"))
    }
    fn idx_len(&self, idx: &CudaIdx) -> usize {
        idx.len()
    }
    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut CudaBuf, value: f64) -> Result<()> {
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        let v = value as f32;
        // SAFETY: fill_f32(float* buf, float value, size_t n); buf holds n floats.
        launch!(self, reg::FILL, flat(n), [buf.slice_mut(), &v, &n])
    }
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        let n = dst.len();
        check("add_assign", "src", src.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: add_assign_f32(float* dst, const float* src, size_t n); both hold n floats.
        launch!(self, reg::ADD_ASSIGN, flat(n), [dst.slice_mut(), src.slice(), &n])
    }
    fn add_fwd(&self, a: &CudaBuf, b: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        let n = a.len();
        check("add_fwd", "b", b.len(), n)?;
        check("add_fwd", "out", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: add_fwd_f32(const float* a, const float* b, float* out, size_t n); all hold n floats.
        launch!(self, reg::ADD_FWD, flat(n), [a.slice(), b.slice(), out.slice_mut(), &n])
    }

    // ---- convolution ----------------------------------------------------------------------------

    fn conv2d_fwd(
        &self,
        s: &ConvShape,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        y: &mut CudaBuf,
        act: Act,
    ) -> Result<()> {
        const OP: &str = "conv2d_fwd";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "b", b.len(), s.out_c)?;
        check(OP, "y", y.len(), s.y_len())?;
        let p = ConvParams::new(s)?;
        let a = act as i32;
        let k = self.version(reg::CONV2D_FWD)[0];
        // SAFETY: conv2d_fwd_*(x, w, bias, y, ConvParams, int act): lengths checked against p above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows(), s.out_c)?,
            [x.slice(), w.slice(), b.slice(), y.slice_mut(), &p, &a]
        )
    }
    fn conv2d_bwd_input(&self, s: &ConvShape, dz: &CudaBuf, w: &CudaBuf, dx: &mut CudaBuf) -> Result<()> {
        const OP: &str = "conv2d_bwd_input";
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "w", w.len(), s.w_len())?;
        check(OP, "dx", dx.len(), s.x_len())?;
        let p = ConvParams::new(s)?;
        let ks = self.version(reg::CONV2D_BWD_INPUT);
        if let [k] = ks {
            let grid = gemm_grid(*k, s.batch * s.in_h * s.in_w, s.in_c)?;
            // SAFETY: conv2d_bwd_input_v1(dz, w, dx, ConvParams): lengths checked against p above.
            return launch_gemm!(self, *k, grid, [dz.slice(), w.slice(), dx.slice_mut(), &p]);
        }
        let [gemm, col2im] = ks else {
            unreachable!("conv2d_bwd_input versions launch one kernel or a GEMM and col2im")
        };
        // cols [images·OH·OW, K·K·Cin] for as many images at a time as COLS_CHUNK_FLOATS allows
        let per_image = s.out_h() * s.out_w() * s.patch_len();
        if per_image == 0 || s.batch == 0 {
            return Ok(());
        }
        let chunk = (reg::COLS_CHUNK_FLOATS / per_image).clamp(1, s.batch);
        if chunk * per_image > i32::MAX as usize || chunk * s.in_h * s.in_w * s.in_c > i32::MAX as usize {
            return Err(Error::msg(format!(
                "{OP}: one image of {}x{}x{} needs {per_image} floats of cols, more than 32-bit indices reach",
                s.in_h, s.in_w, s.in_c
            )));
        }
        let mut cols = self.take::<f32>(chunk * per_image)?;
        for b0 in (0..s.batch).step_by(chunk) {
            let nb = chunk.min(s.batch - b0);
            let (b0i, nbi) = (b0 as i32, nb as i32);
            let grid = gemm_grid(*gemm, nb * s.out_h() * s.out_w(), s.patch_len())?;
            // SAFETY: conv2d_bwd_cols_v2(dz, w, cols, ConvParams, b0, nb) writes nb·OH·OW·K·K·Cin ≤
            // cols.len() floats and reads images b0..b0+nb < batch of dz; lengths checked above.
            launch_gemm!(
                self,
                *gemm,
                grid,
                [dz.slice(), w.slice(), cols.slice_mut(), &p, &b0i, &nbi]
            )?;
            // SAFETY: col2im_add_v2(cols, dx, ConvParams, b0, nb) reads what the GEMM wrote and adds
            // to images b0..b0+nb of dx, one thread per element.
            launch!(
                self,
                *col2im,
                flat(nb * s.in_h * s.in_w * s.in_c),
                [cols.slice(), dx.slice_mut(), &p, &b0i, &nbi]
            )?;
        }
        Ok(())
    }
    fn conv2d_bwd_weight(&self, s: &ConvShape, x: &CudaBuf, dz: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight";
        check(OP, "x", x.len(), s.x_len())?;
        check(OP, "dz", dz.len(), s.y_len())?;
        check(OP, "dw", dw.len(), s.w_len())?;
        let p = ConvParams::new(s)?;
        let ks = self.version(reg::CONV2D_BWD_WEIGHT);
        let (m, n, depth) = (s.patch_len(), s.out_c, s.rows());
        if let [k] = ks {
            // SAFETY: conv2d_bwd_weight_v1(x, dz, dw, ConvParams): lengths checked against p above.
            return launch_gemm!(
                self,
                *k,
                gemm_grid(*k, m, n)?,
                [x.slice(), dz.slice(), dw.slice_mut(), &p]
            );
        }
        let Some((cfg, split, mut ws)) = self.splitk_plan(ks[0], m, n, depth)? else {
            return Ok(());
        };
        // SAFETY: conv2d_bwd_weight_{tf32,bf16}(x, dz, dw, ws, ConvParams) over `split` slices of K: dw
        // gets the sum (split 1) or slice z writes m·n partial sums to ws[z] (ws holds split·m·n).
        launch!(
            self,
            ks[0],
            cfg,
            [x.slice(), dz.slice(), dw.slice_mut(), ws.slice_mut(), &p]
        )?;
        self.splitk_reduce(ks, &ws, dw, m * n, split)
    }
    fn bias_bwd(&self, rows: usize, cols: usize, dz: &CudaBuf, db: &mut CudaBuf) -> Result<()> {
        check("bias_bwd", "dz", dz.len(), rows * cols)?;
        check("bias_bwd", "db", db.len(), cols)?;
        if cols == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i32, cols as i32);
        let cfg = LaunchConfig {
            grid_dim: (cols as u32, 1, 1),
            block_dim: (reg::BIAS_BWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bias_bwd_f32(dz [rows, cols], db [cols], int rows, int cols), one block per column.
        launch!(self, reg::BIAS_BWD, cfg, [dz.slice(), db.slice_mut(), &r, &c])
    }
    fn act_bwd(&self, act: Act, y: &CudaBuf, dy: &CudaBuf, dz: &mut CudaBuf) -> Result<()> {
        let n = y.len();
        check("act_bwd", "dy", dy.len(), n)?;
        check("act_bwd", "dz", dz.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let a = act as i32;
        // SAFETY: act_bwd_f32(y, dy, dz, int act, size_t n); all hold n floats.
        launch!(
            self,
            reg::ACT_BWD,
            flat(n),
            [y.slice(), dy.slice(), dz.slice_mut(), &a, &n]
        )
    }

    // ---- dense ----------------------------------------------------------------------------------

    fn dense_fwd(
        &self,
        s: &DenseShape,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        y: &mut CudaBuf,
        act: Act,
    ) -> Result<()> {
        const OP: &str = "dense_fwd";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "b", b.len(), s.out)?;
        check(OP, "y", y.len(), s.rows * s.out)?;
        let (p, a) = (DenseParams::new(s)?, act as i32);
        let k = self.version(reg::DENSE_FWD)[0];
        // SAFETY: dense_fwd_*(x, w, bias, y, DenseParams, int act): lengths checked above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows, s.out)?,
            [x.slice(), w.slice(), b.slice(), y.slice_mut(), &p, &a]
        )
    }
    fn dense_bwd_input(&self, s: &DenseShape, dz: &CudaBuf, w: &CudaBuf, dx: &mut CudaBuf) -> Result<()> {
        const OP: &str = "dense_bwd_input";
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "w", w.len(), s.inp * s.out)?;
        check(OP, "dx", dx.len(), s.rows * s.inp)?;
        let p = DenseParams::new(s)?;
        let k = self.version(reg::DENSE_BWD_INPUT)[0];
        // SAFETY: dense_bwd_input_*(dz, w, dx, DenseParams): lengths checked above.
        launch_gemm!(
            self,
            k,
            gemm_grid(k, s.rows, s.inp)?,
            [dz.slice(), w.slice(), dx.slice_mut(), &p]
        )
    }
    fn dense_bwd_weight(&self, s: &DenseShape, x: &CudaBuf, dz: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        const OP: &str = "dense_bwd_weight";
        check(OP, "x", x.len(), s.rows * s.inp)?;
        check(OP, "dz", dz.len(), s.rows * s.out)?;
        check(OP, "dw", dw.len(), s.inp * s.out)?;
        let p = DenseParams::new(s)?;
        let ks = self.version(reg::DENSE_BWD_WEIGHT);
        if let [k] = ks {
            // SAFETY: dense_bwd_weight_v1(x, dz, dw, DenseParams): lengths checked above.
            return launch_gemm!(
                self,
                *k,
                gemm_grid(*k, s.inp, s.out)?,
                [x.slice(), dz.slice(), dw.slice_mut(), &p]
            );
        }
        let Some((cfg, split, mut ws)) = self.splitk_plan(ks[0], s.inp, s.out, s.rows)? else {
            return Ok(());
        };
        // SAFETY: dense_bwd_weight_{tf32,bf16}(x, dz, dw, ws, DenseParams), as conv2d_bwd_weight's.
        launch!(
            self,
            ks[0],
            cfg,
            [x.slice(), dz.slice(), dw.slice_mut(), ws.slice_mut(), &p]
        )?;
        self.splitk_reduce(ks, &ws, dw, s.inp * s.out, split)
    }

    // ---- capsules -------------------------------------------------------------------------------

    fn squash_fwd(&self, rows: usize, dim: usize, s: &CudaBuf, v: &mut CudaBuf) -> Result<()> {
        check("squash_fwd", "s", s.len(), rows * dim)?;
        check("squash_fwd", "v", v.len(), rows * dim)?;
        let (r, d) = (i32_of("squash_fwd: rows", rows)?, dim as i32);
        // SAFETY: squash_fwd(s, v, int rows, int dim); both hold rows·dim floats.
        launch!(self, reg::SQUASH_FWD, flat(rows), [s.slice(), v.slice_mut(), &r, &d])
    }
    fn squash_bwd(&self, rows: usize, dim: usize, s: &CudaBuf, dv: &CudaBuf, ds: &mut CudaBuf) -> Result<()> {
        check("squash_bwd", "s", s.len(), rows * dim)?;
        check("squash_bwd", "dv", dv.len(), rows * dim)?;
        check("squash_bwd", "ds", ds.len(), rows * dim)?;
        let (r, d) = (i32_of("squash_bwd: rows", rows)?, dim as i32);
        // SAFETY: squash_bwd(s, dv, ds, int rows, int dim); all hold rows·dim floats.
        launch!(
            self,
            reg::SQUASH_BWD,
            flat(rows),
            [s.slice(), dv.slice(), ds.slice_mut(), &r, &d]
        )
    }
    fn predict_fwd(&self, s: &CapsShape, u: &CudaBuf, w: &CudaBuf, uhat: &mut CudaBuf) -> Result<()> {
        check("predict_fwd", "u", u.len(), s.u_len())?;
        check("predict_fwd", "w", w.len(), s.w_len())?;
        check("predict_fwd", "uhat", uhat.len(), s.uhat_len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_fwd(u, w, uhat, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_FWD,
            flat(s.uhat_len()),
            [u.slice(), w.slice(), uhat.slice_mut(), &p]
        )
    }
    fn predict_bwd_input(&self, s: &CapsShape, duhat: &CudaBuf, w: &CudaBuf, du: &mut CudaBuf) -> Result<()> {
        check("predict_bwd_input", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_input", "w", w.len(), s.w_len())?;
        check("predict_bwd_input", "du", du.len(), s.u_len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_bwd_input(duhat, w, du, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_BWD_INPUT,
            flat(s.u_len()),
            [duhat.slice(), w.slice(), du.slice_mut(), &p]
        )
    }
    fn predict_bwd_weight(&self, s: &CapsShape, u: &CudaBuf, duhat: &CudaBuf, dw: &mut CudaBuf) -> Result<()> {
        check("predict_bwd_weight", "u", u.len(), s.u_len())?;
        check("predict_bwd_weight", "duhat", duhat.len(), s.uhat_len())?;
        check("predict_bwd_weight", "dw", dw.len(), s.w_len())?;
        let p = CapsParams::new(s)?;
        // SAFETY: predict_bwd_weight(u, duhat, dw, CapsParams): lengths checked against p above.
        launch!(
            self,
            reg::PREDICT_BWD_WEIGHT,
            flat(s.w_len()),
            [u.slice(), duhat.slice(), dw.slice_mut(), &p]
        )
    }
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
        check(OP, "v", v.len(), s.v_len())?;
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
        let RoutingSaved { c, s: ss, v: sv } = saved;
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
        check(OP, "dv", dv.len(), s.v_len())?;
        check(OP, "duhat", duhat.len(), s.uhat_len())?;
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
        let (chunk, smem) = reg::fused_routing_plan(reg::CAPS_ROUTE_FWD_PARTIAL, s, rounds)?;
        let (grid, chunks, group) = self.chunk_grid(s, chunk);
        let chunk = chunk as i32;
        let (_, smem_reduce) = reg::fused_routing_plan(reg::CAPS_ROUTE_FWD_REDUCE, s, rounds)?;
        let mut partial = self.take::<f32>(s.batch * chunks as usize * s.out_caps * s.out_dim)?;
        let RoutingSaved { c, s: ss, v: sv } = saved;
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
        let (chunk, smem) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_PARTIAL, s, rounds)?;
        let (grid, chunks, group) = self.chunk_grid(s, chunk);
        let chunk = chunk as i32;
        let (_, smem_reduce) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_REDUCE, s, rounds)?;
        let (chunk_i, smem_i) = reg::fused_routing_plan(reg::CAPS_ROUTE_BWD_INPUT, s, rounds)?;
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
    fn lengths_fwd(&self, rows: usize, dim: usize, v: &CudaBuf, l: &mut CudaBuf) -> Result<()> {
        check("lengths_fwd", "v", v.len(), rows * dim)?;
        check("lengths_fwd", "l", l.len(), rows)?;
        let (r, d) = (i32_of("lengths_fwd: rows", rows)?, dim as i32);
        // SAFETY: lengths_fwd(v [rows, dim], l [rows], int rows, int dim).
        launch!(self, reg::LENGTHS_FWD, flat(rows), [v.slice(), l.slice_mut(), &r, &d])
    }
    fn lengths_bwd(
        &self,
        rows: usize,
        dim: usize,
        v: &CudaBuf,
        l: &CudaBuf,
        dl: &CudaBuf,
        dv: &mut CudaBuf,
    ) -> Result<()> {
        check("lengths_bwd", "v", v.len(), rows * dim)?;
        check("lengths_bwd", "l", l.len(), rows)?;
        check("lengths_bwd", "dl", dl.len(), rows)?;
        check("lengths_bwd", "dv", dv.len(), rows * dim)?;
        i32_of("lengths_bwd: rows x dim", rows * dim)?;
        let (r, d) = (rows as i32, dim as i32);
        // SAFETY: lengths_bwd(v, l, dl, dv, int rows, int dim); lengths checked above.
        launch!(
            self,
            reg::LENGTHS_BWD,
            flat(rows * dim),
            [v.slice(), l.slice(), dl.slice(), dv.slice_mut(), &r, &d]
        )
    }
    fn mask_fwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        v: &CudaBuf,
        idx: &CudaIdx,
        out: &mut CudaBuf,
    ) -> Result<()> {
        check("mask_fwd", "v", v.len(), batch * caps * dim)?;
        check("mask_fwd", "idx", idx.len(), batch)?;
        check("mask_fwd", "out", out.len(), batch * caps * dim)?;
        i32_of("mask_fwd: batch x capsules x dim", batch * caps * dim)?;
        let (b, c, d) = (batch as i32, caps as i32, dim as i32);
        // SAFETY: mask_fwd(v, idx, out, int batch, int caps, int dim); an index ≥ caps matches no
        // capsule, so it zeroes the row instead of reading out of bounds.
        launch!(
            self,
            reg::MASK_FWD,
            flat(batch * caps * dim),
            [v.slice(), idx.slice(), out.slice_mut(), &b, &c, &d]
        )
    }
    fn mask_bwd(
        &self,
        batch: usize,
        caps: usize,
        dim: usize,
        dout: &CudaBuf,
        idx: &CudaIdx,
        dv: &mut CudaBuf,
    ) -> Result<()> {
        check("mask_bwd", "dout", dout.len(), batch * caps * dim)?;
        check("mask_bwd", "idx", idx.len(), batch)?;
        check("mask_bwd", "dv", dv.len(), batch * caps * dim)?;
        i32_of("mask_bwd: batch x capsules x dim", batch * caps * dim)?;
        let (b, c, d) = (batch as i32, caps as i32, dim as i32);
        // SAFETY: mask_bwd(dout, idx, dv, int batch, int caps, int dim); lengths checked above.
        launch!(
            self,
            reg::MASK_BWD,
            flat(batch * caps * dim),
            [dout.slice(), idx.slice(), dv.slice_mut(), &b, &c, &d]
        )
    }
    fn argmax(&self, rows: usize, cols: usize, x: &CudaBuf, idx: &mut CudaIdx) -> Result<()> {
        check("argmax", "x", x.len(), rows * cols)?;
        check("argmax", "idx", idx.len(), rows)?;
        let (r, c) = (i32_of("argmax: rows", rows)?, cols as i32);
        // SAFETY: argmax_f32(x [rows, cols], idx [rows], int rows, int cols).
        launch!(self, reg::ARGMAX, flat(rows), [x.slice(), idx.slice_mut(), &r, &c])
    }

    // ---- losses ---------------------------------------------------------------------------------

    fn margin_loss_fwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &CudaBuf,
        labels: &CudaIdx,
        loss: &mut CudaBuf,
    ) -> Result<()> {
        check("margin_loss_fwd", "l", l.len(), batch * classes)?;
        check_labels("margin_loss_fwd", batch, per, labels.len())?;
        check("margin_loss_fwd", "loss", loss.len(), 1)?;
        let (b, c, k) = (batch as i32, classes as i32, per as i32);
        // SAFETY: margin_loss_fwd(l, labels [batch, per], loss [1], int batch, int classes, int per),
        // one block of 256 threads; lengths checked above.
        launch!(
            self,
            reg::MARGIN_LOSS_FWD,
            single(reg::MARGIN_LOSS_FWD_THREADS),
            [l.slice(), labels.slice(), loss.slice_mut(), &b, &c, &k]
        )
    }
    fn margin_loss_bwd(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        l: &CudaBuf,
        labels: &CudaIdx,
        dloss: &CudaBuf,
        dl: &mut CudaBuf,
    ) -> Result<()> {
        check("margin_loss_bwd", "l", l.len(), batch * classes)?;
        check_labels("margin_loss_bwd", batch, per, labels.len())?;
        check("margin_loss_bwd", "dloss", dloss.len(), 1)?;
        check("margin_loss_bwd", "dl", dl.len(), batch * classes)?;
        i32_of("margin_loss_bwd: batch x classes", batch * classes)?;
        let (b, c, k) = (batch as i32, classes as i32, per as i32);
        // SAFETY: margin_loss_bwd(l, labels [batch, per], dloss [1], dl, int batch, int classes, int per);
        // lengths checked above.
        launch!(
            self,
            reg::MARGIN_LOSS_BWD,
            flat(batch * classes),
            [l.slice(), labels.slice(), dloss.slice(), dl.slice_mut(), &b, &c, &k]
        )
    }
    fn sq_err_fwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &CudaBuf,
        target: &CudaBuf,
        scale: f64,
        loss: &mut CudaBuf,
    ) -> Result<()> {
        check("sq_err_fwd", "pred", pred.len(), rows * cols)?;
        check("sq_err_fwd", "target", target.len(), rows * cols)?;
        check("sq_err_fwd", "loss", loss.len(), 1)?;
        let (r, c, sc) = (rows as i32, cols as i32, scale as f32);
        // SAFETY: sq_err_fwd_f32(pred, target, loss [1], int rows, int cols, float scale), one block of 1024.
        launch!(
            self,
            reg::SQ_ERR_FWD,
            single(reg::SQ_ERR_FWD_THREADS),
            [pred.slice(), target.slice(), loss.slice_mut(), &r, &c, &sc]
        )
    }
    fn sq_err_bwd(
        &self,
        rows: usize,
        cols: usize,
        pred: &CudaBuf,
        target: &CudaBuf,
        scale: f64,
        dloss: &CudaBuf,
        dpred: &mut CudaBuf,
    ) -> Result<()> {
        check("sq_err_bwd", "pred", pred.len(), rows * cols)?;
        check("sq_err_bwd", "target", target.len(), rows * cols)?;
        check("sq_err_bwd", "dloss", dloss.len(), 1)?;
        check("sq_err_bwd", "dpred", dpred.len(), rows * cols)?;
        let (r, c, sc) = (rows as i32, cols as i32, scale as f32);
        // SAFETY: sq_err_bwd_f32(pred, target, dloss [1], dpred, int rows, int cols, float scale).
        launch!(
            self,
            reg::SQ_ERR_BWD,
            flat(rows * cols),
            [
                pred.slice(),
                target.slice(),
                dloss.slice(),
                dpred.slice_mut(),
                &r,
                &c,
                &sc
            ]
        )
    }

    // ---- optimiser ------------------------------------------------------------------------------

    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()> {
        self.adam(hp, groups, None, None)
    }
    fn adam_step_if_finite(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>], guard: &CudaBuf) -> Result<()> {
        if guard.is_empty() {
            return Err(Error::msg("adam_step_if_finite: the guard buffer is empty"));
        }
        self.adam(hp, groups, Some(guard), None)
    }
    fn adam_step_planned(
        &self,
        hp: &AdamHyper,
        groups: &mut [AdamGroup<'_, Self>],
        guard: &CudaBuf,
        plan: &CudaIdx,
    ) -> Result<()> {
        if guard.is_empty() {
            return Err(Error::msg("adam_step_planned: the guard buffer is empty"));
        }
        check_plan("adam_step_planned", plan)?;
        self.adam(hp, groups, Some(guard), Some(plan))
    }
    #[allow(clippy::too_many_arguments)]
    fn step_summary(
        &self,
        batch: usize,
        classes: usize,
        per: usize,
        losses: [&CudaBuf; 3],
        lengths: &CudaBuf,
        labels: &CudaIdx,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "step_summary";
        check_labels(OP, batch, per, labels.len())?;
        check(OP, "lengths", lengths.len(), batch * classes)?;
        for l in losses {
            check(OP, "a loss", l.len(), 1)?;
        }
        if out.len() != 5 {
            *out = self.take::<f32>(5)?;
        }
        let (b, c, pr) = (i32_of("step_summary: batch", batch)?, classes as i32, per as i32);
        i32_of("step_summary: labels", batch * per)?;
        // SAFETY: step_summary(loss, margin, recon, lengths, labels, out [5], int batch, int classes,
        // int per), one block of MARGIN_LOSS_FWD_THREADS; lengths checked above.
        launch!(
            self,
            reg::STEP_SUMMARY,
            single(reg::MARGIN_LOSS_FWD_THREADS),
            [
                losses[0].slice(),
                losses[1].slice(),
                losses[2].slice(),
                lengths.slice(),
                labels.slice(),
                out.slice_mut(),
                &b,
                &c,
                &pr
            ]
        )
    }

    // ---- steps from a plan, captured and replayed -----------------------------------------------
    fn write_idx(&self, dst: &mut CudaIdx, host: &[u32]) -> Result<()> {
        check("write_idx", "destination", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(host, dst.slice_mut()).map_err(de("write_idx"))
    }
    fn advance_plan(&self, plan: &mut CudaIdx) -> Result<()> {
        check_plan("advance_plan", plan)?;
        // SAFETY: plan_advance(unsigned* plan) adds one to plan[0]; the plan holds at least one word.
        launch!(self, reg::PLAN_ADVANCE, single(1), [plan.slice_mut()])
    }
    fn can_capture(&self) -> bool {
        true
    }
    fn begin_capture(&self) -> Result<()> {
        let mut pool = self.pool.borrow_mut();
        if pool.capturing.is_some() {
            return Err(Error::msg("begin_capture: a capture is under way already"));
        }
        self.stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(de("begin a capture"))?;
        pool.arenas += 1;
        pool.capturing = Some(pool.arenas);
        pool.capture_failed = false;
        Ok(())
    }
    fn end_capture(&self) -> Result<GraphId> {
        let failed = {
            let mut pool = self.pool.borrow_mut();
            if pool.capturing.take().is_none() {
                return Err(Error::msg("end_capture: no capture is under way"));
            }
            std::mem::take(&mut pool.capture_failed)
        };
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(de("end a capture"))?
            .ok_or_else(|| Error::msg("end_capture: the capture recorded nothing"))?;
        if failed {
            // the graph lacks the op that refused: dropped, never launched
            return Err(Error::msg(
                "end_capture: an op refused to run inside the capture; no graph",
            ));
        }
        graph.upload().map_err(de("upload a graph"))?;
        let mut graphs = self.graphs.borrow_mut();
        graphs.push(graph);
        Ok(GraphId(graphs.len() - 1))
    }
    fn launch_graph(&self, id: GraphId) -> Result<()> {
        let graphs = self.graphs.borrow();
        let g = graphs
            .get(id.0)
            .ok_or_else(|| Error::msg(format!("launch_graph: no graph {}", id.0)))?;
        g.launch().map_err(de("launch a graph"))?;
        GRAPH_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl CudaBackend {
    /// gather_batch from position `start`, or, given a step plan, from the position its current row
    /// holds, which the kernel reads (a position past the order reads NaN pixels there).
    fn gather(
        &self,
        set: &ResidentSet<'_, Self>,
        plan: Option<&CudaIdx>,
        start: usize,
        batch: usize,
        x: &mut CudaBuf,
        y: &mut CudaIdx,
    ) -> Result<()> {
        const OP: &str = "gather_batch";
        let (pixels, n) = (set.pixels, set.labels.len());
        check(OP, "image words", set.images.len(), (n * pixels).div_ceil(4))?;
        i32_of("gather_batch: pixels of the data set", n * pixels)?;
        check(OP, "x", x.len(), batch * pixels)?;
        check(OP, "y", y.len(), batch)?;
        let order_len = i32_of("gather_batch: the order", set.order.len())?;
        let side = match set.shifts {
            Some(s) => {
                check(OP, "shifts", s.len(), n)?;
                image_side(pixels)? as i32
            }
            None => 0,
        };
        if batch == 0 {
            return Ok(());
        }
        let (b, px, nn) = (batch as i32, pixels as i32, n as i32);
        let st = start as i32;
        let plan_words = i32_of("gather_batch: the plan", plan.map_or(0, |p| p.len()))?;
        let (plan, shifts) = (self.addr_or_null(plan), self.addr_or_null(set.shifts));
        // SAFETY: gather_batch(images, labels, order, x [batch·pixels], y [batch], int start, int batch,
        // int pixels, int n, const unsigned* plan, int plan_words, int order_len, const unsigned*
        // shifts, int side); the kernel reads order below order_len, images below n, whose n·pixels
        // bytes `images` holds (checked), a plan (else null) below plan_words, shifts (else null) of
        // images below n (n of them, checked), pixels = side² (checked).
        launch!(
            self,
            reg::GATHER_BATCH,
            flat(batch * pixels),
            [
                set.images.slice(),
                set.labels.slice(),
                set.order.slice(),
                x.slice_mut(),
                y.slice_mut(),
                &st,
                &b,
                &px,
                &nn,
                &plan,
                &plan_words,
                &order_len,
                &shifts,
                &side
            ]
        )
    }

    /// The device address of `buf`, or 0 (null), for a kernel's optional pointer argument. (No event
    /// is recorded: this backend's one stream orders every use.)
    fn addr_or_null<T: Pooled>(&self, buf: Option<&PooledBuf<T>>) -> u64 {
        buf.map_or(0, |b| b.slice().device_ptr(&self.stream).0)
    }

    /// The fused Adam step, changing nothing where `guard` holds a non-finite value, with lr and the
    /// bias corrections from the current row of `plan` where one is given.
    fn adam(
        &self,
        hp: &AdamHyper,
        groups: &mut [AdamGroup<'_, Self>],
        guard: Option<&CudaBuf>,
        plan: Option<&CudaIdx>,
    ) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::msg("adam_step: step numbers start at 1"));
        }
        if groups.is_empty() {
            return Ok(());
        }
        let mut table = Vec::with_capacity(groups.len());
        let mut longest = 0;
        for (n, g) in groups.iter_mut().enumerate() {
            let len = g.param.len();
            check_adam_group(n, len, g.grad.len(), g.m.len(), g.v.len())?;
            longest = longest.max(len);
            let (p, _a) = g.param.slice_mut().device_ptr_mut(&self.stream);
            let (gr, _b) = g.grad.slice().device_ptr(&self.stream);
            let (m, _c) = g.m.slice_mut().device_ptr_mut(&self.stream);
            let (v, _d) = g.v.slice_mut().device_ptr_mut(&self.stream);
            table.push(AdamTensor {
                p,
                g: gr,
                m,
                v,
                n: len as u64,
            });
        }
        let tensors = table.len() as u32;
        let mut slot = self.adam_table.borrow_mut();
        let stale = slot.as_ref().is_none_or(|(uploaded, _)| *uploaded != table);
        if stale && self.pool.borrow().capturing.is_some() {
            self.pool.borrow_mut().capture_failed = true;
            return Err(Error::msg(
                "adam_step: a captured step updates other buffers than the eager step before it",
            ));
        }
        // a graph reads the table it was captured with: new contents go to a new table then
        if stale
            && !self.graphs.borrow().is_empty()
            && let Some(old) = slot.take()
        {
            self.retired_tables.borrow_mut().push(old.1);
        }
        if slot.as_ref().is_none_or(|(_, t)| t.len() != table.len()) {
            let mut pool = self.pool.borrow_mut();
            pool.fresh += 1;
            pool.bytes += table.len() * std::mem::size_of::<AdamTensor>();
            drop(pool);
            let dev = self
                .stream
                .alloc_zeros::<AdamTensor>(table.len())
                .map_err(de("adam table"))?;
            *slot = Some((vec![], dev));
        }
        let (uploaded, dev_table) = slot.as_mut().expect("allocated above");
        if *uploaded != table {
            self.stream.memcpy_htod(&table, dev_table).map_err(de("adam table"))?;
            self.adam_uploads.set(self.adam_uploads.get() + 1);
            *uploaded = table;
        }
        let dev_table = &*dev_table;
        let [lr, bc1, bc2] = hp.per_step_f32();
        let h = AdamParams {
            lr,
            beta1: hp.beta1 as f32,
            beta2: hp.beta2 as f32,
            eps: hp.eps as f32,
            bc1,
            bc2,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                longest.div_ceil(reg::FLAT_THREADS as usize).clamp(1, 1024) as u32,
                tensors,
                1,
            ),
            block_dim: (reg::FLAT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: adam_step_v1(const AdamTensor* table, AdamParams, const float* guard, const unsigned*
        // plan): blockIdx.y < table.len() picks a row; each row's pointers address buffers of n floats
        // that the borrowed groups keep alive; the guard is a live buffer of at least one float, or
        // null; the plan, or null, is read below plan_words.
        let words = match plan {
            Some(p) => u32::try_from(p.len()).map_err(|_| Error::msg("adam_step: a step plan over 2^32 words"))?,
            None => 0,
        };
        let (guard, plan) = (self.addr_or_null(guard), self.addr_or_null(plan));
        launch!(self, reg::ADAM_STEP, cfg, [dev_table, &h, &guard, &plan, &words])
    }
}
