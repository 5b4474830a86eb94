//! capsnet: a CapsNet (Sabour, Frosst & Hinton 2017) training engine.
//!
//! Layers of the crate, bottom up (docs/ARCHITECTURE.md):
//! - [`backend`]: what every backend is ([`backend::Core`]) and the two CPU backends' machinery;
//! - [`cuda`]: the GPU as a device, with kernels compiled by NVRTC at run time;
//! - [`tape`] and [`ops`]: a thin autodiff tape, and one folder per op family holding its interface,
//!   tape ops, CPU reference, fast CPU and CUDA implementations and kernels;
//! - [`runtime`], [`config`]: the training step's runtime; the model's and a run's configuration;
//! - [`model`], [`data`], [`checkpoint`], [`train`]: the network of Géron's notebook, MNIST,
//!   safetensors checkpoints, the training loop.
//!
//! Ops are recorded on a tape and differentiated backwards:
//!
//! ```
//! use capsnet::backend::cpu::CpuBackend;
//! use capsnet::{ops, tape::Tape};
//!
//! let mut t = Tape::new(CpuBackend::<f64>::new());
//! let s = t.leaf(vec![3.0, 4.0], &[1, 2]).unwrap();
//! let v = ops::squash(&mut t, s).unwrap();
//! let len = ops::lengths(&mut t, v).unwrap();
//! // ‖squash(s)‖ = ‖s‖² / (1 + ‖s‖²) = 25/26, up to the safe norm's ε
//! assert!((t.value(len).buf[0] - 25.0 / 26.0).abs() < 1e-6);
//! // a loss needs one value: Σ (len − 1)² over the single row
//! let target = t.input(vec![1.0], &[1, 1]).unwrap();
//! t.reshape(len, &[1, 1]).unwrap();
//! let loss = ops::sq_err(&mut t, len, target, 1.0).unwrap();
//! t.backward(loss).unwrap();
//! // ‖v‖ grows with ‖s‖, so a loss that wants a longer v pushes s outwards: negative gradients
//! assert!(t.grad(s).unwrap().iter().all(|&g| g < 0.0));
//! ```

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod data;
pub mod dataset;
pub mod error;
pub mod figures;
pub mod float;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod multimnist;
pub mod ops;
pub mod par;
pub mod predict;
pub mod prelude;
pub mod runtime;
pub mod serve;
pub mod tape;
pub mod train;

pub use error::{Error, Result};
