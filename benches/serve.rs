//! How live `capsnet serve` feels: the latency of its API as the page calls it, over HTTP on this
//! machine, one request at a time (the page keeps one of each kind in flight).
//! - encode: a 280x280 PNG of a digit drawn dark on white (the pad's picture) → prepared, encoded,
//!   reconstructed;
//! - decode: a tweaked capsule → the decoder's image (a slider's move);
//! - routing: the same PNG → conv1's maps, primary capsules, coupling coefficients.
//!
//!     cargo bench --bench serve -- [CHECKPOINT] [--gallery]
//!
//! Without CHECKPOINT, a model of the notebook's size trained on 64 images (its latency is the
//! trained model's; its answers are not) from CAPSNET_DATA. --gallery measures while the server
//! classifies the test set for its gallery of errors (the first minute or so after it starts).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let gallery = args.iter().any(|a| a == "--gallery");
    let data = PathBuf::from(std::env::var_os("CAPSNET_DATA").unwrap_or_else(|| "data/mnist".into()));
    let bin = env!("CARGO_BIN_EXE_capsnet");
    let tmp = std::env::temp_dir().join(format!("capsnet-serve-bench-{}", std::process::id()));
    let ck = match args.iter().find(|a| !a.starts_with("--")) {
        Some(c) => PathBuf::from(c),
        None => {
            let run = tmp.join("run");
            let o = Command::new(bin)
                .args([
                    "train",
                    "--device",
                    "cpu",
                    "--epochs",
                    "1",
                    "--limit",
                    "64",
                    "--val-limit",
                    "64",
                ])
                .arg("--data")
                .arg(&data)
                .arg("--checkpoint-dir")
                .arg(&run)
                .output()
                .expect("capsnet runs");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            run.join("best.safetensors")
        }
    };
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--device", "cpu", "--port", "0", "--checkpoint"])
        .arg(&ck);
    if gallery {
        cmd.arg("--data").arg(&data);
    } else {
        cmd.arg("--data").arg(tmp.join("none"));
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("capsnet serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();

    // the pad's picture: an MNIST-like 7 drawn dark on white, 280x280
    let mut img = image::GrayImage::from_pixel(280, 280, image::Luma([255]));
    for t in 0..200 {
        let t = t as f32 / 200.0;
        for (x, y) in [(60.0 + 160.0 * t, 60.0), (220.0 - 110.0 * t, 60.0 + 170.0 * t)] {
            for dy in -9..=9 {
                for dx in -9..=9 {
                    if dx * dx + dy * dy <= 81 {
                        img.put_pixel((x as i32 + dx) as u32, (y as i32 + dy) as u32, image::Luma([0]));
                    }
                }
            }
        }
    }
    let mut png = std::io::Cursor::new(vec![]);
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();

    let post = |path: &str, body: &[u8], ct: &str| -> (f64, Value) {
        let t = Instant::now();
        let mut r = agent
            .post(&format!("{url}{path}"))
            .header("Content-Type", ct)
            .send(body)
            .unwrap();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (t.elapsed().as_secs_f64() * 1e3, v)
    };
    let (_, first) = post("/api/encode", &png, "image/png");
    let digit = first["digit"].as_u64().unwrap() as usize;
    let caps = first["capsules"].clone();
    println!(
        "capsnet serve latency, {} ({}), one request at a time{}",
        ck.display(),
        std::env::var("CAPSNET_THREADS").map_or("every core".into(), |t| format!("{t} threads")),
        if gallery {
            ", while the gallery of errors is computed"
        } else {
            ""
        }
    );
    println!("request   n    p50 ms   p95 ms   max ms");
    for (name, n) in [("encode", 100), ("decode", 300), ("routing", 50)] {
        let mut ms = vec![];
        for i in 0..n {
            let t = match name {
                "encode" => post("/api/encode", &png, "image/png").0,
                "routing" => post("/api/routing", &png, "image/png").0,
                _ => {
                    let mut c = caps.clone();
                    c[digit][i % 16] = json!(c[digit][i % 16].as_f64().unwrap() + 0.05 * ((i % 11) as f64 - 5.0) / 5.0);
                    post(
                        "/api/decode",
                        json!({ "capsules": c, "keep": digit }).to_string().as_bytes(),
                        "application/json",
                    )
                    .0
                }
            };
            ms.push(t);
        }
        let max = ms.iter().cloned().fold(0.0, f64::max);
        println!(
            "{name:<8} {n:>3}  {:>7.1}  {:>7.1}  {:>7.1}",
            pct(&mut ms, 0.5),
            pct(&mut ms, 0.95),
            max
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}
