//! Embeds the CUDA kernel sources of kernels/ into the crate, so that NVRTC can compile them at run
//! time on the machine that has the GPU, and the emulated device's sources of kernels/emulator/, so
//! that g++ can build it where there is none. Needs no CUDA toolkit and no GPU: it only reads text
//! files. Generates `$OUT_DIR/kernels.rs` with `SOURCES` (every `.cu` and `.cuh` file in kernels/) and
//! `EMULATOR_SOURCES` (every file in kernels/emulator/), each `&[(&str, &str)]` of (file name, source)
//! sorted by name.

use std::path::{Path, PathBuf};
use std::{env, fs};

fn embed(out: &mut String, konst: &str, doc: &str, dir: &Path, keep: impl Fn(&Path) -> bool) {
    // the directory itself: edits and added files both rerun this script
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![],
    };
    files.retain(|p| p.is_file() && keep(p));
    files.sort();
    *out += &format!("/// {doc}\npub const {konst}: &[(&str, &str)] = &[\n");
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().expect("a file").to_string_lossy();
        *out += &format!("    ({name:?}, include_str!({:?})),\n", p.display().to_string());
    }
    *out += "];\n";
}

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("kernels");
    let mut out = String::new();
    embed(
        &mut out,
        "SOURCES",
        "(file name, source) of every kernel file in kernels/, sorted by name.",
        &dir,
        |p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"),
    );
    embed(
        &mut out,
        "EMULATOR_SOURCES",
        "(file name, source) of the emulated device in kernels/emulator/, sorted by name.",
        &dir.join("emulator"),
        |p| p.extension().is_some_and(|e| e == "hpp" || e == "cpp" || e == "cu"),
    );
    let target = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    fs::write(&target, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
}
