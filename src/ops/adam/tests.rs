//! The adam family's op tests: the update of the CPU reference against Kingma & Ba's Algorithm 1
//! written out by hand, and the guard that keeps a diverged step from changing anything. Its parity
//! across backends is in tests/common/parity.rs.

use super::{AdamGroup, AdamHyper, AdamOps};
use crate::backend::Core;
use crate::backend::cpu::CpuBackend;

fn hyper(step: u64) -> AdamHyper {
    AdamHyper {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step,
    }
}

#[test]
fn two_steps_follow_algorithm_1() {
    let be = CpuBackend::<f64>::new();
    let (mut p, mut m, mut v) = (vec![0.5, -1.0, 2.0], vec![0.0; 3], vec![0.0; 3]);
    let grads = [vec![0.1, -0.2, 0.3], vec![-0.4, 0.05, 0.3]];
    let (mut want_p, mut want_m, mut want_v) = (p.clone(), vec![0.0f64; 3], vec![0.0f64; 3]);
    for (t, g) in grads.iter().enumerate() {
        let hp = hyper(t as u64 + 1);
        let mut groups = [AdamGroup {
            param: &mut p,
            grad: g,
            m: &mut m,
            v: &mut v,
        }];
        be.adam_step(&hp, &mut groups).unwrap();
        for i in 0..3 {
            want_m[i] = 0.9 * want_m[i] + 0.1 * g[i];
            want_v[i] = 0.999 * want_v[i] + 0.001 * g[i] * g[i];
            let (mh, vh) = (
                want_m[i] / (1.0 - 0.9f64.powi(t as i32 + 1)),
                want_v[i] / (1.0 - 0.999f64.powi(t as i32 + 1)),
            );
            want_p[i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
        }
    }
    for i in 0..3 {
        assert!((p[i] - want_p[i]).abs() < 1e-14, "p[{i}]: {} want {}", p[i], want_p[i]);
        assert!(
            (m[i] - want_m[i]).abs() < 1e-15 && (v[i] - want_v[i]).abs() < 1e-15,
            "moments of {i}"
        );
    }
    // a step's size is about lr where the gradient keeps its sign (Adam's scale invariance)
    assert!((0.5 - p[0]).abs() < 0.05);
}

#[test]
fn a_non_finite_guard_changes_nothing_and_step_zero_is_refused() {
    let be = CpuBackend::<f64>::new();
    let (mut p, mut m, mut v) = (vec![1.0, 2.0], vec![0.1, 0.2], vec![0.3, 0.4]);
    let g = vec![0.5, 0.5];
    for guard in [f64::NAN, f64::INFINITY] {
        let mut groups = [AdamGroup {
            param: &mut p,
            grad: &g,
            m: &mut m,
            v: &mut v,
        }];
        be.adam_step_if_finite(&hyper(1), &mut groups, &be.upload(&[guard]).unwrap())
            .unwrap();
    }
    assert_eq!(
        (p.as_slice(), m.as_slice(), v.as_slice()),
        (&[1.0, 2.0][..], &[0.1, 0.2][..], &[0.3, 0.4][..])
    );
    let mut groups = [AdamGroup {
        param: &mut p,
        grad: &g,
        m: &mut m,
        v: &mut v,
    }];
    let e = be.adam_step(&hyper(0), &mut groups).unwrap_err();
    assert!(e.to_string().contains("start at 1"), "{e}");
    be.adam_step_if_finite(&hyper(1), &mut groups, &be.upload(&[1.0]).unwrap())
        .unwrap();
    assert!(p[0] < 1.0, "a finite guard lets the step run");
}
