//! The `capsnet` binary end to end: learning on real MNIST, exact resume, and clean errors (message
//! naming the file or flag, exit code 1, no panic, nothing saved lost) for bad input.

mod common;

use std::path::Path;

use capsnet::checkpoint;
use common::{Lcg, assert_clean_error, capsnet, capsnet_command, mnist_dir, stderr, stdout, temp_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A metrics object without the timing fields, which legitimately differ between runs.
fn without_timing(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().unwrap();
    o.remove("seconds");
    o.remove("images_per_s");
    o.remove("device_mib");
    v
}

/// The metrics lines without the timing fields.
fn metrics_without_timing(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| without_timing(serde_json::from_str(l).unwrap()))
        .collect()
}

/// A run's last checkpoint, its metrics history without timings (the rest must match exactly).
fn last_checkpoint(run: &Path) -> checkpoint::Checkpoint {
    let mut c = checkpoint::load(&run.join("last.safetensors")).unwrap();
    c.history = c.history.into_iter().map(without_timing).collect();
    c
}

/// `capsnet train` of the tiny model ([`TINY`]) on `data` into `run`, then `extra`.
fn train_tiny<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", s(data), "--checkpoint-dir", s(run)];
    a.extend(TINY);
    a.extend(extra);
    a
}

const TINY: [&str; 12] = [
    "--conv1-channels",
    "4",
    "--primary-maps",
    "2",
    "--limit",
    "300",
    "--val-limit",
    "100",
    "--batch-size",
    "50",
    "--device",
    "cpu",
];

#[test]
fn learns_mnist_well_above_chance() {
    let data = mnist_dir();
    let run = temp_dir("cli_learn");
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--epochs",
            "1",
            "--limit",
            "5000",
            "--val-limit",
            "1000",
            "--conv1-channels",
            "16",
            "--primary-maps",
            "4",
            "--batch-size",
            "32",
            "--seed",
            "3",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // the progress lines (stderr is not a terminal here: a line per quarter) say the time left
    let progress: Vec<String> = stderr(&o)
        .lines()
        .filter(|l| l.starts_with("epoch 1/1 ["))
        .map(str::to_string)
        .collect();
    assert!(progress.len() >= 4, "{}", stderr(&o));
    assert!(progress[0].contains(" left"), "no time left in: {}", progress[0]);
    let m = metrics_without_timing(&run);
    assert_eq!(m.len(), 1);
    let val_acc = m[0]["val_acc"].as_f64().unwrap();
    assert!(
        val_acc > 0.8,
        "validation accuracy after 5,000 images: {val_acc} (chance is 0.1)"
    );
    // held-out test images, from the best checkpoint
    let o = capsnet(
        &[
            "eval",
            "--checkpoint",
            s(&run.join("best.safetensors")),
            "--data",
            s(&data),
            "--limit",
            "2000",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let acc: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("test accuracy: "))
        .and_then(|v| v.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no accuracy line in:\n{out}"));
    assert!(acc > 80.0, "test accuracy {acc}%");
    assert!(
        out.contains("test images: 2000") && out.contains("confusion matrix"),
        "{out}"
    );
    // the confusion matrix rows add up to the images evaluated
    let total: usize = out
        .lines()
        .skip_while(|l| !l.starts_with("confusion"))
        .skip(2)
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|n| n.parse::<usize>().unwrap())
                .sum::<usize>()
        })
        .sum();
    assert_eq!(total, 2000);
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    resume_equals_an_uninterrupted_run_with(&[], "plain");
}

/// With the paper's augmentation and a fast-decaying learning rate too: both are functions of the
/// seed, epoch, image and step, so a resumed run stays exact.
#[test]
fn resume_equals_an_uninterrupted_run_with_shifts_and_lr_decay() {
    let flags = ["--shift", "2", "--lr-decay", "0.5", "--lr-decay-steps", "4"];
    let shifted = resume_equals_an_uninterrupted_run_with(&flags, "shifted");
    // and they change training: the first epoch without them ends elsewhere
    let data = mnist_dir();
    let plain = temp_dir("cli_unshifted");
    let o = capsnet(&train_tiny(&data, &plain, &["--epochs", "1"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plain = metrics_without_timing(&plain);
    assert_ne!(plain[0]["train_loss"], shifted[0]["train_loss"]);
    assert_eq!(plain[0]["step"], shifted[0]["step"]);
    // a resume with another schedule is refused
    let split = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli_resume_split_shifted");
    let mut other = train_tiny(&data, &split, &["--epochs", "4", "--resume", "--shift", "1"]);
    other.extend(&flags[2..]);
    assert_clean_error(&capsnet(&other, &[]), &["--shift 1, stored 2"]);
}

/// Trains 3 epochs at once and 1 + 2 with a resume, with `flags`; asserts the two runs are equal and
/// returns the metrics.
fn resume_equals_an_uninterrupted_run_with(flags: &[&str], name: &str) -> Vec<serde_json::Value> {
    let data = mnist_dir();
    let (full, split) = (
        temp_dir(&format!("cli_resume_full_{name}")),
        temp_dir(&format!("cli_resume_split_{name}")),
    );
    let train = |dir: &Path, epochs: &str, resume: bool| {
        let mut args = train_tiny(&data, dir, &["--epochs", epochs]);
        args.extend(flags);
        if resume {
            args.push("--resume");
        }
        let o = capsnet(&args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    train(&full, "3", false);
    train(&split, "1", false);
    // a write that a kill interrupted leaves a temporary file: the next start removes it
    let orphan = split.join(".last.safetensors.tmp4242");
    std::fs::write(&orphan, b"half a checkpoint").unwrap();
    let o = train(&split, "3", true);
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    assert!(
        !orphan.exists() && stderr(&o).contains("left by an interrupted write"),
        "{}",
        stderr(&o)
    );
    let (a, b) = (metrics_without_timing(&full), metrics_without_timing(&split));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "losses, accuracies and steps must match exactly");
    let (ca, cb) = (last_checkpoint(&full), last_checkpoint(&split));
    assert_eq!(ca, cb, "weights, Adam moments and state must match exactly");
    assert_eq!((ca.state.epoch, ca.state.step), (3, 18));
    a
}

/// --preset paper sets the paper's settings, and a flag beside it wins.
#[test]
fn the_paper_preset_sets_its_values_and_flags_override_them() {
    let data = mnist_dir();
    let run = temp_dir("cli_preset_paper");
    let o = capsnet(
        &[
            "train",
            "--preset",
            "paper",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--limit",
            "256",
            "--val-limit",
            "100",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = last_checkpoint(&run);
    assert_eq!(ck.config.routing_rounds, 3);
    let st = &ck.state;
    assert_eq!(
        (
            st.run.batch_size,
            st.run.shift,
            st.run.lr_decay,
            st.run.lr_decay_steps,
            st.step
        ),
        (128, 2, 0.96, 2000, 2)
    );
    let run = temp_dir("cli_preset_override");
    let o = capsnet(
        &[
            "train",
            "--preset",
            "paper",
            "--routing",
            "1",
            "--batch-size",
            "64",
            "--shift",
            "0",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--limit",
            "128",
            "--val-limit",
            "100",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = last_checkpoint(&run);
    assert_eq!(
        (
            ck.config.routing_rounds,
            ck.state.run.batch_size,
            ck.state.run.shift,
            ck.state.run.lr_decay
        ),
        (1, 64, 0, 0.96)
    );
}

#[test]
fn resume_refuses_other_settings_and_keeps_the_checkpoint() {
    let data = mnist_dir();
    let run = temp_dir("cli_resume_bad");
    let args = train_tiny(&data, &run, &[]);
    let mut first = args.clone();
    first.extend(["--epochs", "1"]);
    assert!(capsnet(&first, &[]).status.success());
    let last = run.join("last.safetensors");
    let before = std::fs::read(&last).unwrap();
    let mut other = args.clone();
    other.extend(["--resume", "--epochs", "2", "--seed", "7"]);
    let o = capsnet(&other, &[]);
    assert_clean_error(&o, &["--resume", "--seed 7, stored 42"]);
    assert!(
        !stderr(&o).contains("--batch-size"),
        "flags that agree are not named: {}",
        stderr(&o)
    );
    // a flag not given is the stored run's; one given is named, in words, not Rust's debug syntax
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--limit",
            "200",
        ],
        &[],
    );
    assert_clean_error(&o, &["--limit 200, stored 300"]);
    assert!(
        !stderr(&o).contains("Some(") && !stderr(&o).contains("None"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "a refused resume must not touch the checkpoint"
    );
    // a fresh run into the same directory would overwrite it: refused too
    assert_clean_error(&capsnet(&first, &[]), &["already holds a run", "--resume"]);
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "a refused run must not touch the checkpoint"
    );
    let empty = temp_dir("cli_resume_none");
    let o = capsnet(
        &["train", "--data", s(&data), "--checkpoint-dir", s(&empty), "--resume"],
        &[],
    );
    assert_clean_error(&o, &["there is no run to resume here", "no last.safetensors"]);
    // a run whose last checkpoint is missing (killed between writes) is still a run: not overwritten
    let partial = temp_dir("cli_partial_run");
    std::fs::write(partial.join("best.safetensors"), b"best").unwrap();
    std::fs::write(partial.join("metrics.jsonl"), b"{}\n").unwrap();
    let fresh = train_tiny(&data, &partial, &["--epochs", "1"]);
    assert_clean_error(
        &capsnet(&fresh, &[]),
        &["already holds a run (best.safetensors, metrics.jsonl)"],
    );
    assert_eq!(std::fs::read(partial.join("best.safetensors")).unwrap(), b"best");
    assert_eq!(std::fs::read(partial.join("metrics.jsonl")).unwrap(), b"{}\n");
}

#[test]
fn bad_data_gives_a_clean_error() {
    let o = capsnet(&["train", "--data", "/nonexistent/mnist", "--device", "cpu"], &[]);
    assert_clean_error(&o, &["/nonexistent/mnist", "not found", "capsnet download"]);
    // the same through CAPSNET_DATA
    let o = capsnet(
        &["eval", "--checkpoint", "x.safetensors"],
        &[("CAPSNET_DATA", "/nonexistent/mnist")],
    );
    assert_clean_error(&o, &["x.safetensors"]);
    let d = temp_dir("cli_bad_data");
    std::fs::write(d.join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0, 0, 9]).unwrap();
    std::fs::write(d.join("train-labels-idx1-ubyte"), [0u8, 0, 8, 1, 0, 0, 0, 0]).unwrap();
    let o = capsnet(&["train", "--data", s(&d)], &[]);
    assert_clean_error(&o, &["train-images-idx3-ubyte", "truncated"]);
}

#[test]
fn corrupt_checkpoints_give_a_clean_error() {
    let data = mnist_dir();
    let d = temp_dir("cli_bad_ckpt");
    let eval = |p: &Path| capsnet(&["eval", "--checkpoint", s(p), "--data", s(&data)], &[]);
    assert_clean_error(
        &eval(&d.join("missing.safetensors")),
        &["missing.safetensors", "cannot read checkpoint"],
    );
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    assert_clean_error(&eval(&garbage), &["garbage.safetensors", "not a capsnet checkpoint"]);
    // a real checkpoint, cut short
    let run = temp_dir("cli_bad_ckpt_run");
    let args = train_tiny(&data, &run, &["--epochs", "1"]);
    assert!(capsnet(&args, &[]).status.success());
    // a valid checkpoint, more test images than there are
    let o = capsnet(
        &[
            "eval",
            "--checkpoint",
            s(&run.join("last.safetensors")),
            "--data",
            s(&data),
            "--limit",
            "10001",
        ],
        &[],
    );
    assert_clean_error(&o, &["--limit 10001 exceeds the 10000 test images"]);
    let bytes = std::fs::read(run.join("last.safetensors")).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    assert_clean_error(
        &eval(&cut),
        &["cut.safetensors", "truncated: 1000 bytes of tensor data are missing"],
    );
    // cut inside its header
    std::fs::write(&cut, &bytes[..100]).unwrap();
    assert_clean_error(&eval(&cut), &["cut.safetensors", "truncated: its header needs"]);
    // written by another version of the format
    let other = d.join("other.safetensors");
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    let meta = std::collections::HashMap::from([("format".to_string(), "capsnet/0".to_string())]);
    std::fs::write(&other, safetensors::serialize([("w", view)], Some(meta)).unwrap()).unwrap();
    assert_clean_error(
        &eval(&other),
        &["other.safetensors", "written by another version of capsnet"],
    );
    // valid safetensors, but not ours
    let foreign = d.join("foreign.safetensors");
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap();
    std::fs::write(&foreign, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
    assert_clean_error(
        &eval(&foreign),
        &[
            "foreign.safetensors",
            "not a capsnet checkpoint",
            "without capsnet's 'format' metadata",
        ],
    );
}

#[test]
fn bad_flags_give_a_clean_error() {
    let data = mnist_dir();
    if capsnet::cuda::open_device(0).is_err() {
        // no GPU here: asking for one is a clean error saying why
        let o = capsnet(&["train", "--device", "cuda", "--data", s(&data)], &[]);
        assert_clean_error(&o, &["--device cuda", "CUDA"]);
    }
    let o = capsnet(
        &["train", "--batch-size", "0", "--data", s(&data), "--device", "cpu"],
        &[],
    );
    assert_clean_error(&o, &["--batch-size"]);
    let o = capsnet(&["train", "--routing", "0", "--data", s(&data), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["routing rounds must be at least 1"]);
    let o = capsnet(&["train", "--lr=-1", "--data", s(&data), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["--lr"]);
    // a negative number is a value, not a flag
    let o = capsnet(&["train", "--lr", "-0.001", "--data", s(&data), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["--lr must be a positive number, got -0.001"]);
    for (flag, value, says) in [
        ("--shift", "9", "--shift must be between 0 and 8 pixels, got 9"),
        ("--lr-decay", "1.5", "--lr-decay must be in (0, 1]"),
        ("--lr-decay", "0", "--lr-decay must be in (0, 1]"),
        ("--lr-decay-steps", "0", "--lr-decay-steps must be at least 1"),
    ] {
        let o = capsnet(&["train", flag, value, "--data", s(&data), "--device", "cpu"], &[]);
        assert_clean_error(&o, &[says]);
    }
    // clap's usage error (status 2) names the flag and what it takes
    let o = capsnet(&["train", "--preset", "tf"], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'tf'") && err.contains("notebook, paper") && !err.contains("panicked"),
        "{err}"
    );
    // more images than there are is refused, not quietly capped
    let o = capsnet(
        &["train", "--limit", "100000", "--data", s(&data), "--device", "cpu"],
        &[],
    );
    assert_clean_error(&o, &["--limit 100000 exceeds the 55000 training images"]);
    let o = capsnet(
        &["train", "--val-limit", "5001", "--data", s(&data), "--device", "cpu"],
        &[],
    );
    assert_clean_error(&o, &["--val-limit 5001 exceeds the 5000 validation images"]);
    // sizes beyond the stated limits are refused before anything is allocated
    let o = capsnet(
        &[
            "train",
            "--routing",
            "1000000",
            "--limit",
            "10",
            "--val-limit",
            "10",
            "--data",
            s(&data),
            "--device",
            "cpu",
        ],
        &[],
    );
    assert_clean_error(&o, &["routing rounds must be between 1 and 16, got 1000000"]);
    let o = capsnet(
        &[
            "train",
            "--batch-size",
            "100000000",
            "--data",
            s(&data),
            "--device",
            "cpu",
        ],
        &[],
    );
    assert_clean_error(&o, &["--batch-size must be between 1 and 4096"]);
    let o = capsnet(&["bench", "--batch-size", "100000000", "--device", "cpu"], &[]);
    assert_clean_error(&o, &["--batch-size must be between 1 and 4096"]);
    let o = capsnet(&["train", "--epochs", "0", "--data", s(&data), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["--epochs 0: nothing to train"]);
    // --data naming a file
    let file = data.join(std::fs::read_dir(&data).unwrap().next().unwrap().unwrap().file_name());
    let o = capsnet(&["train", "--data", s(&file), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["is a file, not a directory"]);
    assert!(!stderr(&o).contains("download --data"), "{}", stderr(&o));
    // flags are judged before the run directory: a directory holding a run does not hide them
    let held = temp_dir("cli_bad_flags_run");
    std::fs::write(held.join("last.safetensors"), b"a run").unwrap();
    let o = capsnet(
        &[
            "train",
            "--routing",
            "0",
            "--data",
            s(&data),
            "--device",
            "cpu",
            "--checkpoint-dir",
            s(&held),
        ],
        &[],
    );
    assert_clean_error(&o, &["routing rounds must be at least 1"]);
    let o = capsnet(&["train", "--limit", "0", "--data", s(&data), "--device", "cpu"], &[]);
    assert_clean_error(&o, &["--limit must be at least 1"]);
    let o = capsnet(
        &["train", "--val-limit", "0", "--data", s(&data), "--device", "cpu"],
        &[],
    );
    assert_clean_error(&o, &["--val-limit must be at least 1"]);
    // flags clap itself refuses: usage error, exit 2, no panic
    let o = capsnet(&["train", "--epochs", "many"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--epochs") && !stderr(&o).contains("panicked"));
}

#[test]
fn download_without_network_fails_clearly_and_writes_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = temp_dir("cli_download_offline");
    let target = d.join("mnist");
    let o = capsnet(
        &["download", "--data", s(&target)],
        &[("CAPSNET_MNIST_MIRROR", &format!("http://{closed}/"))],
    );
    assert_clean_error(&o, &["cannot download train-images-idx3-ubyte", "network"]);
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}

/// `bench --peer` with stand-in peers (the real one needs torch): what it passes, what it prints, and
/// each way a peer can fail.
#[test]
fn bench_runs_a_peer_beside_it_and_says_why_one_fails() {
    let d = temp_dir("cli_bench_peer");
    let script = |name: &str, body: &str| {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    // answers only the arguments the real peer needs for this run, at a speed per configuration:
    // fp32 1, bf16 autocast + channels_last 4 (the fastest), the others 2; torch.compile fails
    let good = script(
        "peer.py",
        "import sys, json\n\
         if sys.argv[1:] == ['--check']: sys.exit(0)\n\
         want = ['--device', 'cpu', '--batch-size', '2', '--steps', '1', '--warmup']\n\
         if sys.argv[1:8] != want or sys.argv[9:11] != ['--routing-iters', '3']: sys.exit('unexpected arguments: %s' % sys.argv[1:])\n\
         rest = sys.argv[13:]\n\
         if '--compile' in rest:\n\
         \x20   if sys.argv[8] != '2': sys.exit('torch.compile needs two untimed steps')\n\
         \x20   sys.exit('RuntimeError: no C++ compiler for the stand-in')\n\
         if sys.argv[8] != '0': sys.exit('unexpected warm-up: %s' % sys.argv[8])\n\
         speed = {(): 1.0, ('--precision', 'bf16-autocast', '--channels-last'): 4.0}.get(tuple(rest), 2.0)\n\
         print('timed 1 steps')\n\
         print(json.dumps({'torch': '9.9-stand-in', 'median_ms_per_step': 2000.0 / speed, 'images_per_s': speed}))\n",
    );
    let run = |peer: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--routing",
            "3",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--device", "cpu", "--peer", s(peer)]);
        capsnet(&args, &[])
    };
    let o = run(&good, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("peer: PyTorch 9.9-stand-in on cpu"), "{out}");
    for (config, figure) in [
        ("fp32", "1.0 images/s"),
        ("fp32, channels_last", "2.0 images/s"),
        ("bf16 autocast", "2.0 images/s"),
        ("bf16 autocast, channels_last", "4.0 images/s"),
        (
            "bf16 autocast, channels_last, torch.compile",
            "failed: python3 exited with",
        ),
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(&format!("{config} "))
                && l.contains(figure)
                && (!figure.starts_with("failed") || l.contains("RuntimeError: no C++ compiler"))),
            "{config}: {figure}: {out}"
        );
    }
    // our images/s over the stand-in's 1.0
    let ours: f64 = out
        .lines()
        .find(|l| l.starts_with("batch 2:"))
        .and_then(|l| l.split(", ").find(|p| p.ends_with("images/s")))
        .and_then(|p| p.trim_end_matches(" images/s").parse().ok())
        .unwrap_or_else(|| panic!("no images/s figure in {out}"));
    // against the fastest (4.0) and against fp32 (1.0)
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("ratio: "))
        .unwrap_or_else(|| panic!("no ratio line in {out}"));
    let (fastest, fp32) = line
        .split_once("x the fastest peer's images/s (bf16 autocast, channels_last), ")
        .and_then(|(a, b)| Some((a.parse::<f64>().ok()?, b.strip_suffix("x fp32's")?.parse::<f64>().ok()?)))
        .unwrap_or_else(|| panic!("ratio line: {line}"));
    assert!(
        (fastest - ours / 4.0).abs() <= 0.051 && (fp32 - ours).abs() <= 0.051,
        "ratios {fastest} and {fp32} for {ours} images/s against 4.0 and 1.0: {out}"
    );

    let o = run(&d.join("missing.py"), &[]);
    assert_clean_error(&o, &["--peer", "missing.py: no such file"]);
    let o = run(&script("notorch.py", "import torch_is_not_here as torch\n"), &[]);
    assert_clean_error(&o, &["--peer", "exited with"]);
    let o = run(
        &script(
            "torchless.py",
            "raise ModuleNotFoundError(\"No module named 'torch'\")\n",
        ),
        &[],
    );
    assert_clean_error(&o, &["has no torch (pip install torch)"]);
    // found before the benchmark runs, and said in words, not a traceback
    assert!(
        !stdout(&o).contains("batch 2:") && !stderr(&o).contains("Traceback"),
        "{}",
        stderr(&o)
    );
    let o = run(&script("chatty.py", "print('hello')\n"), &[]);
    assert_clean_error(&o, &["not the peer's JSON report", "hello"]);
    let o = run(&good, &["--conv1-channels", "16"]);
    assert_clean_error(&o, &["--peer", "only the default model"]);
}

#[test]
fn bench_reports_the_full_models_size_and_cost() {
    let o = capsnet(
        &[
            "bench",
            "--batch-size",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("8215568 parameters") && out.contains("1.2004 GFLOP per training image"),
        "{out}"
    );
    assert!(out.contains("images/s"), "{out}");
    assert!(
        out.contains("backend: cpu (") && out.contains(", f32, "),
        "--device cpu is the fast backend: {out}"
    );
    let o = capsnet(
        &[
            "bench",
            "--batch-size",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu-reference",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("f64 sums"),
        "--device cpu-reference is the reference: {}",
        stdout(&o)
    );
    let o = capsnet(
        &["bench", "--ops", "--batch-size", "1", "--steps", "1", "--device", "cpu"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for op in [
        "primary 256->256 9x9/2 bwd weight",
        "predict bwd input",
        "routing bwd, 3 rounds",
        "fc3 1024->784 fwd",
    ] {
        assert!(out.contains(op), "no {op} in:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("routing fwd, 3 rounds") && l.ends_with("(not this model's rounds)")),
        "{out}"
    );
    // the step profile: each op of a step of the default model (2 rounds) forward and backward, the
    // gradients' zeroing, Adam and the time between ops, whose shares add up to the step
    let profile: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("training step, 2 rounds: "))
        .skip(1)
        .collect();
    for row in [
        "forward  conv2d 256->256 9x9/2",
        "forward  predict_routing",
        "backward conv2d 1->256 9x9/1",
        "backward dense 512->1024",
        "backward zero the gradients",
        "backward Adam",
        "between ops",
    ] {
        assert!(
            profile.iter().any(|l| l.trim_start().starts_with(row)),
            "no {row} in:\n{out}"
        );
    }
    let shares: f64 = profile
        .iter()
        .map(|l| {
            let v = l.split_whitespace().last().and_then(|v| v.strip_suffix('%'));
            v.and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no share in {l:?}"))
        })
        .sum();
    assert!((shares - 100.0).abs() < 0.5, "shares add up to {shares}:\n{out}");
}

#[test]
fn early_stopping_ends_the_run_and_stays_ended_on_resume() {
    let data = mnist_dir();
    let run = temp_dir("cli_early_stop");
    // a learning rate far below f32 resolution leaves the weights, hence the validation loss, unchanged
    let args = train_tiny(&data, &run, &["--patience", "1", "--lr", "1e-12"]);
    let mut first = args.clone();
    first.extend(["--epochs", "5"]);
    let o = capsnet(&first, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("early stop"), "{}", stderr(&o));
    let m = metrics_without_timing(&run);
    assert_eq!(
        m.len(),
        2,
        "epoch 1 sets the best loss, epoch 2 fails to beat it, then the run stops"
    );
    assert_eq!(m[0]["val_loss"], m[1]["val_loss"]);
    let mut again = args.clone();
    again.extend(["--epochs", "6", "--resume"]);
    let o = capsnet(&again, &[]);
    assert!(
        o.status.success() && stderr(&o).contains("early stop"),
        "{}",
        stderr(&o)
    );
    assert_eq!(metrics_without_timing(&run).len(), 2);
}

/// Whether `--device emulated` can run here; says SKIPPED when not (a real GPU under test, or no
/// NVRTC), and fails where CAPSNET_REQUIRE_NVRTC demands NVRTC.
fn emulated_device_usable() -> bool {
    if std::env::var_os("CAPSNET_REQUIRE_GPU").is_some() {
        eprintln!("SKIPPED: the emulated device (CAPSNET_REQUIRE_GPU=1: a real GPU is under test)");
        return false;
    }
    if !capsnet::cuda::nvrtc_available() {
        assert!(
            std::env::var_os("CAPSNET_REQUIRE_NVRTC").is_none(),
            "CAPSNET_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
        );
        eprintln!("SKIPPED: libnvrtc not found, so the emulated device cannot load kernels");
        return false;
    }
    true
}

/// `--device emulated` trains through the CUDA backend on the emulated device and follows the CPU;
/// `info --emulated` says the device is emulated and that every kernel loads on it.
#[test]
fn the_emulated_device_trains_like_the_cpu_and_says_what_it_is() {
    if !emulated_device_usable() {
        return;
    }
    let o = capsnet(&["info", "--emulated"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "EMULATED",
        "capsnet emulated CUDA device",
        "compute capability 9.0, 132 SMs",
        "all load on cuda",
    ] {
        assert!(out.contains(needle), "info lacks {needle:?}:\n{out}");
    }
    let data = mnist_dir();
    let run = |device: &str| {
        let dir = temp_dir(&format!("cli_emulated_{device}"));
        let mut args = vec![
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&dir),
            "--epochs",
            "1",
        ];
        args.extend(&TINY[..TINY.len() - 2]);
        // fp32 on both: the emulated device's default, bf16, rounds every GEMM input
        args.extend(["--device", device, "--precision", "fp32"]);
        let o = capsnet(&args, &[]);
        assert!(o.status.success(), "--device {device}: {}", stderr(&o));
        // on the (emulated) GPU the training set lives on the device, each batch gathered there, and
        // the steps after the second replay the graph captured on it
        for says in [
            "the training set lives on the device",
            "steps replayed from 1 captured graph",
        ] {
            assert_eq!(
                stderr(&o).contains(says),
                device == "emulated",
                "{says}: {}",
                stderr(&o)
            );
        }
        metrics_without_timing(&dir).remove(0)
    };
    let (cpu, emu) = (run("cpu"), run("emulated"));
    for key in ["train_loss", "val_loss", "train_margin", "train_recon"] {
        let (a, b) = (cpu[key].as_f64().unwrap(), emu[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-3 * a.abs().max(1e-3),
            "{key}: cpu {a}, emulated {b}"
        );
    }
}

/// On the emulated GPU, where steps gather their batches from the epoch's step plan and replay a
/// captured graph, a run stopped by Ctrl-C in its second epoch resumes mid-epoch (its plan's cursor
/// at the next batch, the graph captured anew) to the weights, Adam moments and metrics of the
/// uninterrupted run, bit for bit.
#[test]
fn an_emulated_run_stopped_mid_epoch_resumes_to_the_same_weights() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    if !emulated_device_usable() {
        return;
    }
    let data = mnist_dir();
    let args = |dir: &Path| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(dir),
            "--epochs",
            "2",
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--limit",
            "230",
            "--val-limit",
            "20",
            "--batch-size",
            "50",
            "--lr-decay",
            "0.5",
            "--lr-decay-steps",
            "2",
            "--device",
            "emulated",
            "--precision",
            "fp32",
            "--checkpoint-minutes",
            "0",
        ]
        .map(String::from)
        .to_vec();
        if dir.join("last.safetensors").exists() {
            a.push("--resume".into());
        }
        a
    };
    let run = |a: &[String]| capsnet(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let full = temp_dir("cli_emulated_resume_full");
    let o = run(&args(&full));
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, want_metrics) = (last_checkpoint(&full), metrics_without_timing(&full));

    let int = temp_dir("cli_emulated_resume_int");
    let child = capsnet_command(&args(&int).iter().map(String::as_str).collect::<Vec<_>>())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !int.join("last.safetensors").exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // the first epoch's checkpoint is written: the signal comes inside the second epoch's first step
    std::thread::sleep(Duration::from_millis(300));
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let saved = checkpoint::load(&int.join("last.safetensors")).unwrap();
    assert!(
        saved.state.partial.as_ref().is_some_and(|p| p.batches > 0),
        "the interrupt came mid-epoch: {:?}",
        saved.state
    );
    // batches of 50, 50, 50, 50 and 30: the resumed epoch has at least two more of 50, so it captures
    let o = run(&args(&int));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("steps replayed from"), "{}", stderr(&o));
    assert_eq!(
        last_checkpoint(&int),
        want,
        "resumed mid-epoch: not the uninterrupted weights"
    );
    assert_eq!(metrics_without_timing(&int), want_metrics);
}

/// Ctrl-C (SIGINT) saves the last completed step and prints the command that continues; SIGKILL at
/// random moments, inside checkpoint writes too, loses at most the steps since the last checkpoint.
/// Every resume works, and each run ends with the weights, Adam moments, state and metrics of an
/// uninterrupted run.
#[test]
fn interrupted_and_killed_runs_resume_to_the_same_weights() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let data = mnist_dir();
    let args = |dir: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = train_tiny(&data, dir, &["--epochs", "4"])
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        if dir.join("last.safetensors").exists() {
            a.push("--resume".into());
        }
        a
    };
    let run = |a: &[String]| capsnet(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let spawn = |a: &[String]| {
        capsnet_command(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let full = temp_dir("cli_interrupt_full");
    let o = run(&args(&full, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, want_metrics) = (last_checkpoint(&full), metrics_without_timing(&full));

    // A run with no step checkpoints, sent `signal` inside its second epoch: once its progress shows
    // a step of epoch 2 done (four of its six steps still to come). On a loaded machine the signal
    // may still land after the epoch's end, which is a different case ("saved the end of epoch");
    // then the run is started again, up to five times.
    let signalled = |dir: &Path, signal: i32| {
        use std::io::BufRead;
        for _ in 0..5 {
            let _ = std::fs::remove_dir_all(dir);
            let mut child = spawn(&args(dir, &["--checkpoint-minutes", "0"]));
            let pid = child.id() as i32;
            let err = child.stderr.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            let reader = std::thread::spawn(move || {
                let mut all = String::new();
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = tx.send(line.clone());
                    all.push_str(&line);
                    all.push('\n');
                }
                all
            });
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(120) {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(line) if line.starts_with("epoch 2/") => {
                        // SAFETY: a signal to the child this test started and has not yet reaped
                        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
                        break;
                    }
                    Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            let status = child.wait().unwrap();
            let err = reader.join().unwrap();
            if !err.contains("interrupted: saved the end of epoch") {
                return (status, err);
            }
        }
        panic!("five signals in a row landed on an epoch's end");
    };

    // Ctrl-C: it saves the step it completed
    let int = temp_dir("cli_interrupt_sigint");
    let (status, err) = signalled(&int, libc::SIGINT);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted: saved step") && err.contains("continue with:"),
        "{err}"
    );
    let cmd = err
        .lines()
        .skip_while(|l| !l.starts_with("continue with:"))
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        cmd.contains("--resume") && cmd.contains("--checkpoint-minutes 0"),
        "{err}"
    );
    let saved = checkpoint::load(&int.join("last.safetensors")).unwrap();
    assert!(
        saved.state.partial.is_some(),
        "the interrupt came mid-epoch: {:?}",
        saved.state
    );
    let o = run(&args(&int, &["--checkpoint-minutes", "0"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        last_checkpoint(&int),
        want,
        "resumed after Ctrl-C: not the uninterrupted weights"
    );
    assert_eq!(metrics_without_timing(&int), want_metrics);
    // nothing left to do: said in words that fit the count
    let o = run(&args(&int, &[]));
    assert!(
        stderr(&o).contains("nothing to do: 4 epochs done already"),
        "{}",
        stderr(&o)
    );

    // SIGTERM (a scheduler stopping the job) saves the same way
    let (status, err) = signalled(&temp_dir("cli_interrupt_sigterm"), libc::SIGTERM);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: saved step"), "{err}");

    // SIGKILL at 20 or more random moments, a step checkpoint after every step: rounds until 20 kills
    let mut rng = Lcg(2026);
    let (mut kills, mut in_writes, mut round) = (0, 0, 0);
    while kills < 20 {
        round += 1;
        let dir = temp_dir(&format!("cli_interrupt_kill{round}"));
        loop {
            let mut child = spawn(&args(&dir, &["--checkpoint-steps", "1"]));
            std::thread::sleep(Duration::from_secs_f64(rng.uniform(0.3, 1.6)));
            if kills < 20 && child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                let _ = child.wait();
                kills += 1;
                in_writes += std::fs::read_dir(&dir)
                    .unwrap()
                    .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp"))
                    .count();
                continue;
            }
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "resume after {kills} kills failed: {}", stderr(&o));
            break;
        }
        assert_eq!(
            last_checkpoint(&dir),
            want,
            "round {round}: not the uninterrupted weights"
        );
        assert_eq!(
            metrics_without_timing(&dir),
            want_metrics,
            "round {round}: metrics differ"
        );
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    eprintln!("{kills} kills in {round} round(s), {in_writes} of them inside a checkpoint write");
}

/// A loss that turns non-finite stops the run before the update, naming the step and the term; the
/// last checkpoint stays as it was.
#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint() {
    let data = mnist_dir();
    let run = temp_dir("cli_diverge");
    let mut args = train_tiny(&data, &run, &[]);
    let mut first = args.clone();
    first.extend(["--epochs", "1"]);
    assert!(capsnet(&first, &[]).status.success());
    // weights so large (finite, so the checkpoint loads) that the next forward overflows
    let last = run.join("last.safetensors");
    let mut ck = checkpoint::load(&last).unwrap();
    for p in &mut ck.params {
        p.iter_mut()
            .for_each(|x| *x = if *x >= 0.0 { f32::MAX } else { -f32::MAX });
    }
    checkpoint::save(&last, &ck).unwrap();
    let before = std::fs::read(&last).unwrap();
    args.extend(["--epochs", "2", "--resume"]);
    let o = capsnet(&args, &[]);
    assert_clean_error(&o, &["training diverged at step 7", "loss is"]);
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "the last checkpoint must stay as it was"
    );
}

/// `capsnet ... | head` closes the pipe early: the command ends quietly (the status of a SIGPIPE,
/// 141, or 0 if it had written everything), never with a panic.
#[test]
fn a_closed_stdout_ends_quietly() {
    let mut c = common::capsnet_command(&["info"]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(child.stdout.take()); // the reader goes away before the first line
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(matches!(o.status.code(), Some(141) | Some(0)), "{:?}: {err}", o.status);
}

/// `bench --ops` on the CUDA backend (here the emulated device) prints a row for every version of
/// every versioned op at each of the model's layers, each checked before it is timed; and the flags
/// that choose versions refuse what they cannot do, naming the flag.
#[test]
fn bench_ops_lists_every_kernel_version_and_version_flags_are_checked() {
    use capsnet::cuda::registry::OPS;
    // refused before any device is touched
    let o = capsnet(
        &["train", "--device", "cpu", "--precision", "tf32", "--limit", "10"],
        &[],
    );
    assert_clean_error(&o, &["--precision tf32", "no tf32"]);
    let o = capsnet(
        &[
            "train",
            "--device",
            "cpu-reference",
            "--precision",
            "bf16",
            "--limit",
            "10",
        ],
        &[],
    );
    assert_clean_error(&o, &["--precision bf16", "cpu-reference"]);
    // bf16 on the CPU runs on each bf16 GEMM the CPU has (CAPSNET_BF16_GEMM picks one), and is
    // refused in words where it has none, or where the one named is not there or not a GEMM
    use capsnet::backend::bf16::Bf16Gemm;
    let small = [
        "--conv1-channels",
        "16",
        "--primary-maps",
        "4",
        "--batch-size",
        "2",
        "--steps",
        "1",
    ];
    let bf16 = |env: &[(&str, &str)]| {
        capsnet(
            &[&["bench", "--device", "cpu", "--precision", "bf16"][..], &small].concat(),
            env,
        )
    };
    for k in Bf16Gemm::ALL {
        let o = bf16(&[("CAPSNET_BF16_GEMM", k.flag())]);
        if k.supported() {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(stdout(&o).contains(k.describe()), "{}", stdout(&o));
            // the GEMM peak in the step's precision, measured in the same run, and the step's share
            let out = stdout(&o);
            let line = out
                .lines()
                .find(|l| l.starts_with("GEMM peak here (bf16 GEMM, 2048x2048x2048"))
                .unwrap_or_else(|| panic!("no bf16 GEMM peak in\n{out}"));
            let gflops: f64 = line
                .split("): ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no figure in {line:?}"));
            assert!(gflops > 0.0 && line.ends_with("% of it"), "{line}");
        } else {
            assert_clean_error(&o, &["CAPSNET_BF16_GEMM", k.flag(), "cannot run"]);
        }
    }
    let o = bf16(&[("CAPSNET_BF16_GEMM", "avx1024")]);
    assert_clean_error(&o, &["CAPSNET_BF16_GEMM", "avx1024", "amx or avx512-bf16"]);
    // the convolution algorithm CAPSNET_CONV names: a name that is none, and Fourier in fp32,
    // refused in words; where AVX512_BF16 runs, each named is the one the backend line shows
    let o = bf16(&[("CAPSNET_CONV", "winograd")]);
    assert_clean_error(&o, &["CAPSNET_CONV", "winograd", "fourier or direct"]);
    let fp32 = [&["bench", "--device", "cpu", "--precision", "fp32"][..], &small].concat();
    let o = capsnet(&fp32, &[("CAPSNET_CONV", "fourier")]);
    assert_clean_error(&o, &["CAPSNET_CONV=fourier", "--precision bf16"]);
    if Bf16Gemm::Avx512Bf16.supported() {
        for (name, fourier) in [("fourier", true), ("direct", false)] {
            let o = bf16(&[("CAPSNET_BF16_GEMM", "avx512-bf16"), ("CAPSNET_CONV", name)]);
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(stdout(&o).contains("Fourier convolutions"), fourier, "{}", stdout(&o));
        }
    }
    if !Bf16Gemm::ALL.iter().any(|k| k.supported()) {
        assert_clean_error(
            &bf16(&[]),
            &["--device cpu", "AMX-BF16", "AVX512_BF16", "--precision fp32"],
        );
    }
    let o = capsnet(&["bench", "--device", "cpu", "--kernels", "routing=v2"], &[]);
    assert_clean_error(&o, &["--kernels"]);
    if !emulated_device_usable() {
        return;
    }
    // `bench` on the emulated device with a small model, one timed step or op run
    let bench = |flags: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "bench",
            "--device",
            "emulated",
            "--steps",
            "1",
            "--conv1-channels",
            "16",
            "--primary-maps",
            "4",
        ];
        args.extend(flags);
        capsnet(&args, env)
    };
    // a GPU (here emulated) runs bf16 GEMMs unless told otherwise, and says which set it runs
    for (flags, says) in [
        (vec![], "bf16 GEMMs"),
        (vec!["--precision", "tf32"], "tf32 GEMMs"),
        (vec!["--precision", "fp32", "--kernels", "routing=v2"], "routing=v2"),
    ] {
        let flags = [&["--batch-size", "1", "--warmup", "0"][..], &flags].concat();
        let o = bench(&flags, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains(says), "{flags:?}: no {says:?} in\n{}", stdout(&o));
    }
    // the timed step is the one training runs: its batch gathered on the device, replayed as a graph
    // after a warm-up step, or launched kernel by kernel with --eager
    for (eager, says) in [
        (false, "steps replayed as a CUDA graph"),
        (true, "kernels launched one by one"),
    ] {
        let mut flags = vec!["--batch-size", "2", "--warmup", "1", "--precision", "fp32"];
        if eager {
            flags.push("--eager");
        }
        let o = bench(&flags, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains(says), "{flags:?}: no {says:?} in\n{}", stdout(&o));
    }
    // info --kernels lists every version of every op, the default starred
    let o = capsnet(&["info", "--kernels"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info = stdout(&o);
    for op in OPS {
        for v in op.versions {
            let star = if v.label == op.default { "*" } else { " " };
            let row = format!(
                "{:<18} {star}{:<5} {:<5} {}",
                op.name,
                v.label,
                v.precision.name(),
                v.kernels[0].name
            );
            assert!(info.contains(&row), "info --kernels lacks {row:?}:\n{info}");
        }
    }
    let o = bench(&["--kernels", "conv2d_fwd=v9"], &[]);
    assert_clean_error(&o, &["--kernels", "conv2d_fwd", "v9", "v1, tf32, bf16"]);
    let o = bench(&["--ops", "--batch-size", "2"], &[("CAPSNET_KERNELS", "routing=v7")]);
    assert_clean_error(&o, &["CAPSNET_KERNELS", "routing", "v7"]);
    let o = bench(&["--ops", "--batch-size", "2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("TFLOP/s") && out.contains("% peak") && out.contains("floor ms"),
        "{out}"
    );
    // layers per op: two convolutions (one for the input gradient: the image needs none), three
    // decoder layers, prediction + routing forward and backward
    for op in OPS {
        let layers = match op.name {
            "conv2d_fwd" | "conv2d_bwd_weight" => 2,
            "conv2d_bwd_input" => 1,
            "routing" => 2,
            _ => 3,
        };
        for v in op.versions {
            let rows = out
                .lines()
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&op.name) && f.contains(&v.label) && f.contains(&v.precision.name())
                })
                .count();
            assert_eq!(
                rows, layers,
                "{} {}: {rows} rows, want {layers}:\n{out}",
                op.name, v.label
            );
        }
    }
}

/// What the host does with other hardware, through the emulated device's stand-ins: a driver older
/// than CUDA 13.0 and a GPU older than sm_80 are clear errors naming the versions, for `info` and for
/// a command that would train; a GPU of another architecture gets its own cubins. And the compiled
/// kernels are kept on disk: a second run reads them, a damaged entry is compiled again.
#[test]
fn other_drivers_and_gpus_are_named_and_kernels_are_compiled_once() {
    if !emulated_device_usable() {
        return;
    }
    let dir = temp_dir("cli_standins");
    let cache = dir.join("cache");
    let env = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = vec![("CAPSNET_KERNEL_CACHE", s(&cache))];
        v.extend_from_slice(extra);
        v
    };
    let o = capsnet(
        &["info", "--emulated"],
        &env(&[("CAPSNET_EMULATOR_DRIVER_VERSION", "12.8")]),
    );
    assert_clean_error(&o, &["CUDA 12.8", "13.0", "driver 580", "NVRTC is 13.0"]);
    let o = capsnet(&["info", "--emulated"], &env(&[("CAPSNET_EMULATOR_CC", "7.5")]));
    assert_clean_error(&o, &["compute capability 7.5", "8.0"]);
    let data = mnist_dir();
    let o = capsnet(
        &[
            "train",
            "--device",
            "emulated",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&dir.join("run")),
            "--limit",
            "10",
        ],
        &env(&[("CAPSNET_EMULATOR_CC", "7.5")]),
    );
    assert_clean_error(&o, &["--device emulated", "compute capability 7.5"]);
    assert!(!dir.join("run").exists(), "a run that could not start wrote files");
    // an sm_86 GPU gets sm_86 cubins, loaded by the driver
    let o = capsnet(&["info", "--emulated"], &env(&[("CAPSNET_EMULATOR_CC", "8.6")]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("compile to a cubin for sm_86") && stdout(&o).contains("all load"),
        "{}",
        stdout(&o)
    );
    // sm_90: compiled once, then read from the cache; a damaged entry is compiled again
    let kernels_line = |o: &std::process::Output| {
        stdout(o)
            .lines()
            .find(|l| l.starts_with("kernels: all") && l.contains("sm_90"))
            .unwrap_or_else(|| panic!("no kernels line:\n{}", stdout(o)))
            .to_string()
    };
    let files = capsnet::kernels::SOURCES
        .iter()
        .filter(|(n, _)| n.ends_with(".cu"))
        .count();
    assert!(files >= 7, "kernel files: {files}");
    let first = kernels_line(&capsnet(&["info", "--emulated"], &env(&[])));
    assert!(
        first.contains(&format!("({files} compiled by NVRTC, 0 read from the cache")),
        "{first}"
    );
    let second = kernels_line(&capsnet(&["info", "--emulated"], &env(&[])));
    assert!(
        second.contains(&format!("(0 compiled by NVRTC, {files} read from the cache")),
        "{second}"
    );
    // adam.cu's cubins (the sm_86 run above left one too) damaged
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "cubin")
                && std::fs::read(p).is_ok_and(|b| b.windows(12).any(|w| w == b"adam_step_v1"))
        })
        .collect();
    assert!(!entries.is_empty(), "adam.cu's cubin in the cache");
    for entry in entries {
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&entry, bytes).unwrap();
    }
    let third = kernels_line(&capsnet(&["info", "--emulated"], &env(&[])));
    assert!(
        third.contains(&format!("(1 compiled by NVRTC, {} read from the cache", files - 1)),
        "{third}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The surprises a new user met, each now a clear answer: ranges, flags that do nothing where they
/// are given, devices by number, messages in words.
#[test]
fn flags_that_do_nothing_or_are_out_of_range_are_refused_in_words() {
    let data = mnist_dir();
    let run = temp_dir("cli_surprises");
    let ck = run.join("last.safetensors");
    let o = capsnet(&train_tiny(&data, &run, &["--epochs", "1"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // the one line on stdout: the checkpoint to use
    assert!(
        stdout(&o).starts_with(&format!(
            "best checkpoint: {} (epoch 1, validation accuracy",
            run.join("best.safetensors").display()
        )),
        "{}",
        stdout(&o)
    );
    let eval = |extra: &[&str]| {
        let mut a = vec!["eval", "--checkpoint", s(&ck), "--data", s(&data), "--device", "cpu"];
        a.extend(extra);
        capsnet(&a, &[])
    };
    assert_clean_error(
        &eval(&["--batch-size", "100000"]),
        &["--batch-size must be between 1 and 4096, got 100000"],
    );
    let o = eval(&["--limit", "0"]);
    assert_clean_error(&o, &["--limit must be at least 1"]);
    assert!(!stderr(&o).contains("--batch-size"), "{}", stderr(&o));
    assert_clean_error(
        &eval(&["--count", "5"]),
        &["--count is a figure's setting", "--figures DIR"],
    );
    // eval --json: one object
    let o = eval(&["--limit", "20", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["images"], 20);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 10);
    assert!((0.0..=1.0).contains(&v["accuracy"].as_f64().unwrap()));
    // a directory given as a checkpoint names the file to give
    assert_clean_error(
        &capsnet(&["eval", "--checkpoint", s(&run), "--data", s(&data)], &[]),
        &["is a directory", "such as", "best.safetensors"],
    );
    // --eager does nothing on the CPU; --arch only with --kernels, and only where the kernels run
    assert_clean_error(
        &capsnet(&train_tiny(&data, &run, &["--eager"]), &[]),
        &["--eager", "CPU"],
    );
    assert_clean_error(
        &capsnet(&["info", "--arch", "sm_80"], &[]),
        &["--arch sm_80", "add --kernels"],
    );
    let o = capsnet(&["info", "--kernels", "--arch", "sm_75"], &[]);
    assert_clean_error(&o, &["--arch sm_75", "sm_80 (Ampere) or newer"]);
    assert!(
        stderr(&o).lines().count() <= 2,
        "one line, not ptxas's log:\n{}",
        stderr(&o)
    );
    // devices by number; a wrong one in words, not clap's suggestion of 'cpu'
    for (value, needle) in [("gpu:x", "cuda:N"), ("tpu", "is not a device"), ("cuda:-1", "cuda:N")] {
        let o = capsnet(&["train", "--device", value], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(needle) && !stderr(&o).contains("panicked"),
            "{value}: {}",
            stderr(&o)
        );
    }
    // counts in words; a negative threshold is a value, refused by range
    let o = capsnet(&["train", "--shift=-1"], &[]);
    assert!(
        stderr(&o).contains("'-1' is negative") && !stderr(&o).contains("invalid digit"),
        "{}",
        stderr(&o)
    );
    assert_clean_error(
        &capsnet(&["predict", "--checkpoint", s(&ck), "--threshold", "-1", "x.png"], &[]),
        &["--threshold must be between 0 and 1", "got -1"],
    );
    // an empty CAPSNET_DATA is no setting: the default directory is looked for and named
    let o = capsnet(
        &["eval", "--checkpoint", s(&ck), "--device", "cpu"],
        &[("CAPSNET_DATA", "")],
    );
    assert_clean_error(&o, &["data/mnist"]);
    assert!(!stderr(&o).contains("a value is required"), "{}", stderr(&o));
    // no raw OS error numbers
    let o = capsnet(
        &["eval", "--checkpoint", "/nonexistent/x.safetensors", "--data", s(&data)],
        &[],
    );
    assert_clean_error(&o, &["No such file or directory"]);
    assert!(!stderr(&o).contains("os error"), "{}", stderr(&o));
    // one step, not "1 steps"
    let o = capsnet(
        &[
            "bench",
            "--device",
            "cpu",
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        &[],
    );
    assert!(stdout(&o).contains("over 1 step,"), "{}", stdout(&o));
    // the threads: by flag (any command) or variable; 0 is refused
    let bench1 = [
        "bench",
        "--device",
        "cpu",
        "--conv1-channels",
        "4",
        "--primary-maps",
        "2",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
    ];
    let mut flagged = bench1.to_vec();
    flagged.extend(["--threads", "1"]);
    for (args, env) in [
        (flagged.clone(), vec![]),
        (bench1.to_vec(), vec![("CAPSNET_THREADS", "1")]),
    ] {
        let o = capsnet(&args, &env);
        assert!(
            stdout(&o).contains("backend: cpu (1 thread, "),
            "{env:?}: {}",
            stdout(&o)
        );
    }
    let o = capsnet(
        &[
            "--threads",
            "3",
            "bench",
            "--device",
            "cpu",
            "--conv1-channels",
            "4",
            "--primary-maps",
            "2",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        &[],
    );
    assert!(stdout(&o).contains("backend: cpu (3 threads, "), "{}", stdout(&o));
    assert_clean_error(
        &capsnet(&["info", "--threads", "0"], &[]),
        &["--threads must be at least 1"],
    );
}

/// `capsnet train 2>&1 | head -3`: the reader goes away; the run ends quietly (SIGPIPE's status), and
/// a Ctrl-C during validation ends the epoch, saves it and says how to continue.
#[test]
fn a_closed_stderr_and_an_interrupt_during_validation_end_cleanly() {
    use std::io::BufRead;
    let data = mnist_dir();
    let run = temp_dir("cli_closed_stderr");
    let mut c = capsnet_command(&train_tiny(&data, &run, &["--epochs", "2"]));
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    drop(err); // the reader goes away after a line
    let o = child.wait_with_output().unwrap();
    assert!(matches!(o.status.code(), Some(141) | Some(0)), "{:?}", o.status);
    // (a panic would be status 101); whatever it had written is whole
    if run.join("last.safetensors").exists() {
        checkpoint::load(&run.join("last.safetensors")).unwrap();
    }

    // a long validation: interrupted while it runs
    let run = temp_dir("cli_interrupt_validation");
    let mut args = train_tiny(&data, &run, &["--epochs", "2"]);
    let at = args.iter().position(|a| *a == "100").unwrap(); // --val-limit
    args[at] = "5000";
    let mut c = capsnet_command(&args);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the run ended before validating:\n{seen}"
        );
        seen.push_str(&line);
        if line.contains("validation [") {
            break;
        }
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(
        rest.contains("interrupted: saved the end of epoch 1") && rest.contains("continue with:"),
        "{rest}"
    );
    assert_eq!(last_checkpoint(&run).state.epoch, 1);
}

/// docs/CLI.md's synopsis of each command lists exactly the flags its `--help` has, and every flag
/// the README shows exists: the documentation and the binary cannot drift apart.
#[test]
fn the_docs_and_help_agree_on_every_flag() {
    use std::collections::BTreeSet;
    let flags_in = |text: &str| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let b = text.as_bytes();
        let mut i = 0;
        while let Some(k) = text[i..].find("--") {
            let start = i + k;
            let before = if start == 0 { b' ' } else { b[start - 1] };
            let end = start
                + 2
                + text[start + 2..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .unwrap_or(text.len() - start - 2);
            let name = &text[start..end];
            if name.len() > 3 && !before.is_ascii_alphanumeric() && before != b'-' {
                out.insert(name.to_string());
            }
            i = end.max(start + 2);
        }
        out
    };
    let help = |cmd: &str| -> BTreeSet<String> {
        let o = capsnet(&[cmd, "--help"], &[]);
        assert!(o.status.success(), "{cmd} --help: {}", stderr(&o));
        // every flag says what it does: text beside it or on the line under it
        let text = stdout(&o);
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !t.starts_with("--") && !t.starts_with("-h, ") {
                continue;
            }
            let beside = t.split("  ").skip(1).any(|x| !x.trim().is_empty());
            let under = lines.get(i + 1).is_some_and(|n| {
                let n = n.trim_start();
                !n.is_empty() && !n.starts_with('-')
            });
            assert!(beside || under, "`capsnet {cmd} --help`: no help text for {t}");
        }
        let flags: BTreeSet<String> = stdout(&o)
            .lines()
            .filter_map(|l| {
                let t = l.trim_start();
                let t = t.strip_prefix("-h, ").unwrap_or(t);
                t.starts_with("--")
                    .then(|| t.split([' ', '=', '[', '<']).next().unwrap().to_string())
            })
            .filter(|f| f != "--help")
            .collect();
        flags
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/CLI.md")).unwrap();
    let o = capsnet(&["--help"], &[]);
    let commands: Vec<String> = stdout(&o)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 9, "{commands:?}");
    // flags every command takes (listed once in the docs)
    let global: BTreeSet<String> = stdout(&o)
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix("-h, ").or_else(|| t.strip_prefix("-V, ")).unwrap_or(t);
            t.starts_with("--")
                .then(|| t.split([' ', '=', '[', '<']).next().unwrap().to_string())
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    assert!(global.contains("--threads"), "{global:?}");
    for f in &global {
        assert!(docs.contains(&format!("`{f}")), "docs/CLI.md does not describe {f}");
    }
    let mut every = std::collections::BTreeMap::new();
    for cmd in &commands {
        let head = format!("    capsnet {cmd} ");
        let lines: Vec<&str> = docs.lines().collect();
        let start = lines
            .iter()
            .position(|l| l.starts_with(&head) || *l == head.trim_end())
            .unwrap_or_else(|| panic!("docs/CLI.md has no synopsis of `capsnet {cmd}`"));
        let block: String = std::iter::once(lines[start])
            .chain(
                lines[start + 1..]
                    .iter()
                    .copied()
                    .take_while(|l| l.starts_with("          ")),
            )
            .collect::<Vec<_>>()
            .join("\n");
        let documented = flags_in(&block);
        let actual: BTreeSet<String> = help(cmd).difference(&global).cloned().collect();
        assert_eq!(
            documented, actual,
            "`capsnet {cmd}`: docs/CLI.md's synopsis (left) and --help (right)"
        );
        every.insert(cmd.clone(), actual);
    }
    // the README's commands use flags that exist
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut checked = 0;
    for line in readme.lines() {
        let Some(cmd) = commands
            .iter()
            .find(|c| line.contains(&format!("-- {c} ")) || line.contains(&format!("capsnet {c} ")))
        else {
            continue;
        };
        let code = line.split('#').next().unwrap();
        // the flags after the command's name (before it: cargo's)
        let at = code.find(&format!(" {cmd} ")).unwrap();
        for f in flags_in(&code[at..]) {
            assert!(
                every[cmd].contains(&f),
                "README: `{f}` is not a flag of `capsnet {cmd}`: {line}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} flags found in the README's commands");
}

/// `--cpu-gemm` (and `CAPSNET_CPU_GEMM`) forces the fast CPU backend's f32 GEMM, which the backend
/// line names; a GEMM this CPU cannot run and an unknown name are refused in words.
#[test]
fn cpu_gemm_forces_the_gemm_and_the_backend_line_names_it() {
    use capsnet::backend::CpuGemm;
    let bench = [
        "bench",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
    ];
    let tiny = ["--conv1-channels", "4", "--primary-maps", "2"];
    let backend_line = |o: &std::process::Output| {
        stdout(o)
            .lines()
            .chain(stderr(o).lines())
            .find(|l| l.starts_with("backend: "))
            .unwrap_or_default()
            .to_string()
    };
    for g in CpuGemm::ALL {
        let mut a: Vec<&str> = bench.iter().chain(tiny.iter()).copied().collect();
        a.extend(["--cpu-gemm", g.flag()]);
        let o = capsnet(&a, &[]);
        if g.supported() {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(
                backend_line(&o).contains(&g.describe()),
                "{}: {}",
                g.flag(),
                backend_line(&o)
            );
        } else {
            assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
            assert!(
                stderr(&o).contains("--cpu-gemm") && stderr(&o).contains("cannot run"),
                "{}",
                stderr(&o)
            );
        }
    }
    // the environment forces it too, and auto takes the best this CPU runs
    let a: Vec<&str> = bench.iter().chain(tiny.iter()).copied().collect();
    let o = capsnet(&a, &[("CAPSNET_CPU_GEMM", "avx2")]);
    assert!(backend_line(&o).contains("matrixmultiply"), "{}", backend_line(&o));
    // auto names none: the CPU's default precision runs (bf16 where it has AMX tiles, or
    // AVX512_BF16 on an AMD CPU), on the best kernel for it
    let o = capsnet(&a, &[("CAPSNET_CPU_GEMM", "auto")]);
    let default = if capsnet::backend::fast::FastCpu::default_precision() == capsnet::float::Precision::Bf16 {
        capsnet::backend::bf16::Bf16Gemm::choose()
            .unwrap()
            .describe()
            .to_string()
    } else {
        CpuGemm::best().describe()
    };
    assert!(backend_line(&o).contains(&default), "{}", backend_line(&o));
    // an f32 GEMM named beside bf16 is a flag that does nothing: refused
    let mut both = a.clone();
    both.extend(["--cpu-gemm", "avx2", "--precision", "bf16"]);
    assert_clean_error(&capsnet(&both, &[]), &["--cpu-gemm", "--precision bf16"]);
    let mut a = a.clone();
    a.extend(["--cpu-gemm", "blas"]);
    let o = capsnet(&a, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--cpu-gemm") && stderr(&o).contains("'blas' is not a CPU GEMM: give auto, avx512 or avx2"),
        "{}",
        stderr(&o)
    );
}
