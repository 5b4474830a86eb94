//! MultiMNIST: the generator, its files, and a small model that learns it.

mod common;

use std::path::Path;

use capsnet::data::{self, MNIST_PIXELS, Which};
use capsnet::multimnist::{self, MAX_SHIFT, MultiMnist, PIXELS, SIDE, box_overlap, ink_box};
use common::{assert_clean_error, capsnet, mnist_dir, stderr, stdout, temp_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn examples_are_deterministic_two_classes_shifted_within_4px_and_whole() {
    let test = data::load(&mnist_dir(), Which::Test).unwrap();
    let m = MultiMnist::new(&test, 7).unwrap();
    assert_eq!(m.len(), 10_000 * 1000, "the paper's 10M test examples");
    let n = 20_000;
    let mut seen_shifts = std::collections::HashSet::new();
    let (mut overlap_box, mut overlap_ink) = (0.0, 0.0);
    for j in 0..n {
        // spread over the whole index space: every digit, pairings far apart
        let idx = (j * 499_979) % m.len();
        let e = m.example(idx);
        assert_eq!(e, m.example(idx), "example {idx} is a function of (seed, index)");
        assert_eq!(e.sources[0], idx / 1000);
        assert_ne!(e.labels[0], e.labels[1], "example {idx}: two digits of one class");
        assert_eq!(e.labels[1], test.labels[e.sources[1]]);
        for (k, &(dx, dy)) in e.shifts.iter().enumerate() {
            assert!(
                dx.abs() <= MAX_SHIFT && dy.abs() <= MAX_SHIFT,
                "example {idx}: shift {dx},{dy}"
            );
            seen_shifts.insert((dx, dy));
            // every pixel of the digit is on the canvas: the part holds all of its ink
            let digit = &test.images[e.sources[k] * MNIST_PIXELS..(e.sources[k] + 1) * MNIST_PIXELS];
            let ink: u64 = digit.iter().map(|&p| p as u64).sum();
            assert_eq!(
                e.parts[k].iter().map(|&p| p as u64).sum::<u64>(),
                ink,
                "example {idx}, digit {k}"
            );
        }
        // the overlay is the clipped sum of the two parts
        for i in 0..PIXELS {
            assert_eq!(e.image[i], e.parts[0][i].saturating_add(e.parts[1][i]));
        }
        overlap_box += box_overlap(e.shifts[0], e.shifts[1], 20, 20);
        // and with the digits' own ink boxes: the shared area over the smaller box
        let (a, b) = (ink_box(&e.parts[0], SIDE).unwrap(), ink_box(&e.parts[1], SIDE).unwrap());
        let w = |x0: usize, x1: usize| (x1 + 1).saturating_sub(x0) as f64;
        let shared = w(a.0.max(b.0), a.2.min(b.2)) * w(a.1.max(b.1), a.3.min(b.3));
        let area = |b: (usize, usize, usize, usize)| w(b.0, b.2) * w(b.1, b.3);
        overlap_ink += shared / area(a).min(area(b));
    }
    assert_eq!(seen_shifts.len(), 81, "every shift of ±4 px occurs");
    let (overlap_box, overlap_ink) = (overlap_box / n as f64, overlap_ink / n as f64);
    eprintln!("mean overlap: {overlap_box:.3} of a 20x20 box, {overlap_ink:.3} of the smaller ink box");
    // the paper: "two digits bounding boxes on average have 80% overlap". Measured here (20,000
    // examples, seed 7): 72.7% of a 20x20 box, 72.7% of the smaller ink box; along one axis the mean
    // is 1 − E|dx₁ − dx₂| / 20 = 85%, so the paper's figure lies between the two ways of counting.
    assert!(
        (0.70..=0.80).contains(&overlap_box),
        "20x20 boxes overlap {overlap_box:.3}"
    );
    assert!(
        (0.70..=0.90).contains(&overlap_ink),
        "ink boxes overlap {overlap_ink:.3}"
    );
    // another seed pairs differently
    let other = MultiMnist::new(&test, 8).unwrap();
    let differ = (0..200)
        .filter(|&i| other.example(i * 1000) != m.example(i * 1000))
        .count();
    assert!(differ > 190, "{differ} of 200 differ under another seed");
}

#[test]
fn the_multimnist_command_writes_idx_files_and_a_sample() {
    let data = mnist_dir();
    let out = temp_dir("multimnist-files");
    let o = capsnet(
        &["multimnist", "--out", s(&out), "--count", "250", "--data", s(&data)],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("clipped sum"), "{}", stdout(&o));
    let images = std::fs::read(out.join("multimnist-test-images-idx3-ubyte")).unwrap();
    let labels = std::fs::read(out.join("multimnist-test-labels-idx2-ubyte")).unwrap();
    let be = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    assert_eq!(
        (&images[..4], be(&images, 4), be(&images, 8), be(&images, 12)),
        (&[0u8, 0, 8, 3][..], 250, 36, 36)
    );
    assert_eq!(images.len(), 16 + 250 * PIXELS);
    assert_eq!(
        (&labels[..4], be(&labels, 4), be(&labels, 8)),
        (&[0u8, 0, 8, 2][..], 250, 2)
    );
    // the same examples the evaluation sees: seed 2017, each test digit's first pairing first
    let test = data::load(&data, Which::Test).unwrap();
    let m = MultiMnist::new(&test, multimnist::TEST_SEED).unwrap();
    for j in [0, 1, 137, 249] {
        let e = m.example(j * 1000);
        assert_eq!(
            &images[16 + j * PIXELS..16 + (j + 1) * PIXELS],
            &e.image[..],
            "example {j}"
        );
        assert_eq!(&labels[12 + 2 * j..12 + 2 * j + 2], &e.labels[..]);
    }
    let (w, h) = image::image_dimensions(out.join("multimnist-test-sample.png")).unwrap();
    assert!(w > 10 * 72 && h > 10 * 72, "{w}x{h}");
    let o = capsnet(
        &["multimnist", "--out", s(&out), "--count", "0", "--data", s(&data)],
        &[],
    );
    assert_clean_error(&o, &["--count must be between 1"]);
    let o = capsnet(
        &[
            "multimnist",
            "--out",
            s(&out),
            "--split",
            "validation",
            "--count",
            "5000001",
            "--data",
            s(&data),
        ],
        &[],
    );
    assert_clean_error(&o, &["exceeds the 5000000 examples of the validation split"]);
}

/// A small CapsNet (32 conv1 channels, 8 capsule types: 800 primary capsules at 36x36) trained for
/// one epoch on the pairs of 8,000 training digits learns MultiMNIST well above chance: both digits
/// right (chance 1/45 = 2.2%) and each digit (chance 20%) on held-out pairs, in training's
/// validation and in eval on test pairs; then figures draws the paper's Figure 5.
#[test]
fn a_small_model_learns_multimnist_above_chance() {
    let data = mnist_dir();
    let dir = temp_dir("multimnist-train");
    let run = dir.join("run");
    let o = capsnet(
        &[
            "train",
            "--dataset",
            "multimnist",
            "--device",
            "cpu",
            "--conv1-channels",
            "32",
            "--primary-maps",
            "8",
            "--limit",
            "8000",
            "--val-limit",
            "1000",
            "--epochs",
            "1",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("800 primary capsules"), "{}", stderr(&o));
    let ck = capsnet::checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!((ck.config.image_side, ck.state.run.dataset.name()), (36, "multimnist"));
    let val_acc = ck.history[0]["val_acc"].as_f64().unwrap();
    assert!(val_acc > 0.08, "validation: both digits right for {val_acc}");
    let best = run.join("best.safetensors");
    let o = capsnet(
        &[
            "eval",
            "--checkpoint",
            s(&best),
            "--device",
            "cpu",
            "--limit",
            "500",
            "--data",
            s(&data),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let pct = |key: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}:\n{text}"));
        line[key.len()..]
            .trim()
            .split('%')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (both, each) = (pct("test accuracy:"), pct("per-digit accuracy:"));
    eprintln!("test pairs: both digits {both}%, each digit {each}%");
    assert!(both > 8.0 && each > 45.0, "both {both}%, each {each}%:\n{text}");
    assert!(!text.contains("confusion matrix"), "{text}");
    // an MNIST evaluation of a 36x36 model is refused, naming both sizes
    let o = capsnet(
        &[
            "eval",
            "--checkpoint",
            s(&best),
            "--dataset",
            "mnist",
            "--device",
            "cpu",
            "--data",
            s(&data),
        ],
        &[],
    );
    assert_clean_error(&o, &["36x36", "mnist's are 28x28"]);
    // the paper's Figure 5
    let figs = dir.join("figs");
    let o = capsnet(
        &[
            "figures",
            "--checkpoint",
            s(&best),
            "--out",
            s(&figs),
            "--device",
            "cpu",
            "--limit",
            "300",
            "--count",
            "9",
            "--data",
            s(&data),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    use capsnet::figures::{LABEL, PAD};
    let cell = 2 * 36;
    assert_eq!(
        image::image_dimensions(figs.join("multimnist.png")).unwrap(),
        (9 * (cell + PAD) + PAD, 2 * LABEL + 2 * (cell + PAD) + PAD)
    );
    assert!(figs.join("curves.png").is_file());
    // a resume on the other dataset is refused (a resume without --dataset is the stored one's)
    let o = capsnet(
        &[
            "train",
            "--device",
            "cpu",
            "--conv1-channels",
            "32",
            "--primary-maps",
            "8",
            "--limit",
            "8000",
            "--val-limit",
            "1000",
            "--epochs",
            "2",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--dataset",
            "mnist",
        ],
        &[],
    );
    assert_clean_error(&o, &["--dataset mnist, stored multimnist"]);
    // MultiMNIST examples are shifted already
    let o = capsnet(
        &["train", "--dataset", "multimnist", "--shift", "2", "--data", s(&data)],
        &[],
    );
    assert_clean_error(&o, &["--shift", "shifted already"]);
}
