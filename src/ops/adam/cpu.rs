//! Adam on the CPU reference backend (f64 sums).

use crate::backend::cpu::CpuBackend;
use crate::float::Float;
use crate::{Error, Result};

use super::{AdamGroup, AdamHyper, AdamOps, check_adam_group};

impl<T: Float> AdamOps for CpuBackend<T> {
    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::msg("adam_step: step numbers start at 1"));
        }
        let bc1 = 1.0 - hp.beta1.powf(hp.step as f64);
        let bc2 = 1.0 - hp.beta2.powf(hp.step as f64);
        for (n, g) in groups.iter_mut().enumerate() {
            let len = g.param.len();
            check_adam_group(n, len, g.grad.len(), g.m.len(), g.v.len())?;
            for k in 0..len {
                let gr = g.grad[k].to_f64();
                let m = hp.beta1 * g.m[k].to_f64() + (1.0 - hp.beta1) * gr;
                let v = hp.beta2 * g.v[k].to_f64() + (1.0 - hp.beta2) * gr * gr;
                let p = g.param[k].to_f64() - hp.lr * (m / bc1) / ((v / bc2).sqrt() + hp.eps);
                g.m[k] = T::from_f64(m);
                g.v[k] = T::from_f64(v);
                g.param[k] = T::from_f64(p);
            }
        }
        Ok(())
    }
}
