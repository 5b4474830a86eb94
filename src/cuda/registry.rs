//! Every CUDA kernel, by name and file: the one place kernel names are spelled, with the launch
//! geometry each is written for. An op (a convolution's forward, a dense layer's input gradient,
//! routing, ...) can have several versions side by side; [`OPS`] lists them, names the default, and
//! says which precision each computes in. A backend is built with a [`KernelSet`]: the defaults, then
//! `--precision` (tf32/bf16 versions where an op has them), then `CAPSNET_KERNELS=op=version,...`.
//! Version 1 of every op stays as the simplest correct one.

use crate::{Error, Result};

/// A kernel: its `extern "C"` name, the kernels/ file that defines it, the threads per block it is
/// launched with (what the static report computes occupancy from) and, for a GEMM, the output tile
/// (rows, columns) one block computes; (0, 0) otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub file: &'static str,
    pub threads: u32,
    pub tile: (u32, u32),
}

macro_rules! kernels {
    ($($id:ident = $file:literal : $name:literal @ $threads:expr $(, tile $tile:expr)?;)*) => {
        $(pub const $id: Kernel = Kernel {
            name: $name,
            file: $file,
            threads: $threads,
            tile: kernels!(@tile $($tile)?),
        };)*
        /// Every kernel of every version.
        pub const ALL: &[Kernel] = &[$($id),*];
    };
    (@tile) => { (0, 0) };
    (@tile $t:expr) => { $t };
}

kernels! {
    CONV2D_FWD_V1 = "conv.cu": "conv2d_fwd_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    CONV2D_BWD_INPUT_V1 = "conv.cu": "conv2d_bwd_input_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    CONV2D_BWD_COLS_V2 = "conv.cu": "conv2d_bwd_cols_v2" @ GEMM_THREADS, tile GEMM_TILE_2D;
    COL2IM_ADD_V2 = "conv.cu": "col2im_add_v2" @ FLAT_THREADS;
    CONV2D_BWD_WEIGHT_V1 = "conv.cu": "conv2d_bwd_weight_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    DENSE_FWD_V1 = "dense.cu": "dense_fwd_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    DENSE_BWD_INPUT_V1 = "dense.cu": "dense_bwd_input_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    DENSE_BWD_WEIGHT_V1 = "dense.cu": "dense_bwd_weight_v1" @ GEMM_THREADS, tile GEMM_TILE_2D;
    CONV2D_FWD_TF32 = "conv.cu": "conv2d_fwd_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    CONV2D_FWD_BF16 = "conv.cu": "conv2d_fwd_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    CONV2D_BWD_COLS_TF32 = "conv.cu": "conv2d_bwd_cols_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    CONV2D_BWD_COLS_BF16 = "conv.cu": "conv2d_bwd_cols_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    CONV2D_BWD_WEIGHT_TF32 = "conv.cu": "conv2d_bwd_weight_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    CONV2D_BWD_WEIGHT_BF16 = "conv.cu": "conv2d_bwd_weight_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_FWD_TF32 = "dense.cu": "dense_fwd_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_FWD_BF16 = "dense.cu": "dense_fwd_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_BWD_INPUT_TF32 = "dense.cu": "dense_bwd_input_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_BWD_INPUT_BF16 = "dense.cu": "dense_bwd_input_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_BWD_WEIGHT_TF32 = "dense.cu": "dense_bwd_weight_tf32" @ MMA_THREADS, tile MMA_TILE_2D;
    DENSE_BWD_WEIGHT_BF16 = "dense.cu": "dense_bwd_weight_bf16" @ MMA_THREADS, tile MMA_TILE_2D;
    FILL = "elementwise.cu": "fill_f32" @ FLAT_THREADS;
    ADD_ASSIGN = "elementwise.cu": "add_assign_f32" @ FLAT_THREADS;
    ADD_FWD = "elementwise.cu": "add_fwd_f32" @ FLAT_THREADS;
    ACT_BWD = "dense.cu": "act_bwd_f32" @ FLAT_THREADS;
    BIAS_BWD = "dense.cu": "bias_bwd_f32" @ BIAS_BWD_THREADS;
    SQ_ERR_FWD = "losses.cu": "sq_err_fwd_f32" @ SQ_ERR_FWD_THREADS;
    SQ_ERR_BWD = "losses.cu": "sq_err_bwd_f32" @ FLAT_THREADS;
    SPLITK_REDUCE_ADD = "elementwise.cu": "splitk_reduce_add" @ FLAT_THREADS;
    GATHER_BATCH = "runtime.cu": "gather_batch" @ FLAT_THREADS;
    ADAM_STEP_V1 = "adam.cu": "adam_step_v1" @ FLAT_THREADS;
    PLAN_ADVANCE = "runtime.cu": "plan_advance" @ 1;
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
    MARGIN_LOSS_FWD = "losses.cu": "margin_loss_fwd" @ MARGIN_LOSS_FWD_THREADS;
    MARGIN_LOSS_BWD = "losses.cu": "margin_loss_bwd" @ FLAT_THREADS;
    STEP_SUMMARY = "runtime.cu": "step_summary" @ MARGIN_LOSS_FWD_THREADS;
    ROUTING_FWD_V1 = "routing.cu": "routing_fwd_v1" @ ROUTING_THREADS;
    ROUTING_BWD_V1 = "routing.cu": "routing_bwd_v1" @ ROUTING_THREADS;
    ROUTING_FWD_V2 = "routing.cu": "routing_fwd_v2" @ ROUTING_THREADS;
    ROUTING_BWD_V2 = "routing.cu": "routing_bwd_v2" @ ROUTING_THREADS;
    CAPS_ROUTE_FWD_PARTIAL = "caps_routing.cu": "caps_route_fwd_partial" @ ROUTING_THREADS;
    CAPS_ROUTE_FWD_REDUCE = "caps_routing.cu": "caps_route_fwd_reduce" @ ROUTING_THREADS;
    CAPS_ROUTE_BWD_REDUCE = "caps_routing.cu": "caps_route_bwd_reduce" @ ROUTING_THREADS;
    CAPS_ROUTE_BWD_PARTIAL = "caps_routing.cu": "caps_route_bwd_partial" @ ROUTING_THREADS;
    CAPS_ROUTE_BWD_INPUT = "caps_routing.cu": "caps_route_bwd_input" @ ROUTING_THREADS;
    CAPS_ROUTE_BWD_WEIGHT = "caps_routing.cu": "caps_route_bwd_weight" @ ROUTING_THREADS;
}

pub use crate::float::Precision;

/// One version of an op: its label ("v1", "v2", "tf32", ...), what it computes in, the kernels it
/// launches (in launch order) and one line on how it works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub label: &'static str,
    pub precision: Precision,
    pub kernels: &'static [Kernel],
    pub about: &'static str,
}

/// An op with its versions; `default` labels the fp32 version a backend launches unless told otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub name: &'static str,
    pub versions: &'static [Version],
    pub default: &'static str,
}

/// An index into [`OPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpId(pub usize);

const fn v(label: &'static str, precision: Precision, kernels: &'static [Kernel], about: &'static str) -> Version {
    Version {
        label,
        precision,
        kernels,
        about,
    }
}
use Precision::*;

pub const CONV2D_FWD: OpId = OpId(0);
pub const CONV2D_BWD_INPUT: OpId = OpId(1);
pub const CONV2D_BWD_WEIGHT: OpId = OpId(2);
pub const DENSE_FWD: OpId = OpId(3);
pub const DENSE_BWD_INPUT: OpId = OpId(4);
pub const DENSE_BWD_WEIGHT: OpId = OpId(5);
pub const ROUTING: OpId = OpId(6);

const SIMT: &str = "64x64 tile, 4x4 outputs per thread, fp32 FMAs, index arithmetic per element";
const TC: &str = "mma.sync 64x64x32 tile, 4 warps of 32x32, offsets once per row and K-tile, double-buffered";
const TC_SPLIT: &str =
    "the tensor-core GEMM, split over K when it has fewer tiles than the GPU has SMs, slices summed in order";

/// Every op with versions, indexed by the [`OpId`] constants above.
pub const OPS: &[Op] = &[
    Op {
        name: "conv2d_fwd",
        versions: &[
            v("v1", Fp32, &[CONV2D_FWD_V1], SIMT),
            v("tf32", Tf32, &[CONV2D_FWD_TF32], TC),
            v("bf16", Bf16, &[CONV2D_FWD_BF16], TC),
        ],
        default: "v1",
    },
    Op {
        name: "conv2d_bwd_input",
        versions: &[
            v(
                "v1",
                Fp32,
                &[CONV2D_BWD_INPUT_V1],
                "gathers over every tap of the zero-stuffed gradient",
            ),
            v(
                "v2",
                Fp32,
                &[CONV2D_BWD_COLS_V2, COL2IM_ADD_V2],
                "cols = dz·Wᵀ as a GEMM, then a fixed-order col2im sum (no zero taps)",
            ),
            v(
                "tf32",
                Tf32,
                &[CONV2D_BWD_COLS_TF32, COL2IM_ADD_V2],
                "v2 with the cols GEMM on tensor cores",
            ),
            v(
                "bf16",
                Bf16,
                &[CONV2D_BWD_COLS_BF16, COL2IM_ADD_V2],
                "v2 with the cols GEMM on tensor cores",
            ),
        ],
        default: "v2",
    },
    Op {
        name: "conv2d_bwd_weight",
        versions: &[
            v("v1", Fp32, &[CONV2D_BWD_WEIGHT_V1], SIMT),
            v("tf32", Tf32, &[CONV2D_BWD_WEIGHT_TF32, SPLITK_REDUCE_ADD], TC_SPLIT),
            v("bf16", Bf16, &[CONV2D_BWD_WEIGHT_BF16, SPLITK_REDUCE_ADD], TC_SPLIT),
        ],
        default: "v1",
    },
    Op {
        name: "dense_fwd",
        versions: &[
            v("v1", Fp32, &[DENSE_FWD_V1], SIMT),
            v("tf32", Tf32, &[DENSE_FWD_TF32], TC),
            v("bf16", Bf16, &[DENSE_FWD_BF16], TC),
        ],
        default: "v1",
    },
    Op {
        name: "dense_bwd_input",
        versions: &[
            v("v1", Fp32, &[DENSE_BWD_INPUT_V1], SIMT),
            v("tf32", Tf32, &[DENSE_BWD_INPUT_TF32], TC),
            v("bf16", Bf16, &[DENSE_BWD_INPUT_BF16], TC),
        ],
        default: "v1",
    },
    Op {
        name: "dense_bwd_weight",
        versions: &[
            v("v1", Fp32, &[DENSE_BWD_WEIGHT_V1], SIMT),
            v("tf32", Tf32, &[DENSE_BWD_WEIGHT_TF32, SPLITK_REDUCE_ADD], TC_SPLIT),
            v("bf16", Bf16, &[DENSE_BWD_WEIGHT_BF16, SPLITK_REDUCE_ADD], TC_SPLIT),
        ],
        default: "v1",
    },
    Op {
        name: "routing",
        versions: &[
            v(
                "v1",
                Fp32,
                &[ROUTING_FWD_V1, ROUTING_BWD_V1],
                "û stored by predict_fwd; all per-image state in shared memory; v2 where it does not fit",
            ),
            v(
                "v2",
                Fp32,
                &[ROUTING_FWD_V2, ROUTING_BWD_V2],
                "couplings and db in global memory, any number of input capsules",
            ),
            v(
                "fused",
                Fp32,
                &[
                    CAPS_ROUTE_FWD_PARTIAL,
                    CAPS_ROUTE_FWD_REDUCE,
                    CAPS_ROUTE_BWD_REDUCE,
                    CAPS_ROUTE_BWD_PARTIAL,
                    CAPS_ROUTE_BWD_INPUT,
                    CAPS_ROUTE_BWD_WEIGHT,
                ],
                "prediction fused in: û recomputed per chunk of capsules, never stored; chunk sums reduced in order",
            ),
        ],
        default: "fused",
    },
];

/// The precision the command line picks for the CUDA backend when `--precision` is not given: bf16,
/// chosen by accuracy. The same short run (one pass over 3,200 MNIST images, batch 32, then 1,000
/// validation images) on the CPU reference rounding every GEMM input as each precision's kernels do
/// (`cargo bench --bench precision`) ended at validation loss 0.1055 / accuracy 93.2% in fp32, 0.1053 /
/// 92.9% in tf32 and 0.1042 / 93.3% in bf16 (docs/BENCHMARKS.md). [`KernelSet::default`] stays the
/// exact fp32 set, the one the parity suite holds every other set to.
pub const DEFAULT_PRECISION: Precision = Precision::Bf16;

/// The versions a backend launches, one per op of [`OPS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSet {
    chosen: Vec<usize>,
}

impl Default for KernelSet {
    fn default() -> Self {
        KernelSet::for_precision(Precision::Fp32)
    }
}

impl KernelSet {
    /// The defaults, with every op that has a version in `p` switched to it (fp32: the defaults).
    pub fn for_precision(p: Precision) -> KernelSet {
        let chosen = OPS
            .iter()
            .map(|op| {
                let default = op
                    .versions
                    .iter()
                    .position(|v| v.label == op.default)
                    .expect("the default is a version");
                if p == Precision::Fp32 {
                    default
                } else {
                    op.versions.iter().position(|v| v.precision == p).unwrap_or(default)
                }
            })
            .collect();
        KernelSet { chosen }
    }

    /// The version of `op` this set launches.
    pub fn version(&self, op: OpId) -> &'static Version {
        &OPS[op.0].versions[self.chosen[op.0]]
    }

    /// Launch version `label` of the op named `op`.
    pub fn set(&mut self, op: &str, label: &str) -> Result<()> {
        let i = OPS.iter().position(|o| o.name == op).ok_or_else(|| {
            let names: Vec<&str> = OPS.iter().map(|o| o.name).collect();
            Error::msg(format!("no op named {op:?} (ops with versions: {})", names.join(", ")))
        })?;
        let j = OPS[i].versions.iter().position(|v| v.label == label).ok_or_else(|| {
            let labels: Vec<&str> = OPS[i].versions.iter().map(|v| v.label).collect();
            Error::msg(format!("{op} has no version {label:?} (it has {})", labels.join(", ")))
        })?;
        self.chosen[i] = j;
        Ok(())
    }

    /// Applies `op=version,op=version,...` (what `CAPSNET_KERNELS` holds); `source` names where the
    /// text came from in errors.
    pub fn apply(&mut self, spec: &str, source: &str) -> Result<()> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (op, label) = item
                .split_once('=')
                .ok_or_else(|| Error::msg(format!("{source}: {item:?} is not op=version")))?;
            self.set(op.trim(), label.trim())
                .map_err(|e| Error::msg(format!("{source}: {e}")))?;
        }
        Ok(())
    }

    /// This set changed by `CAPSNET_KERNELS=op=version,...` when the variable is set.
    pub fn with_env(mut self) -> Result<KernelSet> {
        if let Ok(spec) = std::env::var("CAPSNET_KERNELS") {
            self.apply(&spec, "CAPSNET_KERNELS")?;
        }
        Ok(self)
    }

    /// The set as `op=version,...`, every op named.
    pub fn describe(&self) -> String {
        OPS.iter()
            .zip(&self.chosen)
            .map(|(o, &j)| format!("{}={}", o.name, o.versions[j].label))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The sets that launch every version of every op at least once: for each op and version, the
    /// defaults with that one version chosen.
    pub fn each_version() -> Vec<(OpId, KernelSet)> {
        let mut out = vec![];
        for (i, op) in OPS.iter().enumerate() {
            for v in op.versions {
                let mut ks = KernelSet::default();
                ks.set(op.name, v.label).expect("a listed version");
                out.push((OpId(i), ks));
            }
        }
        out
    }
}

/// Threads per block of the v1 GEMM kernels and their output tile (GEMM_BM = GEMM_BN) and K step.
pub const GEMM_THREADS: u32 = 256;
pub const GEMM_TILE: usize = 64;
const GEMM_TILE_2D: (u32, u32) = (GEMM_TILE as u32, GEMM_TILE as u32);
pub const GEMM_K_STEP: usize = 16;
/// Threads per block of the tensor-core GEMMs (gemm_mma.cuh), their output tile and K step.
pub const MMA_THREADS: u32 = 128;
pub const MMA_TILE: usize = 64;
const MMA_TILE_2D: (u32, u32) = (MMA_TILE as u32, MMA_TILE as u32);
pub const MMA_K_STEP: usize = 32;
/// Block sizes the reduction kernels are written for.
pub const BIAS_BWD_THREADS: u32 = 256;
pub const SQ_ERR_FWD_THREADS: u32 = 1024;
pub const MARGIN_LOSS_FWD_THREADS: u32 = 256;
pub const ROUTING_THREADS: u32 = 256;
/// Threads per block of the grid-stride kernels (and of the Adam step).
pub const FLAT_THREADS: u32 = 256;
/// The most floats conv2d_bwd_input v2 holds in its cols buffer at once (64 MiB): a batch whose
/// cols are larger runs in chunks of images.
pub const COLS_CHUNK_FLOATS: usize = 16 << 20;
/// A split-K slice sums at least this many K steps (of MMA_K_STEP), so that a slice's loads and its
/// share of the reduction stay small against its multiplies.
pub const SPLITK_MIN_STEPS: usize = 4;
/// The fused routing kernels take no more dynamic shared memory than every GPU gives without opting in.
pub const FUSED_SMEM_BYTES: usize = 48 << 10;
/// The capsule layer's sizes, as the routing kernels' launch geometry needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsDims {
    /// I: primary capsules.
    pub in_caps: usize,
    /// Primary capsule dimension.
    pub in_dim: usize,
    /// J: digit capsules.
    pub out_caps: usize,
    /// Digit capsule dimension.
    pub out_dim: usize,
}

/// The most input capsules one block of a fused routing kernel takes (its chunk).
pub const FUSED_MAX_CHUNK: usize = 16;
/// The largest primary capsule dimension the fused version's weight gradient takes (CAPS_MAX_IN_DIM
/// in src/ops/routing/caps_routing.cu).
pub const FUSED_MAX_IN_DIM: usize = 16;

/// How fused routing kernel `k` is launched at shape `s` over `rounds` rounds: the input capsules one
/// block takes (0 for the per-image reduce kernels) and its dynamic shared memory in bytes. The chunk is
/// the largest (up to [`FUSED_MAX_CHUNK`]) whose arrays fit [`FUSED_SMEM_BYTES`]; it depends on the
/// shape alone, so a run's sums do not depend on the GPU.
pub fn fused_routing_plan(k: Kernel, s: &CapsDims, rounds: usize) -> Result<(usize, u32)> {
    let (j, d, e, r) = (s.out_caps, s.out_dim, s.in_dim, rounds.max(1));
    let (jd, jde) = (j * d, j * d * e);
    // floats per capsule of the chunk, and floats whatever the chunk
    let (per, fixed) = match k {
        CAPS_ROUTE_FWD_REDUCE => return Ok((0, (4 * 2 * jd) as u32)),
        CAPS_ROUTE_BWD_REDUCE => return Ok((0, (4 * jd) as u32)),
        CAPS_ROUTE_FWD_PARTIAL => (jde + e + jd + j, (r - 1) * jd),
        CAPS_ROUTE_BWD_PARTIAL => (jde + e + jd + 2 * j, jd),
        CAPS_ROUTE_BWD_INPUT => (jde + jd + (2 * r - 1) * j, (2 * r - 1) * jd),
        // one thread per (i, j, d) with in_dim sums in registers; no shared memory
        CAPS_ROUTE_BWD_WEIGHT if e <= FUSED_MAX_IN_DIM => return Ok((0, 0)),
        CAPS_ROUTE_BWD_WEIGHT => {
            return Err(Error::msg(format!(
                "routing (fused): primary capsules of {e} dimensions; its weight gradient holds at most {FUSED_MAX_IN_DIM} per thread"
            )));
        }
        other => return Err(Error::msg(format!("{} is not a fused routing kernel", other.name))),
    };
    let room = (FUSED_SMEM_BYTES / 4).saturating_sub(fixed);
    let chunk = (room / per).min(FUSED_MAX_CHUNK).min(s.in_caps.max(1));
    if chunk == 0 {
        return Err(Error::msg(format!(
            "routing (fused): {} digit capsules of {d} x {e} weights over {rounds} rounds need {} bytes of shared memory per block, more than {FUSED_SMEM_BYTES}",
            j,
            4 * (per + fixed)
        )));
    }
    Ok((chunk, (4 * (chunk * per + fixed)) as u32))
}

/// The unversioned ops' kernels.
pub const ADAM_STEP: Kernel = ADAM_STEP_V1;

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
    ("CAPS_MAX_IN_DIM", FUSED_MAX_IN_DIM),
    ("FLAT_THREADS", FLAT_THREADS as usize),
    ("MMA_BM", MMA_TILE),
    ("MMA_BN", MMA_TILE),
    ("MMA_BK", MMA_K_STEP),
    ("MMA_THREADS", MMA_THREADS as usize),
];

/// [`DEFINES`] as compiler options.
pub fn define_flags() -> Vec<String> {
    DEFINES.iter().map(|(k, v)| format!("-D{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_ids_index_their_ops() {
        for (id, name) in [
            (CONV2D_FWD, "conv2d_fwd"),
            (CONV2D_BWD_INPUT, "conv2d_bwd_input"),
            (CONV2D_BWD_WEIGHT, "conv2d_bwd_weight"),
            (DENSE_FWD, "dense_fwd"),
            (DENSE_BWD_INPUT, "dense_bwd_input"),
            (DENSE_BWD_WEIGHT, "dense_bwd_weight"),
            (ROUTING, "routing"),
        ] {
            assert_eq!(OPS[id.0].name, name);
        }
        for op in OPS {
            assert!(
                op.versions
                    .iter()
                    .any(|v| v.label == op.default && v.precision == Precision::Fp32)
            );
            for v in op.versions {
                assert!(v.kernels.iter().all(|k| ALL.contains(k)), "{} {}", op.name, v.label);
            }
        }
    }

    #[test]
    fn kernel_sets_parse_and_refuse() {
        let mut ks = KernelSet::default();
        assert_eq!(ks.version(CONV2D_BWD_INPUT).label, "v2");
        ks.apply("conv2d_bwd_input=v1, routing=v2", "CAPSNET_KERNELS").unwrap();
        assert_eq!(ks.version(CONV2D_BWD_INPUT).label, "v1");
        assert_eq!(ks.version(ROUTING).label, "v2");
        assert!(ks.describe().contains("conv2d_bwd_input=v1"));
        let e = ks
            .apply("conv2d_bwd_input=v9", "CAPSNET_KERNELS")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CAPSNET_KERNELS") && e.contains("v9") && e.contains("v1, v2"),
            "{e}"
        );
        let e = ks.apply("nope=v1", "X").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("conv2d_fwd"), "{e}");
        let e = ks.apply("routing", "X").unwrap_err().to_string();
        assert!(e.contains("op=version"), "{e}");
        let n: usize = OPS.iter().map(|o| o.versions.len()).sum();
        assert_eq!(KernelSet::each_version().len(), n);
    }
}
