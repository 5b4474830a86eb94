//! Microbenchmarks of both CPU backends' ops at the model's real shapes, the fast one then the
//! reference (capsnet::bench::op_bench; `capsnet bench --ops --device cuda` runs the same list on a GPU).
//!
//!     cargo bench --bench ops [-- BATCH]

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
    report(&CpuBackend::<f32>::new(), batch);
}
