//! Adam on the GPU: one launch updates every parameter tensor, reading a table of them.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{AdamGroup, AdamHyper, AdamOps, check_adam_group};
use crate::cuda::launch::{de, launch};
use crate::cuda::params::{AdamParams, AdamTensor, check_plan};
use crate::cuda::registry as reg;
use crate::cuda::{CudaBackend, CudaBuf, CudaIdx};
use crate::{Error, Result};

impl AdamOps for CudaBackend {
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
}

impl CudaBackend {
    /// The fused Adam step, changing nothing where `guard` holds a non-finite value, with lr and the
    /// bias corrections from the current row of `plan` where one is given.
    pub(crate) fn adam(
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
        let dev_table = self.adam_table(table)?;
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
