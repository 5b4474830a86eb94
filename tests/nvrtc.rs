//! Every kernel compiles with NVRTC, without a GPU: NVRTC runs on the CPU. CI installs NVRTC 13.0
//! (the pip wheel nvidia-cuda-nvrtc==13.0.*) and sets CAPSNET_REQUIRE_NVRTC=1, so there this test
//! cannot skip; elsewhere it prints SKIPPED when libnvrtc is not on the library path. Also: which
//! image a GPU gets (a cubin for its own architecture, PTX only for one NVRTC does not know) and which
//! NVRTC and driver versions work together, with stand-in versions.

use std::io::Write;

use capsnet::cuda::compile::{self, Target, check_versions, target_for};
use capsnet::cuda::{nvrtc_available, nvrtc_version, registry};
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

/// The architecture a cubin is for, from its ELF header (e_flags bits 8-15, as cuobjdump reads it).
fn cubin_arch(image: &[u8]) -> u32 {
    assert_eq!(&image[..4], b"\x7fELF", "not an ELF image");
    assert_eq!(
        u16::from_le_bytes([image[18], image[19]]),
        190,
        "not a CUDA ELF (EM_CUDA)"
    );
    (u32::from_le_bytes([image[48], image[49], image[50], image[51]]) >> 8) & 0xff
}

/// CI has NVRTC write a cubin for sm_80 and sm_90 for every kernel file (what the backend loads
/// first), and PTX for compute_90 (the fallback for an architecture NVRTC does not know).
#[test]
fn every_kernel_compiles_to_cubins_for_sm80_and_sm90_and_to_ptx() {
    if !nvrtc_or_skip() {
        return;
    }
    let files = SOURCES.iter().filter(|(n, _)| n.ends_with(".cu")).count();
    for arch in [80, 90] {
        let images = compile::compile_all(Target::Cubin(arch)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(images.len(), files);
        for (file, image) in images.iter() {
            let bytes = &image.bytes;
            assert_eq!(cubin_arch(bytes), arch, "kernels/{file}");
            for k in registry::ALL.iter().filter(|k| k.file == *file) {
                let name = format!("{}\0", k.name);
                assert!(
                    bytes.windows(name.len()).any(|w| w == name.as_bytes()),
                    "sm_{arch}: kernels/{file} has no kernel {}",
                    k.name
                );
            }
        }
    }
    let ptx = compile::compile_all(Target::Ptx(90)).unwrap_or_else(|e| panic!("{e}"));
    for k in registry::ALL {
        let (_, p) = ptx
            .iter()
            .find(|(f, _)| *f == k.file)
            .unwrap_or_else(|| panic!("{} not compiled", k.file));
        assert!(
            p.ptx_text().unwrap().contains(&format!(".entry {}(", k.name)),
            "compute_90: kernels/{} has no entry {}",
            k.file,
            k.name
        );
    }
}

/// A GPU gets its own architecture's cubin where NVRTC knows it, PTX for the newest architecture
/// below it where NVRTC does not, and a GPU older than sm_80 an error naming its compute capability.
#[test]
fn a_gpu_gets_its_own_cubin_and_ptx_only_for_an_architecture_nvrtc_does_not_know() {
    let known = [75, 80, 86, 87, 89, 90, 100, 120];
    assert_eq!(target_for((9, 0), &known).unwrap(), Target::Cubin(90));
    assert_eq!(target_for((8, 6), &known).unwrap(), Target::Cubin(86));
    assert_eq!(target_for((12, 1), &known).unwrap(), Target::Ptx(120));
    assert_eq!(target_for((9, 5), &known).unwrap(), Target::Ptx(90));
    let e = target_for((7, 5), &known).unwrap_err().to_string();
    assert!(e.contains("compute capability 7.5") && e.contains("8.0"), "{e}");
    if nvrtc_or_skip() {
        // this NVRTC knows the GPUs the project is measured on
        let archs = compile::supported_archs().unwrap();
        assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
    }
}

/// Stand-in versions: a cubin loads on a driver of its NVRTC's major version or newer (minor version
/// compatibility), PTX only on a driver at least as new as its NVRTC; every refusal names both.
#[test]
fn nvrtc_and_driver_versions_that_cannot_work_together_are_named() {
    let (cubin, ptx) = (Target::Cubin(90), Target::Ptx(90));
    for (nvrtc, driver) in [
        ((13, 0), (13, 0)),
        ((13, 1), (13, 0)),
        ((13, 0), (13, 2)),
        ((12, 8), (13, 0)),
    ] {
        check_versions(nvrtc, driver, cubin).unwrap_or_else(|e| panic!("{nvrtc:?} {driver:?}: {e}"));
    }
    for (nvrtc, driver) in [((13, 0), (13, 0)), ((13, 0), (13, 2)), ((12, 8), (13, 0))] {
        check_versions(nvrtc, driver, ptx).unwrap_or_else(|e| panic!("{nvrtc:?} {driver:?}: {e}"));
    }
    let refused = |nvrtc, driver, target, words: &[&str]| {
        let e = check_versions(nvrtc, driver, target).unwrap_err().to_string();
        for w in words {
            assert!(e.contains(w), "{nvrtc:?} {driver:?} {target:?}: {e:?} lacks {w:?}");
        }
    };
    // the case the driver would report only as CUDA_ERROR_UNSUPPORTED_PTX_VERSION
    refused(
        (13, 1),
        (13, 0),
        ptx,
        &["NVRTC 13.1", "CUDA 13.0", "nvidia-cuda-nvrtc==13.0"],
    );
    refused((14, 0), (13, 0), cubin, &["NVRTC 14.0", "CUDA 13.0"]);
    refused((13, 0), (12, 8), cubin, &["CUDA 12.8", "13.0", "580", "NVRTC is 13.0"]);
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
    let e = compile::compile_source("broken.cu", src, Target::Cubin(90))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kernels/broken.cu") && e.contains("undefined_thing"),
        "no file name or log in: {e}"
    );
    // an unknown file is refused by name
    let e = compile::compile_file("no_such.cu", Target::Cubin(90))
        .unwrap_err()
        .to_string();
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
    let c = capsnet::config::Config::default();
    let (caps, rounds) = (c.caps_shape(1).dims(), c.routing_rounds);
    let report = kernel_report("sm_90", &caps, rounds).unwrap_or_else(|e| panic!("{e}"));
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
    assert!(
        kernel_report("sm_86", &caps, rounds)
            .unwrap()
            .iter()
            .all(|k| k.occupancy.is_none())
    );
    assert!(
        kernel_report("compute_90", &caps, rounds)
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
        let ptx = compile::compile_file(file, Target::Ptx(90))
            .unwrap_or_else(|e| panic!("{e}"))
            .ptx_text()
            .unwrap();
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
