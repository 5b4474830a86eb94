//! The fast CPU backend (f32 arithmetic, SIMD loops) against the f64 reference: every op through the
//! parity suite (tests/common/parity.rs, tolerances stated there per op), ten training steps of a
//! small model, and one step of the full-size model (loss and every gradient).

mod common;

use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::fast::FastCpu;
use capsnet::config::Config;
use capsnet::float::Float;
use capsnet::model::{CapsNet, init_params};
use capsnet::prelude::*;
use capsnet::tape::Tape;
use common::{Lcg, parity};

#[test]
fn fast_cpu_conv2d_matches_reference() {
    parity::conv2d(&FastCpu::new());
}

/// The fast backend in bf16 (`--precision bf16`) on each bf16 GEMM the CPU runs (AMX tiles,
/// AVX512_BF16): the convolutions, dense layers and whole training steps against the reference that
/// rounds the same GEMM inputs the same way. Where it runs neither, bf16 is refused in words that
/// name what is missing.
#[test]
fn fast_cpu_bf16_matches_the_rounded_reference_on_each_bf16_gemm_the_cpu_runs() {
    use capsnet::backend::bf16::Bf16Gemm;
    use capsnet::float::Precision;
    let kernels: Vec<Bf16Gemm> = Bf16Gemm::ALL.into_iter().filter(|k| k.supported()).collect();
    if kernels.is_empty() {
        let e = FastCpu::with_precision(Precision::Bf16).unwrap_err().to_string();
        assert!(
            e.contains("AMX-BF16") && e.contains("AVX512_BF16") && e.contains("--precision fp32"),
            "{e}"
        );
        eprintln!("no bf16 GEMM on this CPU: refused as it should be ({e})");
        return;
    }
    assert_eq!(
        FastCpu::with_precision(Precision::Bf16).unwrap().name(),
        FastCpu::with_bf16_gemm(kernels[0]).name()
    );
    for k in kernels {
        let be = FastCpu::with_bf16_gemm(k);
        assert_eq!(be.precision(), Precision::Bf16);
        assert!(be.name().contains(k.describe()), "{}", be.name());
        parity::conv2d_against_rounded_reference(&be, Precision::Bf16);
        parity::dense_and_elementwise_against_rounded_reference(&be, Precision::Bf16);
        parity::training_steps_match_rounded_reference(|| FastCpu::with_bf16_gemm(k), Precision::Bf16);
    }
    assert!(
        FastCpu::with_precision(Precision::Tf32)
            .unwrap_err()
            .to_string()
            .contains("no tf32")
    );
}

#[test]
fn fast_cpu_dense_and_elementwise_match_reference() {
    parity::dense_and_elementwise(&FastCpu::new());
}

#[test]
fn fast_cpu_adam_matches_reference() {
    parity::adam(&FastCpu::new());
}

#[test]
fn fast_cpu_capsule_ops_match_reference() {
    parity::capsule_ops(&FastCpu::new());
}

/// The CPU backends keep no data on a device, but their gather (the trait's default) is the spec.
#[test]
fn cpu_backends_gather_resident_batches_as_the_loader_does() {
    parity::resident_batches(&FastCpu::new());
    parity::resident_batches(&CpuBackend::<f64>::new());
    parity::planned_steps(&FastCpu::new());
    parity::planned_steps(&CpuBackend::<f64>::new());
}

#[test]
fn fast_cpu_routing_matches_reference_for_1_2_3_rounds() {
    parity::routing_1_2_3_rounds(&FastCpu::new());
}

#[test]
fn fast_cpu_training_steps_match_reference_and_repeat_bit_for_bit() {
    parity::training_steps_match_reference(FastCpu::new);
}

/// Loss terms and every parameter's gradient after one forward and backward of the default model.
fn full_step<B: Backend>(be: B, images: &[f32], labels: &[u32]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let cfg = Config::default();
    let mut t = Tape::new(be);
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 11)).unwrap();
    let x: Vec<B::E> = images.iter().map(|&v| B::E::from_f64(v as f64)).collect();
    let f = model.forward(&mut t, &x, labels, true).unwrap();
    t.backward(f.loss).unwrap();
    let val = |v| parity::down(t.backend(), &t.value(v).buf)[0];
    let losses = vec![val(f.loss), val(f.margin), val(f.recon_loss)];
    let grads = model
        .params
        .all()
        .iter()
        .map(|&p| parity::down(t.backend(), t.grad(p).unwrap()))
        .collect();
    (losses, grads)
}

#[test]
fn fast_cpu_full_model_step_matches_reference() {
    let batch = 3;
    let mut rng = Lcg(77);
    let images: Vec<f32> = rng.vec(batch * 784, 0.0, 1.0).iter().map(|&v| v as f32).collect();
    let labels = [3u32, 0, 9];
    let (want_l, want_g) = full_step(CpuBackend::<f64>::new(), &images, &labels);
    let (got_l, got_g) = full_step(FastCpu::new(), &images, &labels);
    // loss, margin and reconstruction terms: f32 sums over 20,736-long patches and 1,152 capsules
    parity::compare("loss terms", &got_l, &want_l, 1e-6, 1e-4);
    for (k, spec) in Config::default().param_specs().iter().enumerate() {
        let scale = want_g[k].iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(scale > 0.0, "the reference gradient of {} is all zeros", spec.name);
        parity::compare(
            &format!("gradient of {}", spec.name),
            &got_g[k],
            &want_g[k],
            1e-3 * scale,
            1e-3,
        );
    }
}

#[test]
fn fast_cpu_steps_after_the_first_allocate_no_tensor() {
    parity::steps_after_the_first_allocate_nothing(FastCpu::new(), FastCpu::fresh_allocations);
}

/// The backend's name says which f32 GEMM multiplies, and `CAPSNET_CPU_GEMM` (as `--cpu-gemm`) forces it.
#[test]
fn fast_cpu_names_its_gemm_and_the_environment_forces_it() {
    use capsnet::backend::{CpuGemm, cpu_gemm};
    let g = cpu_gemm();
    assert!(g.supported());
    let name = FastCpu::new().name();
    assert!(name.contains(&g.describe()), "{name}");
    match std::env::var("CAPSNET_CPU_GEMM")
        .ok()
        .filter(|v| !v.is_empty() && v != "auto")
    {
        Some(forced) => assert_eq!(g.flag(), forced),
        None => assert_eq!(g, CpuGemm::best()),
    }
}

/// Every f32 GEMM this CPU runs passes the parity suite above (each op, ten training steps, the full
/// model's step): this test executable runs those tests again once per GEMM, forced through
/// `CAPSNET_CPU_GEMM`. A GEMM this CPU cannot run is refused in words instead.
#[test]
fn every_gemm_this_cpu_runs_passes_the_parity_suite() {
    use capsnet::backend::CpuGemm;
    let mut ran = vec![];
    for g in CpuGemm::ALL {
        if !g.supported() {
            assert!(CpuGemm::parse(g.flag()).unwrap_err().contains("cannot run"));
            continue;
        }
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["fast_cpu_", "--test-threads", "2"])
            .env("CAPSNET_CPU_GEMM", g.flag())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{}: {out}{}",
            g.flag(),
            String::from_utf8_lossy(&o.stderr)
        );
        // the op suites, the steps, the full model's step and the naming test all ran
        let passed = out
            .lines()
            .filter(|l| l.starts_with("test fast_cpu_") && l.ends_with(" ok"))
            .count();
        assert!(passed >= 9, "{}: only {passed} tests ran: {out}", g.flag());
        ran.push(g.flag());
    }
    assert!(!ran.is_empty());
    eprintln!("parity suite passed on the f32 GEMMs: {}", ran.join(", "));
}

/// The primary conv's weight gradient over more images than one im2col chunk holds (46: chunks of 23)
/// is the sum of the gradients of its two halves, each one chunk (which the parity suite holds to the
/// reference): the chunks accumulate, on whichever GEMM runs (rerun per GEMM above).
#[test]
fn fast_cpu_conv_weight_gradient_over_several_chunks_adds_them() {
    use capsnet::ops::{ConvOps, ConvShape};
    let be = FastCpu::new();
    let shape = |batch| ConvShape {
        batch,
        in_h: 20,
        in_w: 20,
        in_c: 256,
        out_c: 256,
        k: 9,
        stride: 2,
    };
    let (all, half) = (shape(46), shape(23));
    let mut rng = Lcg(46);
    let x: Vec<f32> = rng.vec(all.x_len(), -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let dz: Vec<f32> = rng.vec(all.y_len(), -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let grad = |s: &ConvShape, x: &[f32], dz: &[f32]| {
        let mut dw = be.upload(&vec![0.0; s.w_len()]).unwrap();
        be.conv2d_bwd_weight(s, &be.upload(x).unwrap(), &be.upload(dz).unwrap(), &mut dw)
            .unwrap();
        be.download(&dw).unwrap()
    };
    let whole = grad(&all, &x, &dz);
    let (xh, zh) = (half.x_len(), half.y_len());
    let first = grad(&half, &x[..xh], &dz[..zh]);
    let second = grad(&half, &x[xh..], &dz[zh..]);
    let mut worst = 0.0f32;
    for i in 0..whole.len() {
        let sum = first[i] + second[i];
        // each element sums 46·36 products of magnitude ≤ 1 in f32
        worst = worst.max((whole[i] - sum).abs());
    }
    assert!(worst < 2e-3, "chunks do not add up: worst difference {worst}");
    assert!(
        whole.iter().any(|&v| v.abs() > 1.0),
        "a gradient of zeros proves nothing"
    );
}

/// The activation's and the bias's gradients in one pass (what the backward of a conv or dense layer
/// calls) equal the two ops in turn, bit for bit: a partial last block of 64 rows, one column, and
/// blocks enough to go over the threads.
#[test]
fn fast_cpu_activation_and_bias_gradients_in_one_pass_equal_the_two_ops() {
    use capsnet::ops::Act;
    use capsnet::ops::dense::DenseOps;
    let be = FastCpu::new();
    let mut rng = Lcg(71);
    for (rows, cols) in [(200, 37), (64, 1), (1000, 256)] {
        for act in [Act::None, Act::Relu, Act::Sigmoid] {
            let n = rows * cols;
            let (y, dy) = (
                parity::rand(&mut rng, n, -1.0, 1.0),
                parity::rand(&mut rng, n, -1.0, 1.0),
            );
            let db0 = parity::rand(&mut rng, cols, -1.0, 1.0);
            let (y, dy) = (parity::up(&be, &y), parity::up(&be, &dy));
            let (mut dz1, mut db1) = (parity::poisoned(&be, n), parity::up(&be, &db0));
            be.act_bwd(act, &y, &dy, &mut dz1).unwrap();
            be.bias_bwd(rows, cols, &dz1, &mut db1).unwrap();
            let (mut dz2, mut db2) = (parity::poisoned(&be, n), parity::up(&be, &db0));
            be.act_bias_bwd(act, rows, cols, &y, &dy, &mut dz2, Some(&mut db2))
                .unwrap();
            let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dz1), bits(&dz2), "dz, {rows}x{cols}, {act:?}");
            assert_eq!(bits(&db1), bits(&db2), "db, {rows}x{cols}, {act:?}");
        }
    }
}

/// Prediction vectors and routing as one op (`caps_routing_fwd`/`_bwd`, the model's path: û and the
/// transposed weights kept from the forward, both gradients of the prediction in one pass over dû on
/// AVX-512) against the reference, at the parity suite's shapes (the model's at an odd batch, and
/// shapes the AVX-512 kernels leave to the portable loops).
#[test]
fn fast_cpu_fused_prediction_and_routing_match_reference() {
    parity::caps_routing_at(&FastCpu::new(), &parity::caps_routing_shapes(), &[1, 2, 3]);
}

/// Adam on the fast backend stores a moment that falls below f32's normal range as zero (arithmetic on
/// subnormal floats is many times slower on x86), and leaves every other moment as the update makes
/// it: a parameter with no gradient whose first moment decays from just above the normal range, beside
/// one with a gradient.
#[test]
fn fast_cpu_adam_stores_no_subnormal_moment() {
    use capsnet::ops::{AdamGroup, AdamOps};
    let be = FastCpu::new();
    let tiny = f32::MIN_POSITIVE;
    let mut p = parity::up(&be, &[0.5, -0.25]);
    let grad = parity::up(&be, &[0.0, 0.125]);
    let mut m = parity::up(&be, &[4.0 * tiny, 0.0]);
    let mut v = parity::up(&be, &[4.0 * tiny, 0.0]);
    let (mut m_want, mut v_want) = (0.0f32, 0.0f32);
    for step in 1..=30u64 {
        let hp = parity::hyper(1e-3, step);
        be.adam_step(
            &hp,
            &mut [AdamGroup {
                param: &mut p,
                grad: &grad,
                m: &mut m,
                v: &mut v,
            }],
        )
        .unwrap();
        // the update's own f32 arithmetic (fused as the AVX2 path fuses it; the portable path rounds
        // the product apart, hence the tolerance)
        m_want = 0.9f32.mul_add(m_want, (1.0 - 0.9f32) * 0.125);
        v_want = 0.999f32.mul_add(v_want, (1.0 - 0.999f32) * 0.125 * 0.125);
        for x in m.iter().chain(v.iter()) {
            assert!(*x == 0.0 || x.is_normal(), "step {step}: a subnormal moment {x:e}");
        }
        let close = |x: f32, want: f32| (x - want).abs() <= 1e-6 * want;
        assert!(
            close(m[1], m_want) && close(v[1], v_want),
            "step {step}: {} {}",
            m[1],
            v[1]
        );
    }
    // 4·tiny·0.9^k is below the normal range from k = 14 on: zero by then, and the parameter unmoved
    assert_eq!((m[0], p[0]), (0.0, 0.5));
}

/// The fused op at 16-D shapes the model's does not reach: 5 classes (the AVX-512 kernels' runs of 4
/// and 1, and 35 (i, j) pairs: two groups of 16 and a tail) and a single class (couplings of 1).
#[test]
fn fast_cpu_fused_prediction_and_routing_match_reference_at_small_16d_shapes() {
    let shape = |out_caps| capsnet::ops::CapsShape {
        batch: 3,
        in_caps: 7,
        in_dim: 8,
        out_caps,
        out_dim: 16,
    };
    parity::caps_routing_at(&FastCpu::new(), &[shape(5), shape(1)], &[1, 2, 3]);
}

/// Prediction and routing as one op on the fast backend (on AVX-512 neither û nor dû is stored: each
/// pass makes û again in L1, and dû is made per capsule and image) equals the unfused ops on the same
/// backend bit for bit: the forward (v, and every round's c, s and v) against predict_fwd then
/// routing_fwd, the backward against routing_bwd into dû then predict_bwd_input and
/// predict_bwd_weight, both gradients accumulated onto random values; and each gradient written whole
/// over NaNs (`caps_routing_bwd_into`) as it is added onto zeros. The model's shape at an odd
/// batch (image blocks of unequal size), and 16-D shapes of 5 classes (35 pairs: the last three past
/// the final group of 16) and of 1; 1 to 3 rounds.
#[test]
fn fast_cpu_fused_prediction_and_routing_equals_the_unfused_ops_bit_for_bit() {
    use capsnet::ops::{CapsuleOps, RoutingOps};
    let be = FastCpu::new();
    let small = |out_caps| capsnet::ops::CapsShape {
        batch: 3,
        in_caps: 7,
        in_dim: 8,
        out_caps,
        out_dim: 16,
    };
    let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (n, s) in [Config::default().caps_shape(5), small(5), small(1)]
        .into_iter()
        .enumerate()
    {
        for rounds in 1..=3 {
            let mut rng = Lcg(300 + 10 * n as u64 + rounds as u64);
            let (u, w, dv, du0, dw0) = (
                parity::up(&be, &parity::rand(&mut rng, s.u_len(), -0.5, 0.5)),
                parity::up(&be, &parity::rand(&mut rng, s.w_len(), -0.1, 0.1)),
                parity::up(&be, &parity::rand(&mut rng, s.v_len(), -1.0, 1.0)),
                parity::rand(&mut rng, s.u_len(), -1.0, 1.0),
                parity::rand(&mut rng, s.w_len(), -1.0, 1.0),
            );
            let at = format!("{s:?}, {rounds} rounds");
            let mut v1 = parity::poisoned(&be, s.v_len());
            let mut saved = be.routing_saved(&s, rounds).unwrap();
            for b in [&mut saved.c, &mut saved.s, &mut saved.v] {
                be.fill(b, f64::NAN).unwrap();
            }
            be.caps_routing_fwd(&s, rounds, &u, &w, &mut v1, &mut saved).unwrap();
            let mut uhat = be.zeros(s.uhat_len()).unwrap();
            be.predict_fwd(&s, &u, &w, &mut uhat).unwrap();
            let mut v2 = parity::poisoned(&be, s.v_len());
            let mut unfused = be.routing_saved(&s, rounds).unwrap();
            be.routing_fwd(&s, rounds, &uhat, &mut v2, &mut unfused).unwrap();
            assert_eq!(bits(&v1), bits(&v2), "v, {at}");
            assert_eq!(bits(&saved.c), bits(&unfused.c), "c, {at}");
            assert_eq!(bits(&saved.s), bits(&unfused.s), "s, {at}");
            assert_eq!(bits(&saved.v), bits(&unfused.v), "saved v, {at}");
            assert!(
                rounds == 1 || s.out_caps == 1 || saved.c.iter().any(|&c| c != saved.c[0]),
                "couplings all equal after {rounds} rounds: the test proves nothing"
            );

            let (mut du1, mut dw1) = (parity::up(&be, &du0), parity::up(&be, &dw0));
            be.caps_routing_bwd(&s, rounds, &u, &w, &saved, &dv, Some(&mut du1), Some(&mut dw1))
                .unwrap();
            let mut duhat = be.zeros(s.uhat_len()).unwrap();
            be.routing_bwd(&s, rounds, &uhat, &saved, &dv, &mut duhat).unwrap();
            let (mut du2, mut dw2) = (parity::up(&be, &du0), parity::up(&be, &dw0));
            be.predict_bwd_input(&s, &duhat, &w, &mut du2).unwrap();
            be.predict_bwd_weight(&s, &u, &duhat, &mut dw2).unwrap();
            assert_eq!(bits(&du1), bits(&du2), "du, {at}");
            assert_eq!(bits(&dw1), bits(&dw2), "dW, {at}");
            assert!(
                du1.iter().zip(&du0).filter(|(a, b)| a != b).count() > du0.len() / 2,
                "du hardly moved, {at}: the test proves nothing"
            );

            // a gradient written whole over NaNs is the one added onto zeros; the other added to
            for (du_write, dw_write) in [(false, true), (true, false)] {
                let start = |write: bool, len: usize, init: &[f32]| match write {
                    true => parity::poisoned(&be, len),
                    false => parity::up(&be, init),
                };
                let (mut du3, mut dw3) = (start(du_write, s.u_len(), &du0), start(dw_write, s.w_len(), &dw0));
                be.caps_routing_bwd_into(
                    &s,
                    rounds,
                    &u,
                    &w,
                    &saved,
                    &dv,
                    Some((&mut du3, du_write)),
                    Some((&mut dw3, dw_write)),
                )
                .unwrap();
                let added = |write: bool, len: usize, init: &[f32]| match write {
                    true => be.zeros(len).unwrap(),
                    false => parity::up(&be, init),
                };
                let (mut du4, mut dw4) = (added(du_write, s.u_len(), &du0), added(dw_write, s.w_len(), &dw0));
                be.caps_routing_bwd(&s, rounds, &u, &w, &saved, &dv, Some(&mut du4), Some(&mut dw4))
                    .unwrap();
                let how = format!("du written {du_write}, dW written {dw_write}, {at}");
                assert_eq!(bits(&du3), bits(&du4), "du, {how}");
                assert_eq!(bits(&dw3), bits(&dw4), "dW, {how}");
            }
        }
    }
}

/// The weight and bias gradients of a conv of one input channel in one op (the first layer's
/// backward; on AVX-512 dz is made 64 rows at a time and never stored, its products f32 FMAs) in
/// fp32 and, where the CPU runs a bf16 GEMM, in bf16: db equal to the bit to the default's two steps
/// (dz with its bias gradient, then the weight gradient), dW against the f64 sum of the products of
/// the inputs rounded as the precision rounds them, within f32 FMA sums' error where the out
/// channels come in blocks of 64 (the AVX-512 kernel; in bf16 on AMX the GEMM over the rows, which
/// stays within it too; a missing rounding errs far more) and the GEMM's bound elsewhere. Shapes:
/// conv1's at batch 3 (chunks over two parts, a partial last chunk), a stride of 2 without
/// activation, 48 channels (the default's path), and 32 channels over an odd number of rows (75: in
/// bf16 on AMX, a last K tile partly empty and a row pair with one row).
#[test]
fn fast_cpu_first_layer_gradients_in_one_op() {
    use capsnet::backend::bf16::Bf16Gemm;
    use capsnet::float::{Precision, sum_error_bound};
    use capsnet::ops::Act;
    use capsnet::ops::conv::{ConvOps, ConvShape};
    use capsnet::ops::dense::DenseOps;
    let mut precisions = vec![Precision::Fp32];
    if Bf16Gemm::ALL.into_iter().any(|k| k.supported()) {
        precisions.push(Precision::Bf16);
    }
    let wide = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma");
    let mut rng = Lcg(97);
    for p in precisions {
        let be = FastCpu::with_precision(p).unwrap();
        for (batch, side, k, stride, out_c, act) in [
            (3, 28, 9, 1, 256, Act::Relu),
            (2, 11, 3, 2, 64, Act::None),
            (2, 9, 3, 1, 48, Act::Relu),
            (3, 7, 3, 1, 32, Act::Relu),
        ] {
            let s = ConvShape {
                batch,
                in_h: side,
                in_w: side,
                in_c: 1,
                out_c,
                k,
                stride,
            };
            let x = parity::rand(&mut rng, s.x_len(), 0.0, 1.0);
            let (y, dy) = (
                parity::rand(&mut rng, s.y_len(), -1.0, 1.0),
                parity::rand(&mut rng, s.y_len(), -1.0, 1.0),
            );
            let (dw0, db0) = (
                parity::rand(&mut rng, s.w_len(), -1.0, 1.0),
                parity::rand(&mut rng, out_c, -1.0, 1.0),
            );
            let (xb, yb, dyb) = (parity::up(&be, &x), parity::up(&be, &y), parity::up(&be, &dy));
            let (mut dw1, mut db1) = (parity::up(&be, &dw0), parity::up(&be, &db0));
            be.conv2d_bwd_params(&s, act, &xb, &yb, &dyb, &mut dw1, Some(&mut db1))
                .unwrap();
            let mut db2 = parity::up(&be, &db0);
            let mut dz = parity::poisoned(&be, s.y_len());
            be.act_bias_bwd(act, s.rows(), out_c, &yb, &dyb, &mut dz, Some(&mut db2))
                .unwrap();
            let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let what = format!("{p:?} {s:?} {act:?}");
            assert_eq!(bits(&db1), bits(&db2), "db, {what}");
            // the f64 sums of the rounded products, and of their magnitudes (for the bound)
            let dz = parity::down(&be, &dz);
            let (oh, ow) = (s.out_h(), s.out_w());
            let (mut want, mut mag) = (vec![0f64; s.w_len()], vec![0f64; s.w_len()]);
            for r in 0..s.rows() {
                let (b, q) = (r / (oh * ow), r % (oh * ow));
                let (oy, ox) = (q / ow, q % ow);
                for t in 0..k * k {
                    let xv = x[(b * side + oy * stride + t / k) * side + ox * stride + t % k];
                    let xv = p.round(xv) as f64;
                    for c in 0..out_c {
                        let term = xv * p.round(dz[r * out_c + c] as f32) as f64;
                        want[t * out_c + c] += term;
                        mag[t * out_c + c] += term.abs();
                    }
                }
            }
            let fma = wide && out_c % 64 == 0;
            let bound = sum_error_bound(if fma { Precision::Fp32 } else { p }, s.rows()) + 2f64.powi(-23);
            let mut moved = 0usize;
            for (i, (a, (w, m))) in dw1.iter().zip(want.iter().zip(&mag)).enumerate() {
                let tol = bound * (m + dw0[i].abs() as f64);
                let (a, w) = (*a as f64, dw0[i] as f64 + w);
                assert!((a - w).abs() <= tol, "dW[{i}], {what}: {a}, want {w} (allowed {tol:e})");
                moved += ((a - dw0[i] as f64).abs() > 10.0 * tol) as usize;
            }
            assert!(
                moved > s.w_len() / 2,
                "dW hardly moved beyond the tolerance, {what}: the test proves nothing"
            );
        }
    }
}

/// A conv's forward for a training step, and its input and weight gradients from what it kept,
/// equal the ops without it bit for bit in bf16 (x rounded once, W packed once for both GEMMs; dW
/// also overwritten instead of added to, over NaNs, against the plain op on zeros): 64
/// channels at stride 2 as the primary capsules' conv, 32 at stride 1 with a 5x5 kernel, and 48 out
/// channels, where nothing is kept.
#[test]
fn fast_cpu_conv_gradients_from_what_the_forward_kept_equal_the_plain_ops() {
    use capsnet::backend::bf16::Bf16Gemm;
    use capsnet::float::Precision;
    use capsnet::ops::Act;
    use capsnet::ops::conv::{ConvOps, ConvShape};
    if !Bf16Gemm::ALL.into_iter().any(|k| k.supported()) {
        // no bf16 GEMM here: what a user gets is a refusal
        assert!(FastCpu::with_precision(Precision::Bf16).is_err());
        return;
    }
    let be = FastCpu::with_precision(Precision::Bf16).unwrap();
    let mut rng = Lcg(41);
    let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (batch, side, in_c, out_c, k, stride, kept) in [
        (3, 13, 64, 64, 3, 2, true),
        (2, 9, 32, 32, 5, 1, true),
        (2, 9, 32, 48, 3, 1, false),
    ] {
        let s = ConvShape {
            batch,
            in_h: side,
            in_w: side,
            in_c,
            out_c,
            k,
            stride,
        };
        let up = |v: &[f32]| parity::up(&be, v);
        let x = up(&parity::rand(&mut rng, s.x_len(), -1.0, 1.0));
        let w = up(&parity::rand(&mut rng, s.w_len(), -0.5, 0.5));
        let b = up(&parity::rand(&mut rng, out_c, -0.1, 0.1));
        let dz = up(&parity::rand(&mut rng, s.y_len(), -1.0, 1.0));
        let (dx0, dw0) = (
            parity::rand(&mut rng, s.x_len(), -1.0, 1.0),
            parity::rand(&mut rng, s.w_len(), -1.0, 1.0),
        );
        let what = format!("{s:?}");
        let (mut y1, mut y2) = (parity::poisoned(&be, s.y_len()), parity::poisoned(&be, s.y_len()));
        be.conv2d_fwd(&s, &x, &w, &b, &mut y1, Act::Relu).unwrap();
        let saved = be.conv2d_fwd_saving(&s, &x, &w, &b, &mut y2, Act::Relu).unwrap();
        assert_eq!(bits(&y1), bits(&y2), "y, {what}");
        assert_eq!(
            (saved.x_bf16.is_some(), saved.wt_tiles.is_some()),
            (kept, kept),
            "what was kept, {what}"
        );
        let (mut dx1, mut dx2) = (up(&dx0), up(&dx0));
        be.conv2d_bwd_input(&s, &dz, &w, &mut dx1).unwrap();
        be.conv2d_bwd_input_saved(&s, &dz, &w, &saved, &mut dx2).unwrap();
        assert_eq!(bits(&dx1), bits(&dx2), "dx, {what}");
        let (mut dw1, mut dw2) = (up(&dw0), up(&dw0));
        be.conv2d_bwd_weight(&s, &x, &dz, &mut dw1).unwrap();
        be.conv2d_bwd_weight_saved(&s, &x, &saved, &dz, &mut dw2, false)
            .unwrap();
        assert_eq!(bits(&dw1), bits(&dw2), "dW, {what}");
        // overwritten: as if added to zeros, whatever dW held
        let (mut dw3, mut dw4) = (up(&vec![0.0; s.w_len()]), up(&vec![f32::NAN; s.w_len()]));
        be.conv2d_bwd_weight(&s, &x, &dz, &mut dw3).unwrap();
        be.conv2d_bwd_weight_saved(&s, &x, &saved, &dz, &mut dw4, true).unwrap();
        assert_eq!(bits(&dw3), bits(&dw4), "dW overwritten, {what}");
        let moved = |a: &[f32], a0: &[f32]| a.iter().zip(a0).filter(|(p, q)| p != q).count();
        assert!(
            moved(&dx1, &dx0) > s.x_len() / 2 && moved(&dw1, &dw0) > s.w_len() / 2,
            "the gradients hardly moved, {what}: the test proves nothing"
        );
    }
}

/// The first layer's gradients in one op refuse buffers of the wrong length with an error naming
/// the op and the buffer (before any kernel runs), on the AVX-512 path and the default's.
#[test]
fn fast_cpu_first_layer_gradients_refuse_a_wrong_length() {
    use capsnet::ops::Act;
    use capsnet::ops::conv::{ConvOps, ConvShape};
    let be = FastCpu::new();
    for out_c in [64, 48] {
        let s = ConvShape {
            batch: 2,
            in_h: 9,
            in_w: 9,
            in_c: 1,
            out_c,
            k: 3,
            stride: 1,
        };
        let (x, y, dy) = (
            be.zeros(s.x_len()).unwrap(),
            be.zeros(s.y_len() - 1).unwrap(),
            be.zeros(s.y_len()).unwrap(),
        );
        let (mut dw, mut db) = (be.zeros(s.w_len()).unwrap(), be.zeros(out_c).unwrap());
        let e = be
            .conv2d_bwd_params(&s, Act::Relu, &x, &y, &dy, &mut dw, Some(&mut db))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{}", s.y_len() - 1)), "{out_c} channels: {e}");
        if out_c == 64 {
            assert!(e.contains("conv2d_bwd_params") && e.contains("y"), "{e}");
        }
    }
}

/// A dense layer's weight gradient written (`dense_bwd_weight_into` with `write`: the GEMM's β = 0,
/// dw neither zeroed nor read) over NaNs equals the one added onto zeros, bit for bit, and without
/// `write` it is `dense_bwd_weight`'s: the decoder's three shapes at batch 5 and an odd one, in fp32
/// and, where the CPU runs a bf16 GEMM, in bf16.
#[test]
fn fast_cpu_dense_weight_gradient_written_equals_added_onto_zeros() {
    use capsnet::backend::bf16::Bf16Gemm;
    use capsnet::float::Precision;
    use capsnet::ops::dense::{DenseOps, DenseShape};
    let mut precisions = vec![Precision::Fp32];
    if Bf16Gemm::ALL.into_iter().any(|k| k.supported()) {
        precisions.push(Precision::Bf16);
    }
    let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut rng = Lcg(61);
    for p in precisions {
        let be = FastCpu::with_precision(p).unwrap();
        for (rows, inp, out) in [(5, 160, 512), (5, 512, 1024), (5, 1024, 784), (7, 37, 45)] {
            let s = DenseShape { rows, inp, out };
            let x = parity::up(&be, &parity::rand(&mut rng, rows * inp, -1.0, 1.0));
            let dz = parity::up(&be, &parity::rand(&mut rng, rows * out, -1.0, 1.0));
            let dw0 = parity::rand(&mut rng, inp * out, -1.0, 1.0);
            let mut written = parity::poisoned(&be, inp * out);
            be.dense_bwd_weight_into(&s, &x, &dz, &mut written, true).unwrap();
            let mut onto_zeros = be.zeros(inp * out).unwrap();
            be.dense_bwd_weight(&s, &x, &dz, &mut onto_zeros).unwrap();
            assert_eq!(bits(&written), bits(&onto_zeros), "written, {s:?}, {p:?}");
            assert!(
                written.iter().all(|v| v.is_finite()) && written.iter().any(|&v| v != 0.0),
                "{s:?}, {p:?}"
            );
            let (mut added, mut want) = (parity::up(&be, &dw0), parity::up(&be, &dw0));
            be.dense_bwd_weight_into(&s, &x, &dz, &mut added, false).unwrap();
            be.dense_bwd_weight(&s, &x, &dz, &mut want).unwrap();
            assert_eq!(bits(&added), bits(&want), "added, {s:?}, {p:?}");
            assert_ne!(
                bits(&added),
                bits(&written),
                "added equals written, {s:?}, {p:?}: nothing was added"
            );
        }
    }
}

/// The convolutions through the Fourier transform (bf16 spectra, f32 sums) against the f64
/// reference, each output's relative error (the norm of the difference over the reference's) next
/// to the direct bf16 path's on the same inputs: within 1.5 times it and below 1%, for the forward
/// (ReLU and none, from the plain op and the one that keeps spectra), the input gradient (added
/// onto random values) and the weight gradient (added, and overwritten over NaNs), at the primary
/// capsules' shape with fewer channels, at stride 1, and on an image of odd height and width.
#[test]
fn fourier_convolutions_are_as_close_to_the_reference_as_direct_bf16() {
    use capsnet::backend::bf16::Bf16Gemm;
    use capsnet::ops::Act;
    use capsnet::ops::conv::{ConvOps, ConvShape};
    // in fp32 the Fourier path is refused in words, wherever this runs
    let e = FastCpu::new().with_fourier(true).unwrap_err().to_string();
    assert!(
        e.contains("CAPSNET_CONV=fourier") && e.contains("--precision bf16"),
        "{e}"
    );
    if !Bf16Gemm::Avx512Bf16.supported() {
        // without AVX512_BF16 it is refused too (where another bf16 kernel runs), and the rest
        // cannot run here
        if let Some(k) = Bf16Gemm::ALL.into_iter().find(|k| k.supported()) {
            let e = FastCpu::with_bf16_gemm(k).with_fourier(true).unwrap_err().to_string();
            assert!(e.contains("AVX512_BF16"), "{e}");
        }
        eprintln!("no AVX512_BF16 on this CPU: the Fourier convolutions were refused as they should be");
        return;
    }
    let fourier = FastCpu::with_bf16_gemm(Bf16Gemm::Avx512Bf16)
        .with_fourier(true)
        .unwrap();
    let direct = FastCpu::with_bf16_gemm(Bf16Gemm::Avx512Bf16)
        .with_fourier(false)
        .unwrap();
    let reference = parity::Cpu::new();
    let mut rng = Lcg(73);
    for (batch, (h, w), in_c, out_c, k, stride) in [
        (17, (20, 20), 32, 64, 9, 2),
        (16, (12, 12), 64, 32, 7, 1),
        (18, (13, 11), 32, 32, 6, 1),
    ] {
        let s = ConvShape {
            batch,
            in_h: h,
            in_w: w,
            in_c,
            out_c,
            k,
            stride,
        };
        let x = parity::rand(&mut rng, s.x_len(), 0.0, 1.0);
        let wt = parity::rand(&mut rng, s.w_len(), -0.1, 0.1);
        let b = parity::rand(&mut rng, out_c, -0.1, 0.1);
        let dz = parity::rand(&mut rng, s.y_len(), -1.0, 1.0);
        let dx0 = parity::rand(&mut rng, s.x_len(), -1.0, 1.0);
        let dw0 = parity::rand(&mut rng, s.w_len(), -1.0, 1.0);
        let err = |got: &[f64], want: &[f64], base: &[f64]| {
            let d: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
            let n: f64 = want.iter().zip(base).map(|(w, b)| (w - b).powi(2)).sum();
            (d / n).sqrt()
        };
        macro_rules! run {
            ($be:expr, $saving:expr) => {{
                let be = $be;
                let (xb, wb, bb, dzb) = (
                    parity::up(be, &x),
                    parity::up(be, &wt),
                    parity::up(be, &b),
                    parity::up(be, &dz),
                );
                let mut ys = vec![];
                for act in [Act::Relu, Act::None] {
                    let mut y = parity::poisoned(be, s.y_len());
                    be.conv2d_fwd(&s, &xb, &wb, &bb, &mut y, act).unwrap();
                    ys.push(parity::down(be, &y));
                }
                let mut y = parity::poisoned(be, s.y_len());
                let saved = if $saving {
                    be.conv2d_fwd_saving(&s, &xb, &wb, &bb, &mut y, Act::Relu)
                        .unwrap()
                } else {
                    be.conv2d_fwd(&s, &xb, &wb, &bb, &mut y, Act::Relu).unwrap();
                    capsnet::ops::conv::ConvSaved::none()
                };
                ys.push(parity::down(be, &y));
                let mut dx = parity::up(be, &dx0);
                be.conv2d_bwd_input_saved(&s, &dzb, &wb, &saved, &mut dx).unwrap();
                let mut dw = parity::up(be, &dw0);
                be.conv2d_bwd_weight_saved(&s, &xb, &saved, &dzb, &mut dw, false)
                    .unwrap();
                let mut dw_new = parity::poisoned(be, s.w_len());
                be.conv2d_bwd_weight_saved(&s, &xb, &saved, &dzb, &mut dw_new, true)
                    .unwrap();
                (
                    ys,
                    parity::down(be, &dx),
                    parity::down(be, &dw),
                    parity::down(be, &dw_new),
                )
            }};
        }
        let want = run!(&reference, false);
        let zeros = |n: usize| vec![0.0; n];
        let (dx0d, dw0d): (Vec<f64>, Vec<f64>) = (
            dx0.iter().map(|&v| v as f64).collect(),
            dw0.iter().map(|&v| v as f64).collect(),
        );
        for saving in [false, true] {
            let f = run!(&fourier, saving);
            let d = run!(&direct, saving);
            let checks = [
                (
                    "y relu",
                    err(&f.0[0], &want.0[0], &zeros(s.y_len())),
                    err(&d.0[0], &want.0[0], &zeros(s.y_len())),
                ),
                (
                    "y",
                    err(&f.0[1], &want.0[1], &zeros(s.y_len())),
                    err(&d.0[1], &want.0[1], &zeros(s.y_len())),
                ),
                (
                    "y kept",
                    err(&f.0[2], &want.0[2], &zeros(s.y_len())),
                    err(&d.0[2], &want.0[2], &zeros(s.y_len())),
                ),
                ("dx", err(&f.1, &want.1, &dx0d), err(&d.1, &want.1, &dx0d)),
                ("dw added", err(&f.2, &want.2, &dw0d), err(&d.2, &want.2, &dw0d)),
                (
                    "dw",
                    err(&f.3, &want.3, &zeros(s.w_len())),
                    err(&d.3, &want.3, &zeros(s.w_len())),
                ),
            ];
            for (what, fe, de) in checks {
                eprintln!("{s:?} kept {saving} {what}: Fourier {fe:.2e}, direct {de:.2e}");
                assert!(
                    fe <= 1.5 * de && fe < 1e-2,
                    "{what}, {s:?}: Fourier {fe:.2e} against direct {de:.2e}"
                );
            }
        }
    }
}
