//! The losses family's op tests: finite-difference gradients of its tape ops on the CPU reference
//! ([`crate::ops::gradcheck`]). Its parity across backends is in tests/common/parity.rs.

use std::rc::Rc;

use super::add;
use super::margin_loss;
use super::sq_err;
use crate::backend::cpu::CpuBackend;
use crate::ops::gradcheck::{Lcg, check, random};
use crate::tape::Tape;

type Cpu = CpuBackend<f64>;

#[test]
fn margin_loss_gradients() {
    let mut rng = Lcg(51);
    // lengths spread over both sides of m− = 0.1 and m+ = 0.9
    let inputs = vec![random(&mut rng, &[4, 5], 0.0, 1.2)];
    check("margin_loss", inputs.clone(), &|t, v| {
        margin_loss(t, v[0], Rc::new(vec![1, 4, 0, 4]), 1)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // two labels per image, both present (MultiMNIST)
    check("margin_loss, two labels", inputs, &|t, v| {
        margin_loss(t, v[0], Rc::new(vec![1, 3, 4, 0, 0, 2, 4, 1]), 2)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn sq_err_gradients_for_both_arguments() {
    let mut rng = Lcg(61);
    let inputs = vec![random(&mut rng, &[3, 6], 0.0, 1.0), random(&mut rng, &[3, 6], 0.0, 1.0)];
    check("sq_err", inputs, &|t, v| sq_err(t, v[0], v[1], 0.37)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn add_gradients_with_fan_out() {
    let mut rng = Lcg(71);
    let inputs = vec![
        random(&mut rng, &[2, 3], -1.0, 1.0),
        random(&mut rng, &[2, 3], -1.0, 1.0),
    ];
    check("add(a, b)", inputs.clone(), &|t, v| add(t, v[0], v[1])).unwrap_or_else(|e| panic!("{e}"));
    check("add(a, a)", inputs, &|t, v| add(t, v[0], v[0])).unwrap_or_else(|e| panic!("{e}"));
}

/// Every label of an image is a present class: lengths (0.95, 0.5, 0.05) with the labels {0, 1} give
/// (0.9 − 0.5)² = 0.16, with {0} alone 0.5 · (0.5 − 0.1)² = 0.08.
#[test]
fn margin_loss_counts_every_label_as_present() {
    for (labels, per, want) in [(vec![0u32, 1], 2, 0.16), (vec![0], 1, 0.08), (vec![1, 0], 2, 0.16)] {
        let mut t = Tape::new(Cpu::new());
        let l = t.leaf(vec![0.95, 0.5, 0.05], &[1, 3]).unwrap();
        let loss = margin_loss(&mut t, l, Rc::new(labels.clone()), per).unwrap();
        let got = t.value(loss).buf[0];
        assert!((got - want).abs() < 1e-12, "labels {labels:?}: {got}, want {want}");
    }
    let mut t = Tape::new(Cpu::new());
    let l = t.leaf(vec![0.5; 6], &[2, 3]).unwrap();
    let e = margin_loss(&mut t, l, Rc::new(vec![0, 1, 2]), 2).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
}
