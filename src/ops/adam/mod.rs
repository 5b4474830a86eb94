//! Adam (Kingma & Ba 2015, Algorithm 1): lr 1e-3, β1 0.9, β2 0.999, ε 1e-8 by default.
//!   m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)
//! The first and second moments live on the backend beside the parameters.
//!
//! Here: [`AdamHyper`], [`AdamGroup`], the [`AdamOps`] interface, and [`Adam`], the optimiser over a
//! tape's parameters; the implementations beside them.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod fast;
#[cfg(test)]
mod tests;

use crate::backend::{Core, check};
use crate::float::Float;
use crate::tape::Tape;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1-based step number t of the update being made (bias corrections use β^t).
    pub step: u64,
}

impl AdamHyper {
    /// What a device's Adam kernel takes per step, in f32: lr and the bias corrections 1 − β1ᵗ and
    /// 1 − β2ᵗ, computed in f64.
    pub fn per_step_f32(&self) -> [f32; 3] {
        [
            self.lr as f32,
            (1.0 - self.beta1.powf(self.step as f64)) as f32,
            (1.0 - self.beta2.powf(self.step as f64)) as f32,
        ]
    }
}

/// One parameter tensor's slice of an Adam update.
pub struct AdamGroup<'a, B: Core + ?Sized> {
    pub param: &'a mut B::Buf,
    pub grad: &'a B::Buf,
    pub m: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
}

/// Adam's preconditions for parameter group `n`: gradient and moments as long as the parameter.
pub(crate) fn check_adam_group(n: usize, param: usize, grad: usize, m: usize, v: usize) -> Result<()> {
    check("adam_step", &format!("grad of group {n}"), grad, param)?;
    check("adam_step", &format!("m of group {n}"), m, param)?;
    check("adam_step", &format!("v of group {n}"), v, param)
}

/// One Adam step over parameter groups, on the backend that holds them.
pub trait AdamOps: Core {
    /// One Adam step (Kingma & Ba, Algorithm 1) over every parameter group.
    fn adam_step(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>]) -> Result<()>;
    /// [`AdamOps::adam_step`] unless `guard[0]` is not finite (a diverged loss): then no parameter or
    /// moment changes. The default reads the guard back; a device backend tests it on the device, so
    /// a step needs no host round trip before its update.
    fn adam_step_if_finite(&self, hp: &AdamHyper, groups: &mut [AdamGroup<'_, Self>], guard: &Self::Buf) -> Result<()> {
        match self.download(guard)?.first() {
            Some(g) if g.to_f64().is_finite() => self.adam_step(hp, groups),
            Some(_) => Ok(()),
            None => Err(Error::msg("adam_step_if_finite: the guard buffer is empty")),
        }
    }
    /// [`AdamOps::adam_step_if_finite`] where the plan's current row was made from `hp`
    /// ([`plan_words`](crate::runtime::plan_words)): a device reads lr and the bias corrections from the row, so a captured step
    /// updates with each step's; this default takes them from `hp`.
    fn adam_step_planned(
        &self,
        hp: &AdamHyper,
        groups: &mut [AdamGroup<'_, Self>],
        guard: &Self::Buf,
        _plan: &Self::Idx,
    ) -> Result<()> {
        self.adam_step_if_finite(hp, groups, guard)
    }
}

pub struct Adam<B: AdamOps> {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates made so far.
    pub step: u64,
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
}

impl<B: AdamOps> Adam<B> {
    /// Zero moments for every parameter on the tape.
    pub fn new(tape: &Tape<B>, lr: f64) -> Result<Self> {
        let be = tape.backend();
        let lens: Vec<usize> = (0..tape.num_params())
            .map(|p| tape.value(crate::tape::Var(p)).numel())
            .collect();
        let m = lens.iter().map(|&n| be.zeros(n)).collect::<Result<Vec<_>>>()?;
        let v = lens.iter().map(|&n| be.zeros(n)).collect::<Result<Vec<_>>>()?;
        Ok(Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m,
            v,
        })
    }

    /// Applies the gradients left on the tape by its last backward pass.
    pub fn update(&mut self, tape: &mut Tape<B>) -> Result<()> {
        self.apply(tape, None)
    }

    /// [`Adam::update`] unless `guard[0]` (the step's loss) is not finite: then no parameter or moment
    /// changes, decided on the backend (no host round trip). The step count advances either way, so a
    /// caller that finds the loss non-finite must stop (as training does), not continue from here.
    pub fn update_if_finite(&mut self, tape: &mut Tape<B>, guard: &B::Buf) -> Result<()> {
        self.apply(tape, Some((guard, None)))
    }

    /// [`Adam::update_if_finite`] with this update's lr and bias corrections read from the current row
    /// of a step plan ([`AdamOps::adam_step_planned`]) made with [`Adam::hyper_at`].
    pub fn update_planned(&mut self, tape: &mut Tape<B>, guard: &B::Buf, plan: &B::Idx) -> Result<()> {
        self.apply(tape, Some((guard, Some(plan))))
    }

    /// Counts an update made by replaying a captured step (which ran its planned update).
    pub fn count_replayed_update(&mut self) {
        self.step += 1;
    }

    /// The hyper-parameters of update number `step` (1-based) at learning rate `lr`.
    pub fn hyper_at(&self, lr: f64, step: u64) -> AdamHyper {
        AdamHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            step,
        }
    }

    fn apply(&mut self, tape: &mut Tape<B>, guard: Option<(&B::Buf, Option<&B::Idx>)>) -> Result<()> {
        self.step += 1;
        let hp = self.hyper_at(self.lr, self.step);
        let (be, pg) = tape.params_and_grads()?;
        let mut groups: Vec<AdamGroup<'_, B>> = pg
            .into_iter()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .map(|((param, grad), (m, v))| AdamGroup { param, grad, m, v })
            .collect();
        match guard {
            Some((g, Some(plan))) => be.adam_step_planned(&hp, &mut groups, g, plan),
            Some((g, None)) => be.adam_step_if_finite(&hp, &mut groups, g),
            None => be.adam_step(&hp, &mut groups),
        }
    }
}
