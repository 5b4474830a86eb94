//! Every CUDA kernel, by name and file: the one place kernel names are spelled. Versions of a kernel
//! live side by side (`*_V1`, later `*_V2`, ...); the unversioned constant names the default the
//! backend launches, and benchmarks can launch the others.

/// A kernel: its `extern "C"` name, the kernels/ file that defines it, and the threads per block it
/// is launched with (what the static report computes occupancy from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub file: &'static str,
    pub threads: u32,
}

macro_rules! kernels {
    ($($id:ident = $file:literal : $name:literal @ $threads:expr;)*) => {
        $(pub const $id: Kernel = Kernel { name: $name, file: $file, threads: $threads };)*
        /// Every kernel of every version.
        pub const ALL: &[Kernel] = &[$($id),*];
    };
}

kernels! {
    CONV2D_FWD_V1 = "conv.cu": "conv2d_fwd_v1" @ GEMM_THREADS;
    CONV2D_BWD_INPUT_V1 = "conv.cu": "conv2d_bwd_input_v1" @ GEMM_THREADS;
    CONV2D_BWD_WEIGHT_V1 = "conv.cu": "conv2d_bwd_weight_v1" @ GEMM_THREADS;
    DENSE_FWD_V1 = "dense.cu": "dense_fwd_v1" @ GEMM_THREADS;
    DENSE_BWD_INPUT_V1 = "dense.cu": "dense_bwd_input_v1" @ GEMM_THREADS;
    DENSE_BWD_WEIGHT_V1 = "dense.cu": "dense_bwd_weight_v1" @ GEMM_THREADS;
    FILL = "elementwise.cu": "fill_f32" @ FLAT_THREADS;
    ADD_ASSIGN = "elementwise.cu": "add_assign_f32" @ FLAT_THREADS;
    ADD_FWD = "elementwise.cu": "add_fwd_f32" @ FLAT_THREADS;
    ACT_BWD = "elementwise.cu": "act_bwd_f32" @ FLAT_THREADS;
    BIAS_BWD = "elementwise.cu": "bias_bwd_f32" @ BIAS_BWD_THREADS;
    SQ_ERR_FWD = "elementwise.cu": "sq_err_fwd_f32" @ SQ_ERR_FWD_THREADS;
    SQ_ERR_BWD = "elementwise.cu": "sq_err_bwd_f32" @ FLAT_THREADS;
    ADAM_STEP_V1 = "adam.cu": "adam_step_v1" @ FLAT_THREADS;
    SQUASH_FWD = "capsules.cu": "squash_fwd" @ FLAT_THREADS;
    SQUASH_BWD = "capsules.cu": "squash_bwd" @ FLAT_THREADS;
    PREDICT_FWD = "capsules.cu": "predict_fwd" @ FLAT_THREADS;
    PREDICT_BWD_INPUT = "capsules.cu": "predict_bwd_input" @ FLAT_THREADS;
    PREDICT_BWD_WEIGHT = "capsules.cu": "predict_bwd_weight" @ FLAT_THREADS;
    LENGTHS_FWD = "capsules.cu": "lengths_fwd" @ FLAT_THREADS;
    LENGTHS_BWD = "capsules.cu": "lengths_bwd" @ FLAT_THREADS;
    MASK_FWD = "capsules.cu": "mask_fwd" @ FLAT_THREADS;
    MASK_BWD = "capsules.cu": "mask_bwd" @ FLAT_THREADS;
    ARGMAX = "capsules.cu": "argmax_f32" @ FLAT_THREADS;
    MARGIN_LOSS_FWD = "capsules.cu": "margin_loss_fwd" @ MARGIN_LOSS_FWD_THREADS;
    MARGIN_LOSS_BWD = "capsules.cu": "margin_loss_bwd" @ FLAT_THREADS;
    ROUTING_FWD_V1 = "routing.cu": "routing_fwd_v1" @ ROUTING_THREADS;
    ROUTING_BWD_V1 = "routing.cu": "routing_bwd_v1" @ ROUTING_THREADS;
    ROUTING_FWD_V2 = "routing.cu": "routing_fwd_v2" @ ROUTING_THREADS;
    ROUTING_BWD_V2 = "routing.cu": "routing_bwd_v2" @ ROUTING_THREADS;
}

// The defaults the backend launches.
pub const CONV2D_FWD: Kernel = CONV2D_FWD_V1;
pub const CONV2D_BWD_INPUT: Kernel = CONV2D_BWD_INPUT_V1;
pub const CONV2D_BWD_WEIGHT: Kernel = CONV2D_BWD_WEIGHT_V1;
pub const DENSE_FWD: Kernel = DENSE_FWD_V1;
pub const DENSE_BWD_INPUT: Kernel = DENSE_BWD_INPUT_V1;
pub const DENSE_BWD_WEIGHT: Kernel = DENSE_BWD_WEIGHT_V1;
pub const ADAM_STEP: Kernel = ADAM_STEP_V1;
/// Routing: v1 (all state in shared memory) where it fits the device, else v2 (state in global
/// memory, any number of input capsules); see CudaBackend::routing_kernel.
pub const ROUTING_FWD: Kernel = ROUTING_FWD_V1;
pub const ROUTING_BWD: Kernel = ROUTING_BWD_V1;

/// Threads per block of the GEMM kernels and their output tile (GEMM_BM = GEMM_BN) and K step.
pub const GEMM_THREADS: u32 = 256;
pub const GEMM_TILE: usize = 64;
pub const GEMM_K_STEP: usize = 16;
/// Block sizes the reduction kernels are written for.
pub const BIAS_BWD_THREADS: u32 = 256;
pub const SQ_ERR_FWD_THREADS: u32 = 1024;
pub const MARGIN_LOSS_FWD_THREADS: u32 = 256;
pub const ROUTING_THREADS: u32 = 256;
/// Threads per block of the grid-stride kernels (and of the Adam step).
pub const FLAT_THREADS: u32 = 256;

/// The constants above as the kernels see them: every compile (NVRTC, and g++ for the emulated
/// device) gets them as `-DNAME=VALUE`, so they are written once, here.
pub const DEFINES: &[(&str, usize)] = &[
    ("GEMM_BM", GEMM_TILE),
    ("GEMM_BN", GEMM_TILE),
    ("GEMM_BK", GEMM_K_STEP),
    ("GEMM_THREADS", GEMM_THREADS as usize),
    ("BIAS_BWD_THREADS", BIAS_BWD_THREADS as usize),
    ("SQ_ERR_FWD_THREADS", SQ_ERR_FWD_THREADS as usize),
    ("MARGIN_LOSS_FWD_THREADS", MARGIN_LOSS_FWD_THREADS as usize),
    ("ROUTING_THREADS", ROUTING_THREADS as usize),
];

/// [`DEFINES`] as compiler options.
pub fn define_flags() -> Vec<String> {
    DEFINES.iter().map(|(k, v)| format!("-D{k}={v}")).collect()
}
