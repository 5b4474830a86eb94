//! Every CUDA kernel against the CPU reference (the parity suite in tests/common/parity.rs), then
//! whole training steps: GPU against CPU, GPU against itself, and no allocation after the first.
//!
//! They run on the GPU when a CUDA driver is installed, else on the emulated device (see
//! `common::cuda_backend`), so CI runs every one.

mod common;

use capsnet::cuda::CudaBackend;
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
    parity::steps_after_the_first_allocate_nothing(g, CudaBackend::fresh_allocations);
}
