//! The static kernel report, no GPU needed: every kernel's registers, spills, stack and shared memory
//! from ptxas's own report (NVRTC compiles to a cubin with `--ptxas-options=-v` and puts it in the
//! program log), and the theoretical occupancy those allow at the kernel's block size.

use std::ffi::CString;

use super::compile::{expand, nvrtc_available};
use super::registry::{self as reg, Kernel};
use crate::{Error, Result};

/// What ptxas reports for one kernel, and the occupancy it allows.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelStats {
    pub kernel: Kernel,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack: u32,
    pub static_smem: u32,
    /// Dynamic shared memory at the default model's shapes (batch-independent; routing only).
    pub dynamic_smem: u32,
    /// Resident blocks per SM and warps over the SM's maximum, None where the target's limits are
    /// not known.
    pub occupancy: Option<Occupancy>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Occupancy {
    pub blocks: u32,
    /// Resident warps over the SM's maximum.
    pub fraction: f64,
    /// What stops another block: "registers", "shared memory", "warps" or "blocks".
    pub limited_by: &'static str,
}

/// Per-SM limits of an architecture (CUDA C++ Programming Guide, compute capabilities table).
struct SmLimits {
    warps: u32,
    blocks: u32,
    registers: u32,
    smem: u32,
    /// Shared memory the system reserves per block.
    reserved_smem: u32,
}

fn limits(arch: &str) -> Option<SmLimits> {
    match arch {
        // H100
        "sm_90" | "sm_90a" => Some(SmLimits {
            warps: 64,
            blocks: 32,
            registers: 65536,
            smem: 228 * 1024,
            reserved_smem: 1024,
        }),
        // A100
        "sm_80" => Some(SmLimits {
            warps: 64,
            blocks: 32,
            registers: 65536,
            smem: 164 * 1024,
            reserved_smem: 1024,
        }),
        _ => None,
    }
}

/// Theoretical occupancy of blocks of `threads` using `regs` registers per thread and `smem` bytes
/// of shared memory per block (registers are allocated per warp in units of 256).
fn occupancy(l: &SmLimits, threads: u32, regs: u32, smem: u32) -> Occupancy {
    let warps = threads.div_ceil(32);
    let regs_per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    let by_regs = l.registers / (regs_per_warp * warps);
    let by_smem = if smem == 0 {
        u32::MAX
    } else {
        l.smem / (smem + l.reserved_smem)
    };
    let by_warps = l.warps / warps;
    // on a tie the hard ceilings (warps, blocks) are named first
    let (blocks, limited_by) = [
        (by_warps, "warps"),
        (l.blocks, "blocks"),
        (by_regs, "registers"),
        (by_smem, "shared memory"),
    ]
    .into_iter()
    .min_by_key(|(n, _)| *n)
    .expect("four limits");
    Occupancy {
        blocks,
        fraction: (blocks * warps) as f64 / l.warps as f64,
        limited_by,
    }
}

/// The first number in `s` after `key`.
fn number_after(s: &str, key: &str) -> Option<u32> {
    let rest = &s[s.find(key)? + key.len()..];
    let digits: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The number just before `key` in `s` ("12 bytes spill stores" → 12 for "bytes spill stores").
fn number_before(s: &str, key: &str) -> Option<u32> {
    let head = s[..s.find(key)?].trim_end();
    let digits: String = head.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// ptxas's `-v` lines for one file: (kernel, registers, spill stores, spill loads, stack, smem).
pub fn parse_ptxas_log(log: &str) -> Vec<(String, u32, u32, u32, u32, u32)> {
    let mut out: Vec<(String, u32, u32, u32, u32, u32)> = vec![];
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push((name, 0, 0, 0, 0, 0));
        } else if let Some(cur) = out.last_mut() {
            if line.contains("bytes stack frame") {
                cur.4 = number_before(line, "bytes stack frame").unwrap_or(0);
                cur.2 = number_before(line, "bytes spill stores").unwrap_or(0);
                cur.3 = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                cur.1 = number_after(line, "Used").unwrap_or(0);
                cur.5 = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// ptxas's report for kernels/`file` compiled for `arch` (an `sm_XX` target: ptxas runs only for a
/// real architecture).
fn ptxas_log(file: &str, arch: &str) -> Result<String> {
    let src = CString::new(expand(file)?)
        .map_err(|_| Error::msg(format!("{}: a NUL byte", crate::kernels::path_of(file))))?;
    let name = CString::new(file).expect("a file name without NUL");
    let prog = cudarc::nvrtc::result::create_program(&src, Some(&name)).map_err(|e| {
        Error::msg(format!(
            "{}: nvrtcCreateProgram: {:?}",
            crate::kernels::path_of(file),
            e.0
        ))
    })?;
    let opts: Vec<String> = [
        vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "--fmad=true".into(),
            "--ptxas-options=-v".into(),
        ],
        reg::define_flags(),
    ]
    .concat();
    // SAFETY: `prog` was created above and is destroyed once, below; the log is read before that.
    let res = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) };
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    let log = log.map_err(|e| {
        Error::msg(format!(
            "{}: nvrtcGetProgramLog: {:?}",
            crate::kernels::path_of(file),
            e.0
        ))
    })?;
    let bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let log = String::from_utf8_lossy(&bytes).into_owned();
    res.map_err(|e| {
        Error::msg(format!(
            "{}: NVRTC cannot compile it for {arch}: {:?}\n{log}",
            crate::kernels::path_of(file),
            e.0
        ))
    })?;
    Ok(log)
}

/// Dynamic shared memory a kernel is launched with at capsule sizes `s` and `rounds` routing rounds.
fn dynamic_smem(k: Kernel, s: &reg::CapsDims, rounds: u32) -> u32 {
    let (ij, jd) = ((s.in_caps * s.out_caps) as u32, (s.out_caps * s.out_dim) as u32);
    match k {
        reg::ROUTING_FWD_V1 => 4 * (2 * ij + 2 * jd),
        reg::ROUTING_BWD_V1 => 4 * (2 * ij + 4 * jd),
        reg::ROUTING_FWD_V2 => 4 * jd * (rounds + 1),
        reg::ROUTING_BWD_V2 => 4 * jd * 4,
        k if k.file == "caps_routing.cu" => reg::fused_routing_plan(k, s, rounds as usize).map_or(0, |p| p.1),
        _ => 0,
    }
}

/// Every kernel of the registry compiled for `arch` (e.g. "sm_90"), in registry order, its dynamic
/// shared memory as launched at capsule sizes `caps` over `rounds` routing rounds.
pub fn kernel_report(arch: &str, caps: &reg::CapsDims, rounds: usize) -> Result<Vec<KernelStats>> {
    if !nvrtc_available() {
        return Err(Error::msg(
            "NVRTC (libnvrtc) is not installed or not on the library path",
        ));
    }
    if !arch.starts_with("sm_") {
        return Err(Error::msg(format!(
            "--arch {arch}: the report needs a real architecture (sm_80, sm_90, ...), where ptxas runs"
        )));
    }
    let mut files: Vec<&str> = reg::ALL.iter().map(|k| k.file).collect();
    files.sort();
    files.dedup();
    let mut parsed = vec![];
    for f in files {
        parsed.extend(parse_ptxas_log(&ptxas_log(f, arch)?));
    }
    let l = limits(arch);
    reg::ALL
        .iter()
        .map(|&k| {
            let (_, registers, spill_stores, spill_loads, stack, static_smem) =
                parsed.iter().find(|p| p.0 == k.name).cloned().ok_or_else(|| {
                    Error::msg(format!(
                        "ptxas reported nothing for {} ({})",
                        k.name,
                        crate::kernels::path_of(k.file)
                    ))
                })?;
            let dynamic_smem = dynamic_smem(k, caps, rounds as u32);
            Ok(KernelStats {
                kernel: k,
                registers,
                spill_stores,
                spill_loads,
                stack,
                static_smem,
                dynamic_smem,
                occupancy: l
                    .as_ref()
                    .map(|l| occupancy(l, k.threads, registers, static_smem + dynamic_smem)),
            })
        })
        .collect()
}

/// The kernels whose speed the training step depends on: a spill in one of these is a bug.
pub fn is_hot(k: Kernel) -> bool {
    ["conv2d", "dense", "predict", "routing", "caps_route", "adam", "squash"]
        .iter()
        .any(|p| k.name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_lines_are_read() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'routing_fwd_v1' for 'sm_90'\n\
ptxas info    : Function properties for routing_fwd_v1\n\
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'fill_f32' for 'sm_90'\n\
ptxas info    : Function properties for fill_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers, 368 bytes cmem[0]\n";
        assert_eq!(
            parse_ptxas_log(log),
            vec![
                ("routing_fwd_v1".to_string(), 40, 12, 16, 8, 1024),
                ("fill_f32".to_string(), 8, 0, 0, 0, 0)
            ]
        );
    }

    #[test]
    fn occupancy_follows_the_programming_guides_limits() {
        let h100 = limits("sm_90").unwrap();
        // 256 threads at 32 registers: 8 warps, 8 blocks by warps (64 warps): full
        let o = occupancy(&h100, 256, 32, 0);
        assert_eq!((o.blocks, o.fraction, o.limited_by), (8, 1.0, "warps"));
        // 128 registers: 4096 per warp, 32768 per block: 2 blocks, a quarter
        let o = occupancy(&h100, 256, 128, 0);
        assert_eq!((o.blocks, o.fraction, o.limited_by), (2, 0.25, "registers"));
        // routing v1 at the default model: 93,440 bytes of shared memory: 2 blocks
        let o = occupancy(&h100, 256, 32, 93_440);
        assert_eq!((o.blocks, o.limited_by), (2, "shared memory"));
        // 32 threads, few registers: at most 32 blocks per SM, half the warps
        let o = occupancy(&h100, 32, 16, 0);
        assert_eq!((o.blocks, o.fraction, o.limited_by), (32, 0.5, "blocks"));
    }
}
