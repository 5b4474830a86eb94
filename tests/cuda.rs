//! Every CUDA kernel against the CPU reference (the parity suite in tests/common/parity.rs), then
//! whole training steps: GPU against CPU, GPU against itself, and no allocation after the first.
//!
//! They run on the GPU when a CUDA driver is installed, else on the emulated device (see
//! `common::cuda_backend`), so CI runs every one.

mod common;

use capsnet::adam::Adam;
use capsnet::backend::Backend;
use capsnet::cuda::CudaBackend;
use capsnet::model::{CapsNet, init_params};
use capsnet::tape::Tape;
use common::{parity, small_config};

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
fn cuda_routing_matches_cpu_for_1_2_3_rounds() {
    let Some(g) = gpu() else { return };
    parity::routing_1_2_3_rounds(&g);
}

#[test]
fn cuda_training_step_matches_cpu_and_is_deterministic() {
    if gpu().is_none() {
        return;
    }
    parity::training_steps_match_reference(|| gpu().expect("the device opened above"));
}

#[test]
fn cuda_steps_after_the_first_allocate_nothing() {
    let Some(g) = gpu() else { return };
    let cfg = small_config();
    let images = vec![0.5f32; 4 * 784];
    let labels = vec![1u32, 2, 3, 4];
    let mut t = Tape::new(g);
    let model = CapsNet::new(cfg.clone(), &mut t, &init_params(&cfg, 1)).unwrap();
    let mut adam = Adam::new(&t, 1e-3).unwrap();
    let mut fresh = vec![];
    for _ in 0..3 {
        t.reset();
        let f = model.forward(&mut t, &images, &labels, true).unwrap();
        t.backward(f.loss).unwrap();
        adam.update(&mut t).unwrap();
        let _ = t.backend().download(&t.value(f.loss).buf).unwrap();
        fresh.push(t.backend().fresh_allocations());
    }
    assert!(fresh[0] > 0);
    assert_eq!(fresh[1], fresh[2], "the third step allocated device memory: {fresh:?}");
    assert_eq!(fresh[0], fresh[1], "the second step allocated device memory: {fresh:?}");
}
