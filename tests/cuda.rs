//! Every CUDA kernel against the CPU reference (the parity suite in tests/common/parity.rs), then
//! whole training steps: GPU against CPU, GPU against itself, and no allocation after the first.
//!
//! They run on the GPU when a CUDA driver is installed, else on the emulated device (see
//! `common::cuda_backend`), so CI runs every one.

mod common;

use capsnet::cuda::CudaBackend;
use capsnet::prelude::*;
use common::parity;

fn gpu() -> Option<CudaBackend> {
    common::cuda_backend()
}

#[test]
fn cuda_conv2d_matches_cpu() {
    let Some(g) = gpu() else { return };
    parity::conv2d(&g);
}

#[test]
fn cuda_dense_and_elementwise_match_cpu() {
    let Some(g) = gpu() else { return };
    parity::dense_and_elementwise(&g);
}

#[test]
fn cuda_adam_matches_cpu() {
    let Some(g) = gpu() else { return };
    parity::adam(&g);
}

#[test]
fn cuda_capsule_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    parity::capsule_ops(&g);
}

#[test]
fn cuda_resident_batches_equal_the_host_loaders() {
    let Some(g) = gpu() else { return };
    parity::resident_batches(&g);
    parity::planned_steps(&g);
}

#[test]
fn cuda_step_summary_matches_cpu() {
    let Some(g) = gpu() else { return };
    parity::step_summary(&g);
}

#[test]
fn cuda_routing_matches_cpu_for_1_2_3_rounds() {
    let Some(g) = gpu() else { return };
    parity::routing_1_2_3_rounds(&g);
}

/// Routing version 2 (state in global memory) at the shapes version 1 is tested at.
#[test]
fn cuda_routing_v2_matches_cpu_for_1_2_3_rounds() {
    let Some(g) = gpu() else { return };
    g.set_version("routing", "v2").unwrap();
    parity::routing_1_2_3_rounds(&g);
}

/// The fused version (the default): prediction vectors recomputed in shared memory, never stored, at the
/// model's 1152 capsules and at 37, for 1, 2 and 3 rounds.
#[test]
fn cuda_fused_prediction_and_routing_match_cpu_for_1_2_3_rounds() {
    let Some(g) = gpu() else { return };
    assert_eq!(g.kernels().version(capsnet::cuda::registry::ROUTING).label, "fused");
    parity::caps_routing_at(&g, &parity::caps_routing_shapes(), &[1, 2, 3]);
}

/// MultiMNIST's 3,200 primary capsules: version 1 would need 2·3200·10·4 = 256,000 bytes of shared
/// memory per image, more than an H100 (or the emulated device, which reports one) allows, so the
/// backend runs version 2, which matches the CPU; and the fused version, which holds one chunk of
/// capsules per block, matches it too.
#[test]
fn cuda_routing_runs_multimnists_3200_capsules() {
    let Some(g) = gpu() else { return };
    let cs = capsnet::config::Config {
        image_side: 36,
        ..capsnet::config::Config::default()
    }
    .caps_shape(2);
    assert_eq!(cs.in_caps, 3200);
    assert!(2 * 3200 * 10 * 4 > g.info().max_smem_optin as usize);
    parity::routing_at(&g, &[cs], &[3]);
    // the fused version holds a chunk of capsules per block, whatever I is
    parity::caps_routing_at(&g, &[cs], &[3]);
}

/// Version 2 recomputes the logits in version 1's order of additions: the same bits.
#[test]
fn cuda_routing_v2_equals_v1_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let cs = capsnet::config::Config::default().caps_shape(2);
    let mut rng = common::Lcg(5);
    let uhat: Vec<f32> = rng.vec(cs.uhat_len(), -0.2, 0.2).iter().map(|&x| x as f32).collect();
    let dv: Vec<f32> = rng.vec(cs.v_len(), -1.0, 1.0).iter().map(|&x| x as f32).collect();
    let run = |v2: bool| -> Vec<f32> {
        g.set_version("routing", if v2 { "v2" } else { "v1" }).unwrap();
        let u = g.upload(&uhat).unwrap();
        let mut v = g.zeros(cs.v_len()).unwrap();
        let mut saved = g.routing_saved(&cs, 3).unwrap();
        g.routing_fwd(&cs, 3, &u, &mut v, &mut saved).unwrap();
        let mut duh = g.zeros(cs.uhat_len()).unwrap();
        g.routing_bwd(&cs, 3, &u, &saved, &g.upload(&dv).unwrap(), &mut duh)
            .unwrap();
        [v, saved.c, saved.s, saved.v, duh]
            .iter()
            .flat_map(|b| g.download(b).unwrap())
            .collect()
    };
    let (a, b) = (run(false), run(true));
    g.set_kernels(Default::default());
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} values differ between v1 and v2", a.len());
}

#[test]
fn cuda_training_step_matches_cpu_and_is_deterministic() {
    if gpu().is_none() {
        return;
    }
    parity::training_steps_match_reference(|| gpu().expect("the device opened above"));
}

/// Whole training steps with every GEMM in tf32, then in bf16, against the reference that rounds the
/// same GEMM inputs the same way: gradients and losses within the fp32 tolerances, and the losses
/// repeated bit for bit.
#[test]
fn cuda_training_steps_in_tf32_and_bf16_match_the_rounded_reference() {
    use capsnet::cuda::registry::{KernelSet, Precision};
    if gpu().is_none() {
        return;
    }
    for p in [Precision::Tf32, Precision::Bf16] {
        parity::training_steps_match_rounded_reference(
            || {
                let g = gpu().expect("the device opened above");
                g.set_kernels(KernelSet::for_precision(p));
                g
            },
            p,
        );
    }
}

#[test]
fn cuda_steps_after_the_first_allocate_nothing() {
    let Some(g) = gpu() else { return };
    parity::steps_after_the_first_allocate_nothing(g, CudaBackend::fresh_allocations);
}

/// The fused Adam step's table of device pointers is copied to the GPU on the first step only: later
/// steps update the same buffers (the pool hands them out in the same order).
#[test]
fn cuda_adam_table_is_uploaded_once() {
    let Some(g) = gpu() else { return };
    parity::counter_stops_after_the_first_step(g, "uploaded the Adam table", CudaBackend::adam_table_uploads);
}

/// ... and copied again when the buffers change: a second set of tensors of the same sizes (the first
/// set's buffers held, so the pool hands out others) is updated, not the first set through a stale table.
#[test]
fn cuda_adam_table_follows_new_buffers() {
    let Some(g) = gpu() else { return };
    parity::adam(&g);
    let before = g.adam_table_uploads();
    let hold: Vec<_> = [1, 257, 70_001]
        .iter()
        .flat_map(|&n| (0..4).map(move |_| n))
        .map(|n| g.zeros(n).unwrap())
        .collect();
    parity::adam(&g);
    assert!(g.adam_table_uploads() > before, "new buffers, no new table");
    drop(hold);
}

/// Launches of kernel `name` so far on the emulated device (which counts them); `None` on a GPU.
fn launches(name: &str) -> Option<u64> {
    capsnet::cuda::emulator::loaded().map(|_| capsnet::cuda::emulator::launches(name).unwrap())
}

/// Every version of every op in the registry against the CPU reference, one version at a time with
/// the defaults elsewhere; GEMM-shaped ops within the bound their precision allows
/// (capsnet::float::gemm_error_bound). Every version is checked even when one fails, and each gets a
/// line `version-check: OP VERSION PRECISION default|- ok|FAIL`, which the first GPU run reads to go on
/// with the versions that passed (benches/gpu_run.py). `CAPSNET_PARITY_OPS=op,op` checks those ops
/// only (the run's dry run, for time).
#[test]
fn cuda_every_kernel_version_matches_cpu() {
    use capsnet::cuda::registry::{KernelSet, OPS};
    let Some(g) = gpu() else { return };
    let only: Option<Vec<String>> = std::env::var("CAPSNET_PARITY_OPS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let (mut checked, mut failed) = (0, vec![]);
    for (op, ks) in KernelSet::each_version() {
        let version = ks.version(op);
        let name = OPS[op.0].name;
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        let before: Vec<Option<u64>> = version.kernels.iter().map(|k| launches(k.name)).collect();
        let t = std::time::Instant::now();
        g.set_kernels(ks.clone());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(gop) = parity::GemmOp::from_name(name) {
                parity::gemm_op(&g, gop, version.precision.mantissa_bits());
            } else if name == "routing" {
                parity::routing_1_2_3_rounds(&g);
                parity::caps_routing_at(&g, &parity::caps_routing_shapes(), &[1, 2, 3]);
            } else {
                panic!("no parity check for op {name}");
            }
            for (k, n0) in version.kernels.iter().zip(&before) {
                if let (Some(n0), Some(n1)) = (n0, launches(k.name)) {
                    assert!(n1 > *n0, "{name} {}: {} never ran", version.label, k.name);
                }
            }
        }));
        let default = if version.label == OPS[op.0].default {
            "default"
        } else {
            "-"
        };
        let verdict = if outcome.is_ok() { "ok" } else { "FAIL" };
        eprintln!(
            "version-check: {name} {} {} {default} {verdict} ({:.1} s)",
            version.label,
            version.precision.name(),
            t.elapsed().as_secs_f64()
        );
        if outcome.is_err() {
            failed.push(format!("{name} {}", version.label));
        }
        checked += 1;
    }
    g.set_kernels(KernelSet::default());
    assert!(failed.is_empty(), "versions that differ from the reference: {failed:?}");
    match only {
        None => assert_eq!(checked, OPS.iter().map(|o| o.versions.len()).sum::<usize>()),
        Some(o) => assert!(checked > 0, "CAPSNET_PARITY_OPS={o:?} names no op"),
    }
}

/// Adam with a step plan takes lr and the bias corrections from the plan's current row, not from its
/// arguments: a row made at lr 2e-3 updates as the unplanned step at 2e-3 does, bit for bit, though
/// the planned call is given 1e-3.
#[test]
fn cuda_planned_adam_takes_its_values_from_the_plan() {
    use capsnet::ops::{AdamGroup, AdamHyper};
    use capsnet::runtime::{StepRow, plan_words};
    let Some(g) = gpu() else { return };
    let hp = |lr: f64| AdamHyper {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 3,
    };
    let plan = g
        .upload_idx(
            &plan_words(
                0,
                &[StepRow {
                    start: 0,
                    adam: hp(2e-3),
                }],
            )
            .unwrap(),
        )
        .unwrap();
    // parameters, gradients, first moments in [-0.08, 0.08]; second moments in [0, 0.16]
    let init: Vec<Vec<f32>> = (0..4)
        .map(|t| {
            let shift = if t == 3 { 0.0 } else { 0.08 };
            (0..1000).map(|i| ((i * (t + 3)) % 17) as f32 * 0.01 - shift).collect()
        })
        .collect();
    let guard = g.upload(&[0.5]).unwrap();
    let mut out = vec![];
    for planned in [true, false] {
        let mut t: Vec<_> = init.iter().map(|v| g.upload(v).unwrap()).collect();
        let [p, gr, m, v] = &mut t[..] else { unreachable!() };
        let mut groups = [AdamGroup {
            param: p,
            grad: &*gr,
            m,
            v,
        }];
        if planned {
            g.adam_step_planned(&hp(1e-3), &mut groups, &guard, &plan).unwrap();
        } else {
            g.adam_step_if_finite(&hp(2e-3), &mut groups, &guard).unwrap();
        }
        out.push(g.download(&t[0]).unwrap());
    }
    assert!(
        out[0] != init[0] && out[0].iter().all(|x| x.is_finite()),
        "no finite update"
    );
    assert!(
        out[0].iter().zip(&out[1]).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the planned update does not follow the plan's row"
    );
}

/// Held by the tests that count graph launches (a count for the whole process).
static GRAPH_COUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A capture records and runs nothing; each launch of its graph runs every op again on the same
/// buffers; the buffers a capture took are never handed to eager work afterwards (a new one is
/// allocated instead); an allocation inside a capture is refused, naming the cause, and the capture
/// then ends without a graph.
#[test]
fn cuda_captured_ops_run_when_launched_and_keep_their_buffers() {
    let Some(g) = gpu() else { return };
    let _counting = GRAPH_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let a = g.upload(&vec![1.0; 1001]).unwrap();
    let mut o = g.upload(&vec![0.0; 1001]).unwrap();
    drop(g.zeros(7).unwrap()); // pooled, for the capture to take
    g.begin_capture().unwrap();
    g.add_assign(&mut o, &a).unwrap();
    let mut z = g.zeros(7).unwrap();
    g.fill(&mut z, 3.0).unwrap();
    g.add_assign(&mut o, &a).unwrap();
    let id = g.end_capture().unwrap();
    assert!(
        g.download(&o).unwrap().iter().all(|&x| x == 0.0),
        "the capture ran its ops"
    );
    let before = CudaBackend::graph_launches_in_process();
    g.launch_graph(id).unwrap();
    assert!(g.download(&o).unwrap().iter().all(|&x| x == 2.0));
    assert_eq!(g.download(&z).unwrap(), vec![3.0; 7]);
    g.launch_graph(id).unwrap();
    assert!(g.download(&o).unwrap().iter().all(|&x| x == 4.0), "a second launch");
    assert_eq!(CudaBackend::graph_launches_in_process(), before + 2);
    // z is the graph's: dropped, it is not handed out again outside its capture
    drop(z);
    let fresh = g.fresh_allocations();
    let mut other = g.zeros(7).unwrap();
    assert_eq!(
        g.fresh_allocations(),
        fresh + 1,
        "eager work was given the graph's buffer"
    );
    g.fill(&mut other, 5.0).unwrap();
    g.launch_graph(id).unwrap();
    assert_eq!(
        g.download(&other).unwrap(),
        vec![5.0; 7],
        "a replay wrote eager work's buffer"
    );
    // nothing pooled of 13 values: the capture refuses to allocate, and ends without a graph
    g.begin_capture().unwrap();
    let e = g.zeros(13).err().expect("an allocation inside a capture");
    assert!(e.to_string().contains("allocated a new buffer of 13 values"), "{e}");
    g.fill(&mut o, 1.0).unwrap();
    let e = g.end_capture().expect_err("a graph without the refused op");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(g.end_capture().is_err(), "ended twice");
    // the stream runs eagerly again
    g.fill(&mut o, 6.0).unwrap();
    assert!(g.download(&o).unwrap().iter().all(|&x| x == 6.0));
    assert!(g.launch_graph(capsnet::runtime::GraphId(99)).is_err(), "no such graph");
}

/// A graph keeps the Adam table it was captured with: eager Adam on other tensors afterwards (a new
/// table) does not change what a replay updates. The captured tensors end as three eager steps leave
/// copies of them; the other tensors are left as their own step left them.
#[test]
fn cuda_a_graphs_adam_table_survives_eager_updates_of_other_tensors() {
    use capsnet::ops::{AdamGroup, AdamHyper};
    let Some(g) = gpu() else { return };
    let _counting = GRAPH_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let hp = |step| AdamHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step,
    };
    // parameters, gradients, first moments in [-0.1, 0.12]; second moments in [0, 0.22]
    let init: Vec<Vec<f32>> = (0..4)
        .map(|t| {
            let shift = if t == 3 { 0.0 } else { 0.1 };
            (0..300).map(|i| ((i * (t + 5)) % 23) as f32 * 0.01 - shift).collect()
        })
        .collect();
    let set = || init.iter().map(|v| g.upload(v).unwrap()).collect::<Vec<_>>();
    let step = |t: &mut Vec<capsnet::cuda::CudaBuf>, n: u64| {
        let [p, gr, m, v] = &mut t[..] else { unreachable!() };
        g.adam_step(
            &hp(n),
            &mut [AdamGroup {
                param: p,
                grad: &*gr,
                m,
                v,
            }],
        )
        .unwrap();
    };
    let (mut a, mut b, mut want) = (set(), set(), set());
    step(&mut a, 1);
    g.begin_capture().unwrap();
    step(&mut a, 2);
    let id = g.end_capture().unwrap();
    g.launch_graph(id).unwrap();
    step(&mut b, 1); // other tensors: a new table
    let b_after = g.download(&b[0]).unwrap();
    g.launch_graph(id).unwrap();
    for n in [1, 2, 2] {
        step(&mut want, n);
    }
    let (got, want) = (g.download(&a[0]).unwrap(), g.download(&want[0]).unwrap());
    assert!(
        got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
        "the replay did not update the tensors it was captured with"
    );
    assert!(got.iter().chain(&b_after).all(|x| x.is_finite()));
    assert_eq!(g.download(&b[0]).unwrap(), b_after, "the replay updated other tensors");
}

/// Training on the resident set with each step captured as a graph and replayed, against the same
/// run launching every kernel (`eager`), in fp32 and bf16: the same metrics and the same weights and
/// Adam moments, bit for bit, over three epochs whose last batch is smaller (two graphs: its size is
/// captured in the second epoch and replayed in the third). The replays happened. And against the CPU
/// backend, which has no step plan, at a learning rate that decays tenfold every step: the same losses
/// within fp32 rounding, so each step's planned position, shifts, learning rate and bias corrections
/// are the ones the host path uses.
#[test]
fn cuda_captured_training_replays_the_eager_run_bit_for_bit() {
    use capsnet::cuda::registry::{KernelSet, Precision};
    use capsnet::train::{TrainOptions, train};
    if gpu().is_none() {
        return;
    }
    let _counting = GRAPH_COUNT.lock().unwrap_or_else(|e| e.into_inner());
    let run = |eager: bool, p: Option<Precision>| {
        let dir = common::temp_dir(&format!("cuda_graph_{eager}_{}", p.map_or("cpu", |p| p.name())));
        let opts = TrainOptions {
            data_dir: common::mnist_dir(),
            run_dir: dir.clone(),
            config: capsnet::config::Config {
                conv1_channels: 4,
                primary_maps: 2,
                decoder_hidden: [32, 64],
                ..capsnet::config::Config::default()
            },
            epochs: 3,
            run: capsnet::config::RunSettings {
                dataset: capsnet::config::Dataset::Mnist,
                seed: 7,
                batch_size: 20,
                lr: 1e-2,
                lr_decay: 0.1,
                lr_decay_steps: 1,
                // images shifted by up to 2 pixels: on the device from the epoch's shifts, on the CPU
                // by the host loader
                shift: 2,
                patience: 0,
                limit: Some(50),
                val_limit: Some(20),
            },
            resume: false,
            checkpoint_every: None,
            checkpoint_steps: None,
            eager,
            given: None,
        };
        let before = CudaBackend::graph_launches_in_process();
        let metrics = match p {
            None => train(capsnet::backend::fast::FastCpu::new(), &opts),
            Some(p) => {
                let g = gpu().expect("opened above");
                g.set_kernels(KernelSet::for_precision(p));
                train(g, &opts)
            }
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let launched = CudaBackend::graph_launches_in_process() - before;
        let ck = capsnet::checkpoint::load(&dir.join("last.safetensors")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let losses: Vec<[f64; 5]> = metrics
            .iter()
            .map(|m| [m.train_loss, m.train_margin, m.train_recon, m.val_loss, m.train_acc])
            .collect();
        (losses, [ck.params, ck.adam_m, ck.adam_v].concat(), launched)
    };
    for p in [Precision::Fp32, Precision::Bf16] {
        let (graph, eager) = (run(false, Some(p)), run(true, Some(p)));
        // 3 steps per epoch (20, 20, 10): epoch 1 launches the 20s' graph once (the step it was
        // captured on), epoch 2 twice more and the 10s' once, epoch 3 each as often again
        assert_eq!((graph.2, eager.2), (7, 0), "{}: graph launches", p.name());
        for (k, (a, b)) in graph.0.iter().zip(&eager.0).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}: epoch {k}: {a:?} replayed, {b:?} eager",
                p.name()
            );
        }
        assert_eq!(graph.0.len(), 3);
        if p == Precision::Fp32 {
            let cpu = run(false, None);
            for (k, (a, b)) in graph.0.iter().zip(&cpu.0).enumerate() {
                for (x, y) in a.iter().zip(b).take(4) {
                    assert!(
                        (x - y).abs() <= 2e-5 * y.abs(),
                        "epoch {k}: {a:?} replayed, {b:?} on the CPU"
                    );
                }
            }
        }
        let differ = graph
            .1
            .iter()
            .flatten()
            .zip(eager.1.iter().flatten())
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "{}: {differ} weights or moments differ", p.name());
    }
}
