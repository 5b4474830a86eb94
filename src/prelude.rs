//! The interfaces a caller needs in scope to call ops on a concrete backend (a generic `B: Backend` or
//! `B: StepRuntime` has them through its bound): `use capsnet::prelude::*;`.

pub use crate::backend::Core;
pub use crate::backend::cpu::CpuBackend;
pub use crate::backend::fast::FastCpu;
pub use crate::ops::{AdamOps, Backend, CapsuleOps, ConvOps, DenseOps, LossOps, RoutingOps};
pub use crate::runtime::StepRuntime;
