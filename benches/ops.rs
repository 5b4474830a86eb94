//! Microbenchmarks of both CPU backends' ops at the model's real shapes, the fast one (in fp32, then
//! in bf16 on each bf16 GEMM the CPU runs) then the reference (capsnet::bench::op_bench; `capsnet
//! bench --ops --device cuda` runs the same list on a GPU); and each bf16 GEMM's inner kernel alone on
//! one thread, its B tiles spread over 32 KiB (L1 and L2), 256 KiB, 2 MiB and 32 MiB (memory).
//!
//!     cargo bench --bench ops [-- BATCH]

use capsnet::backend::bf16::{Bf16Gemm, kernel_rate};
use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::fast::FastCpu;
use capsnet::prelude::*;

fn report<B: Backend>(be: &B, batch: usize) {
    println!("ops, batch {batch}, {}", be.name());
    for t in capsnet::bench::op_bench(be, &capsnet::config::Config::default(), batch, 3).expect("the CPU ops run") {
        println!("{:<34} {:>9.2} ms {:>8.1} GFLOP/s", t.name, t.ms, t.gflops);
    }
}

fn main() {
    let batch: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(8);
    report(&FastCpu::new(), batch);
    for k in Bf16Gemm::ALL.into_iter().filter(|k| k.supported()) {
        report(&FastCpu::with_bf16_gemm(k), batch);
        for (kib, wher) in [(32, "32 KiB"), (256, "256 KiB"), (2048, "2 MiB"), (32768, "32 MiB")] {
            println!(
                "{} kernel, one thread, B {wher}: {:.0} GFLOP/s",
                k.flag(),
                kernel_rate(k, kib)
            );
        }
    }
    report(&CpuBackend::<f32>::new(), batch);
}
