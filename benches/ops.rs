//! Microbenchmarks of the CPU reference ops at the model's real shapes.
//!
//!     cargo bench --bench ops [-- BATCH]
//!
//! Each op runs once untimed, then `REPS` times; the median is printed with the achieved GFLOP/s.
//! The same harness will time the CUDA kernels against these figures.

use std::time::Instant;

use capsnet::backend::cpu::CpuBackend;
use capsnet::backend::{Act, Backend, CapsShape, ConvShape, DenseShape};

const REPS: usize = 3;

fn time(name: &str, flops: f64, mut f: impl FnMut()) {
    f();
    let mut ms: Vec<f64> = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let m = ms[REPS / 2];
    println!("{name:<34} {m:>9.2} ms {:>8.1} GFLOP/s", flops / (m / 1e3) / 1e9);
}

fn main() {
    let batch: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(8);
    let be = CpuBackend::<f32>::new();
    let fill = |n: usize| {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
            .collect::<Vec<f32>>()
    };
    println!("CPU reference ops, batch {batch}, {}", be.name());

    for (name, s) in [
        (
            "conv1 1->256 9x9/1",
            ConvShape {
                batch,
                in_h: 28,
                in_w: 28,
                in_c: 1,
                out_c: 256,
                k: 9,
                stride: 1,
            },
        ),
        (
            "primary 256->256 9x9/2",
            ConvShape {
                batch,
                in_h: 20,
                in_w: 20,
                in_c: 256,
                out_c: 256,
                k: 9,
                stride: 2,
            },
        ),
    ] {
        let (x, w, b, dz) = (fill(s.x_len()), fill(s.w_len()), fill(s.out_c), fill(s.y_len()));
        let mut y = vec![0.0; s.y_len()];
        let flops = 2.0 * s.macs() as f64;
        time(&format!("{name} fwd"), flops, || {
            be.conv2d_fwd(&s, &x, &w, &b, &mut y, Act::Relu).unwrap()
        });
        if s.in_c > 1 {
            let mut dx = vec![0.0; s.x_len()];
            time(&format!("{name} bwd input"), flops, || {
                be.conv2d_bwd_input(&s, &dz, &w, &mut dx).unwrap()
            });
        }
        let mut dw = vec![0.0; s.w_len()];
        time(&format!("{name} bwd weight"), flops, || {
            be.conv2d_bwd_weight(&s, &x, &dz, &mut dw).unwrap()
        });
    }

    let cs = CapsShape {
        batch,
        in_caps: 1152,
        in_dim: 8,
        out_caps: 10,
        out_dim: 16,
    };
    let (u, w, duhat) = (fill(cs.u_len()), fill(cs.w_len()), fill(cs.uhat_len()));
    let mut uhat = vec![0.0; cs.uhat_len()];
    let flops = 2.0 * cs.w_len() as f64 * batch as f64;
    time("predict fwd", flops, || be.predict_fwd(&cs, &u, &w, &mut uhat).unwrap());
    let mut du = vec![0.0; cs.u_len()];
    time("predict bwd input", flops, || {
        be.predict_bwd_input(&cs, &duhat, &w, &mut du).unwrap()
    });
    let mut dw = vec![0.0; cs.w_len()];
    time("predict bwd weight", flops, || {
        be.predict_bwd_weight(&cs, &u, &duhat, &mut dw).unwrap()
    });
    for rounds in [2, 3] {
        let mut v = vec![0.0; cs.v_len()];
        let mut saved = be.routing_saved(&cs, rounds).unwrap();
        let flops = 2.0 * (2 * rounds - 1) as f64 * cs.uhat_len() as f64;
        time(&format!("routing fwd, {rounds} rounds"), flops, || {
            be.routing_fwd(&cs, rounds, &uhat, &mut v, &mut saved).unwrap()
        });
        let dv = fill(cs.v_len());
        let mut duh = vec![0.0; cs.uhat_len()];
        time(&format!("routing bwd, {rounds} rounds"), 2.0 * flops, || {
            be.routing_bwd(&cs, rounds, &uhat, &saved, &dv, &mut duh).unwrap()
        });
    }

    for (name, s) in [
        ("fc1 160->512", (160, 512)),
        ("fc2 512->1024", (512, 1024)),
        ("fc3 1024->784", (1024, 784)),
    ] {
        let d = DenseShape {
            rows: batch,
            inp: s.0,
            out: s.1,
        };
        let (x, w, b) = (fill(d.rows * d.inp), fill(d.inp * d.out), fill(d.out));
        let mut y = vec![0.0; d.rows * d.out];
        time(&format!("{name} fwd"), 2.0 * (d.rows * d.inp * d.out) as f64, || {
            be.dense_fwd(&d, &x, &w, &b, &mut y, Act::Relu).unwrap()
        });
    }
}
