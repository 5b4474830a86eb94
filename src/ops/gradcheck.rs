//! Finite-difference gradient checks, in f64, of tape ops on the CPU reference: each family's op
//! tests (src/ops/<family>/tests.rs) and the whole model's (tests/gradcheck.rs) use them.
//!
//! An op's output is reduced to a scalar by a squared error against a fixed random target, so every
//! output element carries its own random weight: a wrong index or a missing term in a backward
//! changes the analytic gradient by O(1) and fails the check. Central differences with h = 1e-6
//! are accurate to ~1e-9 here, so the tolerance is |analytic − numeric| ≤ 1e-7 + 1e-5·|numeric|.

use crate::Result;
use crate::backend::cpu::CpuBackend;
use crate::ops::losses::sq_err;
use crate::tape::{Tape, Var};

/// A small deterministic generator (64-bit LCG), so a check's inputs are the same on every machine.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// The reference in f64, which every check differentiates.
pub type Cpu = CpuBackend<f64>;
/// An op under test: builds it on a tape from its inputs' variables.
pub type Build = dyn Fn(&mut Tape<Cpu>, &[Var]) -> Result<Var>;

/// The central difference's step.
pub const H: f64 = 1e-6;
/// |analytic − numeric| ≤ ATOL + RTOL·|numeric|.
pub const ATOL: f64 = 1e-7;
pub const RTOL: f64 = 1e-5;
/// At most this many elements of each input are checked (spread over the whole tensor).
pub const SAMPLES: usize = 150;

/// One input of an op under test: its values, and whether its gradient is checked.
#[derive(Clone)]
pub struct Input {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub grad: bool,
}

/// An input whose gradient is checked.
pub fn input(shape: &[usize], values: Vec<f64>) -> Input {
    assert_eq!(values.len(), shape.iter().product::<usize>());
    Input {
        shape: shape.to_vec(),
        values,
        grad: true,
    }
}

/// An input of uniform random values in [lo, hi).
pub fn random(rng: &mut Lcg, shape: &[usize], lo: f64, hi: f64) -> Input {
    input(shape, rng.vec(shape.iter().product(), lo, hi))
}

/// Builds the op on a fresh tape and reduces it to Σ (out − target)² (one row, so no batch mean).
fn evaluate(inputs: &[Input], build: &Build, backward: bool) -> (f64, Vec<Option<Vec<f64>>>) {
    let mut t = Tape::new(Cpu::new());
    let vars: Vec<Var> = inputs
        .iter()
        .map(|i| {
            if i.grad {
                t.leaf(i.values.clone(), &i.shape)
            } else {
                t.input(i.values.clone(), &i.shape)
            }
            .unwrap()
        })
        .collect();
    let out = build(&mut t, &vars).unwrap();
    let n = t.value(out).numel();
    t.reshape(out, &[1, n]).unwrap();
    let target = t.input(Lcg(99).vec(n, -1.0, 1.0), &[1, n]).unwrap();
    let loss = sq_err(&mut t, out, target, 1.0).unwrap();
    let value = t.value(loss).buf[0];
    if !backward {
        return (value, vec![]);
    }
    t.backward(loss).unwrap();
    (value, vars.iter().map(|&v| t.grad(v).cloned()).collect())
}

/// The indices of an n-element tensor a check samples: all of them up to [`SAMPLES`], else [`SAMPLES`]
/// spread at random, the first and last among them.
pub fn sample_indices(n: usize, seed: u64) -> Vec<usize> {
    if n <= SAMPLES {
        return (0..n).collect();
    }
    let mut rng = Lcg(seed);
    let mut idx: Vec<usize> = (0..SAMPLES - 2).map(|_| (rng.next_f64() * n as f64) as usize).collect();
    idx.extend([0, n - 1]);
    idx
}

/// Mismatches between analytic and numeric gradients: (what, index, analytic, numeric).
pub type Mismatch = (String, usize, f64, f64);

/// The sampled entries `idx` whose analytic gradient differs from the numeric one (or is not finite).
pub fn compare(what: &str, idx: &[usize], analytic: &[f64], numeric: &[f64]) -> Vec<Mismatch> {
    idx.iter()
        .zip(numeric)
        .filter(|&(&i, &n)| {
            let a = analytic[i];
            !a.is_finite() || (a - n).abs() > ATOL + RTOL * n.abs()
        })
        .map(|(&i, &n)| (what.to_string(), i, analytic[i], n))
        .collect()
}

/// Ok where nothing differs, else the mismatches, worst first lines, as an error to panic with.
pub fn verdict(name: &str, bad: &[Mismatch], checked: usize) -> std::result::Result<(), String> {
    if bad.is_empty() {
        return Ok(());
    }
    let worst = bad.iter().map(|m| (m.2 - m.3).abs()).fold(0.0, f64::max);
    let first: Vec<String> = bad
        .iter()
        .take(8)
        .map(|(w, i, a, n)| format!("{w}[{i}]: analytic {a:.10e}, numeric {n:.10e}"))
        .collect();
    Err(format!(
        "{name}: {} of {checked} gradient entries differ (max |diff| {worst:.3e}, tolerance {ATOL:e} + {RTOL:e}·|numeric|); first:\n  {}",
        bad.len(),
        first.join("\n  ")
    ))
}

/// Checks d(loss)/d(input) of every input that needs a gradient, by central differences.
pub fn check(name: &str, inputs: Vec<Input>, build: &Build) -> std::result::Result<(), String> {
    let (_, grads) = evaluate(&inputs, build, true);
    let mut bad = vec![];
    let mut checked = 0;
    for (k, inp) in inputs.iter().enumerate() {
        if !inp.grad {
            if grads[k].is_some() {
                return Err(format!("{name}: input {k} needs no gradient but got one"));
            }
            continue;
        }
        let analytic = grads[k].clone().unwrap_or_else(|| vec![0.0; inp.values.len()]);
        let idx = sample_indices(inp.values.len(), k as u64 + 1);
        let numeric: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let at = |delta: f64| {
                    let mut p = inputs.clone();
                    p[k].values[i] += delta;
                    evaluate(&p, build, false).0
                };
                (at(H) - at(-H)) / (2.0 * H)
            })
            .collect();
        checked += idx.len();
        bad.extend(compare(&format!("input {k}"), &idx, &analytic, &numeric));
    }
    verdict(name, &bad, checked)
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn the_check_itself_catches_a_wrong_index() {
        // an analytic gradient with two entries swapped must be reported
        let numeric = [0.1, -0.4, 0.7];
        let swapped = [0.1, 0.7, -0.4];
        assert_eq!(compare("x", &[0, 1, 2], &swapped, &numeric).len(), 2);
        assert!(compare("x", &[0, 1, 2], &numeric, &numeric).is_empty());
        assert_eq!(
            compare("x", &[0], &[f64::NAN], &[0.0]).len(),
            1,
            "a NaN gradient must fail"
        );
    }
}
