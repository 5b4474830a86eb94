//! Every kernel compiles with NVRTC, without a GPU: NVRTC runs on the CPU. CI installs NVRTC 13.0
//! (the pip wheel nvidia-cuda-nvrtc==13.0.*) and sets CAPSNET_REQUIRE_NVRTC=1, so there this test
//! cannot skip; elsewhere it prints SKIPPED when libnvrtc is not on the library path.

use std::io::Write;

use capsnet::cuda::{compile, nvrtc_available, nvrtc_version, registry};
use capsnet::kernels::SOURCES;

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    assert!(
        std::env::var_os("CAPSNET_REQUIRE_NVRTC").is_none(),
        "CAPSNET_REQUIRE_NVRTC is set but libnvrtc cannot be loaded: check LD_LIBRARY_PATH"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: libnvrtc not found (set LD_LIBRARY_PATH to NVRTC 13.0's lib directory)"
    );
    false
}

#[test]
fn nvrtc_is_13_0() {
    if !nvrtc_or_skip() {
        return;
    }
    // driver 580 (the GPU machine's) JIT-compiles PTX ISA ≤ 9.0, which NVRTC 13.0 emits and 13.1+ does not
    assert_eq!(nvrtc_version().unwrap(), (13, 0), "NVRTC must be 13.0.x for driver 580");
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = compile::compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ptx.len(), SOURCES.iter().filter(|(n, _)| n.ends_with(".cu")).count());
        for k in registry::ALL {
            let (_, p) = ptx
                .iter()
                .find(|(f, _)| *f == k.file)
                .unwrap_or_else(|| panic!("{} not compiled", k.file));
            let text = p.to_src();
            assert!(
                text.contains(&format!(".entry {}(", k.name)),
                "{arch}: kernels/{} has no entry {}",
                k.file,
                k.name
            );
        }
    }
}

#[test]
fn the_registry_names_every_kernel_and_only_those() {
    let mut defined = vec![];
    for (file, src) in SOURCES {
        for name in capsnet::cuda::emulator::kernel_names(src) {
            defined.push((file.to_string(), name));
        }
    }
    for (file, name) in &defined {
        assert!(
            registry::ALL.iter().any(|k| k.name == name && k.file == file),
            "kernels/{file} defines {name}, which the registry does not list"
        );
    }
    for k in registry::ALL {
        assert!(
            defined.iter().any(|(f, n)| f == k.file && n == k.name),
            "registry lists {} in {}, not defined there",
            k.name,
            k.file
        );
    }
}

#[test]
fn a_compile_error_names_the_file_and_shows_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let src = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_thing(); }";
    let e = compile::compile_source("broken.cu", src, "sm_90")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kernels/broken.cu") && e.contains("undefined_thing"),
        "no file name or log in: {e}"
    );
    // an unknown file is refused by name
    let e = compile::compile_file("no_such.cu", "sm_90").unwrap_err().to_string();
    assert!(e.contains("kernels/no_such.cu"), "{e}");
}

/// The static kernel report (ptxas's own figures, through NVRTC): every kernel of the registry is in
/// it for sm_90, no kernel of the training step spills, and the occupancy follows from its figures.
#[test]
fn the_kernel_report_covers_every_kernel_and_no_hot_kernel_spills() {
    use capsnet::cuda::report::{is_hot, kernel_report};
    if !nvrtc_or_skip() {
        return;
    }
    let report = kernel_report("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.len(), registry::ALL.len());
    let mut spilling = vec![];
    for k in &report {
        assert!(k.registers > 0, "{}: no registers reported", k.kernel.name);
        let o = k.occupancy.expect("sm_90's limits are known");
        assert!(
            o.blocks >= 1 && o.fraction > 0.0 && o.fraction <= 1.0,
            "{}: {o:?}",
            k.kernel.name
        );
        if is_hot(k.kernel) && (k.spill_stores > 0 || k.spill_loads > 0) {
            spilling.push(format!(
                "{} ({} B stores, {} B loads)",
                k.kernel.name, k.spill_stores, k.spill_loads
            ));
        }
    }
    assert!(spilling.is_empty(), "hot kernels spill on sm_90: {spilling:?}");
    // routing v1 holds 2·I·J floats per image: at the default model 93,440 bytes, 2 blocks per SM
    let r = report.iter().find(|k| k.kernel == registry::ROUTING_FWD_V1).unwrap();
    assert_eq!(r.dynamic_smem, 93_440);
    assert_eq!(r.occupancy.unwrap().limited_by, "shared memory");
    // a target whose limits are unknown still gets ptxas's figures; a virtual one is refused
    assert!(kernel_report("sm_86").unwrap().iter().all(|k| k.occupancy.is_none()));
    assert!(
        kernel_report("compute_90")
            .unwrap_err()
            .to_string()
            .contains("real architecture")
    );
}

/// No kernel of the training step divides 64-bit integers (PTX div/rem .u64/.s64, which sm_90 runs
/// as a called subroutine of dozens of instructions): their indices are 32-bit, the host checking
/// that the sizes fit (src/cuda/params.rs).
#[test]
fn no_hot_kernel_divides_64_bit_integers() {
    use capsnet::cuda::report::is_hot;
    if !nvrtc_or_skip() {
        return;
    }
    let mut found = vec![];
    for (file, _) in capsnet::kernels::SOURCES.iter().filter(|(n, _)| n.ends_with(".cu")) {
        let ptx = compile::compile_file(file, "sm_90")
            .unwrap_or_else(|e| panic!("{e}"))
            .to_src();
        let mut kernel = String::new();
        for line in ptx.lines() {
            if let Some(rest) = line.split(".entry ").nth(1) {
                kernel = rest.split('(').next().unwrap_or("").trim().to_string();
            }
            let op = line.split_whitespace().next().unwrap_or("");
            let hot = registry::ALL.iter().any(|k| k.name == kernel && is_hot(*k));
            if hot && ["div.u64", "rem.u64", "div.s64", "rem.s64"].contains(&op) {
                found.push(format!("{kernel} ({file}): {}", line.trim()));
            }
        }
        assert!(!kernel.is_empty(), "kernels/{file}: no .entry in its PTX");
    }
    assert!(
        found.is_empty(),
        "64-bit integer division in hot kernels:\n{}",
        found.join("\n")
    );
}
