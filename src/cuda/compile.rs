//! Run-time compilation of the embedded kernel sources with NVRTC: to a cubin, machine code for the
//! device's own architecture, so the driver loads it without compiling anything; to PTX only for an
//! architecture this NVRTC does not know (the driver then JIT-compiles it, which it can do only for
//! PTX no newer than itself).
//!
//! Which NVRTC works with which driver (CUDA Compatibility, "Minor Version Compatibility", and the
//! Best Practices Guide, "Dynamic Code Generation"): a cubin loads on any driver of the same major
//! version or newer (NVRTC 13.1 with driver 580, which is CUDA 13.0, is fine); PTX loads only on a
//! driver at least as new as the NVRTC that wrote it (NVRTC 13.1's PTX ISA 9.1 fails on driver 580
//! with CUDA_ERROR_UNSUPPORTED_PTX_VERSION). [`check_versions`] says so before anything is loaded.
//!
//! Compiled images are kept for the life of the process, and on disk (`CAPSNET_KERNEL_CACHE`, else
//! `capsnet/kernels` in the user's cache directory; `off` disables it) under the SHA-256 of everything
//! that decides them: the expanded source, the options, the target and NVRTC's version. An entry
//! carries the SHA-256 of its own bytes and is recompiled when they do not match.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::Ptx;
use sha2::{Digest, Sha256};

use crate::kernels::SOURCES;
use crate::{Error, Result};

/// The oldest GPUs the kernels run on: `mma.sync` with bf16 inputs and `cvt.rn.bf16x2` need sm_80.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);
/// The CUDA version this build's driver bindings are for (cudarc's `cuda-13000`): driver 580 or newer.
pub const MIN_DRIVER: (i32, i32) = (13, 0);

pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen libnvrtc; no NVRTC call is made.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn no_nvrtc() -> Error {
    Error::msg("NVRTC (libnvrtc 13) is not installed or not on the library path")
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| Error::msg(format!("nvrtcVersion: {:?}", e.0)))?;
    Ok((a, b))
}

/// The real architectures this NVRTC compiles for, as numbers (75, 80, 86, 89, 90, ...).
pub fn supported_archs() -> Result<Vec<u32>> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let mut n = 0;
    // SAFETY: the library is present; the first call writes one int, the second n ints.
    unsafe { cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| Error::msg(format!("nvrtcGetNumSupportedArchs: {:?}", e.0)))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    unsafe { cudarc::nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| Error::msg(format!("nvrtcGetSupportedArchs: {:?}", e.0)))?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

/// What NVRTC makes: machine code for one architecture (`sm_90` is `Cubin(90)`), or PTX for a
/// virtual one that the driver compiles when it loads it (`compute_90` is `Ptx(90)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Cubin(u32),
    Ptx(u32),
}

impl Target {
    /// NVRTC's `--gpu-architecture` value.
    pub fn arch(self) -> String {
        match self {
            Target::Cubin(n) => format!("sm_{n}"),
            Target::Ptx(n) => format!("compute_{n}"),
        }
    }
    pub fn is_cubin(self) -> bool {
        matches!(self, Target::Cubin(_))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cubin(_) => write!(f, "a cubin for {}", self.arch()),
            Target::Ptx(_) => write!(f, "PTX for {} (compiled by the driver)", self.arch()),
        }
    }
}

fn dotted((a, b): (i32, i32)) -> String {
    format!("{a}.{b}")
}

/// The target for a GPU of compute capability `cc`, given the real architectures NVRTC knows
/// (`archs`): its own architecture's cubin, else PTX for the newest architecture NVRTC knows below it.
pub fn target_for(cc: (i32, i32), archs: &[u32]) -> Result<Target> {
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(Error::msg(format!(
            "the GPU has compute capability {}: capsnet's kernels need {} (Ampere) or newer",
            dotted(cc),
            dotted(MIN_COMPUTE_CAPABILITY)
        )));
    }
    let own = (cc.0 * 10 + cc.1) as u32;
    if archs.contains(&own) {
        return Ok(Target::Cubin(own));
    }
    match archs.iter().copied().filter(|&a| a <= own).max() {
        Some(a) => Ok(Target::Ptx(a)),
        None => Err(Error::msg(format!(
            "NVRTC knows no architecture up to sm_{own} (it knows {archs:?})"
        ))),
    }
}

/// Whether what NVRTC `nvrtc` makes for `target` loads on a driver of CUDA version `driver`; the
/// error names both versions and what to change.
pub fn check_versions(nvrtc: (i32, i32), driver: (i32, i32), target: Target) -> Result<()> {
    let (n, d) = (dotted(nvrtc), dotted(driver));
    if driver < MIN_DRIVER {
        return Err(Error::msg(format!(
            "the CUDA driver supports CUDA {d}, and capsnet needs {} or newer (driver 580 or newer); NVRTC is {n}",
            dotted(MIN_DRIVER)
        )));
    }
    if target.is_cubin() && nvrtc.0 > driver.0 {
        return Err(Error::msg(format!(
            "NVRTC {n} writes cubins for CUDA {}.x, which a driver for CUDA {d} cannot load: install NVRTC {}.x (pip install \"nvidia-cuda-nvrtc=={}.*\") or a newer driver",
            nvrtc.0, driver.0, driver.0
        )));
    }
    if !target.is_cubin() && nvrtc > driver {
        return Err(Error::msg(format!(
            "NVRTC {n} writes PTX that a driver for CUDA {d} cannot compile (it compiles PTX from NVRTC {d} or older), and NVRTC has no cubin for this GPU: install NVRTC {d} (pip install \"nvidia-cuda-nvrtc=={d}.*\") or a driver for CUDA {n}"
        )));
    }
    Ok(())
}

fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The source of kernels/`file` with every `#include "x.cuh"` replaced by that header's embedded
/// text (once per header), so NVRTC needs no include path on the machine that runs it.
pub fn expand(file: &str) -> Result<String> {
    fn go(file: &str, seen: &mut Vec<String>, out: &mut String) -> Result<()> {
        let src = source(file).ok_or_else(|| {
            Error::msg(format!(
                "{}: no such embedded kernel file",
                crate::kernels::path_of(file)
            ))
        })?;
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

/// NVRTC's options for `target`: the kernels' language, and the launch sizes Rust and C share.
fn options(target: Target) -> Vec<String> {
    [
        vec![
            format!("--gpu-architecture={}", target.arch()),
            "--std=c++17".into(),
            "--fmad=true".into(),
            "-lineinfo".into(),
        ],
        super::registry::define_flags(),
    ]
    .concat()
}

/// Programs NVRTC has compiled in this process, and images read from the disk cache instead.
static COMPILED: AtomicUsize = AtomicUsize::new(0);
static FROM_CACHE: AtomicUsize = AtomicUsize::new(0);

/// (compiled by NVRTC, read from the disk cache) in this process so far.
pub fn compilations() -> (usize, usize) {
    (COMPILED.load(Ordering::Relaxed), FROM_CACHE.load(Ordering::Relaxed))
}

/// Where compiled images are cached on disk, if anywhere.
pub fn cache_dir() -> Option<PathBuf> {
    DiskCache::dir()
}

/// What NVRTC wrote for one file: a cubin's bytes, or PTX text.
#[derive(Clone, Debug)]
pub struct Image {
    pub target: Target,
    pub bytes: Arc<Vec<u8>>,
}

impl Image {
    /// The image as cudarc's `load_module` takes it.
    pub fn module(&self) -> Ptx {
        match self.target {
            Target::Cubin(_) => Ptx::from_binary(self.bytes.to_vec()),
            Target::Ptx(_) => Ptx::from_src(self.ptx_text().unwrap_or_default()),
        }
    }
    /// The PTX, when the image is PTX.
    pub fn ptx_text(&self) -> Option<String> {
        match self.target {
            Target::Cubin(_) => None,
            Target::Ptx(_) => Some(String::from_utf8_lossy(&self.bytes).trim_end_matches('\0').to_string()),
        }
    }
}

/// Compiles kernels/`file` for `target`.
pub fn compile_file(file: &str, target: Target) -> Result<Image> {
    compile_source(file, &expand(file)?, target)
}

/// Compiles `src` (self-contained, headers expanded) for `target`: a cubin or PTX. Errors name
/// kernels/`file` and carry NVRTC's log.
pub fn compile_source(file: &str, src: &str, target: Target) -> Result<Image> {
    if !nvrtc_available() {
        return Err(no_nvrtc());
    }
    let opts = options(target);
    let cache = DiskCache::entry(src, &opts, target);
    if let Some(bytes) = cache.as_ref().and_then(DiskCache::read) {
        FROM_CACHE.fetch_add(1, Ordering::Relaxed);
        return Ok(image(bytes, target));
    }
    let bytes = nvrtc_compile(file, src, &opts, target)?;
    COMPILED.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = &cache {
        c.write(&bytes);
    }
    Ok(image(bytes, target))
}

fn image(bytes: Vec<u8>, target: Target) -> Image {
    Image {
        target,
        bytes: Arc::new(bytes),
    }
}

/// One NVRTC program: the cubin's bytes, or the PTX's text.
fn nvrtc_compile(file: &str, src: &str, opts: &[String], target: Target) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let fail = |what: &str| Error::msg(format!("{}: {what}", crate::kernels::path_of(file)));
    let csrc = CString::new(src).map_err(|_| fail("the source holds a NUL byte"))?;
    let name = CString::new(file).map_err(|_| fail("the name holds a NUL byte"))?;
    let prog =
        result::create_program(&csrc, Some(&name)).map_err(|e| fail(&format!("nvrtcCreateProgram: {:?}", e.0)))?;
    // SAFETY: `prog` was created above and is destroyed once, below; every output is read before.
    let out = unsafe {
        let compiled = result::compile_program(prog, opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(fail(&format!(
                "NVRTC cannot compile it for {}: {:?}\n{log}",
                target.arch(),
                e.0
            ))),
            Ok(()) => {
                let mut n = 0usize;
                let (size, get): (
                    _,
                    unsafe fn(sys::nvrtcProgram, *mut std::ffi::c_char) -> sys::nvrtcResult,
                ) = match target {
                    Target::Cubin(_) => (sys::nvrtcGetCUBINSize(prog, &mut n), sys::nvrtcGetCUBIN),
                    Target::Ptx(_) => (sys::nvrtcGetPTXSize(prog, &mut n), sys::nvrtcGetPTX),
                };
                let mut buf = vec![0u8; n];
                size.result()
                    .and_then(|()| get(prog, buf.as_mut_ptr().cast()).result())
                    .map_err(|e| fail(&format!("NVRTC has no output for {}: {:?}", target.arch(), e.0)))
                    .and_then(|()| {
                        if buf.is_empty() {
                            Err(fail(&format!("NVRTC wrote an empty image for {}", target.arch())))
                        } else {
                            Ok(buf)
                        }
                    })
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// (file, image) of every `.cu` file for one target.
pub type Compiled = Arc<Vec<(&'static str, Image)>>;

/// Every `.cu` file compiled for `target`, (file, image), the files compiled side by side, kept for
/// the life of the process.
pub fn compile_all(target: Target) -> Result<Compiled> {
    static CACHE: OnceLock<Mutex<HashMap<Target, Compiled>>> = OnceLock::new();
    // held while compiling: a second caller waits for the first one's images instead of compiling again
    let mut cache = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(hit) = cache.get(&target) {
        return Ok(hit.clone());
    }
    let files: Vec<&'static str> = SOURCES
        .iter()
        .filter(|(n, _)| n.ends_with(".cu"))
        .map(|(n, _)| *n)
        .collect();
    let results: Vec<Result<Image>> = std::thread::scope(|s| {
        let jobs: Vec<_> = files.iter().map(|f| s.spawn(move || compile_file(f, target))).collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(Error::msg("an NVRTC compilation panicked")))
            })
            .collect()
    });
    let mut out = vec![];
    for (f, r) in files.into_iter().zip(results) {
        out.push((f, r?));
    }
    let out = Arc::new(out);
    cache.insert(target, out.clone());
    Ok(out)
}

/// An entry of the on-disk cache of compiled images.
struct DiskCache {
    path: PathBuf,
}

impl DiskCache {
    fn dir() -> Option<PathBuf> {
        match std::env::var_os("CAPSNET_KERNEL_CACHE") {
            Some(v) if v == "off" => None,
            Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
            _ => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
                Some(base.join("capsnet").join("kernels"))
            }
        }
    }

    /// The entry of one compilation, or None when there is no cache (or NVRTC has no version).
    fn entry(src: &str, opts: &[String], target: Target) -> Option<DiskCache> {
        let dir = Self::dir()?;
        let (a, b) = nvrtc_version().ok()?;
        let mut h = Sha256::new();
        h.update(format!("nvrtc {a}.{b}\0{target:?}\0{}\0", opts.join("\0")).as_bytes());
        h.update(src.as_bytes());
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let ext = if target.is_cubin() { "cubin" } else { "ptx" };
        Some(DiskCache {
            path: dir.join(format!("{key}.{ext}")),
        })
    }

    /// The cached image, if the entry is there and its bytes are the ones written.
    fn read(&self) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(&self.path).ok()?;
        if bytes.len() <= 32 {
            return None;
        }
        let sum = bytes.split_off(bytes.len() - 32);
        (Sha256::digest(&bytes).as_slice() == sum.as_slice()).then_some(bytes)
    }

    /// Stores the image (a cache: a failure to write only means compiling again next time).
    fn write(&self, bytes: &[u8]) {
        let Some(dir) = self.path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let mut data = bytes.to_vec();
        data.extend_from_slice(&Sha256::digest(bytes));
        let _ = crate::error::write_atomic(&self.path, &data);
    }
}
