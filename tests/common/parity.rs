//! The parity suite: every op of a backend against the CPU reference (CpuBackend<f64> on the same f32
//! inputs), on seeded random inputs at shapes that do not divide any block or tile size, with written
//! outputs poisoned (NaN) before each run and accumulated outputs starting from random values (so
//! `+=` is checked too); then whole training steps. tests/cuda.rs runs it on the GPU (or the emulated
//! device), tests/cpu_fast.rs on the fast CPU backend. Tolerance: |got − reference| ≤ atol +
//! rtol·|reference|, stated per check.

use capsnet::backend::cpu::CpuBackend;
use capsnet::config::Config;
use capsnet::float::Float;
use capsnet::model::{CapsNet, init_params};
use capsnet::ops::Adam;
use capsnet::ops::{Act, AdamGroup, AdamHyper, CapsShape, ConvShape, DenseShape};
use capsnet::prelude::*;
use capsnet::tape::Tape;

use super::{Lcg, small_config};

pub type Cpu = CpuBackend<f64>;

/// f32-representable random values, so both backends see exactly the same inputs.
pub fn rand(rng: &mut Lcg, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    rng.vec(n, lo, hi).into_iter().map(|x| x as f32).collect()
}

pub fn up<B: Backend>(be: &B, h: &[f32]) -> B::Buf {
    be.upload(&h.iter().map(|&x| B::E::from_f64(x as f64)).collect::<Vec<_>>())
        .unwrap()
}

pub fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f64> {
    be.download(b).unwrap().iter().map(|x| x.to_f64()).collect()
}

pub fn poisoned<B: Backend>(be: &B, n: usize) -> B::Buf {
    let mut b = be.zeros(n).unwrap();
    be.fill(&mut b, f64::NAN).unwrap();
    b
}

/// |got − want| ≤ atol + rtol·|want|; false for NaN.
pub fn within(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    use std::cmp::Ordering::{Equal, Less};
    matches!(
        (got - want).abs().partial_cmp(&(atol + rtol * want.abs())),
        Some(Less | Equal)
    )
}

pub fn compare(name: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| !within(got[i], want[i], atol, rtol))
        .collect();
    if !bad.is_empty() {
        // NaN (a value never written, or poisoned input read) shows as the worst difference
        let worst = bad.iter().map(|&i| (got[i] - want[i]).abs()).fold(0.0, |a: f64, d| {
            if d.is_nan() || a.is_nan() { f64::NAN } else { a.max(d) }
        });
        let first: Vec<String> = bad
            .iter()
            .take(6)
            .map(|&i| format!("[{i}] got {} reference {}", got[i], want[i]))
            .collect();
        panic!(
            "{name}: {} of {} differ (max |diff| {worst:e}; tolerance {atol:e} + {rtol:e}·|reference|); first: {}",
            bad.len(),
            got.len(),
            first.join(", ")
        );
    }
}

/// Runs `$body` with `$be` bound to the CPU reference, then to the backend under test; yields
/// (reference, got).
macro_rules! both {
    ($got:expr, |$be:ident| $body:expr) => {{ both!(Cpu::new(), $got, |$be| $body) }};
    ($reference:expr, $got:expr, |$be:ident| $body:expr) => {{
        let cpu_backend = $reference;
        let want = {
            let $be = &cpu_backend;
            $body
        };
        let got = {
            let $be = $got;
            $body
        };
        (want, got)
    }};
}

/// Odd convolutions (M, N, K multiples of no tile), then the model's own two.
pub fn conv_shapes() -> Vec<ConvShape> {
    vec![
        ConvShape {
            batch: 3,
            in_h: 13,
            in_w: 11,
            in_c: 5,
            out_c: 7,
            k: 3,
            stride: 1,
        },
        ConvShape {
            batch: 2,
            in_h: 15,
            in_w: 12,
            in_c: 3,
            out_c: 70,
            k: 4,
            stride: 2,
        },
        // channels in whole 32-value runs (read straight from the images by the AMX path), odd rest
        ConvShape {
            batch: 2,
            in_h: 9,
            in_w: 8,
            in_c: 64,
            out_c: 40,
            k: 3,
            stride: 2,
        },
        // 32 channels (one class: the bf16 input gradient's threads split by image), 49 patch rows
        // an image (blocks of 32 rows straddle images), big enough for the GEMMs to use threads
        ConvShape {
            batch: 4,
            in_h: 11,
            in_w: 11,
            in_c: 32,
            out_c: 48,
            k: 5,
            stride: 1,
        },
        Config::default().conv1_shape(3),
        Config::default().primary_shape(2),
    ]
}

/// Dense layers at the decoder's shapes with few rows, and an odd small one.
pub fn dense_shapes() -> Vec<DenseShape> {
    vec![
        DenseShape {
            rows: 5,
            inp: 160,
            out: 512,
        },
        DenseShape {
            rows: 67,
            inp: 1024,
            out: 784,
        },
        DenseShape {
            rows: 3,
            inp: 7,
            out: 65,
        },
    ]
}

pub fn conv2d<B: Backend>(g: &B) {
    conv2d_against_rounded_reference(g, capsnet::float::Precision::Fp32)
}

/// [`conv2d`] against the reference that rounds every GEMM input to `p` (CpuBackend::with_gemm_inputs),
/// as a backend multiplying in `p` does: what is left is the order of f32 sums, so the fp32 tolerances
/// hold.
pub fn conv2d_against_rounded_reference<B: Backend>(g: &B, p: capsnet::float::Precision) {
    let shapes = conv_shapes();
    for (n, s) in shapes.iter().enumerate() {
        let mut rng = Lcg(100 + n as u64);
        let (x, w, b) = (
            rand(&mut rng, s.x_len(), 0.0, 1.0),
            rand(&mut rng, s.w_len(), -0.1, 0.1),
            rand(&mut rng, s.out_c, -0.1, 0.1),
        );
        let (dz, dx0, dw0, db0) = (
            rand(&mut rng, s.y_len(), -1.0, 1.0),
            rand(&mut rng, s.x_len(), -1.0, 1.0),
            rand(&mut rng, s.w_len(), -1.0, 1.0),
            rand(&mut rng, s.out_c, -1.0, 1.0),
        );
        // K up to 20,736 products in f32: 1e-4 absolute + 1e-4 relative
        let (atol, rtol) = (1e-4 * (s.patch_len() as f64).sqrt(), 1e-4);
        for act in [Act::None, Act::Relu, Act::Sigmoid] {
            let (want, got) = both!(Cpu::with_gemm_inputs(p), g, |be| {
                let mut y = poisoned(be, s.y_len());
                be.conv2d_fwd(s, &up(be, &x), &up(be, &w), &up(be, &b), &mut y, act)
                    .unwrap();
                down(be, &y)
            });
            compare(&format!("conv2d_fwd {s:?} {act:?}"), &got, &want, atol, rtol);
        }
        let (want, got) = both!(Cpu::with_gemm_inputs(p), g, |be| {
            let mut dx = up(be, &dx0);
            be.conv2d_bwd_input(s, &up(be, &dz), &up(be, &w), &mut dx).unwrap();
            down(be, &dx)
        });
        compare(&format!("conv2d_bwd_input {s:?}"), &got, &want, atol, rtol);
        let (want, got) = both!(Cpu::with_gemm_inputs(p), g, |be| {
            let mut dw = up(be, &dw0);
            be.conv2d_bwd_weight(s, &up(be, &x), &up(be, &dz), &mut dw).unwrap();
            down(be, &dw)
        });
        compare(
            &format!("conv2d_bwd_weight {s:?}"),
            &got,
            &want,
            1e-4 * (s.rows() as f64).sqrt(),
            rtol,
        );
        let (want, got) = both!(Cpu::with_gemm_inputs(p), g, |be| {
            let mut db = up(be, &db0);
            be.bias_bwd(s.rows(), s.out_c, &up(be, &dz), &mut db).unwrap();
            down(be, &db)
        });
        compare(
            &format!("bias_bwd {s:?}"),
            &got,
            &want,
            1e-4 * (s.rows() as f64).sqrt(),
            1e-5,
        );
    }
}

pub fn dense_and_elementwise<B: Backend>(g: &B) {
    dense_and_elementwise_against_rounded_reference(g, capsnet::float::Precision::Fp32)
}

/// [`dense_and_elementwise`] against the reference that rounds every GEMM input to `p`.
pub fn dense_and_elementwise_against_rounded_reference<B: Backend>(g: &B, prec: capsnet::float::Precision) {
    let mut rng = Lcg(7);
    for s in dense_shapes() {
        let (x, w, b) = (
            rand(&mut rng, s.rows * s.inp, -1.0, 1.0),
            rand(&mut rng, s.inp * s.out, -0.1, 0.1),
            rand(&mut rng, s.out, -0.1, 0.1),
        );
        let (dz, dx0, dw0) = (
            rand(&mut rng, s.rows * s.out, -1.0, 1.0),
            rand(&mut rng, s.rows * s.inp, -1.0, 1.0),
            rand(&mut rng, s.inp * s.out, -1.0, 1.0),
        );
        // activation outputs for act_bwd: zeros (ReLU's off side) and values in (0, 1)
        let y_act: Vec<f32> = rand(&mut rng, s.rows * s.out, -0.5, 1.0)
            .iter()
            .map(|&v| v.max(0.0))
            .collect();
        for act in [Act::None, Act::Relu, Act::Sigmoid] {
            let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
                let mut y = poisoned(be, s.rows * s.out);
                be.dense_fwd(&s, &up(be, &x), &up(be, &w), &up(be, &b), &mut y, act)
                    .unwrap();
                down(be, &y)
            });
            compare(&format!("dense_fwd {s:?} {act:?}"), &got, &want, 1e-5, 1e-4);
            let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
                let mut dzb = poisoned(be, s.rows * s.out);
                be.act_bwd(act, &up(be, &y_act), &up(be, &dz), &mut dzb).unwrap();
                down(be, &dzb)
            });
            compare(&format!("act_bwd {act:?}"), &got, &want, 1e-6, 1e-5);
        }
        let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
            let mut dx = up(be, &dx0);
            be.dense_bwd_input(&s, &up(be, &dz), &up(be, &w), &mut dx).unwrap();
            down(be, &dx)
        });
        compare(&format!("dense_bwd_input {s:?}"), &got, &want, 1e-5, 1e-4);
        let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
            let mut dw = up(be, &dw0);
            be.dense_bwd_weight(&s, &up(be, &x), &up(be, &dz), &mut dw).unwrap();
            down(be, &dw)
        });
        compare(&format!("dense_bwd_weight {s:?}"), &got, &want, 1e-5, 1e-4);
    }
    let n = 1001;
    let (a, b) = (rand(&mut rng, n, -1.0, 1.0), rand(&mut rng, n, -1.0, 1.0));
    let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
        let mut out = poisoned(be, n);
        be.add_fwd(&up(be, &a), &up(be, &b), &mut out).unwrap();
        let mut acc = up(be, &a);
        be.add_assign(&mut acc, &up(be, &b)).unwrap();
        let mut f = poisoned(be, n);
        be.fill(&mut f, 0.25).unwrap();
        [down(be, &out), down(be, &acc), down(be, &f)].concat()
    });
    compare("add_fwd, add_assign, fill", &got, &want, 1e-6, 1e-6);
    let (rows, cols) = (37, 784);
    let (p, t, d0) = (
        rand(&mut rng, rows * cols, 0.0, 1.0),
        rand(&mut rng, rows * cols, 0.0, 1.0),
        rand(&mut rng, rows * cols, -1.0, 1.0),
    );
    let (want, got) = both!(Cpu::with_gemm_inputs(prec), g, |be| {
        let mut loss = poisoned(be, 1);
        be.sq_err_fwd(rows, cols, &up(be, &p), &up(be, &t), 0.0005, &mut loss)
            .unwrap();
        let mut dp = up(be, &d0);
        be.sq_err_bwd(rows, cols, &up(be, &p), &up(be, &t), 0.0005, &up(be, &[1.5]), &mut dp)
            .unwrap();
        [down(be, &loss), down(be, &dp)].concat()
    });
    compare("sq_err fwd and bwd", &got, &want, 1e-6, 1e-5);
}

pub fn adam<B: Backend>(g: &B) {
    let mut rng = Lcg(9);
    let sizes = [1, 257, 70_001];
    let init: Vec<[Vec<f32>; 4]> = sizes
        .iter()
        .map(|&n| {
            [
                rand(&mut rng, n, -1.0, 1.0),
                rand(&mut rng, n, -0.1, 0.1),
                rand(&mut rng, n, -0.01, 0.01),
                rand(&mut rng, n, 0.0, 1e-4),
            ]
        })
        .collect();
    let (want, got) = both!(g, |be| {
        let mut bufs: Vec<_> = init
            .iter()
            .map(|t| [up(be, &t[0]), up(be, &t[1]), up(be, &t[2]), up(be, &t[3])])
            .collect();
        // steps 1 and 4 unguarded; step 2 guarded by a finite loss (an update); steps 3 and 5 guarded by
        // a non-finite one (no change at all)
        let guards = [None, Some(0.5), Some(f64::NAN), None, Some(f64::INFINITY)];
        macro_rules! state {
            ($bufs:expr) => {
                $bufs
                    .iter()
                    .flat_map(|[p, _, m, v]| [down(be, p), down(be, m), down(be, v)].concat())
                    .collect::<Vec<f64>>()
            };
        }
        for (step, guard) in (1..).zip(guards) {
            let before = state!(bufs);
            let hp = hyper(1e-3, step);
            let mut groups: Vec<AdamGroup<'_, _>> = bufs
                .iter_mut()
                .map(|[p, gr, m, v]| AdamGroup {
                    param: p,
                    grad: &*gr,
                    m,
                    v,
                })
                .collect();
            match guard {
                None => be.adam_step(&hp, &mut groups).unwrap(),
                Some(x) => {
                    let guard = up(be, &[x as f32, 1.0]);
                    be.adam_step_if_finite(&hp, &mut groups, &guard).unwrap()
                }
            }
            drop(groups);
            let after = state!(bufs);
            let unchanged = before.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits());
            assert_eq!(
                unchanged,
                guard.is_some_and(|x: f64| !x.is_finite()),
                "step {step} guarded by {guard:?}: changed {}",
                !unchanged
            );
        }
        state!(bufs)
    });
    compare(
        "adam_step, 3 updates and 2 skipped over 3 tensors",
        &got,
        &want,
        1e-6,
        1e-4,
    );
}

/// A training step's one-read report (losses, then images right and labels found among the longest
/// capsules) against the CPU reference and against counts worked by hand: ties go to the lower class.
pub fn step_summary<B: StepRuntime>(g: &B) {
    // 3 images x 4 classes; the third ties classes 0 and 1
    let lengths = [0.1, 0.9, 0.2, 0.8, 0.7, 0.1, 0.1, 0.6, 0.5, 0.5, 0.9, 0.1];
    let cases: [(usize, Vec<u32>, [f64; 2]); 4] = [
        // one label: the longest capsule (1, 0, 2) against labels 1, 0, 2: all right
        (1, vec![1, 0, 2], [3.0, 3.0]),
        // none of 3, 3, 1 is its image's longest
        (1, vec![3, 3, 1], [0.0, 0.0]),
        // two labels: the two longest are {1, 3}, {0, 3} and {2, 0} (0.5 twice: 0 ranks before 1, so
        // image 3's label 1 is not found)
        (2, vec![3, 1, 0, 2, 2, 1], [1.0, 4.0]),
        (2, vec![1, 3, 3, 0, 0, 2], [3.0, 6.0]),
    ];
    for (per, labels, counts) in cases {
        let (want, got) = both!(g, |be| {
            let losses = [up(be, &[0.25]), up(be, &[f32::NAN]), up(be, &[0.125])];
            let lens = up(be, &lengths);
            let idx = be.upload_idx(&labels).unwrap();
            let mut out = be.alloc_out(5).unwrap();
            be.step_summary(3, 4, per, [&losses[0], &losses[1], &losses[2]], &lens, &idx, &mut out)
                .unwrap();
            down(be, &out)
        });
        assert_eq!(want.len(), 5);
        assert_eq!(&want[3..], &counts, "reference, per {per}, labels {labels:?}");
        assert_eq!(&got[3..], &counts, "per {per}, labels {labels:?}");
        assert_eq!((got[0], got[2]), (0.25, 0.125));
        assert!(got[1].is_nan(), "the margin loss is passed through as it is");
    }
}

/// Batches gathered from a data set resident on the backend equal, bit for bit, the batches the host
/// loader builds from the same images in the same shuffle (37 images: the last batch is short).
pub fn resident_batches<B: StepRuntime>(be: &B) {
    let (n, pixels) = (37, capsnet::data::MNIST_PIXELS);
    let mut rng = Lcg(77);
    let mut images: Vec<u8> = (0..n * pixels).map(|_| (rng.next_f64() * 256.0) as u8).collect();
    images[..4].copy_from_slice(&[0, 255, 1, 254]);
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let split = capsnet::data::Split {
        images: images.clone(),
        labels: labels.clone(),
    };
    let order = capsnet::train::epoch_order(n, 5, 2);
    let (dev_images, dev_labels) = (
        be.upload_bytes(&images).unwrap(),
        be.upload_idx(&labels.iter().map(|&l| l as u32).collect::<Vec<_>>())
            .unwrap(),
    );
    let dev_order = be
        .upload_idx(&order.iter().map(|&i| i as u32).collect::<Vec<_>>())
        .unwrap();
    // shifts of up to 3 pixels (the extremes included), as training draws them per image and epoch
    let shifts: Vec<(i32, i32)> = (0..n)
        .map(|i| match i {
            0 => (3, -3),
            1 => (-3, 3),
            2 => (0, 0),
            _ => capsnet::data::shift_of(9, 4, i, 3),
        })
        .collect();
    let dev_shifts = be
        .upload_idx(
            &shifts
                .iter()
                .map(|&s| capsnet::runtime::pack_shift(s))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    for shifted in [false, true] {
        let set = capsnet::runtime::ResidentSet {
            pixels,
            images: &dev_images,
            labels: &dev_labels,
            order: &dev_order,
            shifts: shifted.then_some(&dev_shifts),
        };
        let mut batches = 0;
        for (k, chunk) in order.chunks(8).enumerate() {
            let (mut x, mut y) = (
                be.alloc_out(chunk.len() * pixels).unwrap(),
                be.alloc_idx(chunk.len()).unwrap(),
            );
            be.gather_batch(&set, 8 * k, chunk.len(), &mut x, &mut y).unwrap();
            let (mut want_x, want_y) = split.batch::<B::E>(chunk);
            if shifted {
                let s: Vec<(i32, i32)> = chunk.iter().map(|&i| shifts[i]).collect();
                capsnet::data::shift_images(&mut want_x, 28, &s);
            }
            let got_x = be.download(&x).unwrap();
            assert_eq!(got_x.len(), want_x.len(), "batch {k}: pixels");
            let same = got_x
                .iter()
                .zip(&want_x)
                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
            assert!(
                same,
                "batch {k} (shifted: {shifted}): pixels differ from the host loader's"
            );
            assert_eq!(be.download_idx(&y).unwrap(), want_y, "batch {k}: labels");
            batches += 1;
        }
        assert_eq!(batches, 5);
    }
}

/// The tests' Adam hyper-parameters for update `step` at learning rate `lr`: β1 0.9, β2 0.999, ε 1e-8.
pub fn hyper(lr: f64, step: u64) -> AdamHyper {
    AdamHyper {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step,
    }
}

/// A step plan on the backend: each batch gathered at the position of the plan's current row as the
/// cursor advances equals `gather_batch` at that position, bit for bit; the cursor counts the steps;
/// rewriting the plan in place starts it over; Adam from the plan's row equals Adam from the
/// hyper-parameters the row was made from, bit for bit, guarded as ever.
pub fn planned_steps<B: StepRuntime>(be: &B) {
    use capsnet::runtime::{StepRow, plan_words};
    let (n, pixels) = (37, 5);
    let bytes: Vec<u8> = (0..n * pixels).map(|i| (i * 53 % 256) as u8).collect();
    let (images, labels) = (
        be.upload_bytes(&bytes).unwrap(),
        be.upload_idx(&(0..n as u32).map(|i| i % 10).collect::<Vec<_>>())
            .unwrap(),
    );
    let order: Vec<u32> = capsnet::train::epoch_order(n, 3, 1).iter().map(|&i| i as u32).collect();
    let dev_order = be.upload_idx(&order).unwrap();
    let set = capsnet::runtime::ResidentSet {
        pixels,
        images: &images,
        labels: &labels,
        order: &dev_order,
        shifts: None,
    };
    let rows: Vec<StepRow> = (0..5)
        .map(|k| StepRow {
            start: 8 * k,
            adam: hyper(1e-3 * 0.9f64.powi(k as i32), k as u64 + 1),
        })
        .collect();
    let words = plan_words(0, &rows).unwrap();
    assert_eq!(words.len(), 1 + 4 * 5);
    assert_eq!((words[0], words[1], words[5]), (0, 0, 8));
    let mut plan = be.upload_idx(&words).unwrap();
    for (k, row) in rows.iter().enumerate() {
        let len = 8.min(n - row.start);
        let (mut x, mut y) = (be.alloc_out(len * pixels).unwrap(), be.alloc_idx(len).unwrap());
        be.gather_planned(&set, &plan, len, &mut x, &mut y).unwrap();
        let (mut wx, mut wy) = (be.alloc_out(len * pixels).unwrap(), be.alloc_idx(len).unwrap());
        be.gather_batch(&set, row.start, len, &mut wx, &mut wy).unwrap();
        let (got, want) = (be.download(&x).unwrap(), be.download(&wx).unwrap());
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
        assert!(same && got.len() == want.len(), "planned batch {k}: pixels differ");
        assert_eq!(
            be.download_idx(&y).unwrap(),
            be.download_idx(&wy).unwrap(),
            "planned batch {k}: labels"
        );
        be.advance_plan(&mut plan).unwrap();
        assert_eq!(
            be.download_idx(&plan).unwrap()[0],
            k as u32 + 1,
            "the cursor after step {k}"
        );
    }
    be.write_idx(&mut plan, &words).unwrap();
    assert_eq!(be.download_idx(&plan).unwrap(), words, "the plan rewritten in place");
    assert!(
        be.write_idx(&mut plan, &words[1..]).is_err(),
        "a plan of another length written in place"
    );

    // Adam: the same tensors updated from the plan's rows and from their hyper-parameters
    let mut rng = Lcg(31);
    let init: Vec<Vec<f32>> = [1, 257, 70_001]
        .iter()
        .flat_map(|&n| {
            [
                rand(&mut rng, n, -1.0, 1.0),
                rand(&mut rng, n, -0.1, 0.1),
                rand(&mut rng, n, -0.01, 0.01),
                rand(&mut rng, n, 0.0, 1e-4),
            ]
        })
        .collect();
    let mut sets: Vec<Vec<B::Buf>> = (0..2).map(|_| init.iter().map(|t| up(be, t)).collect()).collect();
    for (k, row) in rows.iter().take(3).enumerate() {
        // the second update's loss is not finite: neither changes anything
        let guard = up(be, &[if k == 1 { f32::NAN } else { 0.5 }]);
        for (planned, set) in sets.iter_mut().enumerate() {
            let mut groups: Vec<AdamGroup<'_, B>> = set
                .chunks_mut(4)
                .map(|t| {
                    let [p, g, m, v] = t else { unreachable!() };
                    AdamGroup {
                        param: p,
                        grad: &*g,
                        m,
                        v,
                    }
                })
                .collect();
            if planned == 1 {
                be.adam_step_planned(&row.adam, &mut groups, &guard, &plan).unwrap();
            } else {
                be.adam_step_if_finite(&row.adam, &mut groups, &guard).unwrap();
            }
        }
        be.advance_plan(&mut plan).unwrap();
    }
    let state = |set: &[B::Buf]| set.iter().flat_map(|b| down(be, b)).collect::<Vec<f64>>();
    let (from_hp, from_plan) = (state(&sets[0]), state(&sets[1]));
    assert!(
        from_hp.iter().zip(&from_plan).all(|(a, b)| a.to_bits() == b.to_bits()),
        "Adam from the plan differs from Adam from its hyper-parameters"
    );
    assert_ne!(
        from_hp,
        init.iter().flatten().map(|&x| x as f64).collect::<Vec<_>>(),
        "no update"
    );
}

pub fn capsule_ops<B: Backend>(g: &B) {
    let mut rng = Lcg(11);
    // squash and lengths, with a zero row; 33 blocks of 64 rows and one more (over threads)
    let (rows, dim) = (2113, 8);
    let mut s = rand(&mut rng, rows * dim, -1.0, 1.0);
    s[8..16].fill(0.0);
    let (dv, ds0) = (
        rand(&mut rng, rows * dim, -1.0, 1.0),
        rand(&mut rng, rows * dim, -1.0, 1.0),
    );
    let (want, got) = both!(g, |be| {
        let mut v = poisoned(be, rows * dim);
        be.squash_fwd(rows, dim, &up(be, &s), &mut v).unwrap();
        let mut ds = up(be, &ds0);
        be.squash_bwd(rows, dim, &up(be, &s), &up(be, &dv), &mut ds).unwrap();
        let mut l = poisoned(be, rows);
        be.lengths_fwd(rows, dim, &up(be, &s), &mut l).unwrap();
        let mut dvl = up(be, &ds0);
        be.lengths_bwd(rows, dim, &up(be, &s), &l, &up(be, &dv[..rows]), &mut dvl)
            .unwrap();
        [down(be, &v), down(be, &ds), down(be, &l), down(be, &dvl)].concat()
    });
    compare("squash and lengths fwd/bwd", &got, &want, 1e-5, 1e-4);

    // prediction vectors at the model's size and an odd one
    for cs in [
        Config::default().caps_shape(3),
        CapsShape {
            batch: 5,
            in_caps: 37,
            in_dim: 3,
            out_caps: 7,
            out_dim: 5,
        },
    ] {
        let (u, w, duh) = (
            rand(&mut rng, cs.u_len(), -1.0, 1.0),
            rand(&mut rng, cs.w_len(), -0.5, 0.5),
            rand(&mut rng, cs.uhat_len(), -1.0, 1.0),
        );
        let (du0, dw0) = (
            rand(&mut rng, cs.u_len(), -1.0, 1.0),
            rand(&mut rng, cs.w_len(), -1.0, 1.0),
        );
        let (want, got) = both!(g, |be| {
            let mut uhat = poisoned(be, cs.uhat_len());
            be.predict_fwd(&cs, &up(be, &u), &up(be, &w), &mut uhat).unwrap();
            let mut du = up(be, &du0);
            be.predict_bwd_input(&cs, &up(be, &duh), &up(be, &w), &mut du).unwrap();
            let mut dw = up(be, &dw0);
            be.predict_bwd_weight(&cs, &up(be, &u), &up(be, &duh), &mut dw).unwrap();
            [down(be, &uhat), down(be, &du), down(be, &dw)].concat()
        });
        compare(&format!("predict fwd/bwd {cs:?}"), &got, &want, 1e-5, 1e-4);
    }

    // mask, argmax, margin loss
    let (batch, caps, d) = (13, 10, 16);
    let v = rand(&mut rng, batch * caps * d, -1.0, 1.0);
    let l = rand(&mut rng, batch * caps, 0.0, 1.2);
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 7) % caps as u32).collect();
    let labels2: Vec<u32> = labels.iter().flat_map(|&y| [y, (y + 3) % caps as u32]).collect();
    let (dout, dv0) = (
        rand(&mut rng, batch * caps * d, -1.0, 1.0),
        rand(&mut rng, batch * caps * d, -1.0, 1.0),
    );
    let dl0 = rand(&mut rng, batch * caps, -1.0, 1.0);
    let (want, got) = both!(g, |be| {
        let idx = be.upload_idx(&labels).unwrap();
        let mut out = poisoned(be, batch * caps * d);
        be.mask_fwd(batch, caps, d, &up(be, &v), &idx, &mut out).unwrap();
        let mut dvb = up(be, &dv0);
        be.mask_bwd(batch, caps, d, &up(be, &dout), &idx, &mut dvb).unwrap();
        let mut am = be.upload_idx(&vec![99; batch]).unwrap();
        be.argmax(batch, caps, &up(be, &l), &mut am).unwrap();
        let mut loss = poisoned(be, 1);
        be.margin_loss_fwd(batch, caps, 1, &up(be, &l), &idx, &mut loss)
            .unwrap();
        let mut dl = up(be, &dl0);
        be.margin_loss_bwd(batch, caps, 1, &up(be, &l), &idx, &up(be, &[0.7]), &mut dl)
            .unwrap();
        // two labels per image (MultiMNIST)
        let idx2 = be.upload_idx(&labels2).unwrap();
        let mut loss2 = poisoned(be, 1);
        be.margin_loss_fwd(batch, caps, 2, &up(be, &l), &idx2, &mut loss2)
            .unwrap();
        let mut dl2 = up(be, &dl0);
        be.margin_loss_bwd(batch, caps, 2, &up(be, &l), &idx2, &up(be, &[0.7]), &mut dl2)
            .unwrap();
        let am: Vec<f64> = be.download_idx(&am).unwrap().iter().map(|&x| x as f64).collect();
        [
            down(be, &out),
            down(be, &dvb),
            am,
            down(be, &loss),
            down(be, &dl),
            down(be, &loss2),
            down(be, &dl2),
        ]
        .concat()
    });
    compare("mask, argmax, margin loss", &got, &want, 1e-6, 1e-5);
}

pub fn routing_1_2_3_rounds<B: Backend>(g: &B) {
    let shapes = [
        Config::default().caps_shape(3),
        CapsShape {
            batch: 2,
            in_caps: 37,
            in_dim: 8,
            out_caps: 7,
            out_dim: 5,
        },
        // 16-D capsules (the AVX-512 kernels' case) in 7 classes (their runs of 4, 2 and 1 classes)
        // whose 259 (i, j) pairs end in a partial group of 16
        CapsShape {
            batch: 2,
            in_caps: 37,
            in_dim: 8,
            out_caps: 7,
            out_dim: 16,
        },
    ];
    routing_at(g, &shapes, &[1, 2, 3]);
}

/// Routing forward and backward at each shape and number of rounds, against the CPU reference.
pub fn routing_at<B: Backend>(g: &B, shapes: &[CapsShape], round_counts: &[usize]) {
    for (n, cs) in shapes.iter().enumerate() {
        for &rounds in round_counts {
            let mut rng = Lcg(20 + 3 * n as u64 + rounds as u64);
            let (uhat, dv, duh0) = (
                rand(&mut rng, cs.uhat_len(), -0.2, 0.2),
                rand(&mut rng, cs.v_len(), -1.0, 1.0),
                rand(&mut rng, cs.uhat_len(), -1.0, 1.0),
            );
            let (want, got) = both!(g, |be| {
                let u = up(be, &uhat);
                let mut v = poisoned(be, cs.v_len());
                let mut saved = be.routing_saved(cs, rounds).unwrap();
                for b in [&mut saved.c, &mut saved.s, &mut saved.v] {
                    be.fill(b, f64::NAN).unwrap();
                }
                be.routing_fwd(cs, rounds, &u, &mut v, &mut saved).unwrap();
                let mut duh = up(be, &duh0);
                be.routing_bwd(cs, rounds, &u, &saved, &up(be, &dv), &mut duh).unwrap();
                [
                    down(be, &v),
                    down(be, &saved.c),
                    down(be, &saved.s),
                    down(be, &saved.v),
                    down(be, &duh),
                ]
                .concat()
            });
            compare(
                &format!("routing fwd+bwd {cs:?}, {rounds} rounds"),
                &got,
                &want,
                1e-5,
                1e-3,
            );
        }
    }
}

/// Shapes of the fused prediction + routing op: the model's I = 1152 at batch 5 (chunks of 8 divide
/// it, the input gradient's chunks of 7 at 3 rounds do not; on a 132-SM device five images make image
/// groups of 2, 2 and 1), capsules of 17 dimensions (which the fused version hands to the unfused
/// path), and I = 37 capsules of 3 dimensions into 7 of 5 (no chunk divides it).
pub fn caps_routing_shapes() -> Vec<CapsShape> {
    vec![
        Config::default().caps_shape(5),
        // primary capsules of 17 dimensions: beyond the fused weight gradient's 16, the unfused path
        CapsShape {
            batch: 2,
            in_caps: 5,
            in_dim: 17,
            out_caps: 3,
            out_dim: 4,
        },
        CapsShape {
            batch: 3,
            in_caps: 37,
            in_dim: 3,
            out_caps: 7,
            out_dim: 5,
        },
    ]
}

/// Prediction vectors and routing as one op (`caps_routing_fwd`/`_bwd`) at each shape and number of
/// rounds, against the CPU reference: v, the saved couplings, sums and capsules, and both gradients,
/// accumulated onto random values; at the small shapes also the weight gradient alone (no du wanted).
pub fn caps_routing_at<B: Backend>(g: &B, shapes: &[CapsShape], round_counts: &[usize]) {
    for (n, cs) in shapes.iter().enumerate() {
        for &rounds in round_counts {
            let mut rng = Lcg(40 + 3 * n as u64 + rounds as u64);
            let (u0, w0, dv0, du0, dw0) = (
                rand(&mut rng, cs.u_len(), -0.5, 0.5),
                rand(&mut rng, cs.w_len(), -0.1, 0.1),
                rand(&mut rng, cs.v_len(), -1.0, 1.0),
                rand(&mut rng, cs.u_len(), -1.0, 1.0),
                rand(&mut rng, cs.w_len(), -1.0, 1.0),
            );
            let (want, got) = both!(g, |be| {
                let (u, w, dv) = (up(be, &u0), up(be, &w0), up(be, &dv0));
                let mut v = poisoned(be, cs.v_len());
                let mut saved = be.routing_saved(cs, rounds).unwrap();
                for b in [&mut saved.c, &mut saved.s, &mut saved.v] {
                    be.fill(b, f64::NAN).unwrap();
                }
                be.caps_routing_fwd(cs, rounds, &u, &w, &mut v, &mut saved).unwrap();
                let (mut du, mut dw) = (up(be, &du0), up(be, &dw0));
                be.caps_routing_bwd(cs, rounds, &u, &w, &saved, &dv, Some(&mut du), Some(&mut dw))
                    .unwrap();
                let mut out = vec![
                    down(be, &v),
                    down(be, &saved.c),
                    down(be, &saved.s),
                    down(be, &saved.v),
                    down(be, &du),
                    down(be, &dw),
                ];
                if cs.in_caps < 100 {
                    let mut dw = up(be, &dw0);
                    be.caps_routing_bwd(cs, rounds, &u, &w, &saved, &dv, None, Some(&mut dw))
                        .unwrap();
                    out.push(down(be, &dw));
                }
                out.concat()
            });
            compare(
                &format!("prediction + routing fwd+bwd {cs:?}, {rounds} rounds"),
                &got,
                &want,
                1e-5,
                1e-3,
            );
        }
    }
}

/// Six random images (from `seed`) and their labels, `label(i)` for image i.
fn fixed_batch<B: Backend>(seed: u64, label: impl Fn(u32) -> u32) -> (Vec<B::E>, Vec<u32>) {
    let batch = 6;
    let images = Lcg(seed)
        .vec(batch * 784, 0.0, 1.0)
        .iter()
        .map(|&x| B::E::from_f64(x as f32 as f64))
        .collect();
    (images, (0..batch as u32).map(label).collect())
}

/// Losses of `steps` training steps on fixed random images, and the gradients of the first step.
pub fn train_steps<B: Backend>(be: B, steps: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let cfg = small_config();
    let (images, labels) = fixed_batch::<B>(5, |i| i % 10);
    let mut t = Tape::new(be);
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 3)).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let (mut losses, mut grads) = (vec![], vec![]);
    for s in 0..steps {
        t.reset();
        let f = model.forward(&mut t, &images, &labels, true).unwrap();
        t.backward(f.loss).unwrap();
        if s == 0 {
            grads = model
                .params
                .all()
                .iter()
                .map(|&p| down(t.backend(), t.grad(p).unwrap()))
                .collect();
        }
        adam.update(&mut t).unwrap();
        losses.push(down(t.backend(), &t.value(f.loss).buf)[0]);
    }
    (losses, grads)
}

/// Ten training steps of the small model on `make()`'s backend against the reference: first-step
/// gradients of every parameter, the losses, and the same losses bit for bit from a second backend.
pub fn training_steps_match_reference<B: Backend>(make: impl Fn() -> B) {
    training_steps_match_rounded_reference(make, capsnet::float::Precision::Fp32)
}

/// [`training_steps_match_reference`] against the reference that rounds every GEMM input to `p`
/// (CpuBackend::with_gemm_inputs), as a backend launching `p`'s kernel versions does: what is left is
/// the order of f32 sums, so the fp32 tolerances hold.
pub fn training_steps_match_rounded_reference<B: Backend>(make: impl Fn() -> B, p: capsnet::float::Precision) {
    let (cpu_losses, cpu_grads) = train_steps(Cpu::with_gemm_inputs(p), 10);
    let (got_losses, got_grads) = train_steps(make(), 10);
    // first-step gradients: every parameter, scaled to its largest entry. In bf16 an input that
    // differs from the reference's by the f32 sums' rounding can round to the neighbouring bf16
    // value (one in tens of thousands does), moving a product by up to 2⁻⁷ of itself: the tolerance
    // is that step, where tf32's and fp32's 1e-3 hold
    let tol = if p == capsnet::float::Precision::Bf16 {
        2f64.powi(-7)
    } else {
        1e-3
    };
    for (k, spec) in small_config().param_specs().iter().enumerate() {
        let scale = cpu_grads[k].iter().fold(0.0f64, |a, x| a.max(x.abs()));
        compare(
            &format!("gradient of {} ({})", spec.name, p.name()),
            &got_grads[k],
            &cpu_grads[k],
            tol * scale,
            tol,
        );
    }
    second_step_equals_a_fresh_backends(&make);
    // ten Adam steps: the losses follow the same path
    compare(
        &format!("losses over 10 steps ({})", p.name()),
        &got_losses,
        &cpu_losses,
        1e-5,
        2e-3,
    );
    let (again, _) = train_steps(make(), 10);
    assert_eq!(
        got_losses, again,
        "same seed, same backend: the same losses, bit for bit"
    );
}

/// The second training step, the first where a backend reuses buffers from an earlier step (its
/// pool, kept state), gives every parameter the gradient that the same step on a fresh backend from
/// the same parameters does, bit for bit: nothing left over from the first step leaks into it.
pub fn second_step_equals_a_fresh_backends<B: Backend>(make: &impl Fn() -> B) {
    let cfg = small_config();
    let (images, labels) = fixed_batch::<B>(11, |i| (i * 3) % 10);
    let mut t = Tape::new(make());
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 3)).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let params = model.params.all();
    let step = |t: &mut Tape<B>| {
        t.reset();
        let f = model.forward(t, &images, &labels, true).unwrap();
        t.backward(f.loss).unwrap();
        params
            .iter()
            .map(|&p| down(t.backend(), t.grad(p).unwrap()))
            .collect::<Vec<_>>()
    };
    step(&mut t);
    adam.update(&mut t).unwrap();
    let after_one: Vec<Vec<f64>> = params.iter().map(|&p| down(t.backend(), &t.value(p).buf)).collect();
    let second = step(&mut t);
    let mut fresh = Tape::new(make());
    CapsNet::new(cfg.clone(), &mut fresh, &init_params(&cfg, 3)).unwrap();
    for (&p, v) in params.iter().zip(&after_one) {
        let v: Vec<B::E> = v.iter().map(|&x| B::E::from_f64(x)).collect();
        let buf = fresh.backend().upload(&v).unwrap();
        fresh.set_value(p, buf).unwrap();
    }
    let again = step(&mut fresh);
    for (k, spec) in cfg.param_specs().iter().enumerate() {
        assert!(
            second[k] == again[k],
            "the second step's gradient of {} differs from a fresh backend's from the same parameters",
            spec.name
        );
        assert!(second[k].iter().any(|&g| g != 0.0), "a zero gradient of {}", spec.name);
    }
}

/// Three training steps of the small model on `be`, with `fresh(be)` (the backend's count of
/// allocations) read after each: the first allocates, the second and third allocate nothing.
pub fn steps_after_the_first_allocate_nothing<B: Backend>(be: B, fresh: impl Fn(&B) -> usize) {
    counter_stops_after_the_first_step(be, "allocated memory", fresh);
}

/// Three training steps of the small model on `be`, with `count(be)` read after each: the first step
/// counts something (`what`: allocations, uploads), the second and third nothing more.
pub fn counter_stops_after_the_first_step<B: Backend>(be: B, what: &str, count: impl Fn(&B) -> usize) {
    let cfg = small_config();
    let images: Vec<B::E> = vec![B::E::from_f64(0.5); 4 * 784];
    let labels = vec![1u32, 2, 3, 4];
    let mut t = Tape::new(be);
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 1)).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let mut counts = vec![];
    for _ in 0..3 {
        t.reset();
        let f = model.forward(&mut t, &images, &labels, true).unwrap();
        t.backward(f.loss).unwrap();
        adam.update(&mut t).unwrap();
        let _ = t.backend().download(&t.value(f.loss).buf).unwrap(); // waits for an asynchronous backend
        counts.push(count(t.backend()));
    }
    assert!(counts[0] > 0, "the first step {what} nothing: {counts:?}");
    assert_eq!(counts[1], counts[2], "the third step {what}: {counts:?}");
    assert_eq!(counts[0], counts[1], "the second step {what}: {counts:?}");
}

/// Compares `got` with `want` elementwise against `bound`·`abs_ref` + 1e-6 (abs_ref: the op run by the
/// reference on absolute values; ReLU and sigmoid are 1-Lipschitz, so the bound holds after them).
pub fn compare_bounded(name: &str, got: &[f64], want: &[f64], abs_ref: &[f64], bound: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| !within(got[i], want[i], 1e-6 + bound * abs_ref[i], 0.0))
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{name}: {} of {} outside {bound:.3e}·Σ|a||b| + 1e-6; first [{i}]: got {} reference {} (Σ|a||b| {})",
            bad.len(),
            got.len(),
            got[i],
            want[i],
            abs_ref[i]
        );
    }
}

/// Which GEMM-shaped op [`gemm_op`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOp {
    ConvFwd,
    ConvBwdInput,
    ConvBwdWeight,
    DenseFwd,
    DenseBwdInput,
    DenseBwdWeight,
}

impl GemmOp {
    /// The op of the kernel registry's name.
    pub fn from_name(name: &str) -> Option<GemmOp> {
        Some(match name {
            "conv2d_fwd" => GemmOp::ConvFwd,
            "conv2d_bwd_input" => GemmOp::ConvBwdInput,
            "conv2d_bwd_weight" => GemmOp::ConvBwdWeight,
            "dense_fwd" => GemmOp::DenseFwd,
            "dense_bwd_input" => GemmOp::DenseBwdInput,
            "dense_bwd_weight" => GemmOp::DenseBwdWeight,
            _ => return None,
        })
    }
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// An op of `g` that adds a GEMM of inputs `$a` and `$b` into an output starting at `$acc0`, against the
/// reference within `$bound` of the scale: the same op on the inputs' absolute values, plus |acc0|.
macro_rules! check_accumulating {
    ($g:expr, $name:expr, $a:expr, $b:expr, $acc0:expr, $bound:expr, |$be:ident, $x:ident, $y:ident, $out:ident| $call:expr) => {{
        let scale: Vec<f64> = {
            let cpu_backend = Cpu::new();
            let $be = &cpu_backend;
            let ($x, $y) = (up($be, &abs($a)), up($be, &abs($b)));
            let mut $out = $be.zeros($acc0.len()).unwrap();
            $call.unwrap();
            down($be, &$out)
                .iter()
                .zip($acc0)
                .map(|(s, d)| s + d.abs() as f64)
                .collect()
        };
        let (want, got) = both!($g, |$be| {
            let ($x, $y) = (up($be, $a), up($be, $b));
            let mut $out = up($be, $acc0);
            $call.unwrap();
            down($be, &$out)
        });
        compare_bounded($name, &got, &want, &scale, $bound);
    }};
}

/// One GEMM-shaped op of `g` against the CPU reference at odd shapes and the model's own, with the
/// bound of [`capsnet::float::gemm_error_bound`] for inputs rounded to `mantissa_bits` (23: fp32, 10: tf32, 7: bf16).
/// Written outputs start poisoned, accumulated ones from random values.
pub fn gemm_op<B: Backend>(g: &B, op: GemmOp, mantissa_bits: u32) {
    let cpu = Cpu::new();
    // the odd shapes, a stride of 3, then the model's own (the first three get every activation)
    let mut conv_shapes = conv_shapes();
    conv_shapes.insert(
        2,
        ConvShape {
            batch: 2,
            in_h: 14,
            in_w: 14,
            in_c: 40,
            out_c: 24,
            k: 5,
            stride: 3,
        },
    );
    let mut dense_shapes = dense_shapes();
    // one output tile summed over 600 rows: the weight gradient's tensor-core versions split K
    dense_shapes.push(DenseShape {
        rows: 600,
        inp: 40,
        out: 24,
    });
    let bound = |k: usize| capsnet::float::gemm_error_bound(mantissa_bits, k);
    match op {
        GemmOp::ConvFwd | GemmOp::ConvBwdInput | GemmOp::ConvBwdWeight => {
            for (n, s) in conv_shapes.iter().enumerate() {
                if op == GemmOp::ConvBwdInput && s.in_c == 1 {
                    continue;
                }
                let mut rng = Lcg(300 + n as u64);
                let (x, w, b) = (
                    rand(&mut rng, s.x_len(), 0.0, 1.0),
                    rand(&mut rng, s.w_len(), -0.1, 0.1),
                    rand(&mut rng, s.out_c, -0.1, 0.1),
                );
                let (dz, acc0) = (
                    rand(&mut rng, s.y_len(), -1.0, 1.0),
                    rand(&mut rng, s.x_len().max(s.w_len()), -1.0, 1.0),
                );
                match op {
                    GemmOp::ConvFwd => {
                        let zero = vec![0f32; s.out_c];
                        let abs_ref = {
                            let mut y = cpu.zeros(s.y_len()).unwrap();
                            cpu.conv2d_fwd(
                                s,
                                &up(&cpu, &abs(&x)),
                                &up(&cpu, &abs(&w)),
                                &up(&cpu, &zero),
                                &mut y,
                                Act::None,
                            )
                            .unwrap();
                            down(&cpu, &y)
                        };
                        // every activation at the odd shapes, the model's own (ReLU) at its shapes
                        let acts: &[Act] = if n < 3 {
                            &[Act::None, Act::Relu, Act::Sigmoid]
                        } else {
                            &[Act::Relu]
                        };
                        for &act in acts {
                            let (want, got) = both!(g, |be| {
                                let mut y = poisoned(be, s.y_len());
                                be.conv2d_fwd(s, &up(be, &x), &up(be, &w), &up(be, &b), &mut y, act)
                                    .unwrap();
                                down(be, &y)
                            });
                            let bias_abs: Vec<f64> = abs_ref
                                .iter()
                                .enumerate()
                                .map(|(i, a)| a + b[i % s.out_c].abs() as f64)
                                .collect();
                            compare_bounded(
                                &format!("conv2d_fwd {s:?} {act:?}"),
                                &got,
                                &want,
                                &bias_abs,
                                bound(s.patch_len() + 1),
                            );
                        }
                    }
                    GemmOp::ConvBwdInput => check_accumulating!(
                        g,
                        &format!("conv2d_bwd_input {s:?}"),
                        &dz,
                        &w,
                        &acc0[..s.x_len()],
                        bound(s.k * s.k * s.out_c + 1),
                        |be, dzb, wb, dx| be.conv2d_bwd_input(s, &dzb, &wb, &mut dx)
                    ),
                    _ => check_accumulating!(
                        g,
                        &format!("conv2d_bwd_weight {s:?}"),
                        &x,
                        &dz,
                        &acc0[..s.w_len()],
                        bound(s.rows() + 1),
                        |be, xb, dzb, dw| be.conv2d_bwd_weight(s, &xb, &dzb, &mut dw)
                    ),
                }
            }
        }
        _ => {
            for (n, s) in dense_shapes.iter().enumerate() {
                let mut rng = Lcg(400 + n as u64);
                let (x, w, b) = (
                    rand(&mut rng, s.rows * s.inp, -1.0, 1.0),
                    rand(&mut rng, s.inp * s.out, -0.1, 0.1),
                    rand(&mut rng, s.out, -0.1, 0.1),
                );
                let (dz, acc0) = (
                    rand(&mut rng, s.rows * s.out, -1.0, 1.0),
                    rand(&mut rng, (s.rows * s.inp).max(s.inp * s.out), -1.0, 1.0),
                );
                match op {
                    GemmOp::DenseFwd => {
                        let zero = vec![0f32; s.out];
                        let abs_ref = {
                            let mut y = cpu.zeros(s.rows * s.out).unwrap();
                            cpu.dense_fwd(
                                s,
                                &up(&cpu, &abs(&x)),
                                &up(&cpu, &abs(&w)),
                                &up(&cpu, &zero),
                                &mut y,
                                Act::None,
                            )
                            .unwrap();
                            down(&cpu, &y)
                                .iter()
                                .enumerate()
                                .map(|(i, a)| a + b[i % s.out].abs() as f64)
                                .collect::<Vec<_>>()
                        };
                        for act in [Act::None, Act::Relu, Act::Sigmoid] {
                            let (want, got) = both!(g, |be| {
                                let mut y = poisoned(be, s.rows * s.out);
                                be.dense_fwd(s, &up(be, &x), &up(be, &w), &up(be, &b), &mut y, act)
                                    .unwrap();
                                down(be, &y)
                            });
                            compare_bounded(
                                &format!("dense_fwd {s:?} {act:?}"),
                                &got,
                                &want,
                                &abs_ref,
                                bound(s.inp + 1),
                            );
                        }
                    }
                    GemmOp::DenseBwdInput => check_accumulating!(
                        g,
                        &format!("dense_bwd_input {s:?}"),
                        &dz,
                        &w,
                        &acc0[..s.rows * s.inp],
                        bound(s.out + 1),
                        |be, dzb, wb, dx| be.dense_bwd_input(s, &dzb, &wb, &mut dx)
                    ),
                    _ => check_accumulating!(
                        g,
                        &format!("dense_bwd_weight {s:?}"),
                        &x,
                        &dz,
                        &acc0[..s.inp * s.out],
                        bound(s.rows + 1),
                        |be, xb, dzb, dw| be.dense_bwd_weight(s, &xb, &dzb, &mut dw)
                    ),
                }
            }
        }
    }
}
