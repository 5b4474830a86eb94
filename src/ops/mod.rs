//! Tape ops. Each function runs an op's forward through the backend, checks shapes, and records a
//! node whose [`BackwardOp`](crate::tape::BackwardOp) implementation is that op's backward.
//! Layouts follow [`crate::backend`].

mod caps;
mod conv;
mod dense;
mod loss;

pub use caps::{argmax, lengths, mask, predict, predict_routing, routing, squash};
pub use conv::conv2d;
pub use dense::dense;
pub use loss::{add, margin_loss, sq_err};

use crate::{Error, Result};

fn shape_err<T>(op: &str, msg: impl std::fmt::Display) -> Result<T> {
    Err(Error::msg(format!("{op}: {msg}")))
}
