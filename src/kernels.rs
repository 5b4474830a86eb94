//! The CUDA kernel sources embedded by build.rs (see kernels/README.md).

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
