//! Adam (Kingma & Ba 2015, Algorithm 1): lr 1e-3, β1 0.9, β2 0.999, ε 1e-8 by default.
//!   m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)
//! The first and second moments live on the backend beside the parameters.

use crate::Result;
use crate::backend::{AdamGroup, AdamHyper, Backend};
use crate::tape::Tape;

pub struct Adam<B: Backend> {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates made so far.
    pub step: u64,
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
}

impl<B: Backend> Adam<B> {
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
    /// of a step plan ([`Backend::adam_step_planned`]) made with [`Adam::hyper_at`].
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
