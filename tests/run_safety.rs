//! Runs that nothing can corrupt: a run directory used by one training at a time, checkpoints whose
//! every tensor is checksummed, writes that fail (a full disk) leaving a run that `--resume`
//! continues, a resume that takes the stored settings, and weights-only files (`capsnet export`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsnet::checkpoint;
use common::{assert_clean_error, capsnet, capsnet_command, mnist_dir, stderr, stdout, temp_dir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny model's training flags, without the run directory.
const TINY: [&str; 12] = [
    "--conv1-channels",
    "4",
    "--primary-maps",
    "2",
    "--limit",
    "200",
    "--val-limit",
    "50",
    "--batch-size",
    "50",
    "--device",
    "cpu",
];

fn train_args<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", s(data), "--checkpoint-dir", s(run)];
    a.extend(TINY);
    a.extend(extra);
    a
}

/// Parameters, Adam moments, step and epoch of a checkpoint.
type WeightsAndState = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>, u64, usize);

/// Parameters, Adam moments and state of a checkpoint (the history's timings differ between runs).
fn weights_and_state(path: &Path) -> WeightsAndState {
    let c = checkpoint::load(path).unwrap();
    (c.params, c.adam_m, c.adam_v, c.state.step, c.state.epoch)
}

/// Where each tensor's data lies in a safetensors file: (name, start, end), absolute offsets.
fn tensor_spans(bytes: &[u8]) -> Vec<(String, usize, usize)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            (
                k.clone(),
                8 + n + o[0].as_u64().unwrap() as usize,
                8 + n + o[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_run_directory_serves_one_training_at_a_time() {
    let data = mnist_dir();
    let run = temp_dir("safety_lock");
    // long enough to be running while the others try
    let mut first = train_args(&data, &run, &["--epochs", "3"]);
    let at = first.iter().position(|a| *a == "200").unwrap();
    first[at] = "2000";
    let mut child = capsnet_command(&first)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    wait_for("the first run's step-0 checkpoint", || {
        run.join("last.safetensors").exists()
    });
    // leftovers of writes: a live writer's temporary stays, a dead one's goes (on the next open)
    let live = run.join(format!(".best.safetensors.tmp{}", std::process::id()));
    let dead_pid = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let id = c.id();
        c.wait().unwrap();
        id
    };
    let dead = run.join(format!(".best.safetensors.tmp{dead_pid}"));
    std::fs::write(&live, b"live").unwrap();
    std::fs::write(&dead, b"dead").unwrap();

    let second = capsnet(&train_args(&data, &run, &["--epochs", "3"]), &[]);
    assert_clean_error(
        &second,
        &[
            s(&run),
            &format!("a training run (process {pid}) is using this run directory"),
        ],
    );
    let resume = capsnet(&train_args(&data, &run, &["--epochs", "3", "--resume"]), &[]);
    assert_clean_error(&resume, &[&format!("process {pid}")]);
    assert!(live.exists() && dead.exists(), "a refused run removes nothing");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first run ended before the others were refused: lengthen it"
    );

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ck = checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!(
        (ck.state.epoch, ck.history.len()),
        (3, 3),
        "the first run finished untouched"
    );

    // the run is over: a resume may open the directory, and clears only the dead writer's temporary
    let mut resume = first.clone();
    resume.push("--resume");
    let o = capsnet(&resume, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!dead.exists(), "a dead writer's temporary is removed");
    assert!(live.exists(), "a live writer's temporary is kept");
    std::fs::remove_file(&live).unwrap();
}

#[test]
fn flipped_bytes_in_any_tensor_are_an_error_naming_it() {
    let data = mnist_dir();
    let run = temp_dir("safety_checksum");
    let o = capsnet(&train_args(&data, &run, &["--epochs", "1"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let last = run.join("last.safetensors");
    let good = std::fs::read(&last).unwrap();
    let spans = tensor_spans(&good);
    assert_eq!(spans.len(), 33, "11 parameters and their two Adam moments");
    for (name, start, end) in &spans {
        let mut bad = good.clone();
        let mid = (start + end) / 2;
        bad[mid] ^= 0x5a;
        std::fs::write(&last, &bad).unwrap();
        let o = capsnet(
            &[
                "eval",
                "--checkpoint",
                s(&last),
                "--data",
                s(&data),
                "--limit",
                "10",
                "--device",
                "cpu",
            ],
            &[],
        );
        assert_clean_error(&o, &[s(&last), &format!("tensor '{name}'"), "SHA-256"]);
    }
    // a damaged last with a sound best says so, also when resuming
    let mut bad = good.clone();
    bad[spans[0].1] ^= 1;
    std::fs::write(&last, &bad).unwrap();
    let o = capsnet(&train_args(&data, &run, &["--epochs", "2", "--resume"]), &[]);
    assert_clean_error(&o, &["damaged", "best.safetensors beside it is sound (epoch 1"]);
    assert_eq!(std::fs::read(&last).unwrap(), bad, "a refused resume writes nothing");
    // and the file as written loads
    std::fs::write(&last, &good).unwrap();
    checkpoint::load(&last).unwrap();
}

#[test]
fn a_full_disk_mid_run_leaves_a_run_that_resume_continues() {
    let data = mnist_dir();
    let whole = temp_dir("safety_disk_whole");
    let o = capsnet(&train_args(&data, &whole, &["--epochs", "2"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // a fresh run writes last + metrics at step 0, then steps.jsonl, then best, last, metrics at
    // each epoch's end: the disk fills at each of them in turn (epoch 2 writes best only if it
    // improved: its first or second write is the 7th or 8th)
    for writes in ["1", "2", "3", "4", "5", "6", "7"] {
        let run = temp_dir(&format!("safety_disk_{writes}"));
        let o = capsnet(
            &train_args(&data, &run, &["--epochs", "2"]),
            &[("CAPSNET_FAULT_WRITES", writes)],
        );
        assert_clean_error(&o, &["cannot write: No space left on device"]);
        assert!(!stderr(&o).contains("os error"), "{}", stderr(&o));
        let tmps: Vec<PathBuf> = std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(tmps.is_empty(), "a failed write leaves no temporary: {tmps:?}");
        // space freed: the same directory, only --resume (and where to run) given
        let o = capsnet(
            &[
                "train",
                "--data",
                s(&data),
                "--checkpoint-dir",
                s(&run),
                "--resume",
                "--device",
                "cpu",
            ],
            &[],
        );
        assert!(o.status.success(), "after {writes} writes: {}", stderr(&o));
        assert_eq!(
            weights_and_state(&run.join("last.safetensors")),
            weights_and_state(&whole.join("last.safetensors")),
            "the resumed run after {writes} writes ends where an uninterrupted one does"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            2
        );
        // steps.jsonl: every step once, in order, as an uninterrupted run has them
        let steps: Vec<u64> = std::fs::read_to_string(run.join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<u64>>(), "after {writes} writes");
    }
    // a failed first write leaves no run: the next fresh run may start
    let run = temp_dir("safety_disk_0");
    let o = capsnet(
        &train_args(&data, &run, &["--epochs", "1"]),
        &[("CAPSNET_FAULT_WRITES", "0")],
    );
    assert_clean_error(&o, &["No space left on device"]);
    let o = capsnet(&train_args(&data, &run, &["--epochs", "1"]), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_run_directory_that_cannot_be_written_is_refused_before_training() {
    let data = mnist_dir();
    let base = temp_dir("safety_unwritable");
    let file = base.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("run");
    let o = capsnet(&train_args(&data, &under, &["--epochs", "1"]), &[]);
    assert_clean_error(&o, &[s(&under), "cannot create the run directory", "Not a directory"]);
    assert!(
        !stderr(&o).contains("os error") && !stderr(&o).contains("epoch 1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn resume_takes_the_stored_settings_and_the_target_epochs() {
    let data = mnist_dir();
    let run = temp_dir("safety_resume_stored");
    let paper = ["--preset", "paper", "--routing", "1", "--lr", "0.002", "--seed", "9"];
    let mut first = train_args(&data, &run, &["--epochs", "2", "--checkpoint-steps", "2"]);
    first.extend(paper);
    // 4 steps an epoch; the disk fills in epoch 2, after step 0 (3 writes with steps.jsonl), epoch
    // 1's two step checkpoints and its end (3), and epoch 2's first step checkpoint
    let o = capsnet(&first, &[("CAPSNET_FAULT_WRITES", "9")]);
    assert_clean_error(&o, &["No space left on device"]);
    let stopped = checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert!(
        stopped.state.epoch == 1 && stopped.state.step == 6 && stopped.state.partial.is_some(),
        "{:?}",
        stopped.state
    );
    // given flags that agree are accepted, others refused by name
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--preset",
            "notebook",
            "--seed",
            "9",
        ],
        &[],
    );
    assert_clean_error(
        &o,
        &[
            "--routing 2 (set by --preset notebook), stored 1",
            "--shift 0 (set by --preset notebook), stored 2",
        ],
    );
    assert!(!stderr(&o).contains("--seed"), "--seed agrees: {}", stderr(&o));
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--conv1-channels",
            "256",
        ],
        &[],
    );
    assert_clean_error(&o, &["--conv1-channels 256, stored 4"]);
    // nothing retyped: the stored model, settings and --epochs
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let whole = temp_dir("safety_resume_whole");
    let mut again = train_args(&data, &whole, &["--epochs", "2"]);
    again.extend(paper);
    assert!(capsnet(&again, &[]).status.success());
    let done = checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!(done.state.epoch, 2, "the stored --epochs 2 is reached");
    assert_eq!(done.config.routing_rounds, 1);
    assert_eq!(
        weights_and_state(&run.join("last.safetensors")),
        weights_and_state(&whole.join("last.safetensors"))
    );
    // a later --epochs goes further
    let o = capsnet(
        &[
            "train",
            "--data",
            s(&data),
            "--checkpoint-dir",
            s(&run),
            "--resume",
            "--device",
            "cpu",
            "--epochs",
            "3",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(checkpoint::load(&run.join("last.safetensors")).unwrap().state.epoch, 3);
}

#[test]
fn exported_weights_serve_eval_predict_and_figures_and_pytorch_names() {
    let data = mnist_dir();
    let run = temp_dir("safety_export");
    assert!(
        capsnet(&train_args(&data, &run, &["--epochs", "1"]), &[])
            .status
            .success()
    );
    let last = run.join("last.safetensors");
    let out = temp_dir("safety_export_out");
    let weights = out.join("weights.safetensors");
    let torch = out.join("torch.safetensors");
    let o = capsnet(&["export", "--checkpoint", s(&last), "--out", s(&weights)], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
    let o = capsnet(
        &[
            "export",
            "--checkpoint",
            s(&last),
            "--out",
            s(&torch),
            "--layout",
            "pytorch",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // nothing is overwritten
    let before = std::fs::read(&weights).unwrap();
    let o = capsnet(&["export", "--checkpoint", s(&last), "--out", s(&weights)], &[]);
    assert_clean_error(&o, &[s(&weights), "exists"]);
    assert_eq!(std::fs::read(&weights).unwrap(), before);

    let full = std::fs::metadata(&last).unwrap().len();
    let small = std::fs::metadata(&weights).unwrap().len();
    assert!(small * 5 < full * 2, "weights only: {small} bytes of {full}");
    let ck = checkpoint::load(&last).unwrap();
    for f in [&weights, &torch] {
        let w = checkpoint::load(f).unwrap();
        assert!(!w.has_optimizer());
        assert_eq!(w.params, ck.params, "{} holds the same weights", f.display());
        assert_eq!(w.config, ck.config);
    }
    // PyTorch's names and layouts: OIHW convolutions, [out, in] linear layers
    let bytes = std::fs::read(&torch).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
    assert_eq!(shape("conv1.weight"), [4, 1, 9, 9]);
    assert_eq!(shape("conv2.weight"), [16, 4, 9, 9]);
    assert_eq!(shape("W"), [1152 / 32 * 2, 10, 16, 8]);
    assert_eq!(shape("fc1.weight"), [512, 160]);
    assert_eq!(shape("fc3.bias"), [784]);
    let c1 = st.tensor("conv1.weight").unwrap();
    let oihw = |o: usize, kh: usize, kw: usize| {
        let i = ((o * 9) + kh) * 9 + kw;
        f32::from_le_bytes(c1.data()[4 * i..4 * i + 4].try_into().unwrap())
    };
    // capsnet's conv1.weight is HWIO [9, 9, 1, 4]
    assert_eq!(oihw(3, 2, 5), ck.params[0][(2 * 9 + 5) * 4 + 3]);

    let eval = |f: &Path| {
        let o = capsnet(
            &[
                "eval",
                "--checkpoint",
                s(f),
                "--data",
                s(&data),
                "--limit",
                "100",
                "--device",
                "cpu",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let reference = eval(&last);
    assert_eq!(eval(&weights), reference);
    assert_eq!(eval(&torch), reference);
    // predict reads weights alone too, and finds the same
    let digit = out.join("bar.png");
    image::GrayImage::from_fn(40, 40, |x, y| {
        image::Luma([if (17..23).contains(&x) && (8..32).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&digit)
    .unwrap();
    let predict = |f: &Path| {
        let o = capsnet(
            &["predict", "--checkpoint", s(f), "--device", "cpu", "--json", s(&digit)],
            &[],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(predict(&weights), predict(&last));
    assert_eq!(predict(&torch), predict(&last));
    let figs = out.join("figs");
    let o = capsnet(
        &[
            "figures",
            "--checkpoint",
            s(&weights),
            "--data",
            s(&data),
            "--limit",
            "100",
            "--out",
            s(&figs),
            "--device",
            "cpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(figs.join("reconstructions.png").exists());
    // a training run cannot resume from weights alone
    let wrun = temp_dir("safety_export_run");
    std::fs::copy(&weights, wrun.join("last.safetensors")).unwrap();
    let o = capsnet(&train_args(&data, &wrun, &["--epochs", "2", "--resume"]), &[]);
    assert_clean_error(&o, &["weights only", "capsnet export"]);
}

#[test]
fn a_run_that_diverges_at_once_keeps_its_step_0_checkpoint() {
    let data = mnist_dir();
    let run = temp_dir("safety_diverge");
    let o = capsnet(&train_args(&data, &run, &["--epochs", "1", "--lr", "1e30"]), &[]);
    assert_clean_error(&o, &["training diverged", "last good state"]);
    // the state it names exists: the weights it started from
    let ck = checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!((ck.state.step, ck.state.epoch), (0, 0));
    assert!(ck.params.iter().flatten().all(|x| x.is_finite()));
}
