//! The runs a lent GPU gets (benches/gpu_run.py), proven here without one: each plan's dry run on the
//! emulated device at toy sizes, end to end through the same phases, commands and parsing; its time
//! caps; that it leaves at most 8 files, the GPU machine's limit; the summary's format; how a failing
//! kernel version is left out of the later phases; and that what the packed copy (.gpu/) carries to the GPU
//! machine stays within its 64 MiB.
//!
//! The dry runs need python3, and the emulated device (g++, NVRTC); with CAPSNET_REQUIRE_GPU=1 they
//! print SKIPPED, being about the emulated device. They use the test executables `fragments` and
//! `cuda` beside this one, which `cargo test` builds first.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn skip(why: &str) -> bool {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
    false
}

/// Whether the dry runs can run here: the emulated device is what they run on.
fn dry_runs_possible() -> bool {
    if std::env::var_os("CAPSNET_REQUIRE_GPU").is_some() {
        return skip("the GPU run's dry run is for the emulated device (CAPSNET_REQUIRE_GPU=1)");
    }
    // panics where NVRTC is required and missing; None (SKIPPED) where it may be missing
    common::cuda_backend().is_some()
}

fn deps_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_capsnet")).parent().unwrap().to_path_buf()
}

/// The newest executable `stem-<hash>` beside this test (what benches/gpu_run.py runs).
fn test_exe(stem: &str) -> PathBuf {
    let found = std::fs::read_dir(deps_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.strip_prefix(&format!("{stem}-"))
                .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    found.unwrap_or_else(|| {
        panic!(
            "no {stem} test executable in {}: build them with `cargo test --release --no-run`",
            deps_dir().display()
        )
    })
}

/// One dry run at a time: two at once on a 2-core machine would each see half of it, and a phase
/// whose work outgrew its cap would be stopped for want of cores, not for a fault.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `python3 benches/gpu_run.py ARGS` as the GPU machine would, on this build; its own kernel
/// cache, filled first by `capsnet info --emulated` so no phase waits for NVRTC.
fn gpu_run(args: &[&str], cache: &Path) -> (std::process::Output, f64) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let env = |c: &mut Command| {
        c.env("CAPSNET_BIN_DIR", bin_dir())
            .env("CAPSNET_TESTS_DIR", deps_dir())
            .env("CAPSNET_DATA", common::mnist_dir())
            .env("CAPSNET_KERNEL_CACHE", cache)
            .env_remove("CAPSNET_KERNELS");
    };
    let mut warm = Command::new(env!("CARGO_BIN_EXE_capsnet"));
    env(&mut warm);
    let w = warm.args(["info", "--emulated"]).output().unwrap();
    assert!(
        w.status.success(),
        "capsnet info --emulated: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let t = std::time::Instant::now();
    let mut c = Command::new("python3");
    env(&mut c);
    let out = c
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_run.py"))
        .args(args)
        .output()
        .expect("python3 runs");
    (out, t.elapsed().as_secs_f64())
}

/// The files the run left, by name.
fn files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// The summary's table: (phase, result, seconds, cap) per row.
fn table(summary: &str) -> Vec<(String, String, f64, f64)> {
    summary
        .lines()
        .skip_while(|l| !l.starts_with("phase "))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let n = cols.len();
            (
                cols[0].to_string(),
                cols[1..n - 2].join(" "),
                cols[n - 2].parse().unwrap(),
                cols[n - 1].parse().unwrap(),
            )
        })
        .collect()
}

fn results(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("results.jsonl: {e}: {l}")))
        .collect()
}

fn of_kind<'a>(r: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    r.iter().filter(|v| v["kind"] == kind).collect()
}

/// The log archive's members.
fn archived(out: &Path) -> Vec<String> {
    let o = Command::new("tar")
        .arg("tzf")
        .arg(out.join("logs.tar.gz"))
        .output()
        .unwrap();
    assert!(o.status.success(), "logs.tar.gz does not list");
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// Every phase under its cap (a stopped command gets 10 s to save its state), the whole run under the
/// plan's total, the summary's rows in the plan's order.
fn check_caps(summary: &str, phases: &[&str], total: f64, wall: f64) {
    let rows = table(summary);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, phases, "the summary's phases:\n{summary}");
    let caps: f64 = rows.iter().map(|r| r.3).sum();
    assert!(caps <= total, "caps add up to {caps} s, over {total} s");
    for (phase, result, secs, cap) in &rows {
        assert!(
            *secs <= cap + 12.0,
            "{phase} ran {secs} s, over its cap {cap}:\n{summary}"
        );
        assert!(!result.starts_with("not run"), "{phase}: {result}\n{summary}");
    }
    assert!(wall <= total + 30.0, "the dry run took {wall:.0} s, over its {total} s");
}

#[test]
fn the_first_gpu_runs_dry_run_passes_through_every_phase_within_its_caps() {
    if !dry_runs_possible() {
        return;
    }
    let (fragments, cuda) = (test_exe("fragments"), test_exe("cuda"));
    assert!(fragments.is_file() && cuda.is_file());
    let dir = common::temp_dir("gpu_run_first");
    let out = dir.join("out");
    let (o, wall) = gpu_run(&["first", out.to_str().unwrap(), "--dry"], &dir.join("cache"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "the dry run failed:\n{log}");
    // what comes back from the GPU machine: at most 8 files; the live log is gone once the run ends
    assert_eq!(files(&out), ["logs.tar.gz", "results.jsonl", "summary.txt"]);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.starts_with("capsnet GPU run 'first' (DRY RUN"), "{summary}");
    let phases = [
        "info",
        "fragments",
        "parity",
        "largest",
        "steps",
        "ops",
        "peer",
        "train",
        "sanitize",
    ];
    check_caps(&summary, &phases, 520.0, wall);
    let rows = table(&summary);
    let result = |p: &str| rows.iter().find(|r| r.0 == p).unwrap().1.clone();
    for p in ["info", "fragments", "parity", "largest", "steps", "ops", "train"] {
        assert_eq!(result(p), "ok", "{p}:\n{summary}");
    }
    // no torch and no compute-sanitizer in CI: said so, not skipped in silence
    let peer = result("peer");
    assert!(peer == "ok" || peer.starts_with("FAILED"), "{summary}");
    assert_eq!(result("sanitize"), "not available", "{summary}");
    assert!(summary.contains("compute-sanitizer: not installed here"), "{summary}");
    // the figures, as the GPU run writes them
    let r = results(&out);
    let parity = of_kind(&r, "parity");
    assert_eq!(parity.len(), 1);
    assert_eq!(parity[0]["checked"], 3, "dense_bwd_weight: v1, tf32, bf16");
    assert_eq!(parity[0]["failed"], serde_json::json!([]));
    assert_eq!(of_kind(&r, "largest").iter().filter(|v| v["ok"] == true).count(), 2);
    let steps = of_kind(&r, "steps");
    assert_eq!(steps.len(), 3, "fp32 replayed and eager, bf16 replayed");
    assert!(steps.iter().all(|s| s["images_per_s"].as_f64().unwrap() > 0.0));
    assert!(steps.iter().any(|s| s["graph"] == true) && steps.iter().any(|s| s["graph"] == false));
    let ops = of_kind(&r, "op");
    assert!(ops.len() >= 20 && ops.iter().all(|v| v["matched"] == true), "{ops:?}");
    let trained = of_kind(&r, "training");
    assert_eq!(trained.len(), 2);
    assert_eq!(trained[0]["run"], "notebook");
    assert_eq!(trained[0]["epochs_done"], 2);
    assert!(trained[0]["test_accuracy"].as_f64().is_some());
    // the paper preset asked for more epochs than fit: its cap stopped it, its best checkpoint was
    // evaluated, and the next phase still ran
    assert_eq!(trained[1]["run"], "paper");
    assert_eq!(trained[1]["stopped_at_cap"], true, "{:?}", trained[1]);
    assert!(trained[1]["test_accuracy"].as_f64().is_some(), "{:?}", trained[1]);
    assert!(
        summary.contains("paper: ") && summary.contains("(stopped at its cap)"),
        "{summary}"
    );
    // every phase's log is in the archive, with the training runs' metrics
    let logs = archived(&out);
    for (n, p) in phases.iter().enumerate() {
        let want = format!("logs/{:02}-{p}.log", n + 1);
        assert!(logs.contains(&want), "{want} not in {logs:?}");
    }
    assert!(
        logs.iter().any(|l| l.ends_with("train-notebook-metrics.jsonl")),
        "{logs:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_second_gpu_runs_dry_run_passes_through_every_phase_within_its_caps() {
    if !dry_runs_possible() {
        return;
    }
    let dir = common::temp_dir("gpu_run_second");
    let out = dir.join("out");
    let (o, wall) = gpu_run(&["second", out.to_str().unwrap(), "--dry"], &dir.join("cache"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "the dry run failed:\n{log}");
    assert_eq!(files(&out), ["logs.tar.gz", "results.jsonl", "summary.txt"]);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    check_caps(&summary, &["info", "paper", "multimnist", "profile"], 190.0, wall);
    let rows = table(&summary);
    for (phase, result, _, _) in &rows {
        let want = if phase == "profile" { "not available" } else { "ok" };
        assert_eq!(result, want, "{phase}:\n{summary}");
    }
    assert!(summary.contains("ncu: not installed here"), "{summary}");
    let r = results(&out);
    let trained = of_kind(&r, "training");
    assert_eq!(trained.len(), 2);
    assert!(
        trained.iter().all(|t| t["test_accuracy"].as_f64().is_some()),
        "{trained:?}"
    );
    assert_eq!(trained[1]["run"], "multimnist");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The parity log's failures decide what the later phases run: a failing tensor-core version drops its
/// precision, a failing fp32 version gives way to another fp32 version of its op that passed, and an op
/// with no fp32 version left is named.
#[test]
fn a_failing_version_is_named_and_the_later_phases_go_on_without_it() {
    let dir = common::temp_dir("gpu_run_fallbacks");
    let log = dir.join("parity.log");
    std::fs::write(
        &log,
        "running 21 tests\n\
         version-check: conv2d_fwd v1 fp32 default ok (1.0 s)\n\
         version-check: conv2d_fwd bf16 bf16 - FAIL (2.0 s)\n\
         version-check: routing v1 fp32 - ok (1.0 s)\n\
         version-check: routing v2 fp32 - ok (1.0 s)\n\
         version-check: routing fused fp32 default FAIL (1.0 s)\n\
         version-check: dense_fwd v1 fp32 default FAIL (0.1 s)\n\
         version-check: dense_fwd tf32 tf32 - ok (0.1 s)\n\
         test cuda_every_kernel_version_matches_cpu ... FAILED\n",
    )
    .unwrap();
    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_run.py"))
        .arg("fallbacks")
        .arg(&log)
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["checked"], 7);
    assert_eq!(
        v["failed"],
        serde_json::json!(["conv2d_fwd bf16", "routing fused", "dense_fwd v1"])
    );
    assert_eq!(v["skip_precisions"], serde_json::json!(["bf16"]));
    assert_eq!(v["kernels"], "routing=v1");
    assert_eq!(v["no_fp32_version_left"], serde_json::json!(["dense_fwd"]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test executables benches/gpu_run.py runs (its TEST_EXES), which `trim` keeps.
fn gpu_test_exes() -> Vec<String> {
    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_run.py"))
        .arg("test-exes")
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `gpu_run.py trim` keeps in a packed copy's tests/ the newest executable of each stem the runs use
/// and removes the rest; a stem with no executable is an error naming it.
#[test]
fn trim_keeps_only_the_test_executables_the_runs_use() {
    let dir = common::temp_dir("gpu_run_trim");
    let tests = dir.join("tests");
    std::fs::create_dir_all(&tests).unwrap();
    let stems = gpu_test_exes();
    assert!(stems.contains(&"cuda".to_string()) && stems.contains(&"fragments".to_string()));
    let mut want = vec![];
    let write = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = tests.join(name);
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    for (i, stem) in stems.iter().enumerate() {
        write(&format!("{stem}-{:016x}", i));
        // a newer build of the same stem is the one kept
        std::thread::sleep(std::time::Duration::from_millis(20));
        let newer = format!("{stem}-{:016x}", 100 + i);
        write(&newer);
        want.push(newer);
    }
    for other in [
        "cli-0123456789abcdef",
        "serve-0123456789abcdef",
        "capsnet-0123456789abcdef",
        "tests.list",
    ] {
        write(other);
    }
    let trim = || {
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_run.py"))
            .arg("trim")
            .arg(&dir)
            .output()
            .expect("python3 runs")
    };
    let o = trim();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut left: Vec<String> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    want.sort();
    assert_eq!(left, want);
    // with one stem's executable gone, trim says which
    std::fs::remove_file(tests.join(&want[0])).unwrap();
    let o = trim();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let gone = want[0].rsplit_once('-').unwrap().0;
    assert!(err.contains("missing test executables") && err.contains(gone), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What travels to the GPU machine, measured on this build: the packed copy (.gpu/) after
/// `gpu_run.py trim` (the release binary, the test executables the runs use, MNIST) beside the
/// tracked tree, within the 64 MiB that may travel (the figure is printed, and recorded in
/// docs/BENCHMARKS.md).
#[test]
fn what_travels_to_the_gpu_machine_fits_its_64_mib() {
    let size = |p: &Path| p.metadata().map(|m| m.len()).unwrap_or(0);
    let stems = gpu_test_exes();
    let tests: u64 = stems.iter().map(|s| size(&test_exe(s))).sum();
    let binary = size(Path::new(env!("CARGO_BIN_EXE_capsnet")));
    let mnist: u64 = std::fs::read_dir(common::mnist_dir())
        .unwrap()
        .map(|e| size(&e.unwrap().path()))
        .sum();
    let tracked = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let tree: u64 = match tracked {
        Ok(o) if o.status.success() => o
            .stdout
            .split(|&b| b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| size(&Path::new(env!("CARGO_MANIFEST_DIR")).join(String::from_utf8_lossy(f).as_ref())))
            .sum(),
        _ => panic!("git ls-files does not run: the tree's size is unknown"),
    };
    let total = tests + binary + mnist + tree;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "to the GPU machine: {:.1} MiB = binary {:.1} + test executables {:.1} ({}) + MNIST {:.1} + tracked tree {:.1}",
        mib(total),
        mib(binary),
        mib(tests),
        stems.join(", "),
        mib(mnist),
        mib(tree)
    );
    assert!(total < 64 << 20, "{:.1} MiB would travel, over 64", mib(total));
}
