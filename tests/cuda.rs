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

/// Routing version 2 (state in global memory) at the shapes version 1 is tested at.
#[test]
fn cuda_routing_v2_matches_cpu_for_1_2_3_rounds() {
    let Some(g) = gpu() else { return };
    g.set_routing_v2_always(true);
    parity::routing_1_2_3_rounds(&g);
}

/// MultiMNIST's 3,200 primary capsules: version 1 would need 2·3200·10·4 = 256,000 bytes of shared
/// memory per image, more than an H100 (or the emulated device, which reports one) allows, so the
/// backend runs version 2, which matches the CPU.
#[test]
fn cuda_routing_runs_multimnists_3200_capsules() {
    let Some(g) = gpu() else { return };
    let cs = capsnet::model::Config {
        image_side: 36,
        ..capsnet::model::Config::default()
    }
    .caps_shape(2);
    assert_eq!(cs.in_caps, 3200);
    assert!(2 * 3200 * 10 * 4 > g.info().max_smem_optin as usize);
    parity::routing_at(&g, &[cs], &[3]);
}

/// Version 2 recomputes the logits in version 1's order of additions: the same bits.
#[test]
fn cuda_routing_v2_equals_v1_bit_for_bit() {
    use capsnet::backend::Backend;
    let Some(g) = gpu() else { return };
    let cs = capsnet::model::Config::default().caps_shape(2);
    let mut rng = common::Lcg(5);
    let uhat: Vec<f32> = rng.vec(cs.uhat_len(), -0.2, 0.2).iter().map(|&x| x as f32).collect();
    let dv: Vec<f32> = rng.vec(cs.v_len(), -1.0, 1.0).iter().map(|&x| x as f32).collect();
    let run = |v2: bool| -> Vec<f32> {
        g.set_routing_v2_always(v2);
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
    g.set_routing_v2_always(false);
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

#[test]
fn cuda_steps_after_the_first_allocate_nothing() {
    let Some(g) = gpu() else { return };
    parity::steps_after_the_first_allocate_nothing(g, CudaBackend::fresh_allocations);
}
