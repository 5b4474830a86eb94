//! The CUDA kernel sources and the emulated device's sources, embedded by build.rs (see
//! kernels/README.md and kernels/emulator/README.md).

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
