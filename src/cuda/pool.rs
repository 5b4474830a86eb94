//! The device memory pool: buffers keyed by (arena, length), returned to it when dropped; arena 0 is
//! eager work's, arena g > 0 the g-th captured graph's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// Free device buffers by (arena, length) (opaque outside this module). Arena 0 is eager work's; arena
/// g > 0 holds the buffers of the g-th captured graph.
#[derive(Default)]
pub struct Pool {
    f32s: HashMap<(usize, usize), Vec<CudaSlice<f32>>>,
    u32s: HashMap<(usize, usize), Vec<CudaSlice<u32>>>,
    pub(crate) fresh: usize,
    /// Bytes of every allocation made (buffers are never freed, only pooled).
    pub(crate) bytes: usize,
    /// Arenas made so far.
    pub(crate) arenas: usize,
    /// The arena of the capture under way.
    pub(crate) capturing: Option<usize>,
    /// Whether an op refused to run inside the capture under way (its graph would lack it).
    pub(crate) capture_failed: bool,
}

pub(crate) type PoolRef = Rc<RefCell<Pool>>;

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
    pub(crate) slice: Option<CudaSlice<T>>,
    pub(crate) pool: PoolRef,
    pub(crate) arena: usize,
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
