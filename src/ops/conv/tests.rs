//! The conv family's op tests: finite-difference gradients of its tape ops on the CPU reference
//! ([`crate::ops::gradcheck`]). Its parity across backends is in tests/common/parity.rs.

use super::conv2d;
use crate::ops::dense::Act;
use crate::ops::gradcheck::{Lcg, check, random};

#[test]
fn conv2d_gradients() {
    for (stride, act) in [
        (1, Act::None),
        (1, Act::Relu),
        (2, Act::Relu),
        (2, Act::Sigmoid),
        (3, Act::None),
    ] {
        let mut rng = Lcg(stride as u64 * 7 + act as u64);
        let inputs = vec![
            random(&mut rng, &[2, 8, 7, 3], -1.0, 1.0),
            random(&mut rng, &[3, 3, 3, 5], -0.5, 0.5),
            random(&mut rng, &[5], -0.3, 0.3),
        ];
        check(&format!("conv2d stride {stride} {act:?}"), inputs, &move |t, v| {
            conv2d(t, v[0], v[1], v[2], stride, act)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
