//! capsnet: a CapsNet (Sabour, Frosst & Hinton 2017) training engine.
//!
//! Layers of the crate, bottom up:
//! - [`backend`]: the op interface and its CPU reference implementation;
//! - [`tape`] and [`ops`]: a thin autodiff tape, each op owning its forward and backward;
//! - [`model`], [`adam`]: the network of Géron's notebook and its optimiser;
//! - [`data`], [`checkpoint`], [`train`]: MNIST, safetensors checkpoints, the training loop.

pub mod adam;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod error;
pub mod float;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod par;
pub mod tape;
pub mod train;

pub use error::{Error, Result};
