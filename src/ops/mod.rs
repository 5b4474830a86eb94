//! The ops, one folder per family. Each family holds its shape type and checks, its interface (a trait
//! every backend implements), its tape ops (forward through the backend, a node whose
//! [`BackwardOp`](crate::tape::BackwardOp) is that op's backward) and, beside them, its CPU reference
//! (`cpu.rs`), fast CPU (`fast.rs`) and CUDA (`cuda.rs`) implementations:
//!
//! | family       | interface      | tape ops                                             |
//! |--------------|----------------|------------------------------------------------------|
//! | [`conv`]     | [`ConvOps`]    | [`conv2d`]                                           |
//! | [`dense`]    | [`DenseOps`]   | [`dense`]                                            |
//! | [`capsules`] | [`CapsuleOps`] | [`squash`], [`predict`], [`lengths`], [`mask`], [`argmax`] |
//! | [`routing`]  | [`RoutingOps`] | [`routing()`], [`predict_routing`]                   |
//! | [`losses`]   | [`LossOps`]    | [`margin_loss`], [`sq_err`], [`add`]                 |
//! | [`adam`]     | [`AdamOps`]    | (the optimiser [`Adam`])                             |
//!
//! Each family's op tests are its `tests.rs` (finite differences of its tape ops on the reference,
//! [`gradcheck`]); the parity of every backend with the reference is tests/common/parity.rs.
//!
//! A backend is [`Backend`]: [`Core`] and every family's interface. Layouts and the accumulation
//! rule are [`crate::backend`]'s.

pub mod adam;
pub mod capsules;
pub mod conv;
pub mod dense;
pub mod gradcheck;
pub mod losses;
pub mod routing;

pub use adam::{Adam, AdamGroup, AdamHyper, AdamOps};
pub use capsules::{CapsShape, CapsuleOps, NORM_EPS, argmax, lengths, mask, predict, squash};
pub use conv::{ConvOps, ConvShape, conv2d};
pub use dense::{Act, DenseOps, DenseShape, dense};
pub use losses::{LAMBDA, LossOps, M_MINUS, M_PLUS, add, margin_loss, sq_err};
pub use routing::{RoutingOps, RoutingSaved, predict_routing, routing};

pub use crate::backend::Core;

/// A backend: every op family's interface on one kind of buffer.
pub trait Backend: Core + ConvOps + DenseOps + CapsuleOps + RoutingOps + LossOps + AdamOps {}

impl<T: Core + ConvOps + DenseOps + CapsuleOps + RoutingOps + LossOps + AdamOps> Backend for T {}
