//! Finite-difference gradient checks, in f64, of the whole CapsNet loss on tiny configurations, through
//! the model's own forward (each op's own checks are its family's tests.rs under src/ops/; both use
//! `capsnet::ops::gradcheck`).

use capsnet::backend::cpu::CpuBackend;
use capsnet::config::Config;
use capsnet::model::{CapsNet, init_params};
use capsnet::ops::gradcheck::{H, Lcg, Mismatch, compare, sample_indices, verdict};
use capsnet::tape::Tape;

type Cpu = CpuBackend<f64>;

/// Every parameter tensor's gradient `grads` against central differences of `loss` at `params`, at
/// every `step`-th of the indices sampled with seed `seed + k` for tensor k: the mismatches and how
/// many entries were checked.
fn param_gradients_match(
    cfg: &Config,
    params: &[Vec<f64>],
    grads: &[Vec<f64>],
    loss: &dyn Fn(&[Vec<f64>]) -> f64,
    seed: u64,
    step: usize,
) -> (Vec<Mismatch>, usize) {
    let (mut bad, mut checked) = (vec![], 0);
    for (k, spec) in cfg.param_specs().iter().enumerate() {
        let idx: Vec<usize> = sample_indices(params[k].len(), seed + k as u64)
            .into_iter()
            .step_by(step)
            .collect();
        let numeric: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let at = |delta: f64| {
                    let mut p = params.to_vec();
                    p[k][i] += delta;
                    loss(&p)
                };
                (at(H) - at(-H)) / (2.0 * H)
            })
            .collect();
        checked += idx.len();
        bad.extend(compare(spec.name, &idx, &grads[k], &numeric));
    }
    (bad, checked)
}

fn tiny_config(rounds: usize) -> Config {
    Config {
        conv1_channels: 2,
        primary_maps: 1,
        routing_rounds: rounds,
        // a larger W than the default 0.01 puts capsule lengths on both sides of the margins
        w_std: 0.3,
        decoder_hidden: [6, 5],
        ..Config::default()
    }
}

/// The whole loss, every parameter tensor, through the model's own forward.
fn check_model(rounds: usize, mask_with_labels: bool) {
    check_model_at(tiny_config(rounds), mask_with_labels)
}

fn check_model_at(cfg: Config, mask_with_labels: bool) {
    let rounds = cfg.routing_rounds;
    let mut rng = Lcg(81 + rounds as u64);
    let images = rng.vec(2 * cfg.image_pixels(), 0.0, 1.0);
    let labels = [3u32, 7];
    let loss_at = |params: &[Vec<f64>], backward: bool| {
        let mut t = Tape::new(Cpu::new());
        let model = CapsNet::new(cfg.clone(), &mut t, params).unwrap();
        let f = model.forward(&mut t, &images, &labels, mask_with_labels).unwrap();
        let value = t.value(f.loss).buf[0];
        let grads = if backward {
            t.backward(f.loss).unwrap();
            model.params.all().iter().map(|&p| t.grad(p).unwrap().clone()).collect()
        } else {
            vec![]
        };
        (value, grads)
    };
    let params = init_params(&cfg, 5);
    let (loss, grads) = loss_at(&params, true);
    assert!(loss.is_finite() && loss > 0.0);
    let (bad, checked) = param_gradients_match(&cfg, &params, &grads, &|p| loss_at(p, false).0, 100, 5);
    for (spec, g) in cfg.param_specs().iter().zip(&grads) {
        assert!(g.iter().any(|&g| g != 0.0), "{}: no gradient reached it", spec.name);
    }
    verdict(
        &format!(
            "whole loss, {0}x{0} images, {rounds} rounds, mask by {1}",
            cfg.image_side,
            if mask_with_labels { "label" } else { "prediction" }
        ),
        &bad,
        checked,
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn whole_loss_gradients_2_rounds() {
    check_model(2, true);
}

#[test]
fn whole_loss_gradients_3_rounds_masked_by_prediction() {
    check_model(3, false);
}

/// The image side comes from the config: 21x21 gives conv1 13x13 and a 3x3 capsule grid (nothing
/// divides evenly), and every gradient still matches.
#[test]
fn whole_loss_gradients_at_another_image_side() {
    let cfg = Config {
        image_side: 21,
        ..tiny_config(2)
    };
    assert_eq!((cfg.conv1_side(), cfg.primary_side(), cfg.primary_caps()), (13, 3, 9));
    check_model_at(cfg, true);
}

/// MultiMNIST's loss: two labels present in the margin loss, and two decoder passes, each masked by
/// one label's capsule and compared with its own target, through the model's own forward.
#[test]
fn whole_loss_gradients_with_two_digits_per_image() {
    let cfg = Config {
        image_side: 21,
        ..tiny_config(2)
    };
    let mut rng = Lcg(97);
    let px = cfg.image_pixels();
    let images = rng.vec(2 * px, 0.0, 1.0);
    let targets = rng.vec(2 * 2 * px, 0.0, 1.0);
    let labels = [3u32, 7, 0, 9];
    let loss_at = |params: &[Vec<f64>], backward: bool| {
        let mut t = Tape::new(Cpu::new());
        let model = CapsNet::new(cfg.clone(), &mut t, params).unwrap();
        let f = model.forward_multi(&mut t, &images, &labels, 2, &targets).unwrap();
        let value = t.value(f.loss).buf[0];
        let grads = if backward {
            t.backward(f.loss).unwrap();
            model.params.all().iter().map(|&p| t.grad(p).unwrap().clone()).collect()
        } else {
            vec![]
        };
        (value, grads)
    };
    let params = init_params(&cfg, 6);
    let (loss, grads): (f64, Vec<Vec<f64>>) = loss_at(&params, true);
    // the second pass counts: the loss is more than one label's
    let mut t = Tape::new(Cpu::new());
    let model = CapsNet::new(cfg.clone(), &mut t, &params).unwrap();
    let one = model
        .forward_multi(&mut t, &images, &[3, 0], 1, &targets[..2 * px])
        .unwrap();
    assert!(
        loss > t.value(one.loss).buf[0],
        "two digits' loss {loss} not above one's"
    );
    let (bad, checked) = param_gradients_match(&cfg, &params, &grads, &|p| loss_at(p, false).0, 200, 6);
    verdict("whole loss, two digits per image", &bad, checked).unwrap_or_else(|e| panic!("{e}"));
}
