//! Embeds the CUDA kernel sources of kernels/ into the crate, so that NVRTC can compile them at run
//! time on the machine that has the GPU. Needs no CUDA toolkit and no GPU: it only reads text files.
//! Generates `$OUT_DIR/kernels.rs` with `SOURCES: &[(&str, &str)]`, (file name, source) sorted by
//! name, for every `.cu` and `.cuh` file in kernels/.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("kernels");
    // the directory itself: edits and added files both rerun this script
    println!("cargo:rerun-if-changed=kernels");
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![],
    };
    files.retain(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"));
    files.sort();
    let mut out = String::from("/// (file name, source) of every kernel file in kernels/, sorted by name.\n");
    out += "pub const SOURCES: &[(&str, &str)] = &[\n";
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().expect("a file").to_string_lossy();
        out += &format!("    ({name:?}, include_str!({:?})),\n", p.display().to_string());
    }
    out += "];\n";
    let target = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.rs");
    fs::write(&target, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
}
