//! The emulated CUDA device: the kernels of kernels/ compiled for the host by g++ against
//! kernels/emulator/cuda_emu.hpp, linked with an emulated CUDA driver (kernels/emulator/emulator.cpp)
//! into a shared library whose soname is `libcuda.so`. Once [`load`] has opened it, cudarc's own
//! `dlopen("libcuda.so")` finds it, so the CUDA backend's host code runs unchanged on the CPU: device
//! detection, allocation and the pool, copies, memsets, NVRTC's real compile of every module, and each
//! launch, checked as the driver checks it and then run with one fiber per CUDA thread.
//!
//! Why a driver and not a device trait inside the backend: the code under test is then exactly the
//! code that runs on a GPU, cudarc's argument packing and the `#[repr(C)]` launch contracts included
//! (the emulator compares each kernel's host parameter sizes with the PTX's). Nothing of it is linked
//! into the binary: it is built and opened only by [`load`], which only the tests and
//! `--device emulated` call.
//!
//! The library is built once per source and flag set into a cache directory
//! (`$CAPSNET_EMULATOR_CACHE`, else `capsnet-emulator` in the system's temporary directory), written
//! under a temporary name and renamed, so concurrent processes never see half a library.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::kernels::{EMULATOR_SOURCES, SOURCES};
use crate::{Error, Result};

/// How the emulated kernels are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Optimised, for the tests and `--device emulated`.
    Plain,
    /// AddressSanitizer: out-of-bounds reads and writes in global and dynamic shared memory.
    Address,
    /// ThreadSanitizer: races between the threads of a block (barriers are release/acquire).
    Thread,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Address => "address",
            Variant::Thread => "thread",
        }
    }
    pub fn parse(s: &str) -> Option<Variant> {
        [Variant::Plain, Variant::Address, Variant::Thread]
            .into_iter()
            .find(|v| v.name() == s)
    }
    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Plain => &["-O2"],
            Variant::Address => &["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
            Variant::Thread => &["-O1", "-g", "-fsanitize=thread"],
        }
    }
    /// Flags for the kernels' units only (not the driver's, not the link): every access checked for
    /// the alignment of its type, each report a fault of the launch (emulator.cpp's handler). The
    /// ThreadSanitizer build leaves it to the other two.
    fn kernel_flags(self) -> &'static [&'static str] {
        match self {
            Variant::Plain | Variant::Address => &["-fsanitize=alignment"],
            Variant::Thread => &[],
        }
    }
    /// The sanitizer runtime that must be preloaded (LD_PRELOAD) into a process that opens this
    /// variant, found through g++.
    pub fn runtime(self) -> Result<Option<PathBuf>> {
        let lib = match self {
            Variant::Plain => return Ok(None),
            Variant::Address => "libasan.so",
            Variant::Thread => "libtsan.so",
        };
        let out = Command::new(cxx())
            .arg(format!("-print-file-name={lib}"))
            .output()
            .map_err(|e| Error::msg(format!("cannot run {}: {e}", cxx())))?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !p.is_absolute() || !p.exists() {
            return Err(Error::msg(format!(
                "{} has no {lib}: the {} sanitizer build of the emulated device needs it",
                cxx(),
                self.name()
            )));
        }
        Ok(Some(p))
    }
}

/// The host C++ compiler: `$CXX`, else g++.
fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".into())
}

/// `extern "C" __global__` kernel names defined in a kernel source.
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut flat = src.replace('\n', " ");
    // drop `__launch_bounds__(...)`, which stands between __global__ and the name
    while let Some(at) = flat.find("__launch_bounds__") {
        let end = flat[at..].find(')').map_or(flat.len(), |e| at + e + 1);
        flat.replace_range(at..end, "");
    }
    flat.split("__global__")
        .skip(1)
        .filter_map(|rest| rest.split('(').next()?.split_whitespace().last().map(str::to_string))
        .collect()
}

fn common_flags() -> Vec<String> {
    let mut f: Vec<String> = [
        "-std=c++20",
        "-fPIC",
        "-fvisibility=hidden",
        "-mfma",
        "-pthread",
        "-Ikernels/emulator",
        "-Ikernels",
        "-w",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    f.extend(super::registry::define_flags());
    f
}

/// Every file the build needs, (path, text), laid out as in the repository so that `__FILE__`, and
/// so the emulator's messages, name each file's path (the shared headers found through -Ikernels): the kernel files, the emulator's files, and one
/// wrapper per `.cu` file that includes it after cuda_emu.hpp and registers its kernels.
fn build_files() -> Vec<(String, String)> {
    let kernels = SOURCES.iter().map(|(n, s)| (crate::kernels::path_of(n), *s));
    let emulator = EMULATOR_SOURCES
        .iter()
        .map(|(n, s)| (format!("kernels/emulator/{n}"), *s));
    let all: Vec<(String, &str)> = kernels.chain(emulator).collect();
    let mut files: Vec<(String, String)> = all.iter().map(|(p, s)| (p.clone(), s.to_string())).collect();
    for (path, src) in &all {
        let Some(stem) = path.strip_suffix(".cu") else { continue };
        let mut w = format!("#include \"cuda_emu.hpp\"\n#include \"{path}\"\n");
        for k in kernel_names(src) {
            w += &format!("EMU_KERNEL({k})\n");
        }
        files.push((format!("emu_{}.cpp", stem.rsplit('/').next().unwrap_or(stem)), w));
    }
    files
}

/// Builds (or finds in the cache) the emulated device's library for `variant`; returns its path.
pub fn build(variant: Variant) -> Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let files = build_files();
    let mut flags = common_flags();
    flags.extend(variant.flags().iter().map(|s| s.to_string()));
    let mut h = Sha256::new();
    for (n, s) in &files {
        h.update(n.as_bytes());
        h.update([0]);
        h.update(s.as_bytes());
        h.update([0]);
    }
    h.update(flags.join(" ").as_bytes());
    h.update(variant.kernel_flags().join(" ").as_bytes());
    h.update(cxx().as_bytes());
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let root = std::env::var_os("CAPSNET_EMULATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("capsnet-emulator"));
    let dir = root.join(format!("{}-{hash}", variant.name()));
    let lib = dir.join("libcuda.so");
    if lib.is_file() {
        return Ok(lib);
    }
    let tmp = root.join(format!(".{}-{hash}.tmp{}", variant.name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("kernels/emulator")).map_err(|e| Error::file(&tmp, e))?;
    for (n, s) in &files {
        let path = tmp.join(n);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        }
        std::fs::write(&path, s).map_err(|e| Error::file(&path, e))?;
    }
    // one g++ per translation unit, all at once, then the link
    let units: Vec<&String> = files.iter().map(|(n, _)| n).filter(|n| n.ends_with(".cpp")).collect();
    let mut jobs = vec![];
    for u in &units {
        let mut c = Command::new(cxx());
        // ThreadSanitizer instruments the kernels only: the scheduler's own bookkeeping is ordered by
        // fiber switches that TSan must not see as synchronisation (emulator.cpp), so its unit is
        // built without -fsanitize=thread and told to drive TSan's fiber interface itself
        let driver = u.as_str() == "kernels/emulator/emulator.cpp";
        let tsan_runtime = variant == Variant::Thread && driver;
        c.current_dir(&tmp)
            .args(
                flags
                    .iter()
                    .filter(|f| !(tsan_runtime && f.as_str() == "-fsanitize=thread")),
            )
            .args(if driver { &[][..] } else { variant.kernel_flags() })
            .args(tsan_runtime.then_some("-DEMU_TSAN_FIBERS=1"))
            .arg("-c")
            .arg(u.as_str())
            .arg("-o")
            .arg(format!("{u}.o"));
        let child = c
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::msg(format!(
                    "the emulated device needs a C++20 compiler: cannot run {}: {e}",
                    cxx()
                ))
            })?;
        jobs.push((u.to_string(), child));
    }
    let mut errors = String::new();
    for (u, child) in jobs {
        let out = child
            .wait_with_output()
            .map_err(|e| Error::msg(format!("{}: {e}", cxx())))?;
        if !out.status.success() {
            errors += &format!("{u}:\n{}\n", String::from_utf8_lossy(&out.stderr));
        }
    }
    if !errors.is_empty() {
        return Err(Error::msg(format!(
            "the emulated device ({} build) does not compile with {}:\n{errors}",
            variant.name(),
            cxx()
        )));
    }
    let mut link = Command::new(cxx());
    link.current_dir(&tmp)
        .args(&flags)
        .args(["-shared", "-Wl,-soname,libcuda.so", "-o", "libcuda.so"])
        .args(units.iter().map(|u| format!("{u}.o")));
    let out = link.output().map_err(|e| Error::msg(format!("{}: {e}", cxx())))?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "the emulated device does not link:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // another process finished first: use its build
        Err(_) if lib.is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(Error::file(&dir, e)),
    }
    Ok(lib)
}

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;
const RTLD_GLOBAL: c_int = 0x100;

unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

struct Loaded {
    handle: usize,
    variant: Variant,
}
static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

fn symbol(handle: usize, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: handle came from dlopen and is never closed; c is a NUL-terminated name.
    let p = unsafe { dlsym(handle as *mut c_void, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// Builds the emulated device (`variant`) and opens it as this process's `libcuda.so`. Must come
/// before anything else in the process touches CUDA; loading it twice is a no-op, loading another
/// variant after one is an error. Sanitizer variants need their runtime preloaded
/// ([`Variant::runtime`]).
pub fn load(variant: Variant) -> Result<()> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = loaded.as_ref() {
        if l.variant == variant {
            return Ok(());
        }
        return Err(Error::msg(format!(
            "the {} build of the emulated device is already loaded; cannot switch to {}",
            l.variant.name(),
            variant.name()
        )));
    }
    // a real driver already opened by cudarc owns the name libcuda.so
    let name = CString::new("libcuda.so").expect("no NUL");
    // SAFETY: RTLD_NOLOAD only looks up an already loaded library; nothing is opened.
    let real = unsafe { dlopen(name.as_ptr(), RTLD_NOW | RTLD_NOLOAD) };
    if !real.is_null() && symbol(real as usize, "capsnet_emulator_version").is_none() {
        return Err(Error::msg(
            "a CUDA driver is already loaded in this process: the emulated device must be loaded first",
        ));
    }
    let lib = build(variant)?;
    let path = CString::new(lib.as_os_str().as_encoded_bytes()).map_err(|_| Error::file(&lib, "path holds NUL"))?;
    // SAFETY: a path to the library built above; its initialisers only register kernels.
    let h = unsafe { dlopen(path.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a NUL-terminated message after a failed dlopen.
        let why = unsafe { CStr::from_ptr(dlerror()) }.to_string_lossy().into_owned();
        return Err(Error::file(&lib, format!("cannot open the emulated device: {why}")));
    }
    *loaded = Some(Loaded {
        handle: h as usize,
        variant,
    });
    Ok(())
}

/// The loaded variant, if the emulated device is this process's CUDA driver.
pub fn loaded() -> Option<Variant> {
    LOADED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|l| l.variant)
}

/// The loaded emulator's exported function `name`.
fn emulator_fn(name: &str) -> Result<*mut c_void> {
    let loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let l = loaded
        .as_ref()
        .ok_or_else(|| Error::msg("the emulated device is not loaded"))?;
    symbol(l.handle, name).ok_or_else(|| Error::msg(format!("the emulated device has no {name}")))
}

/// Runs every block's threads in reversed order between barriers (`true`) or in order (`false`).
/// A kernel whose result depends on the order has a race; see tests/emulator.rs.
pub fn set_reversed_schedule(reversed: bool) -> Result<()> {
    let f = emulator_fn("capsnet_emu_set_schedule")?;
    // SAFETY: the emulator exports `void capsnet_emu_set_schedule(int)`.
    let f = unsafe { std::mem::transmute::<*mut c_void, extern "C" fn(c_int)>(f) };
    f(reversed as c_int);
    Ok(())
}

/// How the emulated `mma.sync` sums, for the launches the calling thread makes from now on: `false`,
/// fp32 FMAs in k order (round to nearest); `true`, truncated as a tensor core may sum
/// (kernels/mma.cuh, `truncated_sum`). The bound of [`crate::float::gemm_error_bound`] holds for both.
pub fn set_mma_truncation(truncates: bool) -> Result<()> {
    let f = emulator_fn("capsnet_emu_set_mma_truncation")?;
    // SAFETY: the emulator exports `void capsnet_emu_set_mma_truncation(int)`.
    let f = unsafe { std::mem::transmute::<*mut c_void, extern "C" fn(c_int)>(f) };
    f(truncates as c_int);
    Ok(())
}

/// How many launches of kernel `name` the emulated device has run since it was loaded.
pub fn launches(name: &str) -> Result<u64> {
    let f = emulator_fn("capsnet_emu_launches")?;
    let c = CString::new(name).map_err(|_| Error::msg("kernel name holds NUL"))?;
    // SAFETY: the emulator exports `unsigned long long capsnet_emu_launches(const char*)`.
    let f = unsafe { std::mem::transmute::<*mut c_void, extern "C" fn(*const c_char) -> u64>(f) };
    Ok(f(c.as_ptr()))
}
