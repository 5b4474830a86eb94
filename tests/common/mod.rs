//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod parity;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The MNIST directory from CAPSNET_DATA. Tests that need real data fail (never skip) without it.
pub fn mnist_dir() -> PathBuf {
    match std::env::var_os("CAPSNET_DATA").filter(|v| !v.is_empty()) {
        Some(d) => {
            let dir = PathBuf::from(d);
            assert!(dir.is_dir(), "CAPSNET_DATA={} is not a directory", dir.display());
            dir
        }
        // where `capsnet train --download` run in the repository puts it
        None => {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join("mnist");
            assert!(
                dir.is_dir(),
                "no MNIST in {} and CAPSNET_DATA is not set: run `cargo run --release -- download` first, or point CAPSNET_DATA at the four MNIST files",
                dir.display()
            );
            dir
        }
    }
}

/// A fresh empty directory unique to `name`: under cargo's target directory, or under the system's
/// temporary directory when the test executable runs on another machine (packed for a GPU).
pub fn temp_dir(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let base = if base.is_dir() {
        base
    } else {
        std::env::temp_dir().join("capsnet-tests")
    };
    let d = base.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The capsnet binary: `CAPSNET_BIN` if set, else the one cargo built, else (a test executable packed
/// for another machine, in .gpu/tests) the packed one in .gpu/bin.
pub fn capsnet_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CAPSNET_BIN") {
        return p.into();
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_capsnet"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let packed = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bin").join("capsnet"));
    packed.filter(|p| p.exists()).unwrap_or(built)
}

/// Runs the capsnet binary with `args`, CAPSNET_DATA removed unless given in `env`, in a directory of
/// the tests' own: a default path (runs/capsnet, data/mnist) never reaches the user's files.
pub fn capsnet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = capsnet_command(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the capsnet binary runs")
}

/// The command [`capsnet`] runs, to spawn and signal.
pub fn capsnet_command(args: &[&str]) -> Command {
    static CWD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let cwd = CWD.get_or_init(|| temp_dir(&format!("cwd-{}", std::process::id())));
    let mut c = Command::new(capsnet_bin());
    c.current_dir(cwd)
        .args(args)
        .env_remove("CAPSNET_DATA")
        .env("MATMUL_NUM_THREADS", "2");
    c
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a clean failure: non-zero exit, an `error:` line containing every one of `needles`,
/// and no panic or backtrace.
pub fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr:\n{err}");
    assert_eq!(o.status.code(), Some(1), "expected exit code 1; stderr:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panicked:\n{err}"
    );
    assert!(err.contains("error:"), "no error line:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// The tests' deterministic generator for inputs: the library's, which its own op tests use.
pub use capsnet::ops::gradcheck::Lcg;

/// The CUDA backend the GPU tests run on:
/// - the emulated device when `CAPSNET_EMULATOR` names a build (plain, address, thread), or when no
///   CUDA driver is installed (plain);
/// - else GPU 0.
///
/// `CAPSNET_REQUIRE_GPU=1` demands a real GPU. Only a missing NVRTC, which every CUDA test needs to
/// compile the kernels, gives `None`, with a `SKIPPED` line, and only while neither
/// `CAPSNET_REQUIRE_NVRTC` nor `CAPSNET_REQUIRE_GPU` is set.
pub fn cuda_backend() -> Option<capsnet::cuda::CudaBackend> {
    use capsnet::cuda::{self, emulator};
    let require_gpu = std::env::var_os("CAPSNET_REQUIRE_GPU").is_some();
    if !cuda::nvrtc_available() {
        assert!(
            !require_gpu && std::env::var_os("CAPSNET_REQUIRE_NVRTC").is_none(),
            "NVRTC (libnvrtc 13.0) cannot be loaded: check LD_LIBRARY_PATH"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: libnvrtc not found, so no kernel can be compiled"
        );
        return None;
    }
    let wanted = std::env::var("CAPSNET_EMULATOR").ok();
    if wanted.is_some() || (emulator::loaded().is_none() && !cuda::driver_available()) {
        assert!(!require_gpu, "CAPSNET_REQUIRE_GPU=1 but there is no CUDA driver");
        let v = match wanted.as_deref() {
            None => emulator::Variant::Plain,
            Some(w) => emulator::Variant::parse(w)
                .unwrap_or_else(|| panic!("CAPSNET_EMULATOR={w}: expected plain, address or thread")),
        };
        emulator::load(v).unwrap_or_else(|e| panic!("{e}"));
    }
    let be = capsnet::cuda::CudaBackend::new(0).unwrap_or_else(|e| panic!("the CUDA backend does not open: {e}"));
    if require_gpu {
        assert!(
            emulator::loaded().is_none(),
            "CAPSNET_REQUIRE_GPU=1 but the device is emulated"
        );
    }
    Some(be)
}

/// A small CapsNet (16 conv1 channels, 4 primary maps, a 64-128 decoder) for whole training steps on
/// the GPU or the emulated device.
pub fn small_config() -> capsnet::config::Config {
    capsnet::config::Config {
        conv1_channels: 16,
        primary_maps: 4,
        decoder_hidden: [64, 128],
        ..capsnet::config::Config::default()
    }
}

/// kernels/emulator/`file` compiled by NVRTC for `be`'s device and loaded there; an
/// `#include "../X"` of a kernels/ header is replaced by its text (NVRTC has no include path).
pub fn emulator_module(be: &capsnet::cuda::CudaBackend, file: &str) -> std::sync::Arc<cudarc::driver::CudaModule> {
    use capsnet::cuda::compile;
    let src = capsnet::kernels::EMULATOR_SOURCES
        .iter()
        .find(|(n, _)| *n == file)
        .unwrap_or_else(|| panic!("kernels/emulator/{file} is not embedded"))
        .1;
    let src: String = src
        .lines()
        .map(|l| {
            match l
                .trim()
                .strip_prefix("#include \"../")
                .and_then(|h| h.strip_suffix('"'))
            {
                Some(header) => compile::expand(header).unwrap_or_else(|e| panic!("{e}")),
                None => format!("{l}\n"),
            }
        })
        .collect();
    let target = capsnet::cuda::kernel_target(be.info().compute_capability).unwrap_or_else(|e| panic!("{e}"));
    let image = compile::compile_source(&format!("emulator/{file}"), &src, target).unwrap_or_else(|e| panic!("{e}"));
    be.context()
        .load_module(image.module())
        .unwrap_or_else(|e| panic!("kernels/emulator/{file}: {}", capsnet::cuda::describe(&e)))
}
