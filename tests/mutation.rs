//! What reads files never panics: thousands of random byte flips, truncations and extensions of valid
//! MNIST files (raw and gzipped) and of a valid checkpoint. Each read either succeeds or fails with an
//! error that names the file. Plus: a checkpoint whose tensor shapes do not match its configuration
//! is refused, naming the tensor.

mod common;

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use capsnet::checkpoint::{self, Checkpoint, TrainState};
use capsnet::config::Config;
use capsnet::data::{self, Which};
use capsnet::model::init_params;
use common::{Lcg, temp_dir};

/// A random change of `good`: flipped bytes, a cut, or bytes added at the end.
fn mutate(rng: &mut Lcg, good: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    let pick = |rng: &mut Lcg, n: usize| (rng.next_f64() * n as f64) as usize % n.max(1);
    match pick(rng, 3) {
        0 => {
            for _ in 0..1 + pick(rng, 4) {
                let i = pick(rng, b.len());
                b[i] ^= 1 << pick(rng, 8);
            }
        }
        1 => b.truncate(pick(rng, b.len())),
        _ => {
            let extra = 1 + pick(rng, 64);
            b.extend((0..extra).map(|_| pick(rng, 256) as u8));
        }
    }
    b
}

/// Calls `read` on `mutations` changes of `good` written to `path`; every error must name the file.
fn survive(name: &str, path: &Path, good: &[u8], mutations: usize, read: impl Fn() -> Result<(), String>) -> usize {
    let mut rng = Lcg(name.len() as u64 * 7919);
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut refused = 0;
    for k in 0..mutations {
        let bad = mutate(&mut rng, good);
        std::fs::write(path, &bad).unwrap();
        match catch_unwind(AssertUnwindSafe(&read)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused += 1;
                assert!(
                    e.contains(&file),
                    "{name}, mutation {k}: the error does not name {file}: {e}"
                );
            }
            Err(_) => panic!(
                "{name}, mutation {k}: reading panicked (the bytes are in {})",
                path.display()
            ),
        }
    }
    refused
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn mutated_mnist_files_are_refused_by_name_and_never_panic() {
    // a valid test split of 4 images
    let mut images = vec![];
    for v in [0x803u32, 4, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    images.extend((0..4 * 784).map(|i| (i % 251) as u8));
    let mut labels = vec![];
    for v in [0x801u32, 4] {
        labels.extend(v.to_be_bytes());
    }
    labels.extend([3, 1, 4, 1]);
    for (raw, suffix) in [(true, ""), (false, ".gz")] {
        let d = temp_dir(&format!("mutation_mnist{suffix}"));
        let enc = |b: &[u8]| if raw { b.to_vec() } else { gz(b) };
        let (img_path, lbl_path) = (
            d.join(format!("t10k-images-idx3-ubyte{suffix}")),
            d.join(format!("t10k-labels-idx1-ubyte{suffix}")),
        );
        std::fs::write(&img_path, enc(&images)).unwrap();
        std::fs::write(&lbl_path, enc(&labels)).unwrap();
        let read = || data::load(&d, Which::Test).map(|_| ()).map_err(|e| e.to_string());
        read().expect("the unmutated files load");
        let n = if raw { 1500 } else { 750 };
        let refused = survive(&format!("images{suffix}"), &img_path, &enc(&images), n, read);
        assert!(refused > n / 2, "only {refused} of {n} mutated image files refused");
        std::fs::write(&img_path, enc(&images)).unwrap();
        let refused = survive(&format!("labels{suffix}"), &lbl_path, &enc(&labels), n, read);
        assert!(refused > n / 2, "only {refused} of {n} mutated label files refused");
    }
}

/// A valid checkpoint of a model with one channel everywhere (a few kilobytes).
fn tiny_checkpoint() -> Checkpoint {
    let config = Config {
        conv1_channels: 1,
        primary_maps: 1,
        decoder_hidden: [2, 2],
        ..Config::default()
    };
    let f32s = |v: Vec<Vec<f64>>| -> Vec<Vec<f32>> {
        v.into_iter()
            .map(|t| t.into_iter().map(|x| x as f32).collect())
            .collect()
    };
    let params = f32s(init_params(&config, 1));
    let zeros: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    Checkpoint {
        state: TrainState {
            run: capsnet::config::RunSettings {
                dataset: capsnet::config::Dataset::Mnist,
                seed: 42,
                batch_size: 50,
                lr: 1e-3,
                lr_decay: 1.0,
                lr_decay_steps: 2000,
                shift: 0,
                patience: 0,
                limit: Some(300),
                val_limit: None,
            },
            epoch: 1,
            step: 3,
            best_val_loss: Some(0.5),
            bad_epochs: 0,
            partial: None,
            target_epochs: None,
        },
        config,
        params,
        adam_m: zeros.clone(),
        adam_v: zeros,
        history: vec![serde_json::json!({"epoch": 1, "val_loss": 0.5})],
    }
}

#[test]
fn mutated_checkpoints_are_refused_by_name_and_never_panic() {
    let d = temp_dir("mutation_checkpoint");
    let path = d.join("run.safetensors");
    let ck = tiny_checkpoint();
    checkpoint::save(&path, &ck).unwrap();
    assert_eq!(
        checkpoint::load(&path).unwrap(),
        ck,
        "a checkpoint reads back as written"
    );
    let good = std::fs::read(&path).unwrap();
    let read = || checkpoint::load(&path).map(|_| ()).map_err(|e| e.to_string());
    let refused = survive("checkpoint", &path, &good, 3000, read);
    // flips inside tensor data give other valid numbers; cuts, most flips elsewhere and additions do not
    assert!(refused > 1000, "only {refused} of 3000 mutated checkpoints refused");
}

#[test]
fn a_checkpoint_whose_tensors_do_not_fit_its_configuration_names_the_tensor() {
    let d = temp_dir("mutation_shapes");
    let path = d.join("shapes.safetensors");
    let mut ck = tiny_checkpoint();
    // the weights of a model with 2 conv1 channels, under the configuration that says 1
    let wider = Config {
        conv1_channels: 2,
        ..ck.config.clone()
    };
    let f32s = |v: Vec<Vec<f64>>| -> Vec<Vec<f32>> {
        v.into_iter()
            .map(|t| t.into_iter().map(|x| x as f32).collect())
            .collect()
    };
    let params = f32s(init_params(&wider, 1));
    ck.adam_m = params.iter().map(|p| vec![0.0; p.len()]).collect();
    ck.adam_v = ck.adam_m.clone();
    ck.params = params;
    ck.config = wider.clone();
    checkpoint::save(&path, &ck).unwrap();
    // rewrite the stored configuration to the narrower one
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let (from, to) = ("\\\"conv1_channels\\\":2", "\\\"conv1_channels\\\":1");
    assert!(text.contains(from), "the configuration is stored as JSON text");
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + len].to_vec())
        .unwrap()
        .replacen(from, to, 1);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(&bytes[8 + len..]);
    std::fs::write(&path, out).unwrap();
    let e = checkpoint::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("shapes.safetensors") && e.contains("conv1.weight") && e.contains("the config needs"),
        "{e}"
    );
}
