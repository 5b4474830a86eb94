//! Finite-difference gradient checks, in f64, of every op of the CPU reference and of the whole
//! CapsNet loss on a tiny configuration.
//!
//! Each op's output is reduced to a scalar by a squared error against a fixed random target, so every
//! output element carries its own random weight: a wrong index or a missing term in a backward
//! changes the analytic gradient by O(1) and fails the check. Central differences with h = 1e-6
//! are accurate to ~1e-9 here, so the tolerance is |analytic − numeric| ≤ 1e-7 + 1e-5·|numeric|.

mod common;

use std::rc::Rc;

use capsnet::Result;
use capsnet::backend::Act;
use capsnet::backend::cpu::CpuBackend;
use capsnet::config::Config;
use capsnet::model::{CapsNet, init_params};
use capsnet::ops;
use capsnet::tape::{Tape, Var};
use common::Lcg;

type Cpu = CpuBackend<f64>;
type Build = dyn Fn(&mut Tape<Cpu>, &[Var]) -> Result<Var>;

const H: f64 = 1e-6;
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-5;
/// At most this many elements of each input are checked (spread over the whole tensor).
const SAMPLES: usize = 150;

#[derive(Clone)]
struct Input {
    shape: Vec<usize>,
    values: Vec<f64>,
    grad: bool,
}

fn input(shape: &[usize], values: Vec<f64>) -> Input {
    assert_eq!(values.len(), shape.iter().product::<usize>());
    Input {
        shape: shape.to_vec(),
        values,
        grad: true,
    }
}

fn random(rng: &mut Lcg, shape: &[usize], lo: f64, hi: f64) -> Input {
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
    let loss = ops::sq_err(&mut t, out, target, 1.0).unwrap();
    let value = t.value(loss).buf[0];
    if !backward {
        return (value, vec![]);
    }
    t.backward(loss).unwrap();
    (value, vars.iter().map(|&v| t.grad(v).cloned()).collect())
}

fn sample_indices(n: usize, seed: u64) -> Vec<usize> {
    if n <= SAMPLES {
        return (0..n).collect();
    }
    let mut rng = Lcg(seed);
    let mut idx: Vec<usize> = (0..SAMPLES - 2).map(|_| (rng.next_f64() * n as f64) as usize).collect();
    idx.extend([0, n - 1]);
    idx
}

/// Mismatches between analytic and numeric gradients: (what, index, analytic, numeric).
type Mismatch = (String, usize, f64, f64);

fn compare(what: &str, idx: &[usize], analytic: &[f64], numeric: &[f64]) -> Vec<Mismatch> {
    idx.iter()
        .zip(numeric)
        .filter(|&(&i, &n)| {
            let a = analytic[i];
            !a.is_finite() || (a - n).abs() > ATOL + RTOL * n.abs()
        })
        .map(|(&i, &n)| (what.to_string(), i, analytic[i], n))
        .collect()
}

fn report(name: &str, bad: &[Mismatch], checked: usize) {
    if bad.is_empty() {
        return;
    }
    let worst = bad.iter().map(|m| (m.2 - m.3).abs()).fold(0.0, f64::max);
    let first: Vec<String> = bad
        .iter()
        .take(8)
        .map(|(w, i, a, n)| format!("{w}[{i}]: analytic {a:.10e}, numeric {n:.10e}"))
        .collect();
    panic!(
        "{name}: {} of {checked} gradient entries differ (max |diff| {worst:.3e}, tolerance {ATOL:e} + {RTOL:e}·|numeric|); first:\n  {}",
        bad.len(),
        first.join("\n  ")
    );
}

/// Checks d(loss)/d(input) of every input that needs a gradient, by central differences.
fn check(name: &str, inputs: Vec<Input>, build: &Build) {
    let (_, grads) = evaluate(&inputs, build, true);
    let mut bad = vec![];
    let mut checked = 0;
    for (k, inp) in inputs.iter().enumerate() {
        if !inp.grad {
            assert!(grads[k].is_none(), "{name}: input {k} needs no gradient but got one");
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
    report(name, &bad, checked);
}

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
            ops::conv2d(t, v[0], v[1], v[2], stride, act)
        });
    }
}

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
            ops::dense(t, v[0], v[1], v[2], act)
        });
    }
}

#[test]
fn squash_gradients_including_a_zero_vector() {
    let mut rng = Lcg(11);
    let mut s = rng.vec(5 * 8, -1.5, 1.5);
    s[16..24].fill(0.0); // capsule 2 is the zero vector
    s[24..32].iter_mut().for_each(|x| *x *= 1e-3); // capsule 3 is tiny
    check("squash", vec![input(&[5, 8], s)], &|t, v| ops::squash(t, v[0]));
}

#[test]
fn squash_and_lengths_of_a_zero_vector_are_finite() {
    let mut t = Tape::new(Cpu::new());
    let s = t.leaf(vec![0.0; 8], &[1, 8]).unwrap();
    let v = ops::squash(&mut t, s).unwrap();
    assert!(t.value(v).buf.iter().all(|&x| x == 0.0), "squash(0) = 0");
    let l = ops::lengths(&mut t, v).unwrap();
    let len = t.value(l).buf[0];
    assert!(
        (len - 1e-7f64.sqrt()).abs() < 1e-15,
        "safe length of 0 is √ε, got {len}"
    );
    t.reshape(l, &[1, 1]).unwrap();
    let target = t.input(vec![1.0], &[1, 1]).unwrap();
    let loss = ops::sq_err(&mut t, l, target, 1.0).unwrap();
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
    check("predict", inputs, &|t, v| ops::predict(t, v[0], v[1]));
}

#[test]
fn routing_gradients_for_1_2_3_rounds() {
    for rounds in [1, 2, 3, 4] {
        let mut rng = Lcg(20 + rounds as u64);
        // [B=2, I=7, J=4, D=5]; magnitudes large enough for the agreement to move the couplings
        let inputs = vec![random(&mut rng, &[2, 7, 4, 5], -1.0, 1.0)];
        check(&format!("routing, {rounds} rounds"), inputs, &move |t, v| {
            ops::routing(t, v[0], rounds)
        });
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
            ops::predict_routing(t, v[0], v[1], rounds)
        });
    }
}

#[test]
fn lengths_gradients() {
    let mut rng = Lcg(31);
    check("lengths", vec![random(&mut rng, &[3, 4, 6], -1.0, 1.0)], &|t, v| {
        ops::lengths(t, v[0])
    });
}

#[test]
fn mask_gradients() {
    let mut rng = Lcg(41);
    let inputs = vec![random(&mut rng, &[3, 4, 5], -1.0, 1.0)];
    check("mask", inputs, &|t, v| ops::mask(t, v[0], Rc::new(vec![2, 0, 3])));
}

#[test]
fn margin_loss_gradients() {
    let mut rng = Lcg(51);
    // lengths spread over both sides of m− = 0.1 and m+ = 0.9
    let inputs = vec![random(&mut rng, &[4, 5], 0.0, 1.2)];
    check("margin_loss", inputs.clone(), &|t, v| {
        ops::margin_loss(t, v[0], Rc::new(vec![1, 4, 0, 4]), 1)
    });
    // two labels per image, both present (MultiMNIST)
    check("margin_loss, two labels", inputs, &|t, v| {
        ops::margin_loss(t, v[0], Rc::new(vec![1, 3, 4, 0, 0, 2, 4, 1]), 2)
    });
}

#[test]
fn sq_err_gradients_for_both_arguments() {
    let mut rng = Lcg(61);
    let inputs = vec![random(&mut rng, &[3, 6], 0.0, 1.0), random(&mut rng, &[3, 6], 0.0, 1.0)];
    check("sq_err", inputs, &|t, v| ops::sq_err(t, v[0], v[1], 0.37));
}

#[test]
fn add_gradients_with_fan_out() {
    let mut rng = Lcg(71);
    let inputs = vec![
        random(&mut rng, &[2, 3], -1.0, 1.0),
        random(&mut rng, &[2, 3], -1.0, 1.0),
    ];
    check("add(a, b)", inputs.clone(), &|t, v| ops::add(t, v[0], v[1]));
    check("add(a, a)", inputs, &|t, v| ops::add(t, v[0], v[0]));
}

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
    report(
        &format!(
            "whole loss, {0}x{0} images, {rounds} rounds, mask by {1}",
            cfg.image_side,
            if mask_with_labels { "label" } else { "prediction" }
        ),
        &bad,
        checked,
    );
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

/// Every label of an image is a present class: lengths (0.95, 0.5, 0.05) with the labels {0, 1} give
/// (0.9 − 0.5)² = 0.16, with {0} alone 0.5 · (0.5 − 0.1)² = 0.08.
#[test]
fn margin_loss_counts_every_label_as_present() {
    for (labels, per, want) in [(vec![0u32, 1], 2, 0.16), (vec![0], 1, 0.08), (vec![1, 0], 2, 0.16)] {
        let mut t = Tape::new(Cpu::new());
        let l = t.leaf(vec![0.95, 0.5, 0.05], &[1, 3]).unwrap();
        let loss = ops::margin_loss(&mut t, l, Rc::new(labels.clone()), per).unwrap();
        let got = t.value(loss).buf[0];
        assert!((got - want).abs() < 1e-12, "labels {labels:?}: {got}, want {want}");
    }
    let mut t = Tape::new(Cpu::new());
    let l = t.leaf(vec![0.5; 6], &[2, 3]).unwrap();
    let e = ops::margin_loss(&mut t, l, Rc::new(vec![0, 1, 2]), 2).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
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
    report("whole loss, two digits per image", &bad, checked);
}
