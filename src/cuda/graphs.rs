//! Steps captured as CUDA graphs and replayed. A graph holds raw device pointers, so the buffers a
//! capture takes belong to the graph from then on ([`super::pool`]'s arenas).

use super::CudaBackend;
use super::launch::de;
use crate::{Error, Result};

/// Graph launches by every [`CudaBackend`] of this process.
pub(crate) static GRAPH_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CudaBackend {
    /// From here until [`CudaBackend::capture_end`], launches on the stream are recorded, not run;
    /// buffers taken meanwhile belong to the capture's arena.
    pub(crate) fn capture_begin(&self) -> Result<()> {
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

    /// Ends the capture under way: its graph, uploaded, by number.
    pub(crate) fn capture_end(&self) -> Result<usize> {
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
        Ok(graphs.len() - 1)
    }

    /// Launches captured graph `id` again.
    pub(crate) fn replay(&self, id: usize) -> Result<()> {
        let graphs = self.graphs.borrow();
        let g = graphs
            .get(id)
            .ok_or_else(|| Error::msg(format!("launch_graph: no graph {}", id)))?;
        g.launch().map_err(de("launch a graph"))?;
        GRAPH_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
