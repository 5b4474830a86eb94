//! The emulated CUDA device itself (src/cuda/emulator.rs, kernels/emulator/): its thread model against
//! CUDA's semantics, the misuses it must stop, the launch checks of the real driver, and the race and
//! out-of-bounds checks over every kernel of the model:
//! - every kernel gives the same bits with each block's threads run in order and in reverse between
//!   barriers, and only finite outputs;
//! - the same run under AddressSanitizer and under ThreadSanitizer (a child process with the
//!   sanitizer's runtime preloaded) reports nothing, while a planted out-of-bounds read and a planted
//!   race are reported.
//!
//! These tests are about the emulator, so with CAPSNET_REQUIRE_GPU=1 (a real GPU under test) they
//! print SKIPPED.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use capsnet::cuda::{CudaBackend, emulator, registry};
use capsnet::model::{CapsNet, init_params};
use capsnet::ops::Adam;
use capsnet::prelude::*;
use capsnet::tape::Tape;
use common::{Lcg, small_config};
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

/// Held by the tests that set the schedule, which is one setting for the whole process.
static SCHEDULE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn emulated() -> Option<CudaBackend> {
    if std::env::var_os("CAPSNET_REQUIRE_GPU").is_some() {
        let _ = writeln!(std::io::stderr(), "SKIPPED: emulator tests (CAPSNET_REQUIRE_GPU=1)");
        return None;
    }
    let be = common::cuda_backend()?;
    assert!(
        emulator::loaded().is_some(),
        "these tests need the emulated device, not a GPU"
    );
    Some(be)
}

fn selftest(be: &CudaBackend) -> Arc<CudaModule> {
    common::emulator_module(be, "selftest.cu")
}

fn func(m: &Arc<CudaModule>, name: &str) -> CudaFunction {
    m.load_function(name).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

#[test]
fn warp_collectives_follow_cuda_semantics() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let mut rng = Lcg(3);
    let input: Vec<f32> = (0..64).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let x = s.clone_htod(&input).unwrap();
    let mut out = s.alloc_zeros::<f32>(64 * 8).unwrap();
    let mut votes = s.alloc_zeros::<u32>(64 * 3).unwrap();
    let f = func(&m, "emu_test_warp");
    let mut b = s.launch_builder(&f);
    b.arg(&x).arg(&mut out).arg(&mut votes);
    // SAFETY: emu_test_warp(const float* in [64], float* out [64·8], unsigned* votes [64·3]), 64 threads.
    unsafe { b.launch(cfg((1, 1, 1), 64, 0)) }.unwrap();
    let (out, votes) = (s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&votes).unwrap());
    for t in 0..64usize {
        let (lane, base) = (t % 32, t - t % 32);
        let v = |l: usize| input[base + l];
        // the source lane of each shuffle, or the caller's own value where the source is outside its segment
        let seg = |l: usize, w: usize, src: isize| {
            let lo = (l / w * w) as isize;
            if src >= lo && src < lo + w as isize {
                v(src as usize)
            } else {
                v(l)
            }
        };
        let want = [
            v((lane * 7 + 3) % 32),
            seg(lane, 32, lane as isize - 3),
            seg(lane, 32, lane as isize + 5),
            v(lane ^ 9),
            seg(lane, 8, (lane ^ 1) as isize),
            seg(lane, 16, lane as isize + 2),
            if lane < 16 { v(15 - lane) } else { -1.0 },
            (base + 31) as f32 * 2.0,
        ];
        assert_eq!(&out[t * 8..t * 8 + 8], &want, "thread {t}: shuffles");
        let ballot = (0..32).filter(|&l| v(l) > 0.0).fold(0u32, |a, l| a | 1 << l);
        let any = (0..32).any(|l| v(l) > 0.9) as u32;
        assert_eq!(&votes[t * 3..t * 3 + 3], &[ballot, any, 1], "thread {t}: votes");
    }
}

#[test]
fn barriers_and_dynamic_shared_memory() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let (blocks, threads) = (3usize, 128usize);
    let input: Vec<f32> = (0..blocks * threads).map(|i| (i % 17) as f32 * 0.25).collect();
    let x = s.clone_htod(&input).unwrap();
    let mut out = s.alloc_zeros::<f32>(blocks).unwrap();
    let f = func(&m, "emu_test_block_sum");
    let mut b = s.launch_builder(&f);
    b.arg(&x).arg(&mut out);
    // SAFETY: emu_test_block_sum(in [blocks·threads], out [blocks]), threads floats of shared memory.
    unsafe { b.launch(cfg((blocks as u32, 1, 1), threads as u32, 4 * threads as u32)) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    for (blk, g) in got.iter().enumerate() {
        let want: f32 = input[blk * threads..(blk + 1) * threads].iter().sum();
        assert_eq!(*g, want, "block {blk}");
    }
    // dynamic shared memory is NaN at the start of every block, in every byte the launch asked for
    let n = 1000;
    let mut out = s.alloc_zeros::<f32>(2 * n).unwrap();
    let f = func(&m, "emu_test_smem_copy");
    let ni = n as i32;
    let mut b = s.launch_builder(&f);
    b.arg(&mut out).arg(&ni);
    // SAFETY: emu_test_smem_copy(out [2·n], int n), n floats of shared memory per block.
    unsafe { b.launch(cfg((2, 1, 1), 96, 4 * n as u32)) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    assert!(got.iter().all(|x| x.is_nan()), "shared memory not NaN-filled");
}

/// Launches `name(float* out)` on one block of 32 threads and returns the error text.
fn misuse(be: &CudaBackend, m: &Arc<CudaModule>, name: &str) -> String {
    let s = be.stream();
    let mut out = s.alloc_zeros::<f32>(32).unwrap();
    let f = func(m, name);
    let mut b = s.launch_builder(&f);
    b.arg(&mut out);
    // SAFETY: name(float* out [32]), one block of 32 threads.
    let r = unsafe { b.launch(cfg((1, 1, 1), 32, 0)) };
    format!("{:?}", r.expect_err(name))
}

#[test]
fn misuse_stops_the_launch_naming_file_line_block_and_thread() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let e = misuse(&be, &m, "emu_test_divergent_barrier");
    for needle in [
        "CUDA_ERROR_LAUNCH_FAILED",
        "emu_test_divergent_barrier",
        "block (0,0,0)",
        "thread (16,0,0)",
    ] {
        assert!(e.contains(needle), "lacks {needle:?}: {e}");
    }
    // the two barriers are on different lines of selftest.cu, both named
    let lines: Vec<&str> = e.matches("selftest.cu:").collect();
    assert_eq!(lines.len(), 2, "{e}");
    let e = misuse(&be, &m, "emu_test_exited_lane");
    assert!(
        e.contains("names lane 16, which has exited") && e.contains("selftest.cu:"),
        "{e}"
    );
    let e = misuse(&be, &m, "emu_test_deadlock");
    assert!(
        e.contains("deadlock") && e.contains("__syncthreads") && e.contains("warp collective"),
        "{e}"
    );
    // writes past the end: of a device allocation, of the dynamic shared memory
    let s = be.stream();
    let n = 100i32;
    let mut out = s.alloc_zeros::<f32>(n as usize).unwrap();
    let f = func(&m, "emu_test_oob_write");
    let mut b = s.launch_builder(&f);
    b.arg(&mut out).arg(&n);
    // SAFETY: deliberately writes out[n], into the emulator's redzone after the allocation.
    let e = format!("{:?}", unsafe { b.launch(cfg((1, 1, 1), 128, 0)) }.unwrap_err());
    assert!(
        e.contains("emu_test_oob_write wrote past the end of a device allocation of 400 bytes (at byte 400)"),
        "{e}"
    );
    let f = func(&m, "emu_test_smem_oob_write");
    let mut b = s.launch_builder(&f);
    b.arg(&mut out).arg(&n);
    // SAFETY: deliberately writes s[n] past n floats of dynamic shared memory, into the redzone.
    let e = format!(
        "{:?}",
        unsafe { b.launch(cfg((1, 1, 1), 32, 4 * n as u32)) }.unwrap_err()
    );
    assert!(
        e.contains("wrote past the end of its 400 bytes of dynamic shared memory (at byte 400)"),
        "{e}"
    );
    // the device is still usable afterwards
    let sum = func(&m, "emu_test_block_sum");
    let x = s.clone_htod(&[1.0f32; 32]).unwrap();
    let mut out = s.alloc_zeros::<f32>(1).unwrap();
    let mut b = s.launch_builder(&sum);
    b.arg(&x).arg(&mut out);
    // SAFETY: emu_test_block_sum(in [32], out [1]), 32 floats of shared memory.
    unsafe { b.launch(cfg((1, 1, 1), 32, 128)) }.unwrap();
    assert_eq!(s.clone_dtoh(&out).unwrap(), vec![32.0]);
}

#[test]
fn launches_are_checked_as_the_driver_checks_them() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let mut out = s.alloc_zeros::<f32>(4096).unwrap();
    let n = 16i32;
    let try_launch = |f: &CudaFunction, c: LaunchConfig, out: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = s.launch_builder(f);
        b.arg(out).arg(&n);
        // SAFETY: emu_test_smem_copy(out [4096], int n = 16): writes at most grid·16 floats.
        unsafe { b.launch(c) }.map(|_| ()).map_err(|e| format!("{e:?}"))
    };
    let copy = func(&m, "emu_test_smem_copy");
    let e = try_launch(&copy, cfg((1, 1, 1), 1025, 64), &mut out).unwrap_err();
    assert!(e.contains("exceeds 1024 threads"), "{e}");
    let e = try_launch(
        &copy,
        LaunchConfig {
            grid_dim: (1, 65536, 1),
            ..cfg((1, 1, 1), 32, 64)
        },
        &mut out,
    )
    .unwrap_err();
    assert!(e.contains("grid"), "{e}");
    // 48 KiB of dynamic shared memory without the opt-in attribute; more needs it
    try_launch(&copy, cfg((1, 1, 1), 32, 48 * 1024), &mut out).unwrap();
    let e = try_launch(&copy, cfg((1, 1, 1), 32, 48 * 1024 + 4), &mut out).unwrap_err();
    assert!(
        e.contains("49156 bytes of dynamic shared memory exceed its limit of 49152"),
        "{e}"
    );
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN;
    copy.set_attribute(MAX_DYN, 100 * 1024).unwrap();
    try_launch(&copy, cfg((1, 1, 1), 32, 100 * 1024), &mut out).unwrap();
    try_launch(&copy, cfg((1, 1, 1), 32, 100 * 1024 + 4), &mut out).unwrap_err();
    let e = format!("{:?}", copy.set_attribute(MAX_DYN, 227 * 1024 + 4).unwrap_err());
    assert!(e.contains("opt-in limit"), "{e}");
    // __launch_bounds__(64) is a limit too (the PTX's .maxntid)
    let bounded = func(&m, "emu_test_bounded");
    let mut b = s.launch_builder(&bounded);
    b.arg(&mut out);
    // SAFETY: emu_test_bounded(out [4096]) writes out[threadIdx.x].
    unsafe { b.launch(cfg((1, 1, 1), 64, 0)) }.unwrap();
    let mut b = s.launch_builder(&bounded);
    b.arg(&mut out);
    // SAFETY: as above; refused before it runs.
    let e = format!("{:?}", unsafe { b.launch(cfg((1, 1, 1), 65, 0)) }.unwrap_err());
    assert!(e.contains("__launch_bounds__"), "{e}");
}

#[test]
fn the_device_says_it_is_emulated_and_reports_h100_limits() {
    let Some(be) = emulated() else { return };
    let i = be.info();
    assert!(i.name.contains("emulated"), "{}", i.name);
    assert_eq!(
        (i.compute_capability, i.sms, i.max_smem_optin),
        ((9, 0), 132, 227 * 1024)
    );
    assert!(be.name().contains("emulated"), "{}", be.name());
}

/// Runs the racy tree sum in order and reversed; returns both results.
fn racy_sums(be: &CudaBackend, m: &Arc<CudaModule>) -> (Vec<f32>, Vec<f32>) {
    let s = be.stream();
    let f = func(m, "emu_test_block_sum_racy");
    let x = s.clone_htod(&(0..256).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let run = |reversed: bool| {
        emulator::set_reversed_schedule(reversed).unwrap();
        let mut out = s.alloc_zeros::<f32>(2).unwrap();
        let mut b = s.launch_builder(&f);
        b.arg(&x).arg(&mut out);
        // SAFETY: emu_test_block_sum_racy(in [256], out [2]), 2 blocks of 128 threads, 128 floats shared.
        unsafe { b.launch(cfg((2, 1, 1), 128, 512)) }.unwrap();
        s.clone_dtoh(&out).unwrap()
    };
    let r = (run(false), run(true));
    emulator::set_reversed_schedule(false).unwrap();
    r
}

#[test]
fn a_missing_barrier_shows_in_the_schedules_or_as_nan() {
    let Some(be) = emulated() else { return };
    let _schedule = SCHEDULE.lock().unwrap_or_else(|e| e.into_inner());
    let m = selftest(&be);
    let (fwd, rev) = racy_sums(&be, &m);
    let bad = fwd != rev || fwd.iter().chain(&rev).any(|x| !x.is_finite());
    assert!(bad, "the race went unseen: {fwd:?} {rev:?}");
}

/// Two training steps and an evaluation forward of a small model: every output, bit for bit.
fn step_outputs(be: CudaBackend) -> Vec<f32> {
    passes_outputs(be, &[true, true, false])
}

/// The outputs of forward passes of a small model, each followed (when `true`) by a backward pass and
/// an Adam step.
fn passes_outputs(be: CudaBackend, passes: &[bool]) -> Vec<f32> {
    let cfg = small_config();
    let mut rng = Lcg(5);
    let batch = 5;
    let images: Vec<f32> = rng.vec(batch * 784, 0.0, 1.0).iter().map(|&x| x as f32).collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 3) % 10).collect();
    let mut t = Tape::new(be);
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 3)).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let mut out = vec![];
    for &train in passes {
        t.reset();
        let f = model.forward(&mut t, &images, &labels, train).unwrap();
        out.extend(t.backend().download(&t.value(f.recon).buf).unwrap());
        out.extend(t.backend().download(&t.value(f.lengths).buf).unwrap());
        out.extend(t.backend().download_idx(&f.pred).unwrap().iter().map(|&p| p as f32));
        out.extend(t.backend().download(&t.value(f.loss).buf).unwrap());
        if train {
            t.backward(f.loss).unwrap();
            for p in model.params.all() {
                out.extend(t.backend().download(t.grad(p).unwrap()).unwrap());
            }
            // as the training loop runs it: the step's report, then the update guarded by its loss
            let mut summary = t.backend().alloc_out(5).unwrap();
            let losses = [&t.value(f.loss).buf, &t.value(f.margin).buf, &t.value(f.recon_loss).buf];
            let lengths = &t.value(f.lengths).buf;
            t.backend()
                .step_summary(batch, cfg.classes, 1, losses, lengths, &f.labels, &mut summary)
                .unwrap();
            out.extend(t.backend().download(&summary).unwrap());
            adam.update_if_finite(&mut t, &summary).unwrap();
        }
    }
    out
}

/// [`step_outputs`] with the fp32 kernel versions, then the tf32 ones, then the bf16 ones. Under a
/// sanitizer, where each emulated mma.sync costs two fiber switches that ThreadSanitizer makes slow, the
/// tensor-core versions run one training step (every one of their kernels) instead of three passes.
fn steps_in_every_precision() -> Vec<f32> {
    let mut out = vec![];
    for p in registry::Precision::ALL {
        let be = common::cuda_backend().unwrap();
        be.set_kernels(registry::KernelSet::for_precision(p));
        let short = in_child() && p != registry::Precision::Fp32;
        out.extend(if short {
            passes_outputs(be, &[true])
        } else {
            step_outputs(be)
        });
    }
    out
}

#[test]
fn every_kernel_gives_the_same_bits_in_order_and_reversed() {
    let Some(be) = emulated() else { return };
    let _schedule = SCHEDULE.lock().unwrap_or_else(|e| e.into_inner());
    // the ops no training step calls, on odd sizes
    let mut extra = vec![];
    for (n, reversed) in [(1001usize, false), (1001, true)] {
        emulator::set_reversed_schedule(reversed).unwrap();
        let a = be.upload(&(0..n).map(|i| i as f32 * 0.5).collect::<Vec<_>>()).unwrap();
        let mut o = be.zeros(n).unwrap();
        be.add_fwd(&a, &a, &mut o).unwrap();
        be.add_assign(&mut o, &a).unwrap();
        be.fill(&mut o, 0.25).unwrap();
        // a batch gathered from a resident data set (7 images of 5 bytes; training runs it on MNIST)
        let bytes: Vec<u8> = (0..35u8).map(|i| i.wrapping_mul(37)).collect();
        let images = be.upload_bytes(&bytes).unwrap();
        let labels = be.upload_idx(&[0, 1, 2, 3, 4, 5, 6]).unwrap();
        let order = be.upload_idx(&[6, 2, 0, 5, 1, 3, 4]).unwrap();
        let (mut x, mut y) = (be.alloc_out(4 * 5).unwrap(), be.alloc_idx(4).unwrap());
        let set = capsnet::runtime::ResidentSet {
            pixels: 5,
            images: &images,
            labels: &labels,
            order: &order,
            shifts: None,
        };
        be.gather_batch(&set, 2, 4, &mut x, &mut y).unwrap();
        let gathered = be.download(&x).unwrap();
        let gathered_labels = be.download_idx(&y).unwrap();
        assert_eq!(gathered_labels, [0, 5, 1, 3]);
        // the same batch from a step plan's second row (training gathers this way)
        let hp = capsnet::ops::AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
        };
        let rows = [0, 2].map(|start| capsnet::runtime::StepRow { start, adam: hp });
        let mut plan = be.upload_idx(&capsnet::runtime::plan_words(0, &rows).unwrap()).unwrap();
        be.advance_plan(&mut plan).unwrap();
        be.gather_planned(&set, &plan, 4, &mut x, &mut y).unwrap();
        let planned = be.download(&x).unwrap();
        assert!(
            planned.iter().zip(&gathered).all(|(a, b)| a.to_bits() == b.to_bits()),
            "a planned gather differs"
        );
        // three 3x3 images, each shifted (training shifts with --shift), against the host's gather
        use capsnet::runtime::{ResidentSet, gather_host, pack_bytes, pack_shift};
        let bytes9: Vec<u8> = (1..28u8).map(|i| i.wrapping_mul(29)).collect();
        let shifts3: Vec<u32> = [(1, 0), (0, -1), (-2, 1)].map(pack_shift).to_vec();
        let (images9, labels3, order3, dev_shifts3) = (
            be.upload_bytes(&bytes9).unwrap(),
            be.upload_idx(&[0, 1, 2]).unwrap(),
            be.upload_idx(&[2, 0, 1]).unwrap(),
            be.upload_idx(&shifts3).unwrap(),
        );
        let set9 = ResidentSet {
            pixels: 9,
            images: &images9,
            labels: &labels3,
            order: &order3,
            shifts: Some(&dev_shifts3),
        };
        let (mut x9, mut y9) = (be.alloc_out(27).unwrap(), be.alloc_idx(3).unwrap());
        be.gather_batch(&set9, 0, 3, &mut x9, &mut y9).unwrap();
        let (want9, _) = gather_host(9, &pack_bytes(&bytes9), &[0, 1, 2], &[2, 0, 1], Some(&shifts3), 0, 3).unwrap();
        let shifted = be.download(&x9).unwrap();
        assert_eq!(
            shifted,
            want9.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            "a shifted gather"
        );
        assert_eq!(
            shifted.iter().filter(|&&v| v == 0.0).count(),
            3 + 3 + 7,
            "the uncovered pixels"
        );
        extra.push(
            [be.download(&o).unwrap(), gathered, shifted]
                .concat()
                .into_iter()
                .chain(gathered_labels.iter().map(|&l| l as f32))
                .collect(),
        );
        // the unfused routing versions (prediction kernels, then routing v1 or v2), which the small
        // model's steps (the fused default) do not launch
        let cs = capsnet::ops::CapsShape {
            batch: 2,
            in_caps: 37,
            in_dim: 8,
            out_caps: 7,
            out_dim: 5,
        };
        let wave = |n: usize, k: usize| {
            (0..n)
                .map(|i| ((i * k % 101) as f32 - 50.0) * 0.004)
                .collect::<Vec<_>>()
        };
        let (u, w) = (
            be.upload(&wave(cs.u_len(), 37)).unwrap(),
            be.upload(&wave(cs.w_len(), 53)).unwrap(),
        );
        let mut unfused = vec![];
        for version in ["v1", "v2"] {
            be.set_version("routing", version).unwrap();
            let mut v = be.zeros(cs.v_len()).unwrap();
            let mut saved = be.routing_saved(&cs, 3).unwrap();
            be.caps_routing_fwd(&cs, 3, &u, &w, &mut v, &mut saved).unwrap();
            let (mut du, mut dw) = (be.zeros(cs.u_len()).unwrap(), be.zeros(cs.w_len()).unwrap());
            be.caps_routing_bwd(&cs, 3, &u, &w, &saved, &v, Some(&mut du), Some(&mut dw))
                .unwrap();
            unfused.extend(
                [
                    be.download(&v).unwrap(),
                    be.download(&du).unwrap(),
                    be.download(&dw).unwrap(),
                ]
                .concat(),
            );
        }
        be.set_kernels(Default::default());
        extra.push(unfused);
        // the stride-2 input gradient's version 1, which the default set does not launch
        let s = capsnet::ops::ConvShape {
            batch: 2,
            in_h: 9,
            in_w: 8,
            in_c: 3,
            out_c: 5,
            k: 3,
            stride: 2,
        };
        be.set_version("conv2d_bwd_input", "v1").unwrap();
        let dz = be
            .upload(&(0..s.y_len()).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect::<Vec<_>>())
            .unwrap();
        let w = be
            .upload(&(0..s.w_len()).map(|i| (i % 7) as f32 * 0.05 - 0.15).collect::<Vec<_>>())
            .unwrap();
        let mut dx = be.zeros(s.x_len()).unwrap();
        be.conv2d_bwd_input(&s, &dz, &w, &mut dx).unwrap();
        be.set_kernels(Default::default());
        extra.push(be.download(&dx).unwrap());
    }
    emulator::set_reversed_schedule(false).unwrap();
    drop(be);
    let fwd = steps_in_every_precision();
    assert!(fwd.iter().all(|x| x.is_finite()), "a non-finite output in order");
    // under a sanitizer (a child of the tests below) the sanitizer is the check: one schedule is enough
    if !in_child() {
        emulator::set_reversed_schedule(true).unwrap();
        let rev = steps_in_every_precision();
        emulator::set_reversed_schedule(false).unwrap();
        assert_eq!(extra[0], extra[3], "add and fill differ between schedules");
        assert_eq!(extra[1], extra[4], "unfused routing (v1, v2) differs between schedules");
        assert_eq!(extra[2], extra[5], "conv2d_bwd_input v1 differs between schedules");
        assert_eq!(fwd.len(), rev.len());
        let differ = fwd.iter().zip(&rev).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(
            differ,
            0,
            "{differ} of {} outputs differ between the schedules",
            fwd.len()
        );
    }
    for k in registry::ALL {
        assert!(emulator::launches(k.name).unwrap() > 0, "{} never ran", k.name);
    }
}

// ---- sanitizers: this test executable again, in a child with the sanitizer's runtime preloaded ------

fn sanitized(variant: emulator::Variant, test: &str) -> (bool, String) {
    let runtime = variant
        .runtime()
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a sanitizer variant");
    // build here, so a compile error shows as such
    emulator::build(variant).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("CAPSNET_EMULATOR", variant.name())
        .env("LD_PRELOAD", runtime)
        .env("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0")
        // the test harness is not instrumented: only the emulated kernels are under test
        .env(
            "TSAN_OPTIONS",
            "halt_on_error=1:report_signal_unsafe=0:ignore_noninstrumented_modules=1",
        )
        .env("CAPSNET_EMULATOR_THREADS", "2")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("1 passed"), text)
}

fn in_child() -> bool {
    std::env::var_os("CAPSNET_EMULATOR").is_some_and(|v| v != "plain")
}

/// `variant` reports nothing over every kernel, and reports `planted` (a test here whose kernel has
/// the bug) with `report` naming selftest.cu.
fn sanitizer_check(variant: emulator::Variant, planted: &str, report: &str) {
    if in_child() || emulated().is_none() {
        return;
    }
    let (ok, log) = sanitized(variant, "every_kernel_gives_the_same_bits_in_order_and_reversed");
    assert!(ok && !log.contains("Sanitizer"), "the {variant:?} run failed:\n{log}");
    let (ok, log) = sanitized(variant, planted);
    assert!(
        !ok && log.contains(report) && log.contains("selftest.cu"),
        "the planted bug of {planted} went unreported:\n{log}"
    );
}

#[test]
fn address_sanitizer_finds_nothing_in_any_kernel_and_catches_a_planted_read() {
    sanitizer_check(
        emulator::Variant::Address,
        "out_of_bounds_read",
        "AddressSanitizer: heap-buffer-overflow",
    );
}

#[test]
fn thread_sanitizer_finds_nothing_in_any_kernel_and_catches_a_planted_race() {
    sanitizer_check(
        emulator::Variant::Thread,
        "a_missing_barrier_shows_in_the_schedules_or_as_nan",
        "ThreadSanitizer: data race",
    );
}

/// Reads one float past its input: unseen by the plain emulator (the bytes exist), an error under
/// AddressSanitizer (the test above runs it there).
#[test]
fn out_of_bounds_read() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let n = 100i32;
    let x = s.clone_htod(&(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let mut out = s.alloc_zeros::<f32>(n as usize).unwrap();
    let f = func(&m, "emu_test_oob_read");
    let mut b = s.launch_builder(&f);
    b.arg(&x).arg(&mut out).arg(&n);
    // SAFETY: deliberately reads x[n], one past the end, inside the emulator's own process.
    unsafe { b.launch(cfg((1, 1, 1), 128, 0)) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    assert_eq!(&got[..99], &(1..100).map(|i| i as f32).collect::<Vec<_>>()[..]);
}

/// Stream capture as the driver does it: a capture is active until it ends; a copy from host memory,
/// or a synchronisation, inside it is refused and invalidates it, so it refuses what follows and ends
/// without a graph, saying why; the legacy default stream cannot be captured. (Launches and memsets recorded and replayed:
/// tests/cuda.rs.)
#[test]
fn a_capture_refuses_host_work_and_ends_without_a_graph() {
    use cudarc::driver::sys::CUgraphInstantiate_flags as Flags;
    use cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL as LOCAL;
    use cudarc::driver::sys::CUstreamCaptureStatus as Status;
    let Some(be) = emulated() else { return };
    let s = be.stream();
    let mut buf = s.alloc_zeros::<f32>(4).unwrap();
    s.begin_capture(LOCAL).unwrap();
    assert_eq!(s.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_ACTIVE);
    s.memset_zeros(&mut buf).unwrap();
    let e = format!("{:?}", s.memcpy_htod(&[1.0f32; 4], &mut buf).unwrap_err());
    assert!(e.contains("host copies are not captured"), "{e}");
    assert_eq!(
        s.capture_status().unwrap(),
        Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED
    );
    // an invalidated capture refuses what it would have recorded
    let e = format!("{:?}", s.memset_zeros(&mut buf).unwrap_err());
    assert!(e.contains("CAPTURE_INVALIDATED"), "{e}");
    let e = format!("{:?}", s.end_capture(Flags(0)).err().expect("an invalidated capture"));
    assert!(e.contains("invalidated") && e.contains("cuMemcpyHtoDAsync"), "{e}");
    assert_eq!(s.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_NONE);

    s.begin_capture(LOCAL).unwrap();
    let e = format!("{:?}", s.synchronize().unwrap_err());
    assert!(e.contains("cuStreamSynchronize on a stream being captured"), "{e}");
    assert!(s.end_capture(Flags(0)).is_err());
    // the stream works eagerly again
    s.memcpy_htod(&[2.0f32; 4], &mut buf).unwrap();
    assert_eq!(s.clone_dtoh(&buf).unwrap(), vec![2.0; 4]);

    let legacy = be.context().default_stream();
    let e = format!("{:?}", legacy.begin_capture(LOCAL).unwrap_err());
    assert!(e.contains("legacy NULL stream"), "{e}");
}

// ---- what hardware refuses, refused here too (planted kernels of selftest.cu) --------------------------

/// The register file: a kernel of over 64 registers a thread and no launch bounds runs at 512 threads
/// and is refused at 1024 (more than the 65,536 registers of a block), as the driver refuses it
/// (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); its figures come from the cubin, as the driver's do.
#[test]
fn a_block_needing_more_registers_than_the_multiprocessor_has_is_refused() {
    use cudarc::driver::sys::CUfunction_attribute::*;
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let f = func(&m, "emu_test_many_registers");
    let regs = f.get_attribute(CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap();
    assert!(
        regs > 64,
        "ptxas gave it {regs} registers: the planted kernel no longer needs over 64"
    );
    let most = f.get_attribute(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK).unwrap();
    assert!((512..1024).contains(&most), "at most {most} threads a block");
    let x = s.clone_htod(&vec![0.5f32; 96 * 1024]).unwrap();
    let mut out = s.alloc_zeros::<f32>(1024).unwrap();
    let launch = |threads: u32, out: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = s.launch_builder(&f);
        b.arg(&x).arg(out);
        // SAFETY: emu_test_many_registers(in [96·threads], out [threads]).
        unsafe { b.launch(cfg((1, 1, 1), threads, 0)) }
            .map(|_| ())
            .map_err(|e| capsnet::cuda::describe(&e))
    };
    launch(512, &mut out).unwrap();
    let e = launch(1024, &mut out).unwrap_err();
    assert!(
        e.contains("LAUNCH_OUT_OF_RESOURCES") && e.contains(&format!("1024 threads of {regs} registers")),
        "{e}"
    );
}

/// Static and dynamic shared memory together within the block's 227 KiB: 40 KiB of static leave at most
/// 187 KiB of dynamic, for the opt-in attribute and for the launch.
#[test]
fn static_and_dynamic_shared_memory_together_stay_within_the_blocks_limit() {
    use cudarc::driver::sys::CUfunction_attribute::*;
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let f = func(&m, "emu_test_static_smem");
    let static_smem = f.get_attribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).unwrap();
    assert_eq!(static_smem, 40 * 1024);
    let limit = be.info().max_smem_optin;
    let e = capsnet::cuda::describe(
        &f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit)
            .unwrap_err(),
    );
    assert!(e.contains("40960 bytes of static shared memory"), "{e}");
    f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit - static_smem)
        .unwrap();
    let mut out = s.alloc_zeros::<f32>(64).unwrap();
    let launch = |smem: u32, out: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = s.launch_builder(&f);
        b.arg(out);
        // SAFETY: emu_test_static_smem(out [64]), 64 threads.
        unsafe { b.launch(cfg((1, 1, 1), 64, smem)) }
            .map(|_| ())
            .map_err(|e| capsnet::cuda::describe(&e))
    };
    launch((limit - static_smem) as u32, &mut out).unwrap();
    assert_eq!(s.clone_dtoh(&out).unwrap()[..2], [10239.0, 10238.0]);
    let e = launch((limit - static_smem) as u32 + 4, &mut out).unwrap_err();
    assert!(e.contains("exceed"), "{e}");
}

/// A float4 load four bytes off its 16-byte alignment is a fault, as on a GPU
/// (CUDA_ERROR_MISALIGNED_ADDRESS), named with the kernel, thread and line; aligned, it reads right.
#[test]
fn a_misaligned_vector_access_is_a_fault() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let f = func(&m, "emu_test_vector_load");
    let x = s.clone_htod(&(0..16).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    let mut out = s.alloc_zeros::<f32>(32).unwrap();
    let launch = |offset: i32, out: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = s.launch_builder(&f);
        b.arg(&x).arg(out).arg(&offset);
        // SAFETY: emu_test_vector_load(in [16], out [32], offset ≤ 8): reads in[offset..offset + 4].
        unsafe { b.launch(cfg((1, 1, 1), 32, 0)) }
            .map(|_| ())
            .map_err(|e| capsnet::cuda::describe(&e))
    };
    launch(4, &mut out).unwrap();
    assert_eq!(s.clone_dtoh(&out).unwrap()[0], 4.0 + 5.0 + 6.0 + 7.0);
    let e = launch(1, &mut out).unwrap_err();
    for needle in [
        "CUDA_ERROR_MISALIGNED_ADDRESS",
        "emu_test_vector_load",
        "float4",
        "16-byte alignment",
        "block (0,0,0), thread (",
        "selftest.cu:",
    ] {
        assert!(e.contains(needle), "lacks {needle:?}: {e}");
    }
    // every thread makes the same misaligned load: the one named is whichever ran it first
    let thread = e
        .split("thread (")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|x| x.parse::<u32>().ok());
    assert!(thread.is_some_and(|t| t < 32), "names no thread of the block's 32: {e}");
    // a fault ends the launch, not the device
    launch(8, &mut out).unwrap();
}

/// ldmatrix row addresses: 16-byte aligned and in shared memory. Rows 8 bytes off their alignment,
/// and rows in device memory, are faults; aligned rows in shared memory load as the ISA says.
#[test]
fn ldmatrix_rows_must_be_aligned_and_in_shared_memory() {
    let Some(be) = emulated() else { return };
    let m = selftest(&be);
    let s = be.stream();
    let f = func(&m, "emu_test_ldmatrix");
    let input: Vec<u16> = (0..256).map(|i| i as u16).collect();
    let x = s.clone_htod(&input).unwrap();
    let mut out = s.alloc_zeros::<u32>(128).unwrap();
    let launch = |offset: i32, global: i32, out: &mut cudarc::driver::CudaSlice<u32>| {
        let mut b = s.launch_builder(&f);
        b.arg(&x).arg(out).arg(&offset).arg(&global);
        // SAFETY: emu_test_ldmatrix(in [256 u16], out [128], offset ≤ 16, from_global), one warp.
        unsafe { b.launch(cfg((1, 1, 1), 32, 0)) }
            .map(|_| ())
            .map_err(|e| capsnet::cuda::describe(&e))
    };
    for offset in [0, 16] {
        launch(offset, 0, &mut out).unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        // lane 4r + t, register j: row r of matrix j, columns 2t and 2t + 1
        for lane in 0..32u32 {
            let (r, t) = (lane / 4, lane % 4);
            for j in 0..4u32 {
                let at = (j * 8 + r) * 8 + 2 * t;
                assert_eq!(
                    got[(lane * 4 + j) as usize],
                    at | (at + 1) << 16,
                    "lane {lane} register {j}"
                );
            }
        }
    }
    let e = launch(8, 0, &mut out).unwrap_err();
    assert!(
        e.contains("CUDA_ERROR_MISALIGNED_ADDRESS") && e.contains("not 16-byte aligned") && e.contains("mma.cuh:"),
        "{e}"
    );
    let e = launch(0, 1, &mut out).unwrap_err();
    assert!(e.contains("not in the block's shared memory"), "{e}");
}

/// What the emulated driver reads from each cubin is what ptxas reports (`capsnet info --kernels`):
/// registers and static shared memory of every kernel of the model.
#[test]
fn the_cubins_figures_are_ptxas_own() {
    let Some(be) = emulated() else { return };
    let report = capsnet::cuda::report::kernel_report(
        "sm_90",
        &capsnet::config::Config::default().caps_shape(1).dims(),
        capsnet::config::Config::default().routing_rounds,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let loaded = be.loaded_kernels().unwrap();
    assert_eq!(loaded.len(), report.len());
    for (l, r) in loaded.iter().zip(&report) {
        assert_eq!(l.kernel, r.kernel);
        assert_eq!(
            (l.registers as u32, l.static_smem as u32),
            (r.registers, r.static_smem),
            "{}: (registers, static shared memory) loaded against ptxas's",
            l.kernel.name
        );
        assert!(l.max_threads as u32 >= l.kernel.threads, "{}: {l:?}", l.kernel.name);
    }
}

/// A cubin runs on its own major architecture only: sm_80's is refused by the 9.0 device, as the
/// driver refuses it (CUDA_ERROR_NO_BINARY_FOR_GPU).
#[test]
fn a_cubin_for_another_architecture_is_refused() {
    use capsnet::cuda::compile::{Target, compile_file};
    let Some(be) = emulated() else { return };
    let image = compile_file("adam.cu", Target::Cubin(80)).unwrap_or_else(|e| panic!("{e}"));
    let e = be.context().load_module(image.module()).unwrap_err();
    let e = capsnet::cuda::describe(&e);
    assert!(
        e.contains("CUDA_ERROR_NO_BINARY_FOR_GPU") && e.contains("sm_80") && e.contains("9.0"),
        "{e}"
    );
    let ok = compile_file("adam.cu", Target::Cubin(90)).unwrap();
    be.context().load_module(ok.module()).unwrap();
}

// ---- tensor-core sums that truncate ---------------------------------------------------------------------

/// Every tensor-core version of every GEMM-shaped op against the CPU reference with the emulated `mma`
/// truncating its sums (kernels/mma.cuh, `truncated_sum`): within the same bound as to nearest
/// (capsnet::float::gemm_error_bound, which is derived for both).
#[test]
fn tensor_core_gemms_stay_within_their_bound_when_the_mma_truncates() {
    use capsnet::cuda::registry::{KernelSet, OPS};
    use capsnet::float::Precision;
    use common::parity::{self, GemmOp};
    let Some(be) = emulated() else { return };
    emulator::set_mma_truncation(true).unwrap();
    let mut checked = 0;
    for (op, ks) in KernelSet::each_version() {
        let version = ks.version(op);
        let Some(gop) = GemmOp::from_name(OPS[op.0].name) else {
            continue;
        };
        if version.precision == Precision::Fp32 {
            continue;
        }
        be.set_kernels(ks.clone());
        parity::gemm_op(&be, gop, version.precision.mantissa_bits());
        checked += 1;
    }
    emulator::set_mma_truncation(false).unwrap();
    assert_eq!(checked, 12, "six GEMM-shaped ops, each in tf32 and bf16");
}

/// Why the bound is not the round-to-nearest one: inputs exact in tf32 (no input rounding), all
/// positive, K = 4096 products per output. Summed to nearest, each output is within the probabilistic
/// term √K·2^-22 of Σ|a||b|; truncated, the errors add up past it, and stay within the worst case
/// K·2^-22 (capsnet::float::sum_error_bound).
#[test]
fn truncated_sums_need_the_worst_case_bound() {
    use capsnet::cuda::registry::{KernelSet, Precision};
    use capsnet::float::sum_error_bound;
    use capsnet::ops::{Act, DenseShape};
    use capsnet::prelude::*;
    let Some(be) = emulated() else { return };
    be.set_kernels(KernelSet::for_precision(Precision::Tf32));
    let d = DenseShape {
        rows: 16,
        inp: 4096,
        out: 8,
    };
    let mut rng = Lcg(4096);
    // 1 + m/1024: ten mantissa bits, exact in tf32
    let mut exact = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| 1.0 + rng.uniform(0.0, 1024.0).floor() as f32 / 1024.0)
            .collect()
    };
    let (x, w) = (exact(d.rows * d.inp), exact(d.inp * d.out));
    let want: Vec<f64> = (0..d.rows * d.out)
        .map(|e| {
            (0..d.inp)
                .map(|k| x[e / d.out * d.inp + k] as f64 * w[k * d.out + e % d.out] as f64)
                .sum()
        })
        .collect();
    let worst = |truncates: bool| -> f64 {
        emulator::set_mma_truncation(truncates).unwrap();
        let (xb, wb, bb) = (
            be.upload(&x).unwrap(),
            be.upload(&w).unwrap(),
            be.upload(&vec![0f32; d.out]).unwrap(),
        );
        let mut y = be.zeros(d.rows * d.out).unwrap();
        be.dense_fwd(&d, &xb, &wb, &bb, &mut y, Act::None).unwrap();
        let got = be.download(&y).unwrap();
        emulator::set_mma_truncation(false).unwrap();
        // every term is positive: Σ|a||b| is the sum itself
        got.iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs() / w)
            .fold(0.0, f64::max)
    };
    let probabilistic = (d.inp as f64).sqrt() * 2f64.powi(-22);
    let (nearest, truncated) = (worst(false), worst(true));
    assert!(
        nearest <= probabilistic,
        "to nearest: {nearest:e} of the sum, above {probabilistic:e}"
    );
    assert!(
        truncated > probabilistic && truncated <= sum_error_bound(Precision::Tf32, d.inp),
        "truncated: {truncated:e} of the sum; the probabilistic term {probabilistic:e}, the bound {:e}",
        sum_error_bound(Precision::Tf32, d.inp)
    );
    eprintln!(
        "K = 4096, exact positive tf32 inputs: worst error {nearest:.2e} of the sum to nearest, {truncated:.2e} truncated"
    );
}
