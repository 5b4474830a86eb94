//! The capsules family's op tests: finite-difference gradients of its tape ops on the CPU reference
//! ([`crate::ops::gradcheck`]). Its parity across backends is in tests/common/parity.rs.

use std::rc::Rc;

use super::lengths;
use super::mask;
use super::predict;
use super::squash;
use crate::backend::cpu::CpuBackend;
use crate::ops::gradcheck::{Lcg, check, input, random};
use crate::ops::losses::sq_err;
use crate::tape::Tape;

type Cpu = CpuBackend<f64>;

#[test]
fn squash_gradients_including_a_zero_vector() {
    let mut rng = Lcg(11);
    let mut s = rng.vec(5 * 8, -1.5, 1.5);
    s[16..24].fill(0.0); // capsule 2 is the zero vector
    s[24..32].iter_mut().for_each(|x| *x *= 1e-3); // capsule 3 is tiny
    check("squash", vec![input(&[5, 8], s)], &|t, v| squash(t, v[0])).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn squash_and_lengths_of_a_zero_vector_are_finite() {
    let mut t = Tape::new(Cpu::new());
    let s = t.leaf(vec![0.0; 8], &[1, 8]).unwrap();
    let v = squash(&mut t, s).unwrap();
    assert!(t.value(v).buf.iter().all(|&x| x == 0.0), "squash(0) = 0");
    let l = lengths(&mut t, v).unwrap();
    let len = t.value(l).buf[0];
    assert!(
        (len - 1e-7f64.sqrt()).abs() < 1e-15,
        "safe length of 0 is √ε, got {len}"
    );
    t.reshape(l, &[1, 1]).unwrap();
    let target = t.input(vec![1.0], &[1, 1]).unwrap();
    let loss = sq_err(&mut t, l, target, 1.0).unwrap();
    t.backward(loss).unwrap();
    let g = t.grad(s).unwrap();
    assert!(
        g.iter().all(|x| x.is_finite()),
        "gradient at the zero vector must be finite: {g:?}"
    );
}

#[test]
fn predict_gradients() {
    let mut rng = Lcg(5);
    let inputs = vec![
        random(&mut rng, &[3, 5, 4], -1.0, 1.0),
        random(&mut rng, &[5, 3, 6, 4], -1.0, 1.0),
    ];
    check("predict", inputs, &|t, v| predict(t, v[0], v[1])).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn lengths_gradients() {
    let mut rng = Lcg(31);
    check("lengths", vec![random(&mut rng, &[3, 4, 6], -1.0, 1.0)], &|t, v| {
        lengths(t, v[0])
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn mask_gradients() {
    let mut rng = Lcg(41);
    let inputs = vec![random(&mut rng, &[3, 4, 5], -1.0, 1.0)];
    check("mask", inputs, &|t, v| mask(t, v[0], Rc::new(vec![2, 0, 3]))).unwrap_or_else(|e| panic!("{e}"));
}
