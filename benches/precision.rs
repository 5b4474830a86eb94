//! Does the model learn as well with tf32 or bf16 GEMMs as with fp32? The same short training run
//! three times on the CPU reference that rounds every GEMM input as the GPU's tensor-core versions do
//! (CpuBackend::with_gemm_inputs, which tests/cuda.rs holds the GPU kernels to), from the same
//! initialisation and batches; prints each run's losses and validation accuracy.
//!
//!     CAPSNET_DATA=../shared/data/mnist cargo bench --bench precision [-- IMAGES [VAL_IMAGES]]

use capsnet::backend::cpu::CpuBackend;
use capsnet::config::Config;
use capsnet::float::Precision;
use capsnet::train::{TrainOptions, train};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (images, val) = (
        args.first().copied().unwrap_or(3200),
        args.get(1).copied().unwrap_or(1000),
    );
    let data_dir = std::env::var_os("CAPSNET_DATA")
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from("../shared/data/mnist"));
    println!(
        "precision  train loss  val loss  val acc   ({images} training images, {val} validation, batch 32, lr 1e-3)"
    );
    for p in Precision::ALL {
        let run_dir = std::env::temp_dir().join(format!("capsnet-precision-{}-{}", p.name(), std::process::id()));
        let opts = TrainOptions {
            data_dir: data_dir.clone(),
            run_dir: run_dir.clone(),
            config: Config::default(),
            epochs: 1,
            run: capsnet::config::RunSettings {
                dataset: capsnet::config::Dataset::Mnist,
                seed: 42,
                batch_size: 32,
                lr: 1e-3,
                lr_decay: 1.0,
                lr_decay_steps: capsnet::config::DEFAULT_DECAY_STEPS,
                shift: 0,
                patience: 0,
                limit: Some(images),
                val_limit: Some(val),
            },
            resume: false,
            checkpoint_every: None,
            checkpoint_steps: None,
            eager: false,
            given: None,
        };
        let m = train(CpuBackend::<f32>::with_gemm_inputs(p), &opts).unwrap_or_else(|e| panic!("{}: {e}", p.name()));
        let last = m.last().expect("one epoch");
        println!(
            "{:<9} {:>11.5} {:>9.5} {:>8.2}%",
            p.name(),
            last.train_loss,
            last.val_loss,
            100.0 * last.val_acc
        );
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}
