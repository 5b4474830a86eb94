//! Run-time compilation of the embedded kernel sources with NVRTC, once per process and target.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::kernels::SOURCES;
use crate::{Error, Result};

pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen libnvrtc; no NVRTC call is made.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0). Driver 580 JIT-compiles PTX only from NVRTC ≤ 13.0.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(Error::msg(
            "NVRTC (libnvrtc) is not installed or not on the library path",
        ));
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| Error::msg(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The source of kernels/`file` with every `#include "x.cuh"` replaced by that header's embedded
/// text (once per header), so NVRTC needs no include path on the machine that runs it.
pub fn expand(file: &str) -> Result<String> {
    fn go(file: &str, seen: &mut Vec<String>, out: &mut String) -> Result<()> {
        let src = source(file).ok_or_else(|| Error::msg(format!("kernels/{file}: no such embedded kernel file")))?;
        for line in src.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("#include \"") {
                let inc = rest.trim_end_matches('"');
                if !seen.iter().any(|s| s == inc) {
                    seen.push(inc.to_string());
                    go(inc, seen, out)?;
                }
            } else if t != "#pragma once" {
                out.push_str(line);
                out.push('\n');
            }
        }
        Ok(())
    }
    let mut out = String::new();
    go(file, &mut vec![], &mut out)?;
    Ok(out)
}

fn pretty(e: &CompileError) -> String {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => format!("{nvrtc:?}\n{}", log.to_string_lossy()),
        other => format!("{other:?}"),
    }
}

/// Compiles kernels/`file` to PTX for `arch` ("sm_90", "compute_80", ...).
pub fn compile_file(file: &str, arch: &str) -> Result<Ptx> {
    compile_source(file, &expand(file)?, arch)
}

/// Compiles `src` (self-contained, headers expanded) to PTX; errors name kernels/`file` and carry
/// NVRTC's log.
pub fn compile_source(file: &str, src: &str, arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(Error::msg(
            "NVRTC (libnvrtc) is not installed or not on the library path",
        ));
    }
    let opts = CompileOptions {
        fmad: Some(true),
        name: Some(file.to_string()),
        options: [
            vec![
                format!("--gpu-architecture={arch}"),
                "--std=c++17".into(),
                "-lineinfo".into(),
            ],
            super::registry::define_flags(),
        ]
        .concat(),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| {
        Error::msg(format!(
            "kernels/{file}: NVRTC cannot compile it for {arch}: {}",
            pretty(&e)
        ))
    })
}

/// (file, PTX) of every `.cu` file for one target.
pub type Compiled = Arc<Vec<(&'static str, Ptx)>>;

/// Every `.cu` file compiled for `arch`, (file, PTX), cached for the life of the process.
pub fn compile_all(arch: &str) -> Result<Compiled> {
    static CACHE: OnceLock<Mutex<HashMap<String, Compiled>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(hit) = cache.lock().expect("compile cache").get(arch) {
        return Ok(hit.clone());
    }
    let mut out = vec![];
    for (name, _) in SOURCES.iter().filter(|(n, _)| n.ends_with(".cu")) {
        out.push((*name, compile_file(name, arch)?));
    }
    let out = Arc::new(out);
    cache
        .lock()
        .expect("compile cache")
        .insert(arch.to_string(), out.clone());
    Ok(out)
}
