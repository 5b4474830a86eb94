//! The tape's contract: reverse replay, one accumulation rule (backward ops add; gradients are
//! zeroed once per backward pass), fan-out sums, no gradient for data, no recording in evaluation.
//! And Adam's first two steps against values computed by hand.

use std::cell::RefCell;
use std::rc::Rc;

use capsnet::Result;
use capsnet::backend::cpu::CpuBackend;
use capsnet::ops;
use capsnet::ops::Act;
use capsnet::ops::Adam;
use capsnet::prelude::*;
use capsnet::tape::{BackwardOp, Ctx, GradStore, Tape, Var};

type Cpu = CpuBackend<f64>;

/// y = x (identity) that logs its name when its backward runs.
struct Logged {
    x: Var,
    name: &'static str,
    log: Rc<RefCell<Vec<&'static str>>>,
}

impl BackwardOp<Cpu> for Logged {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(&self, ctx: &Ctx<'_, Cpu>, g: &mut GradStore<'_, Cpu>) -> Result<()> {
        self.log.borrow_mut().push(self.name);
        if let Some(dx) = g.get(self.x)? {
            ctx.backend.add_assign(dx, ctx.dout)?;
        }
        Ok(())
    }
}

fn logged(t: &mut Tape<Cpu>, x: Var, name: &'static str, log: &Rc<RefCell<Vec<&'static str>>>) -> Var {
    let v = t.value(x).buf.clone();
    let shape = t.value(x).shape.clone();
    t.push_op(
        v,
        &shape,
        &[x],
        Logged {
            x,
            name,
            log: log.clone(),
        },
    )
    .unwrap()
}

fn sum_sq(t: &mut Tape<Cpu>, x: Var) -> Var {
    // Σ x² as sq_err against zeros over one row
    let n = t.value(x).numel();
    t.reshape(x, &[1, n]).unwrap();
    let zeros = t.input(vec![0.0; n], &[1, n]).unwrap();
    ops::sq_err(t, x, zeros, 1.0).unwrap()
}

#[test]
fn backward_replays_ops_in_reverse_order() {
    let log = Rc::new(RefCell::new(vec![]));
    let mut t = Tape::new(Cpu::new());
    let x = t.leaf(vec![1.0, 2.0], &[1, 2]).unwrap();
    let a = logged(&mut t, x, "first", &log);
    let b = logged(&mut t, a, "second", &log);
    let c = logged(&mut t, b, "third", &log);
    let loss = sum_sq(&mut t, c);
    assert_eq!(t.op_names(), ["first", "second", "third", "sq_err"]);
    t.backward(loss).unwrap();
    assert_eq!(*log.borrow(), ["third", "second", "first"]);
    assert_eq!(
        t.grad(x).unwrap(),
        &vec![2.0, 4.0],
        "d Σx² / dx = 2x through three identities"
    );
}

#[test]
fn fan_out_gradients_are_summed() {
    // x feeds two branches: loss = Σ (2x)² + Σ x² = 5 Σ x², so dx = 10 x
    let mut t = Tape::new(Cpu::new());
    let x = t.leaf(vec![1.0, -3.0, 0.5], &[1, 3]).unwrap();
    let doubled = ops::add(&mut t, x, x).unwrap();
    let l1 = sum_sq(&mut t, doubled);
    let l2 = sum_sq(&mut t, x);
    let loss = ops::add(&mut t, l1, l2).unwrap();
    t.backward(loss).unwrap();
    assert_eq!(t.value(loss).buf[0], 5.0 * (1.0 + 9.0 + 0.25));
    assert_eq!(t.grad(x).unwrap(), &vec![10.0, -30.0, 5.0]);
}

#[test]
fn gradients_are_zeroed_once_per_backward_not_accumulated_across_passes() {
    let mut t = Tape::new(Cpu::new());
    let w = t.param(vec![0.5, -1.0], &[2, 1]).unwrap();
    let b = t.param(vec![0.25], &[1]).unwrap();
    let mut grads = vec![];
    for _ in 0..3 {
        t.reset();
        let x = t.input(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let y = ops::dense(&mut t, x, w, b, Act::None).unwrap();
        let loss = sum_sq(&mut t, y);
        t.backward(loss).unwrap();
        // a second backward over the same tape gives the same gradient, not twice it
        t.backward(loss).unwrap();
        grads.push((t.grad(w).unwrap().clone(), t.grad(b).unwrap().clone()));
        assert!(t.grad(x).is_none(), "data inputs get no gradient");
    }
    // y = [1·0.5 + 2·(−1) + 0.25, 3·0.5 + 4·(−1) + 0.25] = [−1.25, −2.25] and loss = Σ y² (one row
    // after the reshape), so dy = 2y = [−2.5, −4.5], dW = xᵀ·dy = [1·−2.5 + 3·−4.5, 2·−2.5 + 4·−4.5],
    // db = −2.5 − 4.5
    assert_eq!(grads[0].0, vec![-16.0, -23.0]);
    assert_eq!(grads[0].1, vec![-7.0]);
    assert!(grads.iter().all(|g| g == &grads[0]));
}

#[test]
fn evaluation_records_nothing() {
    let mut t = Tape::new(Cpu::new());
    let x = t.leaf(vec![1.0, 2.0], &[1, 2]).unwrap();
    t.set_recording(false);
    let y = ops::squash(&mut t, x).unwrap();
    assert!(t.op_names().is_empty());
    let loss = sum_sq(&mut t, y);
    t.backward(loss).unwrap();
    assert!(t.grad(x).is_none(), "nothing recorded, so nothing flows back");
}

#[test]
fn reset_keeps_parameters_and_drops_the_rest() {
    let mut t = Tape::new(Cpu::new());
    let p = t.param(vec![1.0; 4], &[4]).unwrap();
    let x = t.input(vec![2.0; 4], &[4]).unwrap();
    ops::add(&mut t, p, x).unwrap();
    assert!(t.param(vec![0.0], &[1]).is_err(), "parameters come first");
    t.reset();
    assert_eq!(t.num_params(), 1);
    assert!(t.op_names().is_empty());
    assert_eq!(t.value(p).buf, vec![1.0; 4]);
}

#[test]
fn adam_matches_hand_computed_steps() {
    // p0 = [1, −2, 0.5]; g1 = [0.1, −0.2, 0]; g2 = [0.3, 0.1, −0.4]; lr 1e-3, β 0.9/0.999, ε 1e-8.
    // Step 1: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², so p −= 1e-3 · g / (|g| + 1e-8):
    //   1 − 1e-3·0.1/0.10000001 = 0.9990000001, −2 + 1e-3·0.2/0.20000001 = −1.99900000005, 0.5.
    // Step 2: m = [0.039, −0.008, −0.04], v = [9.999e-5, 4.996e-5, 1.6e-4], m̂ = m/0.19,
    //   v̂ = v/0.001999: p = [0.998082219022056, −1.9987336630271866, 0.5007441367972644].
    let be = Cpu::new();
    let mut t = Tape::new(be);
    let p = t.param(vec![1.0, -2.0, 0.5], &[3]).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let expected = [
        [0.9990000001, -1.99900000005, 0.5],
        [0.998082219022056, -1.9987336630271866, 0.5007441367972644],
    ];
    for (g, want) in [[0.1, -0.2, 0.0], [0.3, 0.1, -0.4]].iter().zip(expected) {
        t.reset();
        // loss = x · p (a [1,3]·[3,1] dense layer without bias) has d(loss)/dp = x: set x = g
        let x = t.input(g.to_vec(), &[1, 3]).unwrap();
        t.reshape(p, &[3, 1]).unwrap();
        let zero = t.input(vec![0.0], &[1]).unwrap();
        let y = ops::dense(&mut t, x, p, zero, Act::None).unwrap();
        t.reshape(y, &[1]).unwrap();
        t.backward(y).unwrap();
        assert_eq!(t.grad(p).unwrap(), &g.to_vec());
        adam.update(&mut t).unwrap();
        let got = t.backend().download(&t.value(p).buf).unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() < 1e-14,
                "after step {}: {got:?}, expected {want:?}",
                adam.step
            );
        }
    }
}
