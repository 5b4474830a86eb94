//! The tensor-core wrappers of kernels/mma.cuh against the PTX ISA's fragment tables, lane by lane
//! (kernels/emulator/fragments.cu runs them on one warp). The tables are transcribed here from the ISA
//! (PTX ISA 9.1) independently of mma.cuh:
//! - §9.7.14.5.7 "Matrix Fragments for mma.m16n8k8": the .tf32 A, B and the f32 C/D fragments;
//! - §9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type": .bf16 A and B, two
//!   elements per 32-bit register, the lower-indexed one in the low half ("low to high");
//! - §9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix": each group of four lanes receives
//!   one row, lane 4r + t columns 2t and 2t + 1 of row r; .trans loads the matrix column-major;
//! - §9.7.9.21 cvt: .rna (round to nearest, ties away from zero) for tf32, .rn (ties to even) for
//!   bf16x2 with the first source in the upper half.
//!
//! On the emulated device this proves the emulated bodies follow the tables; on a GPU
//! (CAPSNET_REQUIRE_GPU=1) the same test proves the hardware does, so the two agree. Values are small
//! integers, exact in tf32, bf16 and every f32 sum here, so results must be equal, not close.

mod common;

use std::sync::Arc;

use capsnet::cuda::CudaBackend;
use common::Lcg;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

/// (row, col) of element i of lane `lane`, as the ISA's formulas give them: groupID = lane >> 2,
/// threadID_in_group = lane % 4.
mod isa {
    fn g(lane: usize) -> usize {
        lane >> 2
    }
    fn t(lane: usize) -> usize {
        lane % 4
    }
    /// m16n8k8 .tf32 A: "row = groupID for a0 and a2, groupID + 8 for a1 and a3; col =
    /// threadID_in_group for a0 and a1, threadID_in_group + 4 for a2 and a3".
    pub fn tf32_a(lane: usize, i: usize) -> (usize, usize) {
        let row = if i == 0 || i == 2 { g(lane) } else { g(lane) + 8 };
        let col = if i < 2 { t(lane) } else { t(lane) + 4 };
        (row, col)
    }
    /// m16n8k8 .tf32 B: "row = threadID_in_group for b0, threadID_in_group + 4 for b1; col = groupID".
    pub fn tf32_b(lane: usize, i: usize) -> (usize, usize) {
        (if i == 0 { t(lane) } else { t(lane) + 4 }, g(lane))
    }
    /// C/D (f32, both shapes): "row = groupID for c0 and c1, groupID + 8 for c2 and c3; col =
    /// (threadID_in_group * 2) + (i & 0x1)".
    pub fn acc(lane: usize, i: usize) -> (usize, usize) {
        (if i < 2 { g(lane) } else { g(lane) + 8 }, t(lane) * 2 + (i & 1))
    }
    /// m16n8k16 .bf16 A: "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise;
    /// col = (threadID_in_group * 2) + (i & 0x1) for i < 4, + 8 for i >= 4".
    pub fn bf16_a(lane: usize, i: usize) -> (usize, usize) {
        let row = if i < 2 || (4..6).contains(&i) {
            g(lane)
        } else {
            g(lane) + 8
        };
        let col = t(lane) * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
        (row, col)
    }
    /// m16n8k16 .bf16 B: "row = (threadID_in_group * 2) + (i & 0x1) for i < 2, + 8 for i >= 2; col =
    /// groupID".
    pub fn bf16_b(lane: usize, i: usize) -> (usize, usize) {
        (t(lane) * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, g(lane))
    }
}

/// The transcription against lane examples worked by hand from the ISA's formulas (lanes 0, 1, 4, 5 and 31),
/// and every element of every fragment held by exactly one lane and register.
#[test]
fn the_transcribed_tables_give_the_worked_lanes_and_hold_each_element_once() {
    assert_eq!(
        (0..4).map(|i| isa::tf32_a(0, i)).collect::<Vec<_>>(),
        [(0, 0), (8, 0), (0, 4), (8, 4)]
    );
    assert_eq!(
        (0..4).map(|i| isa::tf32_a(31, i)).collect::<Vec<_>>(),
        [(7, 3), (15, 3), (7, 7), (15, 7)]
    );
    assert_eq!((0..2).map(|i| isa::tf32_b(1, i)).collect::<Vec<_>>(), [(1, 0), (5, 0)]);
    assert_eq!(
        (0..4).map(|i| isa::acc(4, i)).collect::<Vec<_>>(),
        [(1, 0), (1, 1), (9, 0), (9, 1)]
    );
    assert_eq!(
        (0..8).map(|i| isa::bf16_a(31, i)).collect::<Vec<_>>(),
        [(7, 6), (7, 7), (15, 6), (15, 7), (7, 14), (7, 15), (15, 14), (15, 15)]
    );
    assert_eq!(
        (0..4).map(|i| isa::bf16_b(5, i)).collect::<Vec<_>>(),
        [(2, 1), (3, 1), (10, 1), (11, 1)]
    );
    // every element of every matrix is held exactly once
    for (f, regs, rows, cols) in [
        (isa::tf32_a as fn(usize, usize) -> (usize, usize), 4, 16, 8),
        (isa::tf32_b, 2, 8, 8),
        (isa::acc, 4, 16, 8),
        (isa::bf16_a, 8, 16, 16),
        (isa::bf16_b, 4, 16, 8),
    ] {
        let mut seen = vec![0; rows * cols];
        for lane in 0..32 {
            for i in 0..regs {
                let (r, c) = f(lane, i);
                seen[r * cols + c] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}

fn module(be: &CudaBackend) -> Arc<CudaModule> {
    common::emulator_module(be, "fragments.cu")
}

fn func(m: &Arc<CudaModule>, name: &str) -> CudaFunction {
    m.load_function(name).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn warp() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A rows x cols matrix of small integers in [-4, 4].
fn ints(rng: &mut Lcg, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| (rng.uniform(0.0, 9.0).floor() - 4.0) as f32)
        .collect()
}

/// bf16 bits of a float that bf16 holds exactly.
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    assert_eq!(b & 0xffff, 0, "{x} is not exact in bf16");
    b >> 16
}

/// Runs one mma on the device with the registers the ISA's tables give, returns D as a 16x8 matrix
/// read back through the table.
fn run_mma(be: &CudaBackend, bf16: bool, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
    let m = module(be);
    let k = if bf16 { 16 } else { 8 };
    let mut ra = vec![0u32; 32 * 4];
    let mut rb = vec![0u32; 32 * 2];
    let mut rc = vec![0f32; 32 * 4];
    for lane in 0..32 {
        if bf16 {
            for i in 0..8 {
                let (r, col) = isa::bf16_a(lane, i);
                ra[lane * 4 + i / 2] |= bf16_bits(a[r * k + col]) << (16 * (i & 1));
            }
            for i in 0..4 {
                let (r, col) = isa::bf16_b(lane, i);
                rb[lane * 2 + i / 2] |= bf16_bits(b[r * 8 + col]) << (16 * (i & 1));
            }
        } else {
            for i in 0..4 {
                let (r, col) = isa::tf32_a(lane, i);
                ra[lane * 4 + i] = a[r * k + col].to_bits();
            }
            for i in 0..2 {
                let (r, col) = isa::tf32_b(lane, i);
                rb[lane * 2 + i] = b[r * 8 + col].to_bits();
            }
        }
        for i in 0..4 {
            let (r, col) = isa::acc(lane, i);
            rc[lane * 4 + i] = c[r * 8 + col];
        }
    }
    let s = be.stream();
    let (da, db, dc) = (
        s.clone_htod(&ra).unwrap(),
        s.clone_htod(&rb).unwrap(),
        s.clone_htod(&rc).unwrap(),
    );
    let mut dd = s.alloc_zeros::<f32>(32 * 4).unwrap();
    let f = func(&m, if bf16 { "frag_mma_bf16" } else { "frag_mma_tf32" });
    let mut l = s.launch_builder(&f);
    l.arg(&da).arg(&db).arg(&dc).arg(&mut dd);
    // SAFETY: frag_mma_*(a [32·4], b [32·2], c [32·4], d [32·4]), one warp.
    unsafe { l.launch(warp()) }.unwrap();
    let d = s.clone_dtoh(&dd).unwrap();
    let mut out = vec![f32::NAN; 16 * 8];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, col) = isa::acc(lane, i);
            out[r * 8 + col] = d[lane * 4 + i];
        }
    }
    out
}

fn matmul(a: &[f32], b: &[f32], c: &[f32], k: usize) -> Vec<f32> {
    (0..16 * 8)
        .map(|e| {
            let (r, col) = (e / 8, e % 8);
            c[e] + (0..k).map(|kk| a[r * k + kk] * b[kk * 8 + col]).sum::<f32>()
        })
        .collect()
}

#[test]
fn mma_tf32_and_bf16_follow_the_isa_fragment_tables() {
    let Some(be) = common::cuda_backend() else { return };
    let mut rng = Lcg(2017);
    for bf16 in [false, true] {
        let k = if bf16 { 16 } else { 8 };
        for _ in 0..3 {
            let (a, b, c) = (ints(&mut rng, 16, k), ints(&mut rng, k, 8), ints(&mut rng, 16, 8));
            let got = run_mma(&be, bf16, &a, &b, &c);
            assert_eq!(
                got,
                matmul(&a, &b, &c, k),
                "mma {} differs from A·B + C",
                if bf16 { "bf16" } else { "tf32" }
            );
        }
    }
}

#[test]
fn ldmatrix_x4_follows_the_isa_fragment_layout() {
    let Some(be) = common::cuda_backend() else { return };
    let m = module(&be);
    // element (j, r, c) of matrix j is 0x100·j + 0x10·r + c: every value says where it came from
    let mats: Vec<u16> = (0..4 * 64)
        .map(|e| (0x100 * (e / 64) + 0x10 * (e % 64 / 8) + e % 8) as u16)
        .collect();
    let s = be.stream();
    let dm = s.clone_htod(&mats).unwrap();
    let (mut out, mut out_t) = (s.alloc_zeros::<u32>(128).unwrap(), s.alloc_zeros::<u32>(128).unwrap());
    let f = func(&m, "frag_ldmatrix");
    let mut l = s.launch_builder(&f);
    l.arg(&dm).arg(&mut out).arg(&mut out_t);
    // SAFETY: frag_ldmatrix(m [4·64 u16], out [32·4], out_t [32·4]), one warp.
    unsafe { l.launch(warp()) }.unwrap();
    let (out, out_t) = (s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&out_t).unwrap());
    let at = |j: usize, r: usize, c: usize| (0x100 * j + 0x10 * r + c) as u32;
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for j in 0..4 {
            // lane 4r + t holds row r, columns 2t (low half) and 2t + 1 (high half)
            assert_eq!(
                out[lane * 4 + j],
                at(j, g, 2 * t) | at(j, g, 2 * t + 1) << 16,
                "ldmatrix lane {lane} register {j}"
            );
            // .trans: the same fragment of the matrix read column-major
            assert_eq!(
                out_t[lane * 4 + j],
                at(j, 2 * t, g) | at(j, 2 * t + 1, g) << 16,
                "ldmatrix.trans lane {lane} register {j}"
            );
        }
    }
}

/// The nearest value with `keep` mantissa bits to x, found by comparing the two candidates around it
/// in f64; a tie goes away from zero (`away`) or to the even one.
fn round_to(x: f32, keep: u32, away: bool) -> u32 {
    let drop = 23 - keep;
    let b = x.to_bits();
    let lo = b & !((1u32 << drop) - 1);
    let hi = lo + (1 << drop);
    // past the largest finite value the next step up is 2^128 (IEEE rounds to infinity from there)
    let value = |bits: u32| match bits & 0x7fff_ffff {
        0x7f80_0000 => 2f64.powi(128).copysign(x as f64),
        _ => f32::from_bits(bits) as f64,
    };
    let (dl, dh) = ((x as f64 - value(lo)).abs(), (value(hi) - x as f64).abs());
    if dl < dh || (dl == dh && !away && (lo >> drop) & 1 == 0) {
        lo
    } else {
        hi
    }
}

#[test]
fn tf32_and_bf16_conversions_round_as_the_isa_says() {
    let Some(be) = common::cuda_backend() else { return };
    let m = module(&be);
    let mut rng = Lcg(99);
    let tie = |bits: u32| f32::from_bits(0x3f80_0000 | bits);
    let mut x: Vec<f32> = vec![
        tie(1 << 12),       // 1 + 2^-11: a tf32 tie, rounds away to 1 + 2^-10
        -tie(1 << 12),      // and the same below zero
        tie((1 << 12) - 1), // just under the tie: down
        tie(1 << 15),       // 1 + 2^-8: a bf16 tie between 1 (even) and 1 + 2^-7: to 1
        tie(3 << 15),       // 1 + 3·2^-8: a tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up
        0.0,
        -0.0,
        f32::MAX,
        3.0e38,
    ];
    x.extend((0..246).map(|_| rng.uniform(-1e3, 1e3) as f32 * rng.uniform(0.0, 1.0) as f32));
    let n = x.len() as i32;
    let s = be.stream();
    let dx = s.clone_htod(&x).unwrap();
    let (mut t, mut b) = (
        s.alloc_zeros::<u32>(x.len()).unwrap(),
        s.alloc_zeros::<u32>(x.len() / 2).unwrap(),
    );
    let f = func(&m, "frag_convert");
    let mut l = s.launch_builder(&f);
    l.arg(&dx).arg(&mut t).arg(&mut b).arg(&n);
    // SAFETY: frag_convert(x [n], tf32 [n], bf16 [n/2], n), one warp.
    unsafe { l.launch(warp()) }.unwrap();
    let (t, b) = (s.clone_dtoh(&t).unwrap(), s.clone_dtoh(&b).unwrap());
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(t[i], round_to(v, 10, true), "cvt.rna.tf32.f32 of {v:e}");
    }
    for i in 0..x.len() / 2 {
        let want = (round_to(x[2 * i], 7, false) >> 16) | (round_to(x[2 * i + 1], 7, false) & 0xffff_0000);
        assert_eq!(b[i], want, "cvt.rn.bf16x2.f32 of ({:e}, {:e})", x[2 * i + 1], x[2 * i]);
    }
    assert_eq!(t[0], 0x3f80_2000, "the tf32 tie goes away from zero");
    assert_eq!(b[1] & 0xffff, 0x3f80, "the bf16 tie 1 + 2^-8 goes to even (1)");
}

/// How one `mma` sums what the ISA leaves open: on random inputs exact in tf32 or bf16, with
/// exponents spread so that sums need rounding, each output against two models of c + Σ a·b: fp32 FMAs
/// in k order, rounding to nearest, and the truncating model (every term cut to the 24-bit significand
/// of the largest, the sum cut to fp32: kernels/mma.cuh, `truncated_sum`). The emulated device follows
/// the model of its mode bit for bit, and the two models differ on these inputs. On a GPU every output
/// is within the bound of capsnet::float::sum_error_bound, and the test prints how many outputs each
/// model matches: what the hardware does.
#[test]
fn mma_sums_follow_each_emulated_mode_and_stay_within_the_bound() {
    use capsnet::cuda::emulator;
    use capsnet::float::{Precision, sum_error_bound};
    let Some(be) = common::cuda_backend() else { return };
    let emulated = emulator::loaded().is_some();
    let mut rng = Lcg(77);
    for bf16 in [false, true] {
        let (k, bits, p) = if bf16 {
            (16, 7, Precision::Bf16)
        } else {
            (8, 10, Precision::Tf32)
        };
        // ±(1 + m·2^-bits)·2^e, e in [-8, 8]: exact in the input format
        let mut spread = |n: usize, bits: i32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let m = rng.uniform(0.0, 2f64.powi(bits)).floor() * 2f64.powi(-bits);
                    let e = rng.uniform(-8.0, 9.0).floor() as i32;
                    let sign = if rng.uniform(0.0, 1.0) < 0.5 { -1.0 } else { 1.0 };
                    (sign * (1.0 + m) * 2f64.powi(e)) as f32
                })
                .collect()
        };
        let (mut fma_matches, mut trunc_matches, mut models_differ, mut outputs) = (0, 0, 0, 0);
        for _ in 0..8 {
            let (a, b) = (spread(16 * k, bits), spread(k * 8, bits));
            let c = spread(16 * 8, 23);
            let terms = |e: usize| -> Vec<f64> {
                let (r, col) = (e / 8, e % 8);
                std::iter::once(c[e] as f64)
                    .chain((0..k).map(|kk| a[r * k + kk] as f64 * b[kk * 8 + col] as f64))
                    .collect()
            };
            let fma = |e: usize| -> f32 {
                let (r, col) = (e / 8, e % 8);
                (0..k).fold(c[e], |acc, kk| a[r * k + kk].mul_add(b[kk * 8 + col], acc))
            };
            let modes: &[bool] = if emulated { &[false, true] } else { &[false] };
            for &truncates in modes {
                if emulated {
                    emulator::set_mma_truncation(truncates).unwrap();
                }
                let got = run_mma(&be, bf16, &a, &b, &c);
                if emulated {
                    emulator::set_mma_truncation(false).unwrap();
                }
                for (e, &g) in got.iter().enumerate() {
                    let t = terms(e);
                    let (model_fma, model_trunc) = (fma(e), truncated_sum(&t));
                    if emulated {
                        let want = if truncates { model_trunc } else { model_fma };
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{} output {e}, {}: {} against the model's {}",
                            p.name(),
                            if truncates { "truncating" } else { "to nearest" },
                            g,
                            want
                        );
                    }
                    let exact: f64 = t.iter().sum();
                    let scale: f64 = t.iter().map(|x| x.abs()).sum();
                    assert!(
                        (g as f64 - exact).abs() <= sum_error_bound(p, k) * scale,
                        "{} output {e}: {} against {exact} (Σ|terms| {scale})",
                        p.name(),
                        g
                    );
                    fma_matches += (g.to_bits() == model_fma.to_bits()) as usize;
                    trunc_matches += (g.to_bits() == model_trunc.to_bits()) as usize;
                    models_differ += (!truncates && model_fma.to_bits() != model_trunc.to_bits()) as usize;
                    outputs += 1;
                }
            }
        }
        assert!(
            models_differ > 0,
            "{}: the two models agree on every input: no test of the mode",
            p.name()
        );
        eprintln!(
            "mma {} sums{}: {fma_matches} of {outputs} outputs equal fp32 FMAs in k order, {trunc_matches} the truncating model ({models_differ} of {} outputs tell them apart)",
            p.name(),
            if emulated {
                " (emulated, both modes)"
            } else {
                " (hardware)"
            },
            if emulated { outputs / 2 } else { outputs }
        );
    }
}

/// kernels/mma.cuh's `truncated_sum`, written again from its description: every term cut (towards
/// zero) to a multiple of the last bit of a 24-bit significand at the largest term's leading bit, the
/// exact sum of those cut to f32.
fn truncated_sum(t: &[f64]) -> f32 {
    let biggest = t.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if biggest == 0.0 {
        return t[0] as f32;
    }
    let lead = biggest.log2().floor() as i32; // 2^lead <= biggest < 2^(lead+1)
    let q = 2f64.powi(lead - 23);
    let sum: f64 = t.iter().map(|x| (x / q).trunc() * q).sum();
    let f = sum as f32;
    if (f as f64).abs() > sum.abs() {
        // one step towards zero
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    }
}
