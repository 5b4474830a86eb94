//! The CPU reference against PyTorch's own numbers, as llm.c's test_gpt2 checks its C against PyTorch:
//! tests/fixtures/torch_small.safetensors, written in float64 by benches/torch_fixture.py (which says
//! how to write it again), holds a small CapsNet's batch, parameters, lengths, loss terms, every
//! parameter's gradient, and the parameters after two Adam steps. The reference (f64 storage, f64
//! sums) must agree to about 1e-9; the fast CPU backend and the CUDA backend (on the emulated device
//! where there is no GPU), which compute in f32, within f32 tolerances. No PyTorch is needed here. A
//! perturbed fixture fails the same comparison.

mod common;

use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::fast::FastCpu;
use capsnet::config::Config;
use capsnet::float::Float;
use capsnet::model::CapsNet;
use capsnet::ops::Adam;
use capsnet::prelude::*;
use capsnet::tape::Tape;
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_small.safetensors");

/// What PyTorch computed, or what a backend computed for the same batch and parameters.
#[derive(Clone, Debug)]
struct Numbers {
    lengths: Vec<f64>,
    margin: f64,
    recon: f64,
    loss: f64,
    loss_step2: f64,
    grads: Vec<Vec<f64>>,
    after2: Vec<Vec<f64>>,
}

struct Fixture {
    cfg: Config,
    images: Vec<f64>,
    labels: Vec<u32>,
    params: Vec<Vec<f64>>,
    lr: f64,
    want: Numbers,
}

fn f64s(st: &SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{FIXTURE}: {name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
    t.data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn load() -> Fixture {
    let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("the fixture's metadata");
    let num = |k: &str| -> f64 { meta[k].parse().unwrap_or_else(|_| panic!("metadata {k}: {}", meta[k])) };
    let c: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let cfg = Config {
        image_side: u("image_side"),
        conv1_channels: u("conv1_channels"),
        primary_maps: u("primary_maps"),
        decoder_hidden: [
            c["decoder_hidden"][0].as_u64().unwrap() as usize,
            c["decoder_hidden"][1].as_u64().unwrap() as usize,
        ],
        routing_rounds: u("routing_rounds"),
        ..Config::default()
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<&str> = cfg.param_specs().iter().map(|s| s.name).collect();
    let per = |prefix: &str| -> Vec<Vec<f64>> { names.iter().map(|n| f64s(&st, &format!("{prefix}.{n}"))).collect() };
    Fixture {
        labels: serde_json::from_str(&meta["labels"]).unwrap(),
        images: f64s(&st, "images"),
        params: per("param"),
        lr: num("lr"),
        want: Numbers {
            lengths: f64s(&st, "lengths"),
            margin: num("margin"),
            recon: num("recon"),
            loss: num("loss"),
            loss_step2: num("loss_step2"),
            grads: per("grad"),
            after2: per("after2"),
        },
        cfg,
    }
}

/// Two training steps of `be` on the fixture's batch and parameters, as PyTorch took them.
fn run<B: Backend>(be: B, fx: &Fixture) -> Numbers {
    let images: Vec<B::E> = fx.images.iter().map(|&x| B::E::from_f64(x)).collect();
    let mut t = Tape::new(be);
    let model = CapsNet::new(fx.cfg.clone(), &mut t, &fx.params).unwrap();
    let mut adam = Adam::new(&t, fx.lr).unwrap();
    let down =
        |t: &Tape<B>, b: &B::Buf| -> Vec<f64> { t.backend().download(b).unwrap().iter().map(|x| x.to_f64()).collect() };
    let scalar = |t: &Tape<B>, v| down(t, &t.value(v).buf)[0];
    let f = model.forward(&mut t, &images, &fx.labels, true).unwrap();
    t.backward(f.loss).unwrap();
    let mut got = Numbers {
        lengths: down(&t, &t.value(f.lengths).buf),
        margin: scalar(&t, f.margin),
        recon: scalar(&t, f.recon_loss),
        loss: scalar(&t, f.loss),
        loss_step2: 0.0,
        grads: model
            .params
            .all()
            .iter()
            .map(|&p| down(&t, t.grad(p).unwrap()))
            .collect(),
        after2: vec![],
    };
    adam.update(&mut t).unwrap();
    t.reset();
    let f = model.forward(&mut t, &images, &fx.labels, true).unwrap();
    t.backward(f.loss).unwrap();
    got.loss_step2 = scalar(&t, f.loss);
    adam.update(&mut t).unwrap();
    got.after2 = model.params.all().iter().map(|&p| down(&t, &t.value(p).buf)).collect();
    got
}

/// Tolerances: values within `value` relative (and `lengths` absolute), each gradient within `grad` of
/// its tensor's largest entry, each parameter after two steps within `step` (absolute; an Adam step
/// moves a parameter by at most about lr).
struct Tol {
    value: f64,
    lengths: f64,
    grad: f64,
    step: f64,
}

/// Every number of `got` against `want`; the mismatches, named. (`!(a <= b)` is true for NaN too.)
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn mismatches(fx: &Fixture, got: &Numbers, want: &Numbers, tol: &Tol) -> Vec<String> {
    let mut bad = vec![];
    for (name, g, w) in [
        ("margin loss", got.margin, want.margin),
        ("reconstruction loss", got.recon, want.recon),
        ("loss", got.loss, want.loss),
        ("loss at the second step", got.loss_step2, want.loss_step2),
    ] {
        if !((g - w).abs() <= tol.value * w.abs()) {
            bad.push(format!("{name}: {g} against PyTorch's {w}"));
        }
    }
    let mut tensors = |what: &str, g: &[f64], w: &[f64], atol: f64| {
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        if g.len() != w.len() || !(worst <= atol) {
            bad.push(format!("{what}: worst difference {worst:e}, allowed {atol:e}"));
        }
    };
    tensors("lengths", &got.lengths, &want.lengths, tol.lengths);
    for (k, spec) in fx.cfg.param_specs().iter().enumerate() {
        let scale = want.grads[k].iter().fold(0.0f64, |m, x| m.max(x.abs()));
        tensors(
            &format!("gradient of {}", spec.name),
            &got.grads[k],
            &want.grads[k],
            tol.grad * scale,
        );
        tensors(
            &format!("{} after two Adam steps", spec.name),
            &got.after2[k],
            &want.after2[k],
            tol.step,
        );
    }
    bad
}

const REFERENCE: Tol = Tol {
    value: 1e-10,
    lengths: 1e-12,
    grad: 1e-9,
    step: 1e-10,
};
/// f32 storage and sums. After two Adam steps 1% of lr (1e-4): a step moves a parameter by
/// lr·m̂/(√v̂ + ε), and where a gradient is as small as ε (1e-8; the primary conv's largest is 1e-6
/// here) that ratio turns on the gradient's last digits, which f32 sums and f32 parameters move.
const F32: Tol = Tol {
    value: 2e-5,
    lengths: 2e-6,
    grad: 2e-4,
    step: 1e-4,
};

#[test]
fn the_cpu_reference_computes_what_pytorch_computes() {
    let fx = load();
    let got = run(CpuBackend::<f64>::new(), &fx);
    let bad = mismatches(&fx, &got, &fx.want, &REFERENCE);
    assert!(
        bad.is_empty(),
        "the CPU reference differs from PyTorch:\n{}",
        bad.join("\n")
    );
    let worst = |g: &[Vec<f64>], w: &[Vec<f64>]| {
        g.iter()
            .zip(w)
            .map(|(g, w)| {
                let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                g.iter().zip(w).map(|(a, b)| (a - b).abs() / scale).fold(0.0, f64::max)
            })
            .fold(0.0, f64::max)
    };
    eprintln!(
        "against PyTorch: loss {:.1e} relative, gradients {:.1e} of each tensor's largest, parameters after two steps {:.1e}",
        ((got.loss - fx.want.loss) / fx.want.loss).abs(),
        worst(&got.grads, &fx.want.grads),
        worst(&got.after2, &fx.want.after2)
    );
    // the fixture is not trivial: routing moved the couplings, Adam moved every tensor
    assert!((fx.want.loss - fx.want.loss_step2).abs() > 1e-4);
    for (k, p) in fx.params.iter().enumerate() {
        assert!(p != &fx.want.after2[k], "tensor {k} did not move");
    }
}

#[test]
fn the_fast_cpu_backend_computes_what_pytorch_computes_in_f32() {
    let fx = load();
    let got = run(FastCpu::new(), &fx);
    let bad = mismatches(&fx, &got, &fx.want, &F32);
    assert!(
        bad.is_empty(),
        "the fast CPU backend differs from PyTorch:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_cuda_backend_computes_what_pytorch_computes_in_fp32() {
    use capsnet::cuda::registry::{KernelSet, Precision};
    let fx = load();
    let Some(g) = common::cuda_backend() else { return };
    g.set_kernels(KernelSet::for_precision(Precision::Fp32));
    let got = run(g, &fx);
    let bad = mismatches(&fx, &got, &fx.want, &F32);
    assert!(
        bad.is_empty(),
        "the CUDA backend differs from PyTorch:\n{}",
        bad.join("\n")
    );
}

/// The comparison can fail: one gradient entry, one parameter after the steps, or the loss moved by a
/// little more than the reference's tolerance is reported, by name.
#[test]
fn a_perturbed_fixture_fails() {
    let fx = load();
    let got = run(CpuBackend::<f64>::new(), &fx);
    let specs = fx.cfg.param_specs();
    let primary = specs.iter().position(|s| s.name == "primary.weight").unwrap();
    let w = specs.iter().position(|s| s.name == "digit.W").unwrap();
    type Perturb = Box<dyn Fn(&mut Numbers)>;
    let cases: Vec<(&str, Perturb)> = vec![
        (
            "gradient of primary.weight",
            Box::new(move |n: &mut Numbers| {
                let scale = n.grads[primary].iter().fold(0.0f64, |m, x| m.max(x.abs()));
                n.grads[primary][7] += 1e-7 * scale;
            }),
        ),
        (
            "digit.W after two Adam steps",
            Box::new(move |n: &mut Numbers| n.after2[w][3] += 1e-8),
        ),
        ("margin loss", Box::new(|n: &mut Numbers| n.margin *= 1.0 + 1e-8)),
    ];
    for (name, perturb) in cases {
        let mut want = fx.want.clone();
        perturb(&mut want);
        let bad = mismatches(&fx, &got, &want, &REFERENCE);
        assert!(bad.len() == 1 && bad[0].starts_with(name), "perturbing {name}: {bad:?}");
    }
}
