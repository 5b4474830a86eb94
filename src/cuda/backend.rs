//! [`CudaBackend`]: an NVIDIA GPU as a backend: its context and one stream (every op's launches are
//! ordered by it, so a training step needs no host round trip until its loss is read), the kernels as
//! the driver loaded them, the versions it launches, and [`Core`] (buffers, transfers, fill, +=). Each
//! op family's launches are its `cuda.rs` under `crate::ops`.
//!
//! Memory: buffers come from a pool keyed by length and go back to it when dropped (super::pool), so
//! once the first step has run, later steps of the same shapes allocate no device memory
//! ([`CudaBackend::fresh_allocations`] counts the allocations made).
//!
//! Graphs: a step can be captured as a CUDA graph and replayed (super::graphs,
//! [`crate::runtime::StepRuntime::begin_capture`]). The graph holds raw device pointers, so the buffers
//! a captured step takes belong to the graph from then on: the pool keeps them in the graph's own arena,
//! handed out again only inside that capture, never to eager work. Likewise a graph keeps the Adam table
//! it was captured with: an update of other buffers afterwards writes a new table, not that one
//! (`CudaBackend::adam_table`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, PushKernelArg};

use super::graphs::GRAPH_LAUNCHES;
use super::launch::{de, flat, launch};
use super::params::AdamTensor;
use super::pool::{CudaBuf, CudaIdx, PoolRef, Pooled, PooledBuf};
use super::registry::{self as reg, Kernel};
use super::{DeviceInfo, compile_all, describe, device_info, kernel_target, open_device};
use crate::backend::{Core, check};
use crate::{Error, Result};

/// One kernel as the driver loaded it ([`CudaBackend::loaded_kernels`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    pub kernel: Kernel,
    pub registers: i32,
    pub static_smem: i32,
    pub max_threads: i32,
}

pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) info: DeviceInfo,
    pub(crate) funcs: HashMap<&'static str, CudaFunction>,
    pub(crate) pool: PoolRef,
    /// The fused Adam step's table of tensors on the device, with the host copy last uploaded: a step
    /// whose buffers are the last step's (the pool hands them out in the same order) uploads nothing.
    pub(crate) adam_table: RefCell<Option<(Vec<AdamTensor>, CudaSlice<AdamTensor>)>>,
    /// Uploads of the Adam table so far.
    pub(crate) adam_uploads: std::cell::Cell<usize>,
    /// The version of each op this backend launches.
    pub(crate) kernels: RefCell<reg::KernelSet>,
    /// Captured steps, by [`GraphId`].
    pub(crate) graphs: RefCell<Vec<CudaGraph>>,
    /// Adam tables that captured steps read, replaced for eager work by tables of other buffers.
    pub(crate) retired_tables: RefCell<Vec<CudaSlice<AdamTensor>>>,
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
                    "{}: the driver cannot load {target}: {}",
                    crate::kernels::path_of(file),
                    describe(&e)
                ))
            })?;
            for k in reg::ALL.iter().filter(|k| k.file == *file) {
                let f = module.load_function(k.name).map_err(|e| {
                    Error::msg(format!(
                        "{}: no kernel {}: {}",
                        crate::kernels::path_of(file),
                        k.name,
                        describe(&e)
                    ))
                })?;
                funcs.insert(k.name, f);
            }
        }
        for k in reg::ALL {
            if !funcs.contains_key(k.name) {
                return Err(Error::msg(format!(
                    "kernel {} ({}) was not loaded",
                    k.name,
                    crate::kernels::path_of(k.file)
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

    /// Graphs launched so far ([`StepRuntime::launch_graph`](crate::runtime::StepRuntime::launch_graph)) by every CUDA backend of this process.
    pub fn graph_launches_in_process() -> usize {
        GRAPH_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A buffer of `n` values: from the pool (inside a capture, the capture's arena first, then eager
    /// work's free buffers, which become the graph's), else a new allocation, which a capture refuses.
    pub(crate) fn take<T: Pooled>(&self, n: usize) -> Result<PooledBuf<T>> {
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

    pub(crate) fn f(&self, k: Kernel) -> &CudaFunction {
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
    pub(crate) fn version(&self, op: reg::OpId) -> &'static [Kernel] {
        self.kernels.borrow().version(op).kernels
    }
}

impl Core for CudaBackend {
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

    fn device_bytes(&self) -> Option<usize> {
        Some(self.pool.borrow().bytes)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(de("synchronize"))
    }

    fn zeros(&self, n: usize) -> Result<CudaBuf> {
        let mut b = self.take::<f32>(n)?;
        if n > 0 {
            self.stream.memset_zeros(b.slice_mut()).map_err(de("memset"))?;
        }
        Ok(b)
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

    fn alloc_out(&self, n: usize) -> Result<CudaBuf> {
        self.take::<f32>(n)
    }

    fn alloc_idx(&self, n: usize) -> Result<CudaIdx> {
        self.take::<u32>(n)
    }

    fn download_idx(&self, idx: &CudaIdx) -> Result<Vec<u32>> {
        if idx.is_empty() {
            return Ok(vec![]);
        }
        self.stream.clone_dtoh(idx.slice()).map_err(de("download"))
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn idx_len(&self, idx: &CudaIdx) -> usize {
        idx.len()
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
}

impl CudaBackend {
    /// The device address of `buf`, or 0 (null), for a kernel's optional pointer argument. (No event
    /// is recorded: this backend's one stream orders every use.)
    pub(crate) fn addr_or_null<T: Pooled>(&self, buf: Option<&PooledBuf<T>>) -> u64 {
        buf.map_or(0, |b| b.slice().device_ptr(&self.stream).0)
    }

    /// The fused Adam step's table of tensors on the device, holding `table`'s rows: the table uploaded
    /// last where it holds them already (every step updates the same buffers), else `table` copied in.
    /// A graph reads the table it was captured with, so new rows then go to a new table; inside a
    /// capture, new rows are refused (the graph would read a table later steps rewrite).
    pub(crate) fn adam_table(&self, table: Vec<AdamTensor>) -> Result<std::cell::RefMut<'_, CudaSlice<AdamTensor>>> {
        let mut slot = self.adam_table.borrow_mut();
        let stale = slot.as_ref().is_none_or(|(uploaded, _)| *uploaded != table);
        if stale && self.pool.borrow().capturing.is_some() {
            self.pool.borrow_mut().capture_failed = true;
            return Err(Error::msg(
                "adam_step: a captured step updates other buffers than the eager step before it",
            ));
        }
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
        Ok(std::cell::RefMut::map(slot, |s| {
            &mut s.as_mut().expect("allocated above").1
        }))
    }
}
