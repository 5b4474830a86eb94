//! The binary's commands: their flags ([`args`]), the backend they run on ([`device`]), and one
//! module per command that turns its flags into the library's calls and prints what comes back.

/// Runs `$body` with `$be` bound to whichever backend `$sel` holds.
macro_rules! with_backend {
    ($sel:expr, |$be:ident| $body:expr) => {
        match $sel {
            Selected::Cpu($be) => $body,
            Selected::CpuReference($be) => $body,
            Selected::Cuda($be) => {
                let $be = *$be;
                $body
            }
        }
    };
}

pub mod args;
pub mod bench;
pub mod device;
pub mod eval;
pub mod export;
pub mod info;
pub mod multimnist;
pub mod predict;
pub mod serve;
pub mod train;
