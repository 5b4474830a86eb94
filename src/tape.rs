//! A thin reverse-mode autodiff tape.
//!
//! - Values live in the tape, addressed by [`Var`]. The first variables are the model's parameters
//!   ([`Tape::param`]); they persist across steps, while [`Tape::reset`] drops everything recorded
//!   after them.
//! - Each op's forward (in [`crate::ops`]) computes its output through the backend and pushes a
//!   node: a boxed [`BackwardOp`] holding the input variables and whatever else its backward needs.
//!   There is no central dispatcher: each op owns its backward.
//! - [`Tape::backward`] seeds d(loss) = 1 and replays the nodes in reverse; a gradient kept from the
//!   last pass counts as zeros until an op writes or adds to it (those no op reached are zeroed at
//!   the end).
//! - The accumulation rule: a backward ADDS into the gradients of its inputs
//!   ([`GradStore::get`] hands out buffers that hold zeros or the sum so far), so a variable used by
//!   several ops (fan-out) receives the sum of their contributions. An op that writes a gradient
//!   whole may take it with [`GradStore::get_to_write`], which says whether it holds no value yet:
//!   then the op writes it instead of adding (the buffer is not zeroed first).

use std::time::Instant;

use crate::backend::Core;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    pub fn index(self) -> usize {
        self.0
    }
}

pub struct Tensor<B: Core> {
    pub buf: B::Buf,
    pub shape: Vec<usize>,
}

impl<B: Core> Tensor<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Read access to the values during a backward pass, plus the gradient of the node's output.
pub struct Ctx<'a, B: Core> {
    pub backend: &'a B,
    values: &'a [Tensor<B>],
    /// The node's output variable.
    pub out: Var,
    /// d(loss)/d(out).
    pub dout: &'a B::Buf,
}

impl<B: Core> Ctx<'_, B> {
    pub fn value(&self, v: Var) -> &B::Buf {
        &self.values[v.0].buf
    }
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.values[v.0].shape
    }
    /// The node's own output value.
    pub fn y(&self) -> &B::Buf {
        self.value(self.out)
    }
}

/// Gradient buffers, handed out for accumulation.
pub struct GradStore<'a, B: Core> {
    backend: &'a B,
    lens: &'a [usize],
    needs: &'a [bool],
    grads: &'a mut [Option<B::Buf>],
    /// Buffers kept from an earlier pass that hold no gradient of this one yet (zeros once read).
    unwritten: &'a mut [bool],
}

impl<B: Core> GradStore<'_, B> {
    /// The gradient buffer of `v` to add into, zeros before the first op adds to it; `None` when no
    /// gradient flows to `v` (a data input, or a value computed only from such inputs), so the op can
    /// skip that part of its backward.
    pub fn get(&mut self, v: Var) -> Result<Option<&mut B::Buf>> {
        let backend = self.backend;
        Ok(match self.get_to_write(v)? {
            Some((g, true)) => {
                backend.fill(g, 0.0)?;
                Some(g)
            }
            Some((g, false)) => Some(g),
            None => None,
        })
    }

    /// As [`GradStore::get`], for an op that can write its gradient instead of adding it: with
    /// `true`, the buffer holds no value yet (a parameter's gradient buffer kept from the last step,
    /// before any op of this pass reached it), and the op must write every element (as if adding
    /// to zeros), which saves zeroing it and reading the zeros back.
    pub fn get_to_write(&mut self, v: Var) -> Result<Option<(&mut B::Buf, bool)>> {
        if !self.needs[v.0] {
            return Ok(None);
        }
        if self.grads[v.0].is_none() {
            self.grads[v.0] = Some(self.backend.zeros(self.lens[v.0])?);
            self.unwritten[v.0] = false;
        }
        let unwritten = std::mem::replace(&mut self.unwritten[v.0], false);
        Ok(self.grads[v.0].as_mut().map(|g| (g, unwritten)))
    }
}

/// Two variables' gradient buffers, each `None` where no gradient flows.
pub type GradPair<'g, B> = (Option<&'g mut <B as Core>::Buf>, Option<&'g mut <B as Core>::Buf>);

impl<B: Core> GradStore<'_, B> {
    /// [`GradStore::get`] of two different variables at once (for an op with two differentiable inputs
    /// whose gradients one kernel writes together).
    pub fn get_two(&mut self, a: Var, b: Var) -> Result<GradPair<'_, B>> {
        assert_ne!(a.0, b.0, "get_two needs two different variables");
        self.get(a)?;
        self.get(b)?;
        Ok(self.buffers_of(a, b))
    }

    /// [`GradStore::get_to_write`] of two different variables at once.
    pub fn get_two_to_write(&mut self, a: Var, b: Var) -> Result<WritePair<'_, B>> {
        assert_ne!(a.0, b.0, "get_two_to_write needs two different variables");
        let write_a = self.get_to_write(a)?.map(|(_, w)| w);
        let write_b = self.get_to_write(b)?.map(|(_, w)| w);
        let (ga, gb) = self.buffers_of(a, b);
        Ok((ga.zip(write_a), gb.zip(write_b)))
    }

    /// The gradient buffers of two different variables as they stand, in the order asked.
    fn buffers_of(&mut self, a: Var, b: Var) -> GradPair<'_, B> {
        let (lo, hi) = (a.0.min(b.0), a.0.max(b.0));
        let (left, right) = self.grads.split_at_mut(hi);
        let (g_lo, g_hi) = (left[lo].as_mut(), right[0].as_mut());
        if a.0 < b.0 { (g_lo, g_hi) } else { (g_hi, g_lo) }
    }
}

/// Two variables' gradient buffers, each with whether it is to be written whole
/// ([`GradStore::get_to_write`]), `None` where no gradient flows.
pub type WritePair<'g, B> = (
    Option<(&'g mut <B as Core>::Buf, bool)>,
    Option<(&'g mut <B as Core>::Buf, bool)>,
);

pub trait BackwardOp<B: Core> {
    fn name(&self) -> &'static str;
    /// The name with the op's shape where that tells its instances apart (a step profile's rows).
    fn label(&self) -> String {
        self.name().to_string()
    }
    /// Adds this op's contribution to the gradients of its inputs.
    fn backward(&self, ctx: &Ctx<'_, B>, grads: &mut GradStore<'_, B>) -> Result<()>;
}

struct Node<B: Core> {
    op: Box<dyn BackwardOp<B>>,
    out: Var,
}

pub struct Tape<B: Core> {
    backend: B,
    values: Vec<Tensor<B>>,
    needs: Vec<bool>,
    grads: Vec<Option<B::Buf>>,
    /// Gradient buffers kept from the last backward pass that this one has not written yet.
    unwritten: Vec<bool>,
    nodes: Vec<Node<B>>,
    n_params: usize,
    recording: bool,
    profiler: Option<Profiler>,
}

/// The wall time one op took in a profiled step ([`Tape::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// Whether this is the op's backward (else its forward).
    pub backward: bool,
    /// The op, with its shape where it has several instances (`BackwardOp::label`).
    pub label: String,
    pub ms: f64,
}

/// Op times of the steps so far, and when the last one ended.
struct Profiler {
    mark: Instant,
    times: Vec<OpTime>,
}

impl Profiler {
    /// Records the time since the last mark under `label`, and marks now.
    fn lap(&mut self, backward: bool, label: String) {
        let now = Instant::now();
        let ms = (now - self.mark).as_secs_f64() * 1e3;
        self.times.push(OpTime { backward, label, ms });
        self.mark = now;
    }
}

impl<B: Core> Tape<B> {
    pub fn new(backend: B) -> Self {
        Tape {
            backend,
            values: vec![],
            needs: vec![],
            grads: vec![],
            unwritten: vec![],
            nodes: vec![],
            n_params: 0,
            recording: true,
            profiler: None,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Adds a trainable parameter. Parameters come before every other variable.
    pub fn param(&mut self, buf: B::Buf, shape: &[usize]) -> Result<Var> {
        if self.values.len() != self.n_params {
            return Err(Error::msg("tape: parameters must be added before any other variable"));
        }
        let v = self.push_value(buf, shape, true)?;
        self.n_params += 1;
        Ok(v)
    }

    /// Adds a value no gradient flows to (images, targets).
    pub fn input(&mut self, buf: B::Buf, shape: &[usize]) -> Result<Var> {
        self.push_value(buf, shape, false)
    }

    /// Adds a value that receives a gradient but is not a parameter (tests, gradient checks).
    pub fn leaf(&mut self, buf: B::Buf, shape: &[usize]) -> Result<Var> {
        self.push_value(buf, shape, true)
    }

    fn push_value(&mut self, buf: B::Buf, shape: &[usize], needs: bool) -> Result<Var> {
        let n: usize = shape.iter().product();
        if self.backend.buf_len(&buf) != n {
            return Err(Error::msg(format!(
                "tape: buffer of {} elements for shape {shape:?}",
                self.backend.buf_len(&buf)
            )));
        }
        self.values.push(Tensor {
            buf,
            shape: shape.to_vec(),
        });
        self.needs.push(needs);
        self.grads.push(None);
        self.unwritten.push(false);
        Ok(Var(self.values.len() - 1))
    }

    /// Records an op's output. `op` is kept for the backward pass when any input needs a gradient
    /// and the tape is recording; otherwise the output is a constant.
    pub fn push_op(
        &mut self,
        buf: B::Buf,
        shape: &[usize],
        inputs: &[Var],
        op: impl BackwardOp<B> + 'static,
    ) -> Result<Var> {
        let needs = self.records(inputs);
        if let Some(p) = self.profiler.as_mut() {
            p.lap(false, op.label());
        }
        let out = self.push_value(buf, shape, needs)?;
        if needs {
            self.nodes.push(Node { op: Box::new(op), out });
        }
        Ok(out)
    }

    /// Whether an op with these inputs is kept for the backward pass ([`Tape::push_op`]): so that
    /// its forward knows whether to save anything for it.
    pub fn records(&self, inputs: &[Var]) -> bool {
        self.recording && inputs.iter().any(|v| self.needs[v.0])
    }

    /// Whether a gradient flows to `v`.
    pub fn needs_grad(&self, v: Var) -> bool {
        self.needs[v.0]
    }

    /// While off, ops record nothing (evaluation): no backward state is kept.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    /// Drops every variable but the parameters, ready for the next step.
    pub fn reset(&mut self) {
        self.values.truncate(self.n_params);
        self.needs.truncate(self.n_params);
        self.grads.truncate(self.n_params);
        self.unwritten.truncate(self.n_params);
        self.nodes.clear();
        if let Some(p) = self.profiler.as_mut() {
            p.mark = Instant::now();
        }
    }

    /// While on, each op's forward (the time from the previous op's end, or from [`Tape::reset`], to
    /// its output's recording) and backward are timed by the wall clock, as is the zeroing of the
    /// gradients: a step profile, true where the backend computes as it is called (the CPU
    /// backends), not where it queues work (CUDA). Turning it on or off drops the times so far.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(|| Profiler {
            mark: Instant::now(),
            times: vec![],
        });
    }

    /// The op times recorded since profiling was turned on or last taken, in the order they ran.
    pub fn take_profile(&mut self) -> Vec<OpTime> {
        self.profiler
            .as_mut()
            .map(|p| std::mem::take(&mut p.times))
            .unwrap_or_default()
    }

    pub fn value(&self, v: Var) -> &Tensor<B> {
        &self.values[v.0]
    }

    /// Gives `v` a new shape with the same number of elements (a view: the buffer is unchanged).
    pub fn reshape(&mut self, v: Var, shape: &[usize]) -> Result<()> {
        let t = &mut self.values[v.0];
        if shape.iter().product::<usize>() != t.numel() {
            return Err(Error::msg(format!("tape: cannot reshape {:?} to {shape:?}", t.shape)));
        }
        t.shape = shape.to_vec();
        Ok(())
    }

    /// Overwrites the value of a parameter or input (loading a checkpoint, perturbing for a check).
    pub fn set_value(&mut self, v: Var, buf: B::Buf) -> Result<()> {
        let n = self.backend.buf_len(&buf);
        if n != self.values[v.0].numel() {
            return Err(Error::msg(format!(
                "tape: value of {n} elements for shape {:?}",
                self.values[v.0].shape
            )));
        }
        self.values[v.0].buf = buf;
        Ok(())
    }

    pub fn grad(&self, v: Var) -> Option<&B::Buf> {
        self.grads[v.0].as_ref()
    }

    pub fn num_params(&self) -> usize {
        self.n_params
    }

    /// The names of the recorded ops, in forward order.
    pub fn op_names(&self) -> Vec<&'static str> {
        self.nodes.iter().map(|n| n.op.name()).collect()
    }

    /// Each parameter's value and gradient (zeros if no gradient reached it), for the optimiser.
    #[allow(clippy::type_complexity)]
    pub fn params_and_grads(&mut self) -> Result<(&B, Vec<(&mut B::Buf, &B::Buf)>)> {
        for p in 0..self.n_params {
            if self.grads[p].is_none() {
                self.grads[p] = Some(self.backend.zeros(self.values[p].numel())?);
            }
        }
        let (vals, grads) = (&mut self.values[..self.n_params], &self.grads[..self.n_params]);
        let pairs = vals
            .iter_mut()
            .zip(grads)
            .map(|(v, g)| (&mut v.buf, g.as_ref().expect("allocated above")));
        Ok((&self.backend, pairs.collect()))
    }

    /// Computes d(loss)/d(v) for every variable that needs a gradient. `loss` must hold one value.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        if self.values[loss.0].numel() != 1 {
            return Err(Error::msg(format!(
                "tape: backward needs a scalar loss, got shape {:?}",
                self.values[loss.0].shape
            )));
        }
        if let Some(p) = self.profiler.as_mut() {
            p.mark = Instant::now();
        }
        // every kept gradient is zero until an op writes or adds to it: zeroed when first handed to
        // an op that adds, not zeroed where an op writes it whole (`GradStore::get_to_write`), and
        // the rest zeroed at the end
        for (u, g) in self.unwritten.iter_mut().zip(&self.grads) {
            *u = g.is_some();
        }
        let mut seed = self.backend.zeros(1)?;
        self.backend.fill(&mut seed, 1.0)?;
        self.grads[loss.0] = Some(seed);
        self.unwritten[loss.0] = false;
        let res = self.run_backward();
        // gradients no op reached are zeros; after a failed pass all are (one handed out to be
        // written may not have been)
        let failed = res.is_err();
        for (u, g) in self.unwritten.iter_mut().zip(self.grads.iter_mut()) {
            if let (true, Some(g)) = (std::mem::replace(u, false) || failed, g) {
                let zeroed = self.backend.fill(g, 0.0);
                if !failed {
                    zeroed?;
                }
            }
        }
        if let Some(p) = self.profiler.as_mut() {
            p.lap(true, "zero the gradients".to_string());
        }
        res
    }

    /// The nodes' backward, last to first.
    fn run_backward(&mut self) -> Result<()> {
        let lens: Vec<usize> = self.values.iter().map(|t| t.numel()).collect();
        for node in self.nodes.iter().rev() {
            // every consumer of `out` was recorded after it, so its gradient is complete here
            let Some(mut dout) = self.grads[node.out.0].take() else {
                continue;
            };
            if std::mem::replace(&mut self.unwritten[node.out.0], false) {
                // kept from an earlier pass, and no consumer reached it in this one
                self.backend.fill(&mut dout, 0.0)?;
            }
            let ctx = Ctx {
                backend: &self.backend,
                values: &self.values,
                out: node.out,
                dout: &dout,
            };
            let mut store = GradStore {
                backend: &self.backend,
                lens: &lens,
                needs: &self.needs,
                grads: &mut self.grads,
                unwritten: &mut self.unwritten,
            };
            let res = node.op.backward(&ctx, &mut store);
            if let Some(p) = self.profiler.as_mut() {
                p.lap(true, node.op.label());
            }
            self.grads[node.out.0] = Some(dout);
            res.map_err(|e| Error::msg(format!("backward of {}: {e}", node.op.name())))?;
        }
        Ok(())
    }
}
