//! The routing family's op tests: finite-difference gradients of its tape ops on the CPU reference
//! ([`crate::ops::gradcheck`]). Its parity across backends is in tests/common/parity.rs.

use super::predict_routing;
use super::routing;
use crate::ops::gradcheck::{Lcg, check, random};

#[test]
fn routing_gradients_for_1_2_3_rounds() {
    for rounds in [1, 2, 3, 4] {
        let mut rng = Lcg(20 + rounds as u64);
        // [B=2, I=7, J=4, D=5]; magnitudes large enough for the agreement to move the couplings
        let inputs = vec![random(&mut rng, &[2, 7, 4, 5], -1.0, 1.0)];
        check(&format!("routing, {rounds} rounds"), inputs, &move |t, v| {
            routing(t, v[0], rounds)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The model's op: prediction vectors and routing as one tape node (both gradients in one backward).
#[test]
fn predict_routing_gradients_for_1_2_3_rounds() {
    for rounds in [1, 2, 3] {
        let mut rng = Lcg(60 + rounds as u64);
        // u [B=2, I=5, E=3], W [I=5, J=4, D=6, E=3]
        let inputs = vec![
            random(&mut rng, &[2, 5, 3], -1.0, 1.0),
            random(&mut rng, &[5, 4, 6, 3], -1.0, 1.0),
        ];
        check(&format!("predict_routing, {rounds} rounds"), inputs, &move |t, v| {
            predict_routing(t, v[0], v[1], rounds)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}
