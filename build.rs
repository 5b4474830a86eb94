//! Embeds the CUDA kernel sources into the crate, so that NVRTC can compile them at run time on the
//! machine that has the GPU, and the emulated device's sources of kernels/emulator/, so that g++ can
//! build it where there is none. Needs no CUDA toolkit and no GPU: it only reads text files.
//!
//! Kernel files live beside what launches them: each op family's `.cu` files in its folder
//! (src/ops/<family>/), the training step's runtime's in src/runtime/, and what they all share (the
//! `.cuh` headers, elementwise.cu) in kernels/. Generates `$OUT_DIR/kernels.rs` with `SOURCES` (every
//! kernel file: (file name, source), sorted by name; names are unique, as `#include` finds them),
//! `SOURCE_PATHS` ((file name, path in the repository)) and `EMULATOR_SOURCES` (every file in
//! kernels/emulator/).

use std::path::{Path, PathBuf};
use std::{env, fs};

/// The files of `dir` that `keep` accepts, sorted; `dir` itself is watched, so an added file reruns this.
fn files_of(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![],
    };
    files.retain(|p| p.is_file() && keep(p));
    files.sort();
    files
}

fn embed(out: &mut String, konst: &str, doc: &str, files: &[PathBuf]) {
    *out += &format!("/// {doc}\npub const {konst}: &[(&str, &str)] = &[\n");
    for p in files {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().expect("a file").to_string_lossy();
        *out += &format!("    ({name:?}, include_str!({:?})),\n", p.display().to_string());
    }
    *out += "];\n";
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let cuda = |p: &Path| p.extension().is_some_and(|e| e == "cu" || e == "cuh");
    let mut dirs = vec![root.join("kernels"), root.join("src/runtime")];
    println!("cargo:rerun-if-changed={}", root.join("src/ops").display());
    let mut families: Vec<PathBuf> = fs::read_dir(root.join("src/ops"))
        .expect("src/ops exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    families.sort();
    dirs.extend(families);
    let mut files: Vec<PathBuf> = dirs.iter().flat_map(|d| files_of(d, cuda)).collect();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    for w in files.windows(2) {
        assert!(
            w[0].file_name() != w[1].file_name(),
            "two kernel files named {:?} ({} and {}): #include and the registry find files by name",
            w[0].file_name().unwrap_or_default(),
            w[0].display(),
            w[1].display()
        );
    }
    let mut out = String::new();
    embed(
        &mut out,
        "SOURCES",
        "(file name, source) of every kernel file, sorted by name.",
        &files,
    );
    out += "/// (file name, path in the repository) of every kernel file, as [`SOURCES`] orders them.\npub const SOURCE_PATHS: &[(&str, &str)] = &[\n";
    for p in &files {
        let name = p.file_name().expect("a file").to_string_lossy();
        let rel = p
            .strip_prefix(&root)
            .expect("under the crate")
            .to_string_lossy()
            .replace('\\', "/");
        out += &format!("    ({name:?}, {rel:?}),\n");
    }
    out += "];\n";
    embed(
        &mut out,
        "EMULATOR_SOURCES",
        "(file name, source) of the emulated device in kernels/emulator/, sorted by name.",
        &files_of(&root.join("kernels/emulator"), |p| {
            p.extension().is_some_and(|e| e == "hpp" || e == "cpp" || e == "cu")
        }),
    );
    let target = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    fs::write(&target, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
}
