//! The dense family's op tests: finite-difference gradients of its tape ops on the CPU reference
//! ([`crate::ops::gradcheck`]). Its parity across backends is in tests/common/parity.rs.

use super::Act;
use super::dense;
use crate::ops::gradcheck::{Lcg, check, random};

#[test]
fn dense_gradients() {
    for act in [Act::None, Act::Relu, Act::Sigmoid] {
        let mut rng = Lcg(3 + act as u64);
        let inputs = vec![
            random(&mut rng, &[4, 7], -1.0, 1.0),
            random(&mut rng, &[7, 5], -1.0, 1.0),
            random(&mut rng, &[5], -0.5, 0.5),
        ];
        check(&format!("dense {act:?}"), inputs, &move |t, v| {
            dense(t, v[0], v[1], v[2], act)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
