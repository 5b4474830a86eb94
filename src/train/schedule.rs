//! The run's schedule, a function of its settings and the step alone so that a resumed run takes
//! the same steps as an uninterrupted one: the learning rate of each step and the shuffle of each
//! epoch.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The learning rate of update `step` (0-based: the updates made before it), the exponential decay
/// of the official code (TensorFlow's exponential_decay, not staircase).
pub fn lr_at(lr: f64, decay: f64, decay_steps: u64, step: u64) -> f64 {
    if decay == 1.0 {
        return lr;
    }
    lr * decay.powf(step as f64 / decay_steps as f64)
}

/// The shuffle of epoch `epoch` (0-based): a function of the seed and the epoch only, so a resumed
/// run sees the same batches as an uninterrupted one.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_decays_continuously_as_the_official_code_does() {
        assert_eq!(lr_at(1e-3, 1.0, 2000, 123_456), 1e-3);
        assert_eq!(lr_at(1e-3, 0.96, 2000, 0), 1e-3);
        assert!((lr_at(1e-3, 0.96, 2000, 2000) - 0.96e-3).abs() < 1e-15);
        assert!((lr_at(1e-3, 0.96, 2000, 1000) - 1e-3 * 0.96f64.sqrt()).abs() < 1e-15);
        assert!((lr_at(1e-3, 0.96, 2000, 20_000) - 1e-3 * 0.96f64.powi(10)).abs() < 1e-15);
    }
}
